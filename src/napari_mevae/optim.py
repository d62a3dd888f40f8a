"""RMSprop with its whole update fused into one pass over memory (CPU, float32).

``torch.optim.RMSprop`` updates each parameter with five separate tensor operations (``mul_``,
``addcmul_``, ``sqrt``, ``add_``, ``addcdiv_``), each reading and writing whole tensors again.
At the small batches cell crops are trained with, that made the optimizer ~13 % of a training
step on the project's 2-core benchmark machine (docs/benchmarks.md, "Training throughput").
:class:`FusedRMSprop` runs the same update as one parallel numba loop (numba comes with
umap-learn).  It has the same hyper-parameters and the same state (``step``,
``square_avg``), so checkpoints load in either optimizer.  Results agree with torch's to float
rounding: torch's vectorised ``sqrt`` is not always correctly rounded, numba's is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

# the jitted update: None = not tried yet in this process, False = unavailable
_KERNELS: Any = None
# below this many elements a parallel launch costs more than it saves
PARALLEL_MIN = 16384


def _load_kernels() -> tuple[Callable[..., None], Callable[..., None]] | None:
    """Compile the update loops once per process (~1 s); ``None`` if numba cannot run them
    on a thread-safe threading layer (the napari plugin may train and run UMAP at once)."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = False
        try:
            import numba

            try:
                numba.threading_layer()
            except ValueError:  # no parallel region has run in this process yet
                numba.config.THREADING_LAYER = "threadsafe"

            def update(p, g, sq, neg_lr, alpha, one_minus_alpha, eps):  # type: ignore[no-untyped-def]
                for i in numba.prange(p.size):
                    s = sq[i] * alpha + one_minus_alpha * g[i] * g[i]
                    sq[i] = s
                    p[i] = p[i] + neg_lr * g[i] / (np.sqrt(s) + eps)

            parallel = numba.njit(parallel=True, cache=False)(update)
            serial = numba.njit(parallel=False, cache=False)(update)
            x, one = np.zeros(2, np.float32), np.float32(1)
            for kernel in (parallel, serial):  # compile now, and start numba's threads
                kernel(x, x.copy(), x.copy(), one, one, one, one)
            if numba.threading_layer() in ("omp", "tbb"):
                _KERNELS = (parallel, serial)
        except Exception:  # no numba, no compiler backend, no thread-safe layer: torch's step
            _KERNELS = False
    return _KERNELS or None


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
        work = self._fused_work()
        self.last_step_fused = work is not None
        if work is None:
            super().step()
            return loss
        import numba

        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        parallel, serial = _load_kernels()  # type: ignore[misc]  # loaded by _fused_work
        f32 = np.float32
        for group, state, sq, (pv, gv, sv) in work:
            if not state:  # as torch initialises it, so state dicts stay interchangeable
                state["step"] = torch.zeros((), dtype=_scalar_dtype())
                state["square_avg"] = sq
            state["step"] += 1
            alpha = float(group["alpha"])
            kernel = parallel if pv.size >= PARALLEL_MIN else serial
            kernel(
                pv, gv, sv, f32(-float(group["lr"])), f32(alpha), f32(1 - alpha), f32(group["eps"])
            )
        return loss

    def _fused_work(self) -> list[tuple] | None:
        """What the fused loop would update, or ``None`` when torch's step must run: options
        the loop does not implement, no kernel, or a tensor it cannot view flat."""
        if not self._fusable() or _load_kernels() is None:
            return None
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
