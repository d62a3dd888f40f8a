"""Run a generator function in a child Python process and stream what it yields back.

Why the napari widget trains in a child process, not in a thread of napari's own process:

- **It crashed napari.**  Creating a torch optimizer imports ``torch._dynamo``, which imports
  ``triton`` when the torch that pip installs by default (the CUDA build) is present.  triton
  brings its own LLVM; where OpenGL runs on Mesa (software rendering, Xvfb, VMs, remote
  desktops, AMD GPUs) napari's process already holds Mesa's LLVM, and two LLVMs in one process
  segfault.  The child never loads OpenGL, so triton is safe there.
- **It keeps napari responsive.**  The training loop's Python parts hold the GIL; in a child
  they do not compete with the event loop.
- **A crash loses nothing.**  If the child dies, napari lives on and the checkpoint of the last
  finished epoch is still on disk.
- **Process-wide speed-ups stay out of napari** (malloc tuning, thread counts).

The protocol is private to this module: pickled frames over the child's stdin/stdout (its own
prints go to stderr).  The parent sends ``(target, args, kwargs, sys.path)``, then optionally
``"stop"``; the child answers ``("yield", item)`` ..., then ``("return", value)`` or
``("error", exception, traceback text)``.  The target is ``"module:function"``, a generator
function called as ``fn(*args, should_stop=callable, **kwargs)``.  Closing the parent's end
also asks the child to stop, so a child never outlives napari by more than one step.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Generator
from typing import Any, BinaryIO

__all__ = ["ChildCrashed", "ChildRun"]

_HEADER = struct.Struct("<Q")


class ChildCrashed(RuntimeError):
    """The child process ended without an answer (killed, segfault, out of memory)."""


def _send(fh: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(_HEADER.pack(len(data)) + data)
    fh.flush()


def _recv(fh: BinaryIO) -> Any:
    """One frame, or raise EOFError when the other side closed."""
    head = fh.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    size = _HEADER.unpack(head)[0]
    data = fh.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


class ChildRun:
    """``target(*args, should_stop=..., **kwargs)`` in a child process; iterate :meth:`results`.

    ``threads`` sets the child's OpenMP / MKL thread count before it imports anything."""

    def __init__(self, target: str, *args: Any, threads: int | None = None, **kwargs: Any) -> None:
        env = dict(os.environ)
        if threads is not None:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(threads)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "napari_mevae.child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._lock = threading.Lock()
        self._closed = False
        _send(self._proc.stdin, (target, args, kwargs, list(sys.path)))

    @property
    def pid(self) -> int:
        return self._proc.pid

    def results(self) -> Generator[Any, None, Any]:
        """What the child yields, in order; returns what it returns, re-raises what it raises,
        and raises :class:`ChildCrashed` when it dies without an answer."""
        try:
            while True:
                try:
                    kind, *payload = _recv(self._proc.stdout)
                except EOFError:
                    code = self._proc.wait()
                    raise ChildCrashed(_death(code)) from None
                if kind == "yield":
                    yield payload[0]
                elif kind == "return":
                    return payload[0]
                else:
                    err, text = payload
                    err.child_traceback = text
                    raise err
        finally:
            self.close()

    def stop(self) -> None:
        """Ask the child to stop (it ends after its current step and returns normally)."""
        with self._lock:
            if self._closed or self._proc.stdin.closed:
                return
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                _send(self._proc.stdin, "stop")

    def close(self, timeout: float = 30.0) -> None:
        """Let the child finish (closing its input asks it to stop), then reap it; kill it
        if it does not end within ``timeout`` seconds."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()

    def kill(self) -> None:
        self._proc.kill()


def _death(code: int) -> str:
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the background process died ({name})"
    return f"the background process ended unexpectedly (exit code {code})"


# -- the child's side --------------------------------------------------------------------------
def _child_main() -> int:
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt frames
    inp = sys.stdin.buffer
    target, args, kwargs, path = _recv(inp)
    sys.path[:] = list(dict.fromkeys([*path, *sys.path]))
    stop = threading.Event()

    def listen() -> None:
        try:
            while _recv(inp) != "stop":
                pass
        except (EOFError, OSError):
            pass  # the parent closed its end: stop as well
        stop.set()

    threading.Thread(target=listen, daemon=True).start()
    try:
        module, _, name = target.partition(":")
        import importlib

        fn = getattr(importlib.import_module(module), name)
        gen = fn(*args, should_stop=stop.is_set, **kwargs)
        while True:
            try:
                item = next(gen)
            except StopIteration as done:
                _send(out, ("return", done.value))
                return 0
            _send(out, ("yield", item))
    except BaseException as err:  # noqa: BLE001 (every failure goes back to the parent)
        text = traceback.format_exc()
        try:
            pickle.dumps(err)
        except Exception:
            err = RuntimeError(f"{type(err).__name__}: {err}")
        with contextlib.suppress(OSError):
            _send(out, ("error", err, text))
        return 1


if __name__ == "__main__":
    sys.exit(_child_main())
