"""What makes training fast on the hardware at hand, kept apart from what training does.

- **precision**: which reduced precision the CPU/GPU runs natively (:func:`resolve_precision`);
- **malloc tuning** (:func:`tune_malloc`): keep glibc from returning and page-faulting each
  step's activations again.  It changes a process-wide setting, so only processes that are
  ours call it (the CLI, the napari widget's training process), never napari's own;
- **whole-batch loading** (:class:`BatchLoader`) for in-memory data sets;
- **a fused RMSprop** (:class:`FusedRMSprop`).

Each one is measured in docs/benchmarks.md ("Training throughput").

The fused RMSprop runs its whole update in one pass over memory (CPU, float32).

``torch.optim.RMSprop`` updates each parameter with five separate tensor operations (``mul_``,
``addcmul_``, ``sqrt``, ``add_``, ``addcdiv_``), each reading and writing whole tensors again.
At the small batches cell crops are trained with, that made the optimizer ~13 % of a training
step on the project's 2-core benchmark machine (docs/benchmarks.md, "Training throughput").
:class:`FusedRMSprop` runs the same update as one numba loop (numba comes with
umap-learn).  It has the same hyper-parameters and the same state (``step``,
``square_avg``), so checkpoints load in either optimizer.  Results agree with torch's to float
rounding: torch's vectorised ``sqrt`` is not always correctly rounded, numba's is.
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = [
    "AUTOCAST_DTYPES",
    "BatchLoader",
    "FusedRMSprop",
    "bf16_native",
    "bf16_supported",
    "fp16_supported",
    "resolve_precision",
    "tune_malloc",
]


# -- precision ---------------------------------------------------------------------------------
def bf16_supported(device: torch.device) -> bool:
    """bfloat16 compute is available: oneDNN bf16 on CPU (native or emulated on AVX-512),
    bf16-capable GPUs."""
    if device.type == "cpu":
        mkldnn = torch.backends.mkldnn
        return bool(mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False


def fp16_supported(device: torch.device) -> bool:
    """float16 autocast and loss scaling run: any CUDA GPU, and CPUs (emulated, slow)."""
    return device.type in ("cuda", "cpu")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_native(device: torch.device) -> bool:
    """bfloat16 runs in hardware (faster than float32): CPUs with avx512_bf16 or AMX (Linux),
    GPUs from Ampere on (compute capability 8).  On AVX-512 CPUs without them oneDNN only
    emulates bf16, and so does torch on older GPUs (T4, V100), where float16 is the fast one."""
    if device.type == "cpu":
        return bf16_supported(device) and bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run actually uses: ``"bf16"``, ``"fp16"`` or ``"float32"``."""
    if precision == "bf16":
        return "bf16" if bf16_supported(device) else "float32"
    if precision == "fp16":
        return "fp16" if fp16_supported(device) else "float32"
    if precision == "auto":
        if bf16_native(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "float32"
    return "float32"


#: autocast dtype of each reduced precision
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# -- malloc ----------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
_malloc_lock = threading.Lock()
_malloc_users = 0


def tune_malloc() -> Any:
    """Keep big freed blocks in the heap for the duration of training (glibc only).

    By default glibc serves every block above 128 KiB-32 MiB with a fresh mmap and gives it
    back on free, so each training step page-faults all its activations in again (tens of
    thousands of faults per step at batch 10, S=128: ~10% of the step).  Returns a callable
    that restores glibc's defaults and releases the cached memory, or None if not applicable.
    """
    global _malloc_users
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl...)
        return None
    with _malloc_lock:
        if _malloc_users == 0:
            if not (mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)):
                return None
            mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        _malloc_users += 1

    def restore() -> None:
        global _malloc_users
        with _malloc_lock:
            _malloc_users -= 1
            if _malloc_users == 0:
                mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
                mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
                malloc_trim(0)

    return restore


# -- batches -------------------------------------------------------------------------------------
class BatchLoader:
    """Whole batches straight from an in-memory data set, instead of a DataLoader collating
    ``batch`` single items: ``dataset.get_batch(indices)`` or, for a ``TensorDataset``, its
    tensors indexed at once.  Same batches, in the same order, as
    ``DataLoader(dataset, batch_size, sampler=sampler, drop_last=False)``."""

    def __init__(self, dataset: Any, sampler: Sampler[int], batch_size: int) -> None:
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size

    @staticmethod
    def supports(dataset: Any) -> bool:
        return callable(getattr(dataset, "get_batch", None)) or isinstance(
            dataset, torch.utils.data.TensorDataset
        )

    def fetch(self, indices: torch.Tensor):
        get_batch = getattr(self.dataset, "get_batch", None)
        if callable(get_batch):
            return get_batch(indices)
        return tuple(t[indices] for t in self.dataset.tensors)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)  # type: ignore[arg-type]

    def __iter__(self):
        # a DataLoader iterator draws its base seed from the global generator: draw it too, so
        # the model's sampling noise (and so every loss) is the same on both paths
        torch.empty((), dtype=torch.int64).random_()
        order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        for start in range(0, len(order), self.batch_size):
            yield self.fetch(order[start : start + self.batch_size])


# -- fused RMSprop -------------------------------------------------------------------------------
# the jitted update: None = not tried yet in this process, False = unavailable
_KERNEL: Any = None
_KERNEL_LOCK = threading.Lock()  # two trainers starting at once compile it once


def _load_kernel() -> Callable[..., None] | None:
    """Compile the update loop once per process (~1 s, with numba's import); ``None`` if numba
    cannot.

    One thread, on purpose: the loop is bound by memory traffic, a parallel version was only
    ~0.2 ms per step faster, and numba's thread pools would need a process-wide threading
    layer shared with UMAP (which the napari plugin may run while training)."""
    global _KERNEL
    if _KERNEL is not None:  # every step after the first: no lock
        return _KERNEL or None
    with _KERNEL_LOCK:
        if _KERNEL is None:
            _KERNEL = False
            try:
                import numba

                # error_model="numpy": a float division by zero gives inf instead of raising,
                # which drops a check per element and lets the loop vectorise (8x faster, same
                # results)
                @numba.njit(cache=False, nogil=True, error_model="numpy")
                def update(p, g, sq, neg_lr, alpha, one_minus_alpha, eps):  # type: ignore[no-untyped-def]
                    for i in range(p.size):
                        s = sq[i] * alpha + one_minus_alpha * g[i] * g[i]
                        sq[i] = s
                        p[i] = p[i] + neg_lr * g[i] / (np.sqrt(s) + eps)

                x, one = np.zeros(2, np.float32), np.float32(1)
                update(x, x.copy(), x.copy(), one, one, one, one)  # compile now
                _KERNEL = update
            except Exception:  # no numba or no compiler backend: torch's step
                _KERNEL = False
    return _KERNEL or None


def _flat(t: torch.Tensor) -> np.ndarray | None:
    """A 1-D numpy view of a dense float32 CPU tensor's memory, in memory order (also for
    channels_last tensors); ``None`` for any other layout."""
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.is_sparse:
        return None
    if t.is_contiguous():
        return t.view(-1).numpy()
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.as_strided((t.numel(),), (1,), t.storage_offset()).numpy()
    return None


class FusedRMSprop(torch.optim.RMSprop):
    """``torch.optim.RMSprop`` whose plain update (no momentum, not centered, no weight decay)
    runs as one fused loop on CPU float32 parameters; anything else runs torch's own step."""

    def __init__(self, params: Any, lr: float = 1e-2, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, **kwargs)
        self.last_step_fused = False  # whether the previous step ran the fused loop

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's, without its per-call bookkeeping (~0.2 ms a step at 34 tensors)."""
        if not set_to_none:
            super().zero_grad(set_to_none=False)
            return
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _fusable(self) -> bool:
        for group in self.param_groups:
            if (
                group["momentum"] != 0
                or group["centered"]
                or group["weight_decay"] != 0
                or group.get("maximize", False)
                or group.get("differentiable", False)
                or group.get("capturable", False)
            ):
                return False
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kernel = _load_kernel() if self._fusable() else None
        work = None if kernel is None else self._fused_work()
        self.last_step_fused = work is not None
        if kernel is None or work is None:
            super().step()
            return loss
        f32 = np.float32
        for group, state, sq, (pv, gv, sv) in work:
            if not state:  # as torch initialises it, so state dicts stay interchangeable
                state["step"] = torch.zeros((), dtype=_scalar_dtype())
                state["square_avg"] = sq
            state["step"] += 1
            alpha = float(group["alpha"])
            kernel(
                pv, gv, sv, f32(-float(group["lr"])), f32(alpha), f32(1 - alpha), f32(group["eps"])
            )
        return loss

    def _fused_work(self) -> list[tuple] | None:
        """What the fused loop would update, or ``None`` when a tensor cannot be viewed flat
        and torch's step must run."""
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                sq = state.get("square_avg")
                if sq is None:
                    sq = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif sq.stride() != p.stride():  # e.g. loaded from a checkpoint: follow p
                    sq = state["square_avg"] = torch.empty_like(p).copy_(sq)
                views = [_flat(t) for t in (p.detach(), p.grad, sq)]
                if not p.stride() == p.grad.stride() == sq.stride() or any(
                    v is None for v in views
                ):
                    return None
                work.append((group, state, sq, views))
        return work


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
