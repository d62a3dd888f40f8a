"""``mevae train``: the reference's training run (and ``--phase load``), on the one pipeline."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import sys
from pathlib import Path

from ..config import (
    MODEL_KINDS,
    CropSettings,
    InputError,
    TrainingDiverged,
)
from .common import _describe, _device, _dist_rank_world, _input_dirs, _nuisances, _progress, _say
from .parser import PRECISION_NAMES

log = logging.getLogger("mevae")


def cmd_train(args: argparse.Namespace) -> int:
    from .. import workflow
    from ..checkpoints import check_compatible, load_checkpoint
    from ..config import model_kind
    from ..outputs import DirLock, check_output_dir
    from ..runs import write_run_outputs
    from ..training import Trainer

    save_dir = check_output_dir(Path(args.save_dir), "--save_dir")
    rank, world = _dist_rank_world()
    if args.distributed and not {"RANK", "WORLD_SIZE"} <= os.environ.keys():
        raise InputError(
            "--distributed runs under torchrun: torchrun --nproc_per_node=N -m napari_mevae "
            "train ...; without torchrun, leave --distributed out"
        )
    device = _device(args)
    ckpt = None
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
    elif args.phase == "load":
        raise InputError(
            "--phase load needs --checkpoint (a checkpoint file or a training save_dir)"
        )
    if ckpt is not None:
        _refuse_changed_architecture(args, ckpt.config)
        # the checkpoint defines the architecture; flags only describe the data
        args.image_size, args.nchannel = ckpt.config.image_size, ckpt.config.channels
        if ckpt.config.n_encoders == 1 and args.model == "mevae":
            args.model = MODEL_KINDS[model_kind(ckpt.config)]
    nuisances = _nuisances(args.nuisances) if args.targets else []
    opts = None
    if args.phase == "train":  # every setting checked before any image is read
        opts = _settings(lambda: _train_options(args, save_dir if rank == 0 else None, world))
        if ckpt is None:
            _settings(lambda: _train_config(args, nuisances, k=None))
    lock = DirLock(save_dir, "mevae train") if rank == 0 else contextlib.nullcontext()
    with lock:
        data = workflow.load_train_data(
            model=args.model,
            image_size=args.image_size,
            channels=args.nchannel,
            targets=args.targets,
            nuisances=nuisances,
            input_dirs=[] if args.targets else _input_dirs(args),
            target_dir=args.out1_dir,
            lazy=args.lazy,
            seed=args.seed or 0,
        )
        if ckpt is not None:
            if ckpt.config.n_encoders != data.n_encoders:
                given = f"--nuisances {args.nuisances} gives" if args.targets else "the data has"
                raise InputError(
                    f"the checkpoint's model has K={ckpt.config.n_encoders} encoders but "
                    f"{given} {data.n_encoders} input(s)"
                )
            check_compatible(ckpt.config, args.image_size, args.nchannel, data.n_encoders)

        if args.phase == "load":
            model = ckpt.build_model(device)
            log.info(
                "loaded %s; encoding %d images without training", ckpt.path, len(data.filenames)
            )
            write_run_outputs(save_dir, model, data, args.num_save, args.latent_samp, args.verbose)
            _say(
                args,
                f"encoded {len(data.filenames)} images with {ckpt.path} -> "
                f"{save_dir / 'encodings.csv'}",
            )
            return 0

        if ckpt is not None:
            config = ckpt.config
            old = (config.beta, config.epsilon_std)
            if args.beta is not None:
                config.beta = args.beta
            if "epsilon_std" in _given(args):
                config.epsilon_std = args.epsilon_std
            _settings(config.validate)
        else:
            config = _settings(lambda: _train_config(args, data.nuisances, data.n_encoders))
        trainer = Trainer(ckpt.build_model() if ckpt else config, data.dataset, opts, resume=ckpt)
        if rank == 0:
            if ckpt is not None:
                _say(args, _resume_line(ckpt, opts, old))
            _say(
                args,
                f"training {_describe(config)} on {len(data.dataset)} pairs, device "
                f"{trainer.device}"
                + PRECISION_NAMES[trainer.precision]
                + (f", {world} processes" if world > 1 else ""),
            )
        reports = workflow.run_training(trainer, save_dir / "training.log" if rank == 0 else None)
        bar = None
        try:
            for rep in reports:
                if rank != 0:
                    continue
                if rep.kind == "step":
                    if bar is None:
                        desc = f"epoch {rep.epoch + 1}/{rep.epochs}"
                        bar = _progress(rep.steps_per_epoch, desc, args.verbose, "batch")
                    bar.update(1)
                    bar.set_postfix(loss=f"{rep.loss:.2f}", img_s=f"{rep.images_per_s:.0f}")
                elif rep.kind == "epoch":
                    if bar is not None:
                        bar.close()
                        bar = None
                    _say(
                        args,
                        f"epoch {rep.epoch}/{rep.epochs}  loss {rep.loss:.3f}  (recon "
                        f"{rep.recon:.3f}, KL {rep.kl:.3f})  {rep.images_per_s:.0f} images/s",
                    )
                    if rep.message:  # the default budget grew: the loss is still falling
                        _say(args, rep.message)
                elif rep.kind == "end":
                    _say(args, rep.message)
                    _say(args, workflow.dims_in_use(trainer.model_unwrapped))
                    hint = workflow.still_learning(trainer.history, reason=rep.reason)
                    if hint:
                        _say(args, f"note: {hint}")
        except TrainingDiverged as err:
            raise InputError(str(err)) from err
        except KeyboardInterrupt:
            reports.close()  # between steps: the trainer saves what it learned now
            if bar is not None:
                bar.close()
                bar = None
            _interrupted(args, _kept_on_interrupt(trainer, save_dir))
            return 130
        finally:
            if bar is not None:
                bar.close()
        if rank == 0:
            try:
                write_run_outputs(
                    save_dir,
                    trainer.model_unwrapped,
                    data,
                    args.num_save,
                    args.latent_samp,
                    args.verbose,
                )
            except KeyboardInterrupt:
                _interrupted(
                    args,
                    f"the trained model is saved in {trainer.last_checkpoint}; the other "
                    f"outputs in {save_dir} were left as they were",
                )
                return 130
            _say(args, f"outputs written to {save_dir}")
    trainer.close()
    return 0


#: MEVAEConfig fields and TrainOptions settings -> the flags that set them, for messages
FLAGS = {
    "image_size": "--image_size",
    "channels": "--nchannel",
    "latent_dim": "--latent_dim",
    "inter_dim": "--inter_dim",
    "nlayers": "--nlayers",
    "nfilters": "--nfilters",
    "kernel_size": "--kernel_size",
    "epsilon_std": "--epsilon_std",
    "recon_loss": "--recon_loss",
    "beta": "--beta",
    "epochs": "--epochs",
    "batch_size": "--batch_size",
    "learn_rate": "--learn_rate",
    "patience": "--patience",
    "precision": "--precision",
    "kl_warmup": "--kl_warmup",
    "invariance": "--invariance",
    "threads": "--threads",
}


def _crop_settings(args: argparse.Namespace) -> CropSettings:
    """The crop flags shared by `mevae pairs` and `mevae crop`, checked, as CropSettings."""
    return _settings(
        lambda: CropSettings(
            size=args.size,
            channel_axis=args.channel_axis,
            scale=args.scale,
            normalize=args.normalize,
            min_area=args.min_area,
            max_area=args.max_area,
            border=args.border,
        ).check()
    )


def _settings(check):
    """Run a settings check; its ValueError becomes one line naming the flags, not the fields."""
    try:
        return check()
    except InputError:
        raise
    except ValueError as err:
        text = re.sub(
            r"(?<![\w-])(" + "|".join(FLAGS) + r")(?![\w-])",
            lambda m: FLAGS[m.group(1)],
            str(err),
        )
        raise InputError(text) from err


def _train_config(args: argparse.Namespace, nuisances: list[str], k: int | None):
    """The new model's config from the flags (``k`` None: as many encoders as the flags give,
    to check the settings before the data is read)."""
    from .. import workflow

    if k is None:
        k = max(1, len(nuisances) if args.targets else len(_input_dirs(args)))
    return workflow.build_config(
        args.model,
        image_size=args.image_size,
        channels=args.nchannel,
        nuisances=nuisances,
        n_encoders=k,
        beta=args.beta,
        latent_dim=args.latent_dim,
        inter_dim=args.inter_dim,
        nlayers=args.nlayers,
        nfilters=args.nfilters,
        kernel_size=args.kernel_size,
        recon_loss=args.recon_loss,
        epsilon_std=args.epsilon_std,
    )


def _train_options(args: argparse.Namespace, save_dir: Path | None, world: int):
    from ..config import TrainOptions

    opts = TrainOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learn_rate=args.learn_rate,
        seed=args.seed,
        device=args.device,
        earlystop=args.earlystop,
        patience=args.patience,
        save_dir=save_dir,
        num_workers=args.num_workers,
        distributed=args.distributed or world > 1,
        compile=args.compile,
        precision="bf16" if args.bf16 else args.precision,
        kl_warmup=args.kl_warmup,
        invariance=args.invariance,
        threads=args.threads,
    )
    opts.validate()
    return opts


def _given(args: argparse.Namespace) -> set[str]:
    return set(getattr(args, "given", ()))


#: flags that fix a model's architecture -> its config field
ARCHITECTURE_FLAGS = {
    "image_size": "image_size",
    "nchannel": "channels",
    "latent_dim": "latent_dim",
    "inter_dim": "inter_dim",
    "nlayers": "nlayers",
    "nfilters": "nfilters",
    "kernel_size": "kernel_size",
    "recon_loss": "recon_loss",
}


def _refuse_changed_architecture(args: argparse.Namespace, cfg) -> None:
    """A checkpoint's model keeps its architecture: flags given that differ are refused, in one
    line (they were silently ignored)."""
    given = _given(args)
    bad = [
        f"--{flag} {getattr(args, flag)} (checkpoint: {getattr(cfg, field)})"
        for flag, field in ARCHITECTURE_FLAGS.items()
        if flag in given and getattr(args, flag) != getattr(cfg, field)
    ]
    if "model" in given and (args.model == "mevae") != (cfg.n_encoders > 1):
        bad.append(f"--model {args.model} (checkpoint: K={cfg.n_encoders} encoder(s))")
    if "nuisances" in given and args.targets and cfg.nuisances:
        names = _nuisances(args.nuisances)
        if names != list(cfg.nuisances):
            bad.append(f"--nuisances {','.join(names)} (checkpoint: {','.join(cfg.nuisances)})")
    if bad:
        raise InputError(
            "the checkpoint fixes the model, which these flags would change: "
            + "; ".join(bad)
            + ". Leave them out, or train a new model without --checkpoint"
        )


def _resume_line(ckpt, opts, old: tuple[float, float]) -> str:
    """One line on what a resumed run changes: the learning rate (applied to the saved
    optimizer state), beta and epsilon_std."""
    groups = (ckpt.optimizer_state or {}).get("param_groups") or [{}]
    saved_lr = groups[0].get("lr")
    lr = f"learning rate {opts.learn_rate:g}"
    if saved_lr is None:
        lr += " (no saved optimizer state: a fresh one)"
    elif saved_lr != opts.learn_rate:
        lr += f" (was {saved_lr:g}; the saved optimizer state is kept)"
    else:
        lr += " (the saved optimizer state is kept)"
    parts = [lr]
    for name, before, now in zip(
        ("beta", "epsilon_std"), old, (ckpt.config.beta, ckpt.config.epsilon_std), strict=True
    ):
        if before != now:
            parts.append(f"{name} {now:g} (was {before:g})")
    return f"resuming {ckpt.path} after epoch {ckpt.epoch}: " + ", ".join(parts)


def _kept_on_interrupt(trainer, save_dir: Path) -> str:
    """What Ctrl-C kept, in words."""
    if trainer.steps_done and trainer.last_checkpoint is not None:
        done = trainer._completed_epochs()
        return (
            f"the weights at the interrupt are saved in {trainer.last_checkpoint} (after "
            f"{trainer.steps_done} training step(s); its epoch count stays {done}, so a "
            f"resumed run redoes the interrupted epoch: --checkpoint {shlex.quote(str(save_dir))}"
            "); encodings.csv and the pictures were not written"
        )
    return "interrupted before the first training step: nothing was written"


def _interrupted(args: argparse.Namespace, what: str) -> None:
    print(f"mevae {args.command}: interrupted: {what}", file=sys.stderr, flush=True)
