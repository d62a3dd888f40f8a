"""One trainer for every front end: a generator of progress reports, checkpoints, resume.

The CLI iterates it with a progress bar; the napari widget runs it in a thread worker and
shows each yielded :class:`TrainReport`.  Stopping happens between steps (``Trainer.stop()`` or
closing the generator) and always leaves a usable model and, with a ``save_dir``, a checkpoint.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import time
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpoints import CHECKPOINT_NAME, Checkpoint, model_config, save_checkpoint, unwrap
from .config import (
    CHECKPOINT_SECONDS,
    REFERENCE_NUISANCES,
    CheckpointError,
    MEVAEConfig,
    TrainingDiverged,
    TrainOptions,
    default_epochs,
    max_budget_epochs,
    patience_epochs,
)
from .model import MEVAE, VAEOutput
from .speedups import AUTOCAST_DTYPES, BatchLoader, FusedRMSprop, resolve_precision, tune_malloc

__all__ = ["TrainReport", "Trainer", "select_device", "seed_everything"]


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
    """One progress message.  ``kind`` is ``start`` (from :func:`workflow.run_training`),
    ``step``, ``epoch`` or ``end``.

    For ``end`` reports ``reason`` says why training ended: ``done``, ``early_stop`` or
    ``stopped``.  Plain numbers and arrays only, so it crosses threads and processes safely.
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
    checkpoint: str = ""  # written after this epoch ("" if not: see CHECKPOINT_SECONDS)
    # reconstructions of the preview cells (:func:`workflow.run_training`, epoch and end
    # reports, at most every PREVIEW_SECONDS)
    preview: np.ndarray | None = None

    @property
    def progress(self) -> float:
        """Fraction of the whole run done, 0..1."""
        total = max(1, self.epochs * self.steps_per_epoch)
        return min(1.0, (self.epoch * self.steps_per_epoch + self.step) / total)


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
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"unknown device {device!r}: use auto, cpu, cuda, cuda:N (N = the GPU's number) or mps"
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available on this machine")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- the trainer -----------------------------------------------------------------------------
class Trainer:
    """Trains an :class:`MEVAE` on a dataset of ``(inputs (K,C,S,S), target (C,S,S))`` items.

    Datasets with a ``set_epoch(epoch)`` method get it called each epoch, so on-the-fly
    nuisance datasets redraw fresh transforms every epoch, reproducibly.

    Parameters
    ----------
    model : a config (a new model, seeded by ``options.seed``) or a model to train further.
    dataset : the training pairs (:func:`napari_mevae.workflow.training_dataset`).
    options : how to train (:class:`~napari_mevae.config.TrainOptions`).
    resume : a checkpoint of the same architecture: its weights, optimizer state, epoch count
        and history are continued.
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
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)
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
        n = len(dataset)  # type: ignore[arg-type]
        #: epochs of this run (the default budget unless options.epochs says otherwise)
        self.epochs = self.options.epochs if self.options.epochs is not None else default_epochs(n)
        #: the most epochs this run grows to while its loss still falls: the default budget
        #: only; epochs given explicitly are exactly what runs
        self.max_epochs = self.epochs if self.options.epochs is not None else max_budget_epochs(n)
        #: epochs without improvement before early stopping (more than ``patience`` on small sets)
        self.patience = patience_epochs(self.options.patience, n)
        self._optimizer: torch.optim.Optimizer | None = None  # made at the first step
        self._resume_optimizer_state = resume.optimizer_state if resume is not None else None
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
        # when (time.monotonic) and at which epoch this run last wrote its checkpoint
        self._saved_at = -math.inf
        self._saved_epoch: int | None = None
        #: True after Ctrl-C (KeyboardInterrupt) ended the run; the current weights were saved
        self.interrupted = False
        #: optimizer steps taken by this run
        self.steps_done = 0
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
        return unwrap(self.model)

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

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """RMSprop, made on first use: creating a torch optimizer imports torch's compiler stack
        (1.5-3.5 s), which a run that never steps (``--epochs 0``) need not pay.  A resumed
        run's optimizer state is loaded, with this run's learning rate."""
        if self._optimizer is None:
            # on CPU, RMSprop's update as one fused loop (same update and state, see speedups.py)
            rmsprop = FusedRMSprop if self.device.type == "cpu" else torch.optim.RMSprop
            self._optimizer = rmsprop(self.model.parameters(), lr=self.options.learn_rate)
            if self._resume_optimizer_state:
                self._optimizer.load_state_dict(self._resume_optimizer_state)
                for group in self._optimizer.param_groups:
                    group["lr"] = self.options.learn_rate
        return self._optimizer

    def save(self, epoch: int) -> Path | None:
        path = self.checkpoint_path
        if path is None:
            return None
        self.last_checkpoint = save_checkpoint(
            path,
            self.model,
            self._optimizer,
            epoch=epoch,
            history=self.history,
            optimizer_state=None if self._optimizer else self._resume_optimizer_state,
        )
        self._saved_at, self._saved_epoch = time.monotonic(), epoch
        return self.last_checkpoint

    def _loader(self, epoch: int) -> Iterable:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        if self.options.num_workers == 0 and BatchLoader.supports(self.dataset):
            return BatchLoader(self.dataset, self.sampler, self.options.batch_size // self.world)
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

    @property
    def invariance_weight(self) -> float:
        """The invariance term's weight in this run's loss (0: the term is off): per pixel,
        like the reconstruction, so one setting fits every crop size; ME-VAE models only."""
        cfg = model_config(self.model)
        if cfg.n_encoders < 2:
            return 0.0
        return self.options.invariance * cfg.image_size**2

    def _invariance_views(
        self, target: torch.Tensor, epoch: int = 0, step: int = 0
    ) -> torch.Tensor | None:
        """Every encoder's second input: the target cell with every nuisance drawn afresh,
        from (seed, epoch, step, place in the global batch), so processes that share a batch
        draw what one process would."""
        if self.invariance_weight <= 0:
            return None
        from .nuisances import randomise

        cfg = model_config(self.model)
        seed = self.options.seed or 0
        rngs = [  # rank r holds places r, r + world, ... of the global batch (EpochSampler)
            np.random.default_rng([seed, epoch, step, i * self.world + self.rank, 7])
            for i in range(target.shape[0])
        ]
        views = randomise(target.float().cpu(), cfg.nuisances or REFERENCE_NUISANCES, rngs)
        views = views.to(self.device)
        return views[:, None].expand(-1, cfg.n_encoders, -1, -1, -1)

    def _eager_forward_loss(
        self, inputs: torch.Tensor, target: torch.Tensor, views: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        dtype = self._autocast or torch.bfloat16  # any dtype when disabled
        with torch.autocast(self.device.type, dtype=dtype, enabled=self._autocast is not None):
            out = self.model(inputs)
            means2 = None if views is None else unwrap(self.model).encode_all(views)[0]
        if self._autocast is not None:  # the loss in float32, whatever the forward ran in
            out = VAEOutput(*(t.float() for t in (out.recon_logits, out.means, out.logvars, out.z)))
        terms = unwrap(self.model).loss(out, target)
        if means2 is not None:
            # how far each encoder's reading of the cell moves when the nuisances change
            terms["invariance"] = (out.means - means2.float()).pow(2).sum(-1).mean()
            terms["loss"] = terms["loss"] + self.invariance_weight * terms["invariance"]
        # sum and sum of products of the fused means: which latent directions are in use (in
        # float64: the fused means start near FUSION_START ** K, and a variance read from
        # E[z^2] - E[z]^2 in float32 would lose the small ones; MPS has no float64)
        fused = MEVAE.fuse(out.means.detach())
        fused = fused.float() if fused.device.type == "mps" else fused.double()
        terms["latent_moments"] = torch.cat([fused.sum(0), (fused.T @ fused).flatten()])
        return terms

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> Generator[TrainReport, None, MEVAE]:
        """Train, yielding a report per step, one per epoch and a final ``end`` report."""
        tuned = self.options.tune_malloc and self.device.type == "cpu"
        restore = tune_malloc() if tuned else None
        try:
            return (yield from self._run())
        finally:
            if restore is not None:
                restore()

    def _run(self) -> Generator[TrainReport, None, MEVAE]:
        opts = self.options
        total_epochs = self.start_epoch + self.epochs
        good_state = _copy_state(self.model)
        best = math.inf
        bad_epochs = 0
        reason = "done"
        epoch = self.start_epoch
        last = dict(loss=math.nan, recon=math.nan, kl=math.nan, images_per_s=0.0)
        steps = 0
        try:
            for epoch in itertools.count(self.start_epoch):
                if epoch >= total_epochs:  # the budget can grow during the run
                    break
                if self._stop:
                    reason = "stopped"
                    break
                self.model.train()
                loader = self._loader(epoch)
                steps = len(loader)
                sums = np.zeros(3)
                seen = 0
                dim = model_config(self.model).latent_dim
                moments = torch.zeros(dim + dim * dim, dtype=torch.float64)
                t_epoch = time.perf_counter()
                for step, (inputs, target) in enumerate(loader):
                    t0 = time.perf_counter()
                    inputs, target = inputs.to(self.device).float(), self._to_device(target)
                    # a compiled step is specialised to the full batch: the short last batch
                    # of an epoch runs eagerly instead of triggering a second compilation
                    full = target.shape[0] == opts.batch_size // self.world
                    step_fn = self._forward_loss if full else self._eager_forward_loss
                    terms = step_fn(inputs, target, self._invariance_views(target, epoch, step))
                    loss = terms["loss"]
                    ramp = self.kl_ramp(epoch + step / max(steps, 1))
                    if ramp < 1.0:  # outside the (possibly compiled) step: no recompiles
                        loss = terms["recon"] + self.beta * ramp * terms["kl_penalty"]
                        if "invariance" in terms:
                            loss = loss + self.invariance_weight * terms["invariance"]
                    # one host read for the three numbers (and the finiteness check)
                    vals = np.array(
                        torch.stack([loss, terms["recon"], terms["kl"]]).detach().tolist()
                    )
                    if not math.isfinite(vals[0]):
                        self.model.load_state_dict(good_state)
                        done = self._completed_epochs()
                        if self._saved_epoch is not None and self._saved_epoch != done:
                            self.save(done)  # the last good weights, not an older checkpoint
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
                    self.steps_done += 1
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
                ckpt = None  # at most every CHECKPOINT_SECONDS: short epochs are many
                if time.monotonic() - self._saved_at >= CHECKPOINT_SECONDS:
                    ckpt = self.save(epoch + 1)
                ips = seen / max(time.perf_counter() - t_epoch, 1e-9)
                # early stopping counts full-weight epochs (after the KL warm-up) of a model
                # that uses its latent space: a loss plateau before that is not the end
                in_use = self.model_unwrapped.n_active >= min(
                    2, model_config(self.model).latent_dim
                )
                early = False
                if opts.earlystop and self.kl_ramp(epoch) >= 1.0 and in_use:
                    if mean[0] < best - opts.min_delta:
                        best, bad_epochs = float(mean[0]), 0
                    else:
                        bad_epochs += 1
                        early = bad_epochs >= self.patience
                grown = None
                if not early and epoch + 1 == total_epochs:
                    grown = self._grown_budget(total_epochs)
                    total_epochs = grown or total_epochs
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
                    message=(
                        f"the loss is still falling: training on to epoch {total_epochs} (at "
                        f"most {self.start_epoch + self.max_epochs})"
                        if grown
                        else ""
                    ),
                )
                if early:
                    reason = "early_stop"
                    break
                if self._stop:
                    reason = "stopped"
                    break
        except (GeneratorExit, KeyboardInterrupt) as stop:
            # The consumer closed us (e.g. a napari worker quit), or Ctrl-C arrived inside a
            # step: keep what was learned, the weights as they are now.  The epoch counter
            # stays at the last full epoch, so a resumed run redoes the interrupted one.
            if isinstance(stop, KeyboardInterrupt):
                self.interrupted = True
            if self.steps_done:  # else nothing was learned: an older checkpoint stays
                self.save(self._completed_epochs())
            self._finish()
            raise
        done_epoch = self._completed_epochs()
        ckpt = self.save(done_epoch)
        msg = {
            "done": f"training finished after {done_epoch} epoch(s)",
            "early_stop": f"early stop: loss did not improve for {self.patience} epochs",
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

    def _grown_budget(self, total: int) -> int | None:
        """The run's new last epoch when its budget grows (None when it does not): by a third
        of the budget while the loss still falls by :func:`workflow.still_learning`'s rule, up
        to :attr:`max_epochs`.  Where the loss has flattened the default budget is all that runs.
        """
        from .workflow import still_learning

        run = total - self.start_epoch
        if run >= self.max_epochs or still_learning(self.history) is None:
            return None
        return self.start_epoch + min(self.max_epochs, run + max(1, self.epochs // 3))

    def _finish(self) -> MEVAE:
        """Back to the default memory layout, so later encodings match a reloaded checkpoint
        bit for bit."""
        model = unwrap(self.model)
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
        """Store the fused means' mean, covariance and variances over the epoch's cells in the
        model (and so in its checkpoint): :attr:`MEVAE.active_mask` and
        :meth:`MEVAE.feature_projection` read them."""
        if seen < 2:
            return
        model = unwrap(self.model)
        dim = model.latent_variance.numel()
        mean = moments[:dim] / seen
        cov = moments[dim:].view(dim, dim) / seen - torch.outer(mean, mean)
        cov = (cov + cov.T) / 2
        for buf, value in (
            (model.latent_mean, mean),
            (model.latent_covariance, cov),
            (model.latent_variance, torch.diagonal(cov).clamp_min(0.0)),
        ):
            buf.copy_(value.to(buf.device, buf.dtype))

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
