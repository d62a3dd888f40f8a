"""Output files: complete or untouched, written where the user pointed, one run at a time.

- :class:`OutputSet` writes every file of a set to a temporary name beside its target and
  renames them all at the end (:meth:`OutputSet.commit`): a run that fails half-way (full disk,
  Ctrl-C, a crash) leaves the previous files as they were, and the files of one run always
  belong together.  :func:`atomic_write` is the one-file case.
- :func:`output_target` is where a write lands: a symlink is followed to its target (the link
  stays a link); a device, FIFO, socket or directory is refused with one line, since renaming a
  file over it would replace the node (``--out /dev/full`` as root replaced the device).
- A failed write raises :class:`WriteFailed` (an ``OSError`` with its errno) naming the file
  the user asked for, not the temporary one, so the CLI can say "disk full (ENOSPC) while
  writing Outputs/encodings.csv".
- :class:`DirLock` keeps two runs from writing into one folder at once: the second fails at
  once with a line naming the first (pid, host).  The lock is a kernel file lock, released when
  its process ends however it ends, so a killed run never blocks the next one.

No torch, no numpy: the napari plugin and the CLI import this cheaply.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .config import InputError

__all__ = [
    "DirLock",
    "OutputSet",
    "WriteFailed",
    "atomic_write",
    "check_output_dir",
    "describe_oserror",
    "output_target",
]


class WriteFailed(OSError):
    """Writing an output failed (errno kept); ``filename`` is the file the user asked for.
    The previous file, if any, is untouched."""


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def output_target(path: str | os.PathLike) -> Path:
    """The regular file a write to ``path`` replaces: symlinks are followed to their final
    target (which may not exist yet).  Raises :class:`InputError` when that is a directory,
    a device, a FIFO or a socket."""
    given = Path(path)
    real = Path(os.path.realpath(given))
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return real
    except OSError as err:  # e.g. a symlink loop
        raise InputError(f"cannot write {given}: {err.strerror}") from err
    if stat.S_ISREG(mode):
        return real
    via = f" ({given} -> {real})" if os.path.islink(given) else ""
    kind = _kind(mode)
    hint = "give a file name inside it" if kind == "a directory" else "give a regular file"
    raise InputError(f"cannot write {given}{via}: it is {kind}, not a regular file; {hint}")


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` as a folder to write into: refused with one line when it exists as something
    else (a file, a device)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {folder} exists and is not a folder")
    return folder


def describe_oserror(err: OSError) -> str:
    """One line for an ``OSError``: what happened in words, the errno's name, and the file."""
    code = errno.errorcode.get(err.errno or 0)
    if code is None:
        return str(err)
    words = {
        errno.ENOSPC: "disk full",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EISDIR: "is a directory",
        errno.ENOTDIR: "not a directory",
        errno.ENOENT: "no such file or directory",
        errno.EFBIG: "file too large",
        errno.EIO: "input/output error",
    }.get(err.errno or 0, (err.strerror or code).lower())
    where = err.filename
    if where is None:
        return f"{words} ({code})"
    action = "while writing" if isinstance(err, WriteFailed) else "at"
    return f"{words} ({code}) {action} {where}"


def _file_mode(target: Path) -> int:
    """The permissions of the file being replaced, or the usual umask-based ones."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(target).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class OutputSet:
    """Files written together: each to a temporary name beside its target, all renamed over
    their targets by :meth:`commit` (as a context manager: on leaving without an exception),
    all removed by :meth:`discard` (on an exception, Ctrl-C included).

    >>> with OutputSet() as out:
    ...     with out.open("run/a.csv") as fh:
    ...         fh.write("...")
    ...     with out.writing("run/b.png") as tmp:
    ...         image.save(tmp)  # any writer that takes a path
    """

    def __init__(self) -> None:
        self._files: list[tuple[Path, Path, str]] = []  # (temp, target, as given)

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    @contextlib.contextmanager
    def _naming(self, given: str, temp: Path | None) -> Iterator[None]:
        """Report an OSError of this write as :class:`WriteFailed` on the file as given (not
        its temporary name); errors about other files (an input read lazily while writing)
        pass as they are.  ``temp`` None: every OSError is about this output."""
        try:
            yield
        except WriteFailed:
            raise
        except OSError as err:
            if err.errno is None:
                raise
            if temp is not None and err.filename not in (None, str(temp), given):
                raise
            raise WriteFailed(err.errno, err.strerror or os.strerror(err.errno), given) from err

    def temp(self, path: str | os.PathLike) -> Path:
        """A new temporary file for ``path`` (same folder, same suffix so writers that go by
        the suffix pick the right format), renamed over it at :meth:`commit`."""
        given = str(path)
        target = output_target(path)
        with self._naming(given, None):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent
            )
        os.close(fd)
        self._files.append((Path(tmp), target, given))
        return Path(tmp)

    @contextlib.contextmanager
    def writing(self, path: str | os.PathLike) -> Iterator[Path]:
        """The temporary path to write ``path``'s content to."""
        tmp = self.temp(path)
        with self._naming(str(path), tmp):
            yield tmp

    @contextlib.contextmanager
    def open(self, path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
        """An open file on the temporary path (``mode`` ``"w"`` or ``"wb"``)."""
        tmp = self.temp(path)
        with self._naming(str(path), tmp), open(tmp, mode, **kwargs) as fh:
            yield fh

    def write_bytes(self, path: str | os.PathLike, data: bytes) -> None:
        with self.open(path, "wb") as fh:
            fh.write(data)

    def write_text(self, path: str | os.PathLike, text: str) -> None:
        with self.open(path, "w", newline="") as fh:
            fh.write(text)

    def commit(self) -> list[Path]:
        """Flush every file to disk, then rename each over its target; returns the targets."""
        try:
            for tmp, target, given in self._files:
                with self._naming(given, tmp):
                    os.chmod(tmp, _file_mode(target))
                    fd = os.open(tmp, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            for tmp, target, given in self._files:
                with self._naming(given, tmp):
                    os.replace(tmp, target)
        except BaseException:
            self.discard()
            raise
        done = [target for _, target, _ in self._files]
        for folder in {t.parent for t in done}:
            _fsync_dir(folder)
        self._files.clear()
        return done

    def discard(self) -> None:
        """Remove the temporary files; the targets stay as they were."""
        for tmp, _, _ in self._files:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._files.clear()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Write one file completely or not at all: ``with atomic_write(p) as fh: ...``."""
    with OutputSet() as out, out.open(path, mode, **kwargs) as fh:
        yield fh


# -- one run per folder --------------------------------------------------------------------------
LOCK_NAME = ".mevae.lock"
#: the locks this process holds: folder -> [fd, depth, pid, whether acquiring made the folder]
_HELD: dict[str, list[Any]] = {}


def _lock_fd(fd: int) -> bool:
    """Try to take an exclusive lock on ``fd`` without waiting; False when another process
    holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:  # a file system without locks (some network mounts)
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return True
        raise
    return True


def _describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    started = info.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if started else ""
    what = info.get("command") or "a run"
    return f"{what} (pid {info.get('pid', '?')} on host {info.get('host', '?')}{when})"


class DirLock:
    """An exclusive lock on a folder for one run: ``with DirLock(save_dir): ...``.

    The second process to lock a folder gets an :class:`InputError` at once, naming the
    first (its pid, host and command, read from ``<folder>/.mevae.lock``).  Re-entrant within a
    process (the CLI holds it around a run whose training loop takes it again).  The kernel
    releases the lock when its process ends, even on ``kill -9``: a lock file left behind by a
    dead process does not block anyone."""

    def __init__(self, folder: str | os.PathLike, command: str = "") -> None:
        self.folder = Path(folder)
        self.command = command
        self.key = ""
        self.created = False

    def acquire(self) -> DirLock:
        check_output_dir(self.folder)
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = os.path.realpath(self.folder)
        held = _HELD.get(self.key)
        if held is not None and held[2] == os.getpid():
            held[1] += 1
            return self
        path = Path(self.key) / LOCK_NAME
        for _ in range(20):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _lock_fd(fd):
                os.close(fd)
                raise InputError(
                    f"{self.folder} is in use by {_describe_holder(path)}: wait for it to end "
                    "or write to another folder"
                )
            try:  # the file we locked may have been removed by its previous holder meanwhile
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover
            raise InputError(f"cannot lock {self.folder}: its lock file keeps changing")
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": self.command,
        }
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        _HELD[self.key] = [fd, 1, os.getpid(), self.created]
        return self

    def release(self) -> None:
        held = _HELD.get(self.key)
        if held is None or held[2] != os.getpid():
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[self.key]
        with contextlib.suppress(OSError):
            os.unlink(Path(self.key) / LOCK_NAME)  # while still holding it
        os.close(held[0])
        if held[3]:  # a folder made for a run that wrote nothing goes again
            with contextlib.suppress(OSError):
                os.rmdir(self.key)

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
