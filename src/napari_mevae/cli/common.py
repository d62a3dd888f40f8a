"""What every ``mevae`` command shares: messages, progress bars, one-line error explanations."""

from __future__ import annotations

import argparse
import os
import re
import sys

from ..config import (
    CheckpointError,
    InputError,
    TrainingDiverged,
)


def _progress(total: int, desc: str, verbose: int, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit=unit, disable=verbose <= 0, leave=False, file=sys.stderr
    )


def _input_dirs(args: argparse.Namespace) -> list[str]:
    dirs = [d for d in (args.data_dir, args.input2_dir, args.input3_dir) if d]
    if (args.input3_dir and not args.input2_dir) or (args.input2_dir and not args.data_dir):
        raise InputError(
            "encoder inputs must be given in order: --data_dir, then --input2_dir, then --input3_dir"
        )
    return dirs + list(args.input_dir or [])


def _nuisances(text: str) -> list[str]:
    from ..nuisances import get_nuisances

    return [n.name for n in get_nuisances(text)]


def _describe(cfg) -> str:
    from ..config import model_kind

    return (
        f"{model_kind(cfg)} (K={cfg.n_encoders}, {cfg.channels} channel(s), {cfg.image_size} px, "
        f"latent {cfg.latent_dim}, beta {cfg.beta:g})"
    )


def _device(args: argparse.Namespace):
    from ..training import select_device

    return select_device(getattr(args, "device", "auto"))


def _dist_rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes (set by torchrun; 0 and 1 otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def _say(args: argparse.Namespace, text: str) -> None:
    if getattr(args, "verbose", 1) > 0:
        print(text, file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def explain(err: BaseException) -> str | None:
    """The one line the CLI prints for an error it can explain; None for the others (a bug:
    their traceback is shown)."""
    from ..outputs import describe_oserror

    if isinstance(err, InputError | CheckpointError | TrainingDiverged):
        return _one_line(err)
    if isinstance(err, OSError):
        return _one_line(describe_oserror(err))
    if isinstance(err, MemoryError):
        detail = f" ({_one_line(err)})" if str(err) else ""
        return (
            f"out of memory{detail}: try fewer or smaller images, a smaller --batch_size or --lazy"
        )
    if isinstance(err, RuntimeError) and re.search(
        r"out of memory|can't allocate memory|not enough memory", str(err), re.I
    ):
        first = _one_line(str(err).splitlines()[0]) if str(err) else ""
        return f"out of memory ({first}): try a smaller --batch_size or --image_size"
    if isinstance(err, ValueError):  # validation of a setting or a file's content
        return _one_line(err)
    return None
