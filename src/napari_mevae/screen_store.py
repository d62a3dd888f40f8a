"""A screen's crops on disk (a STORE): one chunked zarr array for every kept cell of every field,
one cell table for every labelled cell, and the crop settings.

STORE/
    crops.zarr/    zarr v3 array (N kept, C, S, S) float16 (or uint8 = 0..255), chunks of
                   ``CHUNK`` cells, Blosc-LZ4 compressed; row ``i`` is the cell whose
                   ``crop_index`` is ``i``
    cells.parquet  one row per labelled object, in field order, then plane, then label id:
                   cell_id, source, field_index, plane, label, centroid_y, centroid_x, area,
                   orientation, the manifest's extra columns, skipped ("" or the reason),
                   crop_index (-1 for skipped cells)
    screen.json    format marker, crop settings, counts, crop shape and dtype

Why zarr and not a file per cell: a million cells are a million files otherwise; chunks of
``CHUNK`` cells are read and written as blocks, and a reader decodes only the chunks it needs
(:class:`StoreCrops` keeps a few decoded chunks, so reading cells in order costs one decode
per chunk).  No torch here: the training data set is the usual
:class:`~napari_mevae.nuisances.NuisancePairs` over :class:`StoreCrops`.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import InputError

__all__ = [
    "CHUNK",
    "STORE_FILES",
    "ScreenStore",
    "StoreCrops",
    "StoreWriter",
    "is_store",
]

CHUNK = 256
STORE_FORMAT = "napari-mevae screen store"
STORE_VERSION = 1
#: what a STORE holds (and ``--overwrite`` replaces)
STORE_FILES = ("crops.zarr", "cells.parquet", "screen.json")
_DTYPES = ("float16", "uint8")


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a STORE written by ``mevae crop``."""
    return (Path(path) / "screen.json").is_file()


class StoreWriter:
    """Append crops (N, C, S, S) in [0, 1] to a new ``crops.zarr`` in whole chunks; the
    remainder is written by :meth:`close`.  Holds at most one chunk plus one appended block."""

    def __init__(self, path: Path, channels: int, size: int, dtype: str = "float16") -> None:
        import zarr
        from zarr.codecs import BloscCodec

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        self.dtype = dtype
        self.shape = (channels, size, size)
        self.array = zarr.create_array(
            str(path),
            shape=(0, *self.shape),
            chunks=(CHUNK, *self.shape),
            dtype=dtype,
            compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
            chunk_key_encoding={"name": "default", "separator": "."},  # flat: c.0.0.0.0
            fill_value=0,
        )
        self.written = 0
        self._pending: list[np.ndarray] = []
        self._n_pending = 0

    def _convert(self, crops: np.ndarray) -> np.ndarray:
        if self.dtype == "uint8":
            if crops.dtype == np.uint8:
                return crops
            return np.round(np.clip(crops, 0, 1) * 255).astype(np.uint8)
        return np.asarray(crops, dtype=np.float16)

    def append(self, crops: np.ndarray) -> None:
        crops = np.asarray(crops)
        if len(crops) == 0:
            return
        if crops.shape[1:] != self.shape:
            raise ValueError(f"crops of shape {crops.shape[1:]} into a store of {self.shape}")
        self._pending.append(self._convert(crops))
        self._n_pending += len(crops)
        if self._n_pending >= CHUNK:
            self._flush(whole_chunks=True)

    def _flush(self, whole_chunks: bool) -> None:
        block = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        n = (len(block) // CHUNK) * CHUNK if whole_chunks else len(block)
        if n:
            end = self.written + n
            self.array.resize((end, *self.shape))
            self.array[self.written : end] = block[:n]
            self.written = end
        rest = block[n:]
        self._pending = [rest] if len(rest) else []
        self._n_pending = len(rest)

    def close(self) -> int:
        """Write what is left; returns the number of crops written."""
        if self._n_pending:
            self._flush(whole_chunks=False)
        return self.written


class StoreCrops:
    """The kept cells' crops as a lazy ``(N, C, S, S)`` float32 array: ``len``, ``shape``,
    ``crops[i]`` and ``crops[a:b]`` (what :class:`~napari_mevae.nuisances.NuisancePairs` and
    :func:`~napari_mevae.analysis.iter_encode_chunks` read).  ``start``/``stop`` give a view of a
    range of cells (a worker's share).  Decoded chunks are cached, up to ``cache_mb`` MB (as
    stored: float16 or uint8), so reading in order decodes each chunk once and a store that
    fits is decoded once in all; a random cell outside the cache costs one chunk's decoding
    (~2 ms for 256 cells of 64 x 64).  It pickles by path (DataLoader workers)."""

    def __init__(
        self,
        path: str | os.PathLike,
        start: int = 0,
        stop: int | None = None,
        cache_mb: float = 256,
    ) -> None:
        self.path = Path(path)
        self._open()
        n = self._array.shape[0]
        self.start = int(start)
        self.stop = n if stop is None else min(int(stop), n)
        self.cache_mb = cache_mb
        chunk_bytes = self.chunk * int(np.prod(self._array.shape[1:])) * self.dtype.itemsize
        self.cache = max(1, int(cache_mb * 2**20 // max(chunk_bytes, 1)))
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()

    def _open(self) -> None:
        import zarr

        try:
            self._array = zarr.open_array(str(self.path), mode="r")
        except Exception as err:  # zarr raises several types for a missing/damaged array
            raise InputError(f"cannot open the crops of {self.path.parent}: {err}") from err
        self.dtype = np.dtype(self._array.dtype)
        self.chunk = int(self._array.chunks[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self._array.shape[1:])

    def __len__(self) -> int:
        return self.stop - self.start

    def _float(self, arr: np.ndarray) -> np.ndarray:
        if self.dtype == np.uint8:
            return arr.astype(np.float32) / 255.0
        return arr.astype(np.float32)

    def _chunk(self, k: int) -> np.ndarray:
        hit = self._chunks.get(k)
        if hit is not None:
            self._chunks.move_to_end(k)
            return hit
        data = self._array[k * self.chunk : (k + 1) * self.chunk]
        self._chunks[k] = data
        if len(self._chunks) > self.cache:
            self._chunks.popitem(last=False)
        return data

    def read(self, a: int, b: int) -> np.ndarray:
        """Cells ``a .. b-1`` of this view as float32."""
        a, b = a + self.start, b + self.start
        if b - a >= self.chunk:  # a block: one read, no cache
            return self._float(self._array[a:b])
        parts = []
        while a < b:
            k = a // self.chunk
            end = min(b, (k + 1) * self.chunk)
            parts.append(self._chunk(k)[a - k * self.chunk : end - k * self.chunk])
            a = end
        if not parts:
            return np.zeros((0, *self.shape[1:]), np.float32)
        return self._float(np.concatenate(parts) if len(parts) > 1 else parts[0])

    def __getitem__(self, index: int | slice) -> np.ndarray:
        n = len(self)
        if isinstance(index, slice):
            a, b, step = index.indices(n)
            if step != 1:
                return np.stack([self[i] for i in range(a, b, step)])
            return self.read(a, max(a, b))
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"cell {index} out of range 0..{n - 1}")
        return self.read(i, i + 1)[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)

    def __getstate__(self) -> dict:
        keep = ("path", "start", "stop", "cache_mb", "cache")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()
        self._chunks = OrderedDict()


class ScreenStore:
    """A STORE opened for reading: ``settings`` (screen.json), ``table`` (every labelled cell),
    ``crops`` (the kept cells, lazy; row ``i`` = ``table.crop_index == i``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta = self.path / "screen.json"
        if not meta.is_file():
            raise InputError(
                f"{self.path} is not a cell store written by `mevae crop` (no screen.json)"
            )
        try:
            self.settings: dict[str, Any] = json.loads(meta.read_text())
        except ValueError as err:
            raise InputError(f"{meta} is damaged: {err}") from err
        if self.settings.get("format") != STORE_FORMAT:
            raise InputError(f"{meta} is not a napari-mevae screen store")
        if self.settings.get("version", 0) > STORE_VERSION:
            raise InputError(f"{self.path} was written by a newer napari-mevae")
        self.crops = StoreCrops(self.path / "crops.zarr")
        if len(self.crops) != self.settings.get("n_kept"):
            raise InputError(
                f"{self.path}: screen.json says {self.settings.get('n_kept')} crops but "
                f"crops.zarr holds {len(self.crops)}: incomplete or damaged"
            )

    @property
    def table(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "cells.parquet")

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(self.crops.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.crops)


def write_meta(stage: Path, settings: dict[str, Any], **counts: Any) -> None:
    """screen.json: the format marker, the crop settings and the counts."""
    meta = {"format": STORE_FORMAT, "version": STORE_VERSION, "crop_settings": settings, **counts}
    (stage / "screen.json").write_text(json.dumps(meta, indent=2) + "\n")
