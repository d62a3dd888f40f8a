"""The reference's folder layout: ``<dir>/train/*.tif`` (or ``<dir>/*.tif``), one folder per
encoder input plus one for the target, images paired BY FILE NAME (the reference paired by
position and silently mixed cells up when a file was missing).

Everything that reads or writes those folders is here, with one reader and one writer:

- :func:`read_image` scales every file to [0, 1] by ONE rule: uint8 files are divided by 255
  (the exact inverse of :func:`write_image`, so crops written by ``mevae pairs`` read back as
  they were); any other file (uint16, float...) is divided by its own maximum, as the
  reference does (an all-zero image stays zero instead of becoming NaN).
- :func:`write_image` writes [0, 1] images as uint8 TIFF.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import REFERENCE_NUISANCES, InputError

__all__ = [
    "IMAGE_SUFFIXES",
    "list_images",
    "match_by_name",
    "read_image",
    "read_raw_image",
    "write_image",
    "FolderPairs",
    "FolderTargets",
    "LazyFolderTargets",
    "export_pairs",
    "read_pairs",
    "natural_key",
]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def natural_key(name: str) -> list[object]:
    """Sort Image_2 before Image_10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Images of ``folder/train`` if it exists, else of ``folder``, in natural name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    base = folder / "train" if (folder / "train").is_dir() else folder
    files = [p for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in {base}; expected <dir>/train/*.tif or <dir>/*.tif"
        )
    files.sort(key=lambda p: natural_key(p.name))
    by_stem: dict[str, list[str]] = {}
    for f in files:
        by_stem.setdefault(f.stem, []).append(f.name)
    twins = [names for names in by_stem.values() if len(names) > 1]
    if twins:  # images pair up by name: one of them would be dropped silently
        shown = "; ".join(" and ".join(names) for names in twins[:3])
        more = f" ({len(twins)} names in all)" if len(twins) > 3 else ""
        raise InputError(
            f"{base} holds several images with one name ({shown}{more}); images are "
            "matched by name, so keep one of each"
        )
    return files


def match_by_name(folders: Sequence[str | os.PathLike]) -> tuple[list[str], list[list[Path]]]:
    """Pair images across folders by file stem.  Returns the names and, per folder, the paths in
    that order.  Raises a ValueError listing the unmatched names."""
    listings = [list_images(f) for f in folders]
    maps = [{p.stem: p for p in files} for files in listings]
    common = set(maps[0])
    for m in maps[1:]:
        common &= set(m)
    problems = []
    for folder, m in zip(folders, maps, strict=True):
        missing = sorted(set().union(*maps) - set(m), key=natural_key)
        if missing:
            shown = ", ".join(missing[:10]) + (
                f" ... ({len(missing)} in all)" if len(missing) > 10 else ""
            )
            problems.append(f"{folder} lacks {shown}")
    if problems:
        raise InputError("images do not pair up by file name: " + "; ".join(problems))
    names = sorted(common, key=natural_key)
    return names, [[m[n] for n in names] for m in maps]


def read_image(
    path: str | os.PathLike, image_size: int | None = None, channels: int | None = None
) -> np.ndarray:
    """One image as float32 ``(C, S, S)`` in [0, 1] (uint8 / 255, anything else / its own
    maximum: see the module's docstring).  Resized when ``image_size`` differs.  Channel-last
    files ``(Y, X, C)`` with C <= 32 are moved to channel-first."""
    path = Path(path)
    arr = read_raw_image(path)
    as_uint8 = arr.dtype == np.uint8
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        if arr.shape[-1] <= 32 and arr.shape[0] > arr.shape[-1]:  # (Y, X, C)
            arr = np.moveaxis(arr, -1, 0)
    else:
        raise ValueError(f"{path}: expected a 2-D or 3-D image, got shape {arr.shape}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    if channels is not None and arr.shape[0] != channels:
        if arr.shape[0] in (3, 4) and channels == 1:  # RGB(A) file for a 1-channel model
            arr = arr[:3].mean(0, keepdims=True)
        else:
            raise ValueError(
                f"{path}: has {arr.shape[0]} channel(s), expected {channels} (--nchannel)"
            )
    if image_size is not None and arr.shape[1:] != (image_size, image_size):
        from skimage.transform import resize

        arr = _shrink(path, arr, image_size)
        arr = resize(
            arr,
            (arr.shape[0], image_size, image_size),
            order=1,
            anti_aliasing=True,
            preserve_range=True,
        )
        arr = arr.astype(np.float32)
    peak = 255.0 if as_uint8 else (float(arr.max()) if arr.size else 0.0)
    if peak > 0:
        arr /= peak
    np.clip(arr, 0.0, 1.0, out=arr)
    return arr


def read_raw_image(path: str | os.PathLike) -> np.ndarray:
    """A file's pixels as stored (TIFF with tifffile, PNG/JPEG with scikit-image).  Errors name
    the file, in one line; complex values are refused."""
    path = Path(path)
    complaints = _Complaints()
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with complaints.of("tifffile"):  # a damaged file is logged, not raised
                arr = tifffile.imread(path)
        else:
            from skimage.io import imread

            arr = imread(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image not found: {path}") from err
    except MemoryError as err:
        raise MemoryError(f"reading {path}: {err}") from err
    except (InputError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:  # tifffile, PIL, imageio: many types for a damaged file
        text = " ".join(str(err).split()) or type(err).__name__
        raise InputError(f"cannot read image {path}: {text}") from err
    arr = np.asarray(arr)
    if arr.size == 0:
        why = complaints.last or "no pixels"
        raise InputError(f"cannot read image {path}: {why}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{path}: its pixels are {arr.dtype}; expected real intensities")
    return arr


class _Complaints(logging.Handler):
    """What a library logs while reading a file, kept for the error message instead of being
    printed as lines of its own."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.last = " ".join(record.getMessage().split())

    @contextlib.contextmanager
    def of(self, name: str):
        logger = logging.getLogger(name)
        logger.addHandler(self)
        propagate, logger.propagate = logger.propagate, False
        try:
            yield self
        finally:
            logger.propagate = propagate
            logger.removeHandler(self)


#: an image whose side is more than this many times the crop's is "far larger" (warned)
FAR_LARGER = 8
_warned_large: set[str] = set()


def _shrink(path: Path, arr: np.ndarray, image_size: int) -> np.ndarray:
    """Far larger images (a whole field instead of a cell crop?) are warned about once per
    folder and first shrunk by block means to at most 4x the crop, so the anti-aliased resize
    that follows takes milliseconds, not minutes (8000 x 8000 px: 135 s)."""
    side = max(arr.shape[1:])
    if side <= FAR_LARGER * image_size:
        return arr
    folder = str(path.parent)
    if folder not in _warned_large:
        _warned_large.add(folder)
        warnings.warn(
            f"{path.name} in {folder} is {arr.shape[2]}x{arr.shape[1]} px, far larger than "
            f"the {image_size} px crops: it is shrunk to the crop size (were these meant to "
            "be cell crops? mevae pairs makes them from a segmented image)",
            UserWarning,
            stacklevel=3,
        )
    f = side // (4 * image_size)
    h, w = arr.shape[1] // f * f, arr.shape[2] // f * f
    if h == 0 or w == 0:
        return arr
    blocks = arr[:, :h, :w].reshape(arr.shape[0], h // f, f, w // f, f)
    return blocks.mean(axis=(2, 4), dtype=np.float32)


def write_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Save a ``(C, S, S)`` (or ``(S, S)``) image in [0, 1] as uint8 TIFF (2-D when one channel,
    channel-first otherwise; NaN counts as 0)."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.nan_to_num(np.asarray(image, dtype=np.float32))
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    data = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    tifffile.imwrite(path, data, photometric="minisblack")
    return path


def _load_all(paths: Sequence[Path], image_size: int, channels: int) -> np.ndarray:
    out = np.empty((len(paths), channels, image_size, image_size), np.float32)
    for i, p in enumerate(paths):
        out[i] = read_image(p, image_size, channels)
    return out


class FolderPairs:
    """Torch-style dataset of the reference layout: K input folders + one target folder.

    Item ``i`` is ``(inputs (K,C,S,S), target (C,S,S))`` as float32 tensors.  Images are loaded
    once into memory by default (``in_memory``); ``in_memory=False`` reads files lazily, for data
    sets that do not fit.
    """

    def __init__(
        self,
        input_dirs: Sequence[str | os.PathLike],
        target_dir: str | os.PathLike,
        image_size: int,
        channels: int = 1,
        in_memory: bool = True,
    ) -> None:
        if not input_dirs:
            raise ValueError("at least one input folder is needed")
        self.names, paths = match_by_name([*input_dirs, target_dir])
        self.input_paths, self.target_paths = paths[:-1], paths[-1]
        self.image_size, self.channels = image_size, channels
        self.n_encoders = len(input_dirs)
        self._inputs: list[np.ndarray] | None = None
        self._targets: np.ndarray | None = None
        if in_memory:
            self._inputs = [_load_all(p, image_size, channels) for p in self.input_paths]
            self._targets = _load_all(self.target_paths, image_size, channels)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        import torch

        if self._targets is not None and self._inputs is not None:
            inputs = np.stack([a[i] for a in self._inputs])
            target = self._targets[i]
        else:
            inputs = np.stack(
                [read_image(p[i], self.image_size, self.channels) for p in self.input_paths]
            )
            target = read_image(self.target_paths[i], self.image_size, self.channels)
        return torch.from_numpy(inputs), torch.from_numpy(np.ascontiguousarray(target))

    def get_batch(self, indices):
        """Items ``indices`` at once: ``(inputs (B,K,C,S,S), target (B,C,S,S))`` float32 tensors,
        equal to collating ``[self[i] for i in indices]`` but with one gather per array instead of
        ``B`` small copies (the trainer's fast path for in-memory data)."""
        import torch

        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self._targets is None or self._inputs is None:
            items = [self[int(i)] for i in idx]
            return torch.stack([x for x, _ in items]), torch.stack([t for _, t in items])
        inputs = np.stack([a[idx] for a in self._inputs], axis=1)
        return torch.from_numpy(inputs), torch.from_numpy(self._targets[idx])

    @property
    def filenames(self) -> list[str]:
        """First input folder's paths: the rows of filenames.csv."""
        return [str(p) for p in self.input_paths[0]]

    def targets_array(self) -> np.ndarray:
        if self._targets is not None:
            return self._targets
        return _load_all(self.target_paths, self.image_size, self.channels)

    def inputs_array(self, k: int) -> np.ndarray:
        if self._inputs is not None:
            return self._inputs[k]
        return _load_all(self.input_paths[k], self.image_size, self.channels)

    def pairs_array(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``(N, K, C, S, S)`` encoder inputs for a slice, for encoding."""
        stop = len(self) if stop is None else stop
        if self._inputs is not None:
            return np.stack([a[start:stop] for a in self._inputs], axis=1)
        return np.stack(
            [_load_all(p[start:stop], self.image_size, self.channels) for p in self.input_paths],
            axis=1,
        )


class FolderTargets:
    """A folder of canonical crops (``<dir>/train/*.tif`` or ``<dir>/*.tif``) as ``(N,C,S,S)``."""

    def __init__(self, folder: str | os.PathLike, image_size: int, channels: int = 1) -> None:
        self.paths = list_images(folder)
        self.names = [p.stem for p in self.paths]
        self.array = _load_all(self.paths, image_size, channels)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def filenames(self) -> list[str]:
        return [str(p) for p in self.paths]


class LazyFolderTargets:
    """A folder of canonical crop images read one file per item (for folders too big to load)."""

    def __init__(self, folder: str | os.PathLike, image_size: int, channels: int = 1) -> None:
        self.paths = list_images(folder)
        self.names = [p.stem for p in self.paths]
        self.image_size, self.channels = image_size, channels
        self.shape = (len(self.paths), channels, image_size, image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return read_image(self.paths[i], self.image_size, self.channels)

    @property
    def filenames(self) -> list[str]:
        return [str(p) for p in self.paths]


def export_pairs(
    targets: Any,
    out_dir: str | os.PathLike,
    nuisances: str | Sequence[str] = REFERENCE_NUISANCES,
    seed: int | None = 0,
    names: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write the reference layout for the published code and for ``mevae train --data_dir``:
    ``out_dir/InputImages{k}/train/<name>.tif`` (k = 1..K, nuisance k randomised, epoch 0 of
    :class:`NuisancePairs` with this seed) and ``out_dir/OutputImages/train/<name>.tif`` (targets).

    Files are uint8; one channel -> ``(S, S)``, several -> channel-first ``(C, S, S)``.
    ``names`` are file stems (default ``Image_0`` ...).  Returns the target paths, one per crop.
    """
    from .nuisances import NuisancePairs

    ds = NuisancePairs(targets, nuisances, seed=seed)
    n = len(ds)
    if names is None:
        names = [f"Image_{i}" for i in range(n)]
    names = [str(s) for s in names]
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} crops")
    if len(set(names)) != n:
        raise ValueError("names must be unique (images are paired by file name)")
    out = Path(out_dir)
    in_dirs = [out / f"InputImages{k + 1}" / "train" for k in range(ds.n_encoders)]
    tg_dir = out / "OutputImages" / "train"
    for d in [*in_dirs, tg_dir]:
        d.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    every = max(1, n // 100)
    for i in range(n):
        inputs, target = ds[i][:2]
        for k, d in enumerate(in_dirs):
            write_image(d / f"{names[i]}.tif", inputs[k].numpy())
        files.append(write_image(tg_dir / f"{names[i]}.tif", target.numpy()))
        if progress is not None and ((i + 1) % every == 0 or i + 1 == n):
            progress(i + 1, n)
    return files


def read_pairs(out_dir: str | os.PathLike) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Read :func:`export_pairs`' layout back: inputs per encoder ``(N, C, S, S)``, targets and
    the file stems, paired by file name (natural order)."""
    out = Path(out_dir)
    in_dirs = []
    k = 1
    while (out / f"InputImages{k}").is_dir():
        in_dirs.append(out / f"InputImages{k}")
        k += 1
    if not in_dirs:
        raise FileNotFoundError(f"no InputImages1 folder in {out}")
    if not (out / "OutputImages").is_dir():
        raise FileNotFoundError(f"no OutputImages folder in {out}")
    names, paths = match_by_name([*in_dirs, out / "OutputImages"])
    arrays = [np.stack([read_image(p) for p in col]) for col in paths]
    return arrays[:-1], arrays[-1], list(names)
