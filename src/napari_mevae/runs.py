"""What the ``mevae`` commands leave on disk, written so that nothing is half-written or mixed:
a training run's folder in the reference's layout (``training.log``, ``filenames.csv``,
``encodings.csv``, the image grids, the weights), and the pairs folders of ``mevae pairs``."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import MAX_LATENT_SAMP, MAX_NUM_SAVE, InputError

if TYPE_CHECKING:
    import pandas as pd

    from .cells import CellCrops
    from .model import MEVAE
    from .outputs import OutputSet

__all__ = [
    "PAIRS_FILES",
    "TrainData",
    "RunLog",
    "pairs_outputs",
    "write_encodings_csv",
    "write_pairs",
    "write_run_outputs",
]


@dataclass
class TrainData:
    """What a run on files reads: a dataset for the trainer, arrays for encoding and grids."""

    dataset: Any
    filenames: list[str]  # rows of filenames.csv / encodings.csv
    encode_inputs: Any  # (N, K, C, S, S) or (N, C, S, S)
    grid_inputs: list[np.ndarray]
    targets: np.ndarray
    n_encoders: int
    nuisances: list[str]


#: what ``mevae pairs`` / :func:`write_pairs` writes into its folder (and ``--overwrite`` replaces)
PAIRS_FILES = ("cells.csv", "crops.npy", "crops.csv")
#: rows of latent_walk_final.png for a model that uses no latent dimension (yet)
WALK_UNTRAINED = 16


def pairs_outputs(folder: str | Path) -> list[Path]:
    """What an earlier :func:`write_pairs` wrote into ``folder``: ``InputImages<k>/``,
    ``OutputImages/``, ``cells.csv``, ``crops.npy``, ``crops.csv`` (and the temporary folders
    of one that was killed)."""
    import re

    folder = Path(folder)
    if not folder.is_dir():
        return []
    owned = r"InputImages\d+|OutputImages|\.mevae-(pairs|old)\..+"
    return sorted(
        p for p in folder.iterdir() if p.name in PAIRS_FILES or re.fullmatch(owned, p.name)
    )


def write_pairs(
    out: str | Path,
    cells: CellCrops,
    nuisances: Sequence[str],
    seed: int | None = 0,
    npy: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Write cropped cells as the reference folder layout (:func:`folders.export_pairs`) with
    ``cells.csv`` (the cell table with each kept cell's file name) and, with ``npy``,
    ``crops.npy`` + ``crops.csv``.  Returns that table.

    Everything is written into a temporary folder inside ``out`` first, then swapped in: the
    outputs of an earlier call in ``out`` (:func:`pairs_outputs`) are replaced only when the new
    ones are complete, and nothing else in ``out`` is touched."""
    import shutil
    import tempfile

    from .folders import export_pairs
    from .outputs import WriteFailed, check_output_dir

    out = check_output_dir(out, "output folder")
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".mevae-pairs.", dir=out))
    try:
        files = export_pairs(cells.crops, stage, nuisances, seed=seed, progress=progress)
        table = cells.table.copy()
        table.insert(0, "filename", "")
        kept = table["crop_index"] >= 0
        table.loc[kept, "filename"] = [Path(files[i]).name for i in table.loc[kept, "crop_index"]]
        table.to_csv(stage / "cells.csv", index=False)
        if npy:
            cells.save(stage / "crops.npy")
        _swap_in(stage, out, [p for p in pairs_outputs(out) if p != stage])
    except OSError as err:  # name the folder asked for, not the temporary one
        if err.errno is None or not str(err.filename or stage).startswith(str(stage)):
            raise
        raise WriteFailed(err.errno, err.strerror or os.strerror(err.errno), str(out)) from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return table


def _swap_in(stage: Path, out: Path, old: list[Path]) -> None:
    """Move everything in ``stage`` into ``out``, the ``old`` entries of ``out`` out of the way
    first; on failure, put everything back as it was."""
    import shutil
    import tempfile

    trash = Path(tempfile.mkdtemp(prefix=".mevae-old.", dir=out))
    moved_out: list[Path] = []
    moved_in: list[Path] = []
    try:
        for p in old:
            os.replace(p, trash / p.name)
            moved_out.append(p)
        for p in sorted(stage.iterdir()):
            os.replace(p, out / p.name)
            moved_in.append(out / p.name)
    except BaseException:
        for p in moved_in:
            os.replace(p, stage / p.name)
        for p in moved_out:
            os.replace(trash / p.name, p)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)


class RunLog:
    """``training.log`` of one run.  Appended to when resuming the checkpoint of epoch
    ``start`` (rows of later epochs, logged after that checkpoint by a run that was killed, are
    dropped first: they are trained again); otherwise written under a temporary name and
    renamed over the old log with the run's first checkpoint (the first epoch report comes
    after the trainer saved it), so log and checkpoint stay one run's."""

    def __init__(self, path: Path, append: bool, start: int = 0) -> None:
        from .outputs import output_target

        self.path = output_target(path)
        self.append = append and self.path.exists()
        self.start = start
        self.fh: Any = None
        self.tmp: Path | None = None

    def open(self) -> None:
        import tempfile

        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.append:
            self._drop_rows_from(self.start)
            self.fh = open(self.path, "a")  # noqa: SIM115 (closed by close())
            return
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        self.tmp = Path(tmp)
        os.chmod(fd, 0o666 & ~_umask())
        self.fh = os.fdopen(fd, "w")
        self.fh.write("epoch\tloss\n")
        self.fh.flush()

    def _drop_rows_from(self, epoch: int) -> None:
        from .outputs import atomic_write

        lines = self.path.read_text().splitlines(keepends=True)
        keep = [ln for ln in lines if not _epoch_row_at_or_after(ln, epoch)]
        if len(keep) < len(lines):
            with atomic_write(self.path) as fh:
                fh.writelines(keep)

    def row(self, epoch: int, loss: float) -> None:
        self.commit()
        self.fh.write(f"{epoch}\t{loss:.6f}\n")
        self.fh.flush()

    def commit(self) -> None:
        if self.tmp is not None:
            self.fh.flush()
            os.replace(self.tmp, self.path)  # the open file keeps writing to it
            self.tmp = None

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.tmp is not None:  # never committed: the older log stays
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


def _epoch_row_at_or_after(line: str, epoch: int) -> bool:
    first = line.split("\t", 1)[0]
    return first.isdigit() and int(first) >= epoch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_encodings_csv(
    path: Path,
    names: Sequence[str],
    model: MEVAE,
    inputs: Any,
    verbose: int = 1,
    batch_size: int = 256,
    outputs: OutputSet | None = None,
) -> Path:
    """Encode and stream rows to ``path``: header ``filename,z0,z1,...``, one row per image in
    ``names`` order.  Only one batch of latents is in memory at a time.

    The file is complete or untouched: written under a temporary name and renamed at the end,
    or, with ``outputs``, when that set of files is committed."""
    from tqdm.auto import tqdm

    from .analysis import _check_batch_size, iter_encode_chunks
    from .outputs import OutputSet

    batch_size = _check_batch_size(batch_size)
    path = Path(path)
    own = outputs is None
    out = OutputSet() if outputs is None else outputs
    bar = tqdm(total=len(names), desc="encoding", unit="cell", disable=verbose <= 0, leave=False)
    try:
        with out.open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["filename", *[f"z{i}" for i in range(model.config.latent_dim)]])
            for start, z in iter_encode_chunks(model, inputs, batch_size):
                for name, row in zip(names[start : start + len(z)], z, strict=True):
                    w.writerow([name, *[f"{v:.7g}" for v in row]])
                bar.update(len(z))
        if own:
            out.commit()
    except BaseException:
        if own:
            out.discard()
        raise
    finally:
        bar.close()
    return path


def write_run_outputs(
    save_dir: Path,
    model: MEVAE,
    data: TrainData,
    num_save: int = 8,
    latent_samp: int = 10,
    verbose: int = 1,
) -> None:
    """Everything the reference writes after training (training.log is written while
    training): filenames.csv, encodings.csv, the input / truth / reconstruction grids
    (``num_save`` images per row), the latent walk (``latent_samp`` steps) and the weights.

    All or nothing: every file is written under a temporary name first and they are renamed
    together at the end, so a failure (full disk, Ctrl-C) leaves the previous run's files as
    they were and never a mix of two runs."""
    from .analysis import latent_walk, reconstruct
    from .checkpoints import CHECKPOINT_NAME, save_checkpoint, torch_bytes
    from .figures import save_grid, save_latent_walk
    from .outputs import OutputSet, check_output_dir

    if not 1 <= num_save <= MAX_NUM_SAVE:
        raise InputError(f"num_save must be 1..{MAX_NUM_SAVE} images per row, got {num_save}")
    if not 2 <= latent_samp <= MAX_LATENT_SAMP:
        raise InputError(f"latent_samp must be 2..{MAX_LATENT_SAMP} steps, got {latent_samp}")
    save_dir = check_output_dir(save_dir, "save_dir")
    _check_run_checkpoint(save_dir, model)
    models = save_dir / "models"
    with OutputSet() as out:
        out.write_text(save_dir / "filenames.csv", "".join(f + "\n" for f in data.filenames))
        write_encodings_csv(
            save_dir / "encodings.csv",
            data.filenames,
            model,
            data.encode_inputs,
            verbose,
            outputs=out,
        )
        ncols = num_save
        n = ncols * ncols
        for k, imgs in enumerate(data.grid_inputs):
            name = "input_images.png" if k == 0 else f"input{k + 1}_images.png"
            with out.writing(save_dir / name) as tmp:
                save_grid(tmp, imgs, n, ncols)
        with out.writing(save_dir / "Truth_images.png") as tmp:
            save_grid(tmp, data.targets[:n], n, ncols)
        first = data.encode_inputs[:n]
        with out.writing(save_dir / "recon_images_final1.tif") as tmp:
            save_grid(tmp, reconstruct(model, first), n, ncols)
        with out.writing(save_dir / "latent_walk_final.png") as tmp:
            # the dimensions in use (an unused one walks a column of identical cells, and
            # encodings.csv holds 0 there); while none is (an untrained model), the first
            # WALK_UNTRAINED: 128 rows of an untrained decoder took 6 s to say nothing more
            in_use = np.flatnonzero(model.active_mask.cpu().numpy())
            if not model.activity_measured or model.n_active == 0:
                in_use = in_use[:WALK_UNTRAINED]
            save_latent_walk(tmp, latent_walk(model, latent_samp, dims=in_use))
        for k, enc in enumerate(model.encoders):
            out.write_bytes(models / f"encoder{k + 1}.pt", torch_bytes(enc.state_dict()))
        out.write_bytes(models / "decoder.pt", torch_bytes(model.decoder.state_dict()))
        if not (models / CHECKPOINT_NAME).exists():  # --phase load: keep the run self-contained
            save_checkpoint(models, model, outputs=out)


def _check_run_checkpoint(save_dir: Path, model: MEVAE) -> None:
    """The outputs of ``model`` may go into ``save_dir`` only when its checkpoint (if any) is
    ``model``'s: encodings of one model beside another's checkpoint would be one run's files
    mixed with another's."""

    from .checkpoints import CHECKPOINT_NAME, load_checkpoint

    path = save_dir / "models" / CHECKPOINT_NAME
    if not path.exists():
        return
    try:
        saved = load_checkpoint(path).model_state
    except Exception:  # unreadable: it is replaced by nothing here, and named
        saved = {}
    ours = model.state_dict()
    same = saved.keys() == ours.keys() and all(_same(saved[k], ours[k]) for k in ours)
    if not same:
        raise InputError(
            f"{save_dir} holds the checkpoint of another model ({path}); its outputs would "
            "not match it: write to another folder"
        )


def _same(a: Any, b: Any) -> bool:
    """Equal tensors, NaN matching NaN (an untrained model's latent activity is NaN)."""
    import torch

    a, b = a.detach().cpu(), b.detach().cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(
            torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
    return bool(torch.equal(a, b))
