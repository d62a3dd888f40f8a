"""Crops that do not fit in memory: a plain ``.npy`` file read cell by cell.

A crops file is a standard NumPy ``.npy`` array ``(N, C, S, S)`` (float32, float16 or uint8 in
0..255), so any tool can open it.  :class:`CropStore` reads one cell per ``__getitem__`` with
``os.pread`` at the right offset: no memory map, so the process's memory stays flat however large
the file (a memory map would count every page it touched as resident).  It pickles by path, so
DataLoader worker processes each open their own handle.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .config import InputError
from .outputs import OutputSet

__all__ = ["CropStore", "write_crops"]

_DTYPES = (np.float32, np.float16, np.uint8)


def write_crops(
    path: str | os.PathLike,
    chunks: Iterable[np.ndarray] | np.ndarray,
    dtype: str = "float16",
    outputs: OutputSet | None = None,
) -> Path:
    """Write crops ``(N, C, S, S)`` in [0, 1] (or an iterable of such chunks, streamed) to
    ``path`` (.npy).  ``uint8`` stores 0..255, 4x smaller than float32.  The file is complete
    or untouched (with ``outputs``: renamed when that set of files is committed)."""
    path = Path(path)
    dt = np.dtype(dtype)
    if dt not in [np.dtype(d) for d in _DTYPES]:
        raise ValueError(f"dtype must be float32, float16 or uint8, got {dtype}")
    if isinstance(chunks, np.ndarray):
        chunks = [chunks]
    n, shape = 0, None
    header_len = 0
    own = outputs is None
    out = OutputSet() if outputs is None else outputs
    with contextlib.ExitStack() as stack:
        if own:
            stack.enter_context(out)
        fh = stack.enter_context(out.open(path, "wb"))
        for chunk in chunks:
            chunk = np.asarray(chunk)
            if chunk.ndim != 4:
                raise ValueError(f"crops must be (N, C, S, S), got {chunk.shape}")
            if shape is None:
                shape = chunk.shape[1:]
                # reserve a header big enough for any N; rewritten at the end
                header_len = _write_header(fh, dt, (2**40, *shape))
            elif chunk.shape[1:] != shape:
                raise ValueError(f"chunk of shape {chunk.shape[1:]} after {shape}")
            data = np.round(np.clip(chunk, 0, 1) * 255) if dt == np.uint8 else chunk
            fh.write(np.ascontiguousarray(data, dtype=dt).tobytes())
            n += chunk.shape[0]
        if shape is None:
            raise ValueError("no crops to write")
        fh.seek(0)
        if _write_header(fh, dt, (n, *shape)) != header_len:  # pragma: no cover
            raise RuntimeError("npy header length changed")
    return path


def _write_header(fh, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    start = fh.tell()
    # pad every header to the same width (256 bytes in all, 64-aligned) so the final N can
    # overwrite the placeholder written first
    text = repr(header).ljust(256 - 10 - 1) + "\n"
    magic = np.lib.format.magic(1, 0)
    fh.write(magic + len(text).to_bytes(2, "little") + text.encode("latin1"))
    return fh.tell() - start


class CropStore:
    """Lazy ``(N, C, S, S)`` float32 array view of a crops ``.npy`` file (see module doc)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._fd: int | None = None
        self._pid = -1
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"crops file not found: {self.path}")
        with open(self.path, "rb") as fh:
            try:
                version = np.lib.format.read_magic(fh)
                read = {
                    (1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0,
                }[version]
                shape, fortran, dtype = read(fh)
            except (ValueError, KeyError, EOFError) as err:
                raise InputError(f"{self.path} is not a .npy crops file: {err}") from err
            self.offset = fh.tell()
            size = os.fstat(fh.fileno()).st_size
        if fortran or len(shape) != 4 or dtype not in [np.dtype(d) for d in _DTYPES]:
            raise InputError(
                f"{self.path}: expected a C-order (N, C, S, S) float32/float16/uint8 array, "
                f"got shape {shape}, dtype {dtype}"
            )
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        # plain Python ints: a header may claim any size; check it against the file before
        # anything is allocated for it (a claimed 2**40 cells built names for minutes)
        self.item_bytes = math.prod(self.shape[1:]) * dtype.itemsize
        claimed = self.offset + self.shape[0] * self.item_bytes
        if claimed != size:
            holds = (size - self.offset) // self.item_bytes if self.item_bytes else 0
            raise InputError(
                f"{self.path}: its header claims {self.shape[0]} crops of "
                f"{self.shape[1:]} ({claimed} bytes) but the file has {size} bytes "
                f"(room for {max(0, holds)} crops): truncated, still being written, or damaged"
            )

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # re-open in worker processes
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, count: int) -> np.ndarray:
        raw = os.pread(
            self._handle(), self.item_bytes * count, self.offset + start * self.item_bytes
        )
        arr = np.frombuffer(raw, dtype=self.dtype).reshape(count, *self.shape[1:])
        if self.dtype == np.uint8:
            return arr.astype(np.float32) / 255.0
        return arr.astype(np.float32)

    def __getitem__(self, index: int | slice) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return np.stack([self[i] for i in range(start, stop, step)])
            return self._read(start, max(0, stop - start))
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"cell {index} out of range 0..{len(self) - 1}")
        return self._read(i, 1)[0]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, -1
        return state

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)
