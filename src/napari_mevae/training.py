"""One trainer for every front end: a generator of progress reports, checkpoints, resume.

The CLI iterates it with a progress bar; the napari widget runs it in a thread worker and
shows each yielded :class:`TrainReport`.  Stopping happens between steps (``Trainer.stop()`` or
closing the generator) and always leaves a usable model and, with a ``save_dir``, a checkpoint.
"""

from __future__ import annotations

import ctypes
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .model import MEVAE, MEVAEConfig, VAEOutput
from .optim import FusedRMSprop

__all__ = [
    "TrainOptions",
    "TrainReport",
    "Trainer",
    "TrainingDiverged",
    "CheckpointError",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_checkpoint",
    "select_device",
    "seed_everything",
]

CHECKPOINT_FORMAT = "napari-mevae-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the model holds the last good weights."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the data/model."""


PRECISIONS = ("auto", "float32", "bf16", "fp16")


@dataclass
class TrainOptions:
    """How to train; defaults follow the reference (RMSprop, lr 5e-4, batch 50, patience 8)."""

    epochs: int = 10
    batch_size: int = 50
    learn_rate: float = 5e-4
    seed: int | None = None
    device: str = "auto"
    earlystop: bool = True
    patience: int = 8
    min_delta: float = 0.0
    save_dir: str | os.PathLike | None = None
    num_workers: int = 0
    shuffle: bool = True
    channels_last: bool = True
    distributed: bool = False
    # Performance knobs (see docs/benchmarks.md, "Training throughput"):
    # compile: torch.compile the model (inductor); pays only for long runs (compile takes ~1 min).
    compile: bool = False
    # precision: "auto" = bfloat16 autocast for the forward pass where the hardware runs bf16
    # natively (CPUs with avx512_bf16 / AMX, GPUs from Ampere on), float16 autocast with loss
    # scaling on older CUDA GPUs (Volta, Turing: T4, V100), float32 elsewhere; "bf16" asks for
    # bf16 wherever oneDNN / the GPU supports it, even emulated; "fp16" for float16 with loss
    # scaling (CUDA; CPUs emulate it slowly); "float32" never uses either.  Weights, optimizer
    # and loss stay float32 (docs/benchmarks.md: bf16 1.3-1.7x faster than float32 here,
    # invariance within the float32 seed-to-seed spread).
    precision: str = "auto"
    # tune_malloc: on Linux/glibc, keep large freed blocks in the heap while training instead of
    # returning them to the OS, so the per-step activations are not page-faulted in again
    # every step; restored (and the memory released) when training ends.
    tune_malloc: bool = True
    # kl_warmup: ramp the KL weight linearly from 0 to beta over this many epochs (0 = off, as
    # the reference), so the encoders learn to carry the cell before the KL prior squeezes
    # them; early stopping only counts epochs after the ramp.
    kl_warmup: float = 0.0

    def validate(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.learn_rate > 0 and math.isfinite(self.learn_rate)):
            raise ValueError(f"learn_rate must be a positive number, got {self.learn_rate}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if not (self.kl_warmup >= 0 and math.isfinite(self.kl_warmup)):
            raise ValueError(f"kl_warmup must be a number of epochs >= 0, got {self.kl_warmup}")


class EpochSampler(Sampler[int]):
    """Seeded per-epoch permutation, split across processes by stride.

    With ``world`` processes each taking ``batch/world`` items, rank r's batch j holds items
    ``perm[j*batch + r :: world]``: together exactly the single-process batch j, so a distributed
    run sees the same global batches as a one-process run with the same seed.
    """

    def __init__(
        self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1
    ) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 1000 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        return iter(perm[self.rank :: self.world])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


@dataclass
class TrainReport:
    """One progress message.  ``kind`` is ``step``, ``epoch`` or ``end``.

    For ``end`` reports ``reason`` says why training ended: ``done``, ``early_stop`` or
    ``stopped``.  Plain numbers only, so a GUI thread can take it across threads safely.
    """

    kind: str
    epoch: int
    step: int
    steps_per_epoch: int
    loss: float
    recon: float
    kl: float
    images_per_s: float
    epochs: int
    reason: str = ""
    message: str = ""
    checkpoint: str = ""

    @property
    def progress(self) -> float:
        """Fraction of the whole run done, 0..1."""
        total = max(1, self.epochs * self.steps_per_epoch)
        return min(1.0, (self.epoch * self.steps_per_epoch + self.step) / total)


@dataclass
class Checkpoint:
    config: MEVAEConfig
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None = None
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def build_model(self, device: str | torch.device = "cpu") -> MEVAE:
        model = MEVAE(self.config)
        try:
            model.load_state_dict(self.model_state)
        except RuntimeError as err:  # shape mismatch inside a hand-edited file
            raise CheckpointError(f"checkpoint weights do not fit its own config: {err}") from err
        return model.to(device).eval()


# -- devices and seeds -----------------------------------------------------------------------
def select_device(device: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; anything else is passed to torch, checked."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available on this machine")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- checkpoints -----------------------------------------------------------------------------
def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        _readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    _readable(tmp)
    os.replace(tmp, path)


def _readable(path: str) -> None:
    """mkstemp makes 0600 files; give checkpoints the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_checkpoint(
    path: str | os.PathLike,
    model: MEVAE,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    history: Iterable[dict[str, float]] = (),
    extra: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write weights + config atomically (temp file + rename) and a readable config JSON beside.

    ``path`` is a ``.pt`` file or a directory (then ``<dir>/checkpoint.pt``).  The optimizer
    state comes from ``optimizer`` or, when only its state is at hand, ``optimizer_state``."""
    path = Path(path)
    if path.suffix != ".pt":
        path = path / CHECKPOINT_NAME
    state = {k: v.detach().to("cpu") for k, v in _unwrap(model).state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model_config(model).to_dict(),
        "model": state,
        "optimizer": optimizer.state_dict() if optimizer is not None else optimizer_state,
        "epoch": int(epoch),
        "history": [dict(h) for h in history],
        "extra": dict(extra or {}),
    }
    _atomic_torch_save(payload, path)
    _atomic_write_text(model_config(model).to_json() + "\n", path.with_suffix(".json"))
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the save_dir / models dir of a training run."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / CHECKPOINT_NAME, p / "models" / CHECKPOINT_NAME):
            if cand.is_file():
                return cand
        raise CheckpointError(
            f"no checkpoint in directory {p}: expected {CHECKPOINT_NAME} or models/{CHECKPOINT_NAME}"
        )
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Read a checkpoint safely: ``weights_only=True`` so a file can never run code."""
    p = resolve_checkpoint(path)
    try:
        payload = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle.UnpicklingError, RuntimeError (zip), EOFError...
        raise CheckpointError(
            f"cannot read checkpoint {p}: not a napari-mevae checkpoint, corrupt, or it holds "
            f"objects other than weights (refused for safety). Details: {err}"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not a napari-mevae checkpoint (no format marker)")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{p} was written by a newer napari-mevae (format version {payload['version']})"
        )
    try:
        config = MEVAEConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{p} has an invalid model config: {err}") from err
    return Checkpoint(
        config=config,
        model_state=payload["model"],
        optimizer_state=payload.get("optimizer"),
        epoch=int(payload.get("epoch", 0)),
        history=list(payload.get("history", [])),
        extra=dict(payload.get("extra", {})),
        path=p,
    )


def check_compatible(config: MEVAEConfig, image_size: int, channels: int, n_inputs: int) -> None:
    """Clear error when data does not fit a (loaded) model, naming what differs."""
    problems = []
    if config.image_size != image_size:
        problems.append(f"image size: model {config.image_size}, data {image_size}")
    if config.channels != channels:
        problems.append(f"channels: model {config.channels}, data {channels}")
    if config.n_encoders != n_inputs:
        problems.append(f"encoder inputs: model K={config.n_encoders}, data {n_inputs}")
    if problems:
        raise CheckpointError("model and data do not match: " + "; ".join(problems))


def _unwrap(model: torch.nn.Module) -> MEVAE:
    return getattr(model, "module", model)


def model_config(model: torch.nn.Module) -> MEVAEConfig:
    return _unwrap(model).config


# -- performance helpers ---------------------------------------------------------------------
class _BatchLoader:
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
_malloc_lock = threading.Lock()
_malloc_users = 0


def _tune_malloc() -> Any:
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


# -- the trainer -----------------------------------------------------------------------------
class Trainer:
    """Trains an :class:`MEVAE` on a dataset of ``(inputs (K,C,S,S), target (C,S,S))`` items.

    Datasets with a ``set_epoch(epoch)`` method get it called each epoch, so on-the-fly
    nuisance datasets redraw fresh transforms every epoch, reproducibly.
    """

    def __init__(
        self,
        model: MEVAE | MEVAEConfig,
        dataset: Dataset,
        options: TrainOptions | None = None,
        resume: Checkpoint | None = None,
    ) -> None:
        self.options = options or TrainOptions()
        self.options.validate()
        if isinstance(model, MEVAEConfig):
            if self.options.seed is not None:
                seed_everything(self.options.seed)
            model = MEVAE(model)
        self.rank, self.world, self._own_group = 0, 1, False
        if self.options.distributed:
            self._init_distributed()
        self.device = select_device(self.options.device)
        if self.world > 1 and self.device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        self.model = model.to(self.device)
        if self.options.channels_last and self.device.type != "mps":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dataset = dataset
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("the training set is empty")
        if self.world > 1 and self.options.batch_size % self.world:
            raise ValueError(
                f"--batch_size {self.options.batch_size} is the global batch and must be divisible "
                f"by the number of processes ({self.world})"
            )
        # on CPU, RMSprop's update as one fused loop (same update and state, see optim.py)
        rmsprop = FusedRMSprop if self.device.type == "cpu" else torch.optim.RMSprop
        self.optimizer = rmsprop(self.model.parameters(), lr=self.options.learn_rate)
        self.start_epoch = 0
        self.history: list[dict[str, float]] = []
        if resume is not None:
            diff = resume.config.diff(self.model.config)
            diff.pop("beta", None)  # beta may change when fine-tuning; nothing else may
            diff.pop("epsilon_std", None)
            if diff:
                raise CheckpointError(
                    "cannot resume: checkpoint and model differ in "
                    + ", ".join(f"{k} (checkpoint {a}, now {b})" for k, (a, b) in diff.items())
                )
            self.model.load_state_dict(resume.model_state)
            if resume.optimizer_state:
                self.optimizer.load_state_dict(resume.optimizer_state)
            self.start_epoch = resume.epoch
            self.history = list(resume.history)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)
        self.sampler = EpochSampler(
            len(dataset),  # type: ignore[arg-type]
            self.options.seed or 0,
            self.options.shuffle,
            self.rank,
            self.world,
        )
        self._stop = False
        self.last_checkpoint: Path | None = None
        # the precision in use ("bf16", "fp16" or "float32"), after "auto" and hardware checks
        self.precision = resolve_precision(self.options.precision, self.device)
        self._autocast = AUTOCAST_DTYPES.get(self.precision)
        # float16 gradients underflow (and overflow) where float32 ones do not: scale the loss.
        # The loss is a per-pixel mean x S^2, so torch's usual first scale (2^16, made for
        # mean losses) is divided by S^2; otherwise the first steps all overflow and are skipped.
        self.scaler = (
            torch.amp.GradScaler(
                self.device.type,
                init_scale=max(2.0**16 / model_config(self.model).image_size ** 2, 1.0),
            )
            if self.precision == "fp16"
            else None
        )
        self._forward_loss = (
            torch.compile(self._eager_forward_loss) if self.options.compile else None
        ) or self._eager_forward_loss

    @property
    def beta(self) -> float:
        return model_config(self.model).beta

    def kl_ramp(self, epochs_done: float) -> float:
        """Fraction of the KL weight in use after ``epochs_done`` (fractional) epochs."""
        warm = self.options.kl_warmup
        return 1.0 if warm <= 0 else min(1.0, max(0.0, epochs_done / warm))

    def _init_distributed(self) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            raise RuntimeError("this PyTorch build has no torch.distributed")
        if not dist.is_initialized():
            if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
                raise RuntimeError(
                    "distributed training needs torchrun (RANK/WORLD_SIZE not set): "
                    "torchrun --nproc_per_node=N -m napari_mevae train ..."
                )
            backend = (
                "nccl" if torch.cuda.is_available() and self.options.device != "cpu" else "gloo"
            )
            dist.init_process_group(backend=backend)
            self._own_group = True
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def model_unwrapped(self) -> MEVAE:
        return _unwrap(self.model)

    def close(self) -> None:
        """Wait for every process and leave the process group this trainer created."""
        if self._own_group:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
            self._own_group = False

    # -- control ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask training to end after the current step (thread-safe: a plain flag)."""
        self._stop = True

    @property
    def checkpoint_path(self) -> Path | None:
        if self.options.save_dir is None:
            return None
        return Path(self.options.save_dir) / "models" / CHECKPOINT_NAME

    def save(self, epoch: int) -> Path | None:
        path = self.checkpoint_path
        if path is None:
            return None
        self.last_checkpoint = save_checkpoint(
            path, self.model, self.optimizer, epoch=epoch, history=self.history
        )
        return self.last_checkpoint

    def _loader(self, epoch: int) -> Iterable:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        if self.options.num_workers == 0 and _BatchLoader.supports(self.dataset):
            return _BatchLoader(self.dataset, self.sampler, self.options.batch_size // self.world)
        return DataLoader(
            self.dataset,
            batch_size=self.options.batch_size // self.world,
            sampler=self.sampler,
            num_workers=self.options.num_workers,
            drop_last=False,
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
        )

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, non_blocking=True).float()
        if self.options.channels_last and t.dim() == 4 and self.device.type != "mps":
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _eager_forward_loss(
        self, inputs: torch.Tensor, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        dtype = self._autocast or torch.bfloat16  # any dtype when disabled
        with torch.autocast(self.device.type, dtype=dtype, enabled=self._autocast is not None):
            out = self.model(inputs)
        if self._autocast is not None:  # the loss in float32, whatever the forward ran in
            out = VAEOutput(*(t.float() for t in (out.recon_logits, out.means, out.logvars, out.z)))
        terms = _unwrap(self.model).loss(out, target)
        # sum and sum of squares of the fused means: which latent dimensions are in use
        fused = MEVAE.fuse(out.means.detach())
        terms["latent_moments"] = torch.cat([fused.sum(0), fused.pow(2).sum(0)])
        return terms

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> Generator[TrainReport, None, MEVAE]:
        """Train, yielding a report per step, one per epoch and a final ``end`` report."""
        tuned = self.options.tune_malloc and self.device.type == "cpu"
        restore = _tune_malloc() if tuned else None
        try:
            return (yield from self._run())
        finally:
            if restore is not None:
                restore()

    def _run(self) -> Generator[TrainReport, None, MEVAE]:
        opts = self.options
        total_epochs = self.start_epoch + opts.epochs
        good_state = _copy_state(self.model)
        best = math.inf
        bad_epochs = 0
        reason = "done"
        epoch = self.start_epoch
        last = dict(loss=math.nan, recon=math.nan, kl=math.nan, images_per_s=0.0)
        steps = 0
        try:
            for epoch in range(self.start_epoch, total_epochs):
                if self._stop:
                    reason = "stopped"
                    break
                self.model.train()
                loader = self._loader(epoch)
                steps = len(loader)
                sums = np.zeros(3)
                seen = 0
                moments = torch.zeros(2 * model_config(self.model).latent_dim, dtype=torch.float64)
                t_epoch = time.perf_counter()
                for step, (inputs, target) in enumerate(loader):
                    t0 = time.perf_counter()
                    inputs, target = inputs.to(self.device).float(), self._to_device(target)
                    # a compiled step is specialised to the full batch: the short last batch
                    # of an epoch runs eagerly instead of triggering a second compilation
                    full = target.shape[0] == opts.batch_size // self.world
                    step_fn = self._forward_loss if full else self._eager_forward_loss
                    terms = step_fn(inputs, target)
                    loss = terms["loss"]
                    ramp = self.kl_ramp(epoch + step / max(steps, 1))
                    if ramp < 1.0:  # outside the (possibly compiled) step: no recompiles
                        loss = terms["recon"] + self.beta * ramp * terms["kl"]
                    # one host read for the three numbers (and the finiteness check)
                    vals = np.array(
                        torch.stack([loss, terms["recon"], terms["kl"]]).detach().tolist()
                    )
                    if not math.isfinite(vals[0]):
                        self.model.load_state_dict(good_state)
                        self._finish()
                        raise TrainingDiverged(
                            f"loss became {vals[0]} at epoch {epoch + 1}, step {step + 1}; "
                            "training stopped and the last good weights were kept "
                            f"({'checkpoint ' + str(self.last_checkpoint) if self.last_checkpoint else 'in memory'}). "
                            "Try a lower learning rate or check the images for NaN/inf pixels"
                            + (
                                ", or --precision float32 (float16 overflowed?)."
                                if self.precision == "fp16"
                                else "."
                            )
                        )
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.scaler is None:
                        loss.backward()
                        self.optimizer.step()
                    else:  # skips the update when a scaled gradient overflowed
                        self.scaler.scale(loss).backward()
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    moments += terms["latent_moments"].to("cpu", torch.float64)
                    n = target.shape[0]
                    sums += vals * n
                    seen += n
                    dt = max(time.perf_counter() - t0, 1e-9)
                    last = dict(
                        loss=vals[0], recon=vals[1], kl=vals[2], images_per_s=n * self.world / dt
                    )
                    yield TrainReport("step", epoch, step + 1, steps, epochs=total_epochs, **last)
                    if self._stop:
                        break
                if self._stop and seen < len(self.sampler):
                    reason = "stopped"
                    # a partial epoch still trained the weights: keep them
                    good_state = _copy_state(self.model)
                    if seen:
                        self._record(epoch, sums / seen, seen, t_epoch, partial=True)
                        self._set_latent_variance(moments, seen)
                    break
                if self.world > 1:
                    sums, seen = self._all_reduce(sums, seen)
                    moments = self._all_reduce_tensor(moments)
                self._set_latent_variance(moments, seen)
                mean = sums / max(seen, 1)
                self._record(epoch, mean, seen, t_epoch)
                good_state = _copy_state(self.model)
                ckpt = self.save(epoch + 1)
                ips = seen / max(time.perf_counter() - t_epoch, 1e-9)
                yield TrainReport(
                    "epoch",
                    epoch + 1,
                    0,
                    steps,
                    float(mean[0]),
                    float(mean[1]),
                    float(mean[2]),
                    ips,
                    total_epochs,
                    checkpoint=str(ckpt or ""),
                )
                if opts.earlystop and self.kl_ramp(epoch) >= 1.0:  # a full-weight epoch
                    if mean[0] < best - opts.min_delta:
                        best, bad_epochs = float(mean[0]), 0
                    else:
                        bad_epochs += 1
                        if bad_epochs >= opts.patience:
                            reason = "early_stop"
                            break
                if self._stop:
                    reason = "stopped"
                    break
        except GeneratorExit:
            # The consumer closed us (e.g. a napari worker quit): keep what was learned.
            self.save(self._completed_epochs())
            self._finish()
            raise
        done_epoch = self._completed_epochs()
        ckpt = self.save(done_epoch)
        msg = {
            "done": f"training finished after {done_epoch} epoch(s)",
            "early_stop": f"early stop: loss did not improve for {opts.patience} epochs",
            "stopped": "training stopped by the user; the model was kept",
        }[reason]
        yield TrainReport(
            "end",
            done_epoch,
            0,
            steps,
            epochs=total_epochs,
            reason=reason,
            message=msg,
            checkpoint=str(ckpt or ""),
            **last,
        )
        return self._finish()

    def _finish(self) -> MEVAE:
        """Back to the default memory layout, so later encodings match a reloaded checkpoint
        bit for bit."""
        model = _unwrap(self.model)
        model.to(memory_format=torch.contiguous_format).eval()
        return model

    def _all_reduce(self, sums: np.ndarray, seen: int) -> tuple[np.ndarray, int]:
        vals = self._all_reduce_tensor(torch.tensor([*sums, seen], dtype=torch.float64)).numpy()
        return vals[:3], int(vals[3])

    def _all_reduce_tensor(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    def _set_latent_variance(self, moments: torch.Tensor, seen: int) -> None:
        """Store each fused dimension's variance over the epoch's cells in the model (and so in
        its checkpoint): :attr:`MEVAE.active_mask` reads it."""
        if seen < 2:
            return
        half = moments.numel() // 2
        mean = moments[:half] / seen
        var = (moments[half:] / seen - mean**2).clamp_min(0.0)
        buf = _unwrap(self.model).latent_variance
        buf.copy_(var.to(buf.device, buf.dtype))

    def _record(
        self, epoch: int, mean: np.ndarray, seen: int, t0: float, partial: bool = False
    ) -> None:
        entry = {
            "epoch": epoch + 1,
            "loss": float(mean[0]),
            "recon": float(mean[1]),
            "kl": float(mean[2]),
            "seconds": time.perf_counter() - t0,
            "images": seen,
        }
        if partial:
            entry["partial"] = True
        self.history.append(entry)

    def _completed_epochs(self) -> int:
        """Epochs run to the end: a checkpoint's epoch counter, so resume redoes a partial one."""
        return len([h for h in self.history if not h.get("partial")])

    def train(self) -> MEVAE:
        """Run to the end without reporting (library use)."""
        gen = self.run()
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
