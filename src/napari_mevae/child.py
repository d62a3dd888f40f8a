"""Run generator functions in a child Python process and stream what they yield back.

Why the napari widget trains, encodes and runs UMAP in child processes, not in threads of
napari's own process:

- **Training crashed napari.**  Creating a torch optimizer imports ``torch._dynamo``, which
  imports ``triton`` when the torch that pip installs by default (the CUDA build) is present.
  triton brings its own LLVM; where OpenGL runs on Mesa (software rendering, Xvfb, VMs, remote
  desktops, AMD GPUs) napari's process already holds Mesa's LLVM, and two LLVMs in one process
  segfault.  A child never loads OpenGL, so triton is safe there.
- **napari stays responsive.**  The Python parts of training, and numba compiling UMAP, hold
  the GIL for long stretches; in a child they do not compete with the event loop.
- **A crash loses nothing.**  If the child dies, napari lives on and the checkpoint of the last
  finished epoch is still on disk.
- **Process-wide settings stay out of napari** (malloc tuning, thread counts).

:class:`ChildService` keeps one child alive for many jobs (the Analyse tab's: UMAP is imported
and compiled once, then answers in about a second); :class:`ChildRun` is one job in a child of
its own (a training run).  The protocol is private to this module: pickled frames over the
child's stdin/stdout (its own prints go to stderr).  The parent sends ``sys.path``, then jobs
``(target, args, kwargs, last)`` and ``"stop"``; for each job the child answers ``("yield", item)``
..., then ``("return", value)`` or ``("error", exception, traceback text)``.  A target is
``"module:function"``, a generator function called as
``fn(*args, should_stop=callable, **kwargs)``.  Closing the parent's end also asks the child to
stop, so a child never outlives napari by more than one step.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Generator
from typing import Any, BinaryIO

__all__ = ["ChildCrashed", "ChildRun", "ChildService"]

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


class ChildService:
    """One child process that runs jobs one after the other (:meth:`submit`).

    ``threads`` sets the child's OpenMP / MKL thread count before it imports anything;
    ``nice`` lowers its scheduling priority (POSIX), so the GUI that started it stays smooth."""

    def __init__(self, threads: int | None = None, nice: int = 0) -> None:
        env = dict(os.environ)
        if nice:  # the viewer's own thread goes first when the cores are busy
            env["NAPARI_MEVAE_CHILD_NICE"] = str(int(nice))
        if threads is not None:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
                env[var] = str(threads)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "napari_mevae.child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)
        self._busy = False
        self._closed = False
        _send(self._proc.stdin, list(sys.path))

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return not self._closed and self._proc.poll() is None

    def submit(
        self, target: str, *args: Any, wait: bool = False, last: bool = False, **kwargs: Any
    ) -> Generator[Any, None, Any]:
        """Start ``target`` in the child; the generator returned streams what it yields,
        returns what it returns, re-raises what it raises (with ``child_traceback``) and raises
        :class:`ChildCrashed` when the child dies.  One job at a time: with ``wait`` this
        blocks until the job before has ended, otherwise a busy child is an error.  After a
        ``last`` job the child ends, whether or not anyone still reads its answer."""
        with self._lock:
            while self._busy and wait and not self._closed:
                self._free.wait()
            if self._closed:
                raise RuntimeError("this background process has been closed")
            if self._busy:
                raise RuntimeError("the background process is busy with another job")
            self._busy = True
            _send(self._proc.stdin, (target, args, kwargs, last))
        return self._results()

    def _results(self) -> Generator[Any, None, Any]:
        done = False
        try:
            while True:
                kind, *payload = self._next_frame()
                if kind == "yield":
                    yield payload[0]
                    continue
                done = True
                if kind == "return":
                    return payload[0]
                err, text = payload
                err.child_traceback = text
                raise err
        finally:
            if not done and self.alive:  # left early: stop the job, skip the rest of its answer
                self.stop()
                with contextlib.suppress(ChildCrashed):
                    while self._next_frame()[0] == "yield":
                        pass
            with self._lock:
                self._busy = False
                self._free.notify_all()

    def _next_frame(self) -> tuple:
        try:
            return _recv(self._proc.stdout)
        except (EOFError, ValueError, OSError):
            code = self._proc.wait()
            with self._lock:
                self._closed = True
                self._free.notify_all()
            raise ChildCrashed(_death(code)) from None

    def stop(self) -> None:
        """Ask the running job to stop (it ends after its current step and returns)."""
        with self._lock:
            if self._closed or not self._busy:
                return
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                _send(self._proc.stdin, "stop")

    def close(self, timeout: float = 30.0) -> None:
        """Let a running job finish (closing the child's input asks it to stop), then reap the
        child; kill it if it does not end within ``timeout`` seconds."""
        with self._lock:
            if self._closed and self._proc.returncode is not None:
                return
            self._closed = True
            self._free.notify_all()
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


class ChildRun:
    """One job, ``target(*args, should_stop=..., **kwargs)``, in a child process of its own,
    which ends with the job; iterate :meth:`results`."""

    def __init__(
        self, target: str, *args: Any, threads: int | None = None, nice: int = 0, **kwargs: Any
    ) -> None:
        self.service = ChildService(threads, nice)
        self._job = self.service.submit(target, *args, last=True, **kwargs)

    @property
    def pid(self) -> int:
        return self.service.pid

    def results(self) -> Generator[Any, None, Any]:
        try:
            return (yield from self._job)
        finally:
            self.service.close()

    def stop(self) -> None:
        self.service.stop()

    def close(self, timeout: float = 30.0) -> None:
        self.service.close(timeout)


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
    nice = int(os.environ.pop("NAPARI_MEVAE_CHILD_NICE", "0") or 0)
    if nice and hasattr(os, "nice"):
        with contextlib.suppress(OSError):
            os.nice(nice)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt frames
    inp = sys.stdin.buffer
    path = _recv(inp)
    sys.path[:] = list(dict.fromkeys([*path, *sys.path]))
    jobs: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()

    def listen() -> None:
        try:
            while True:
                msg = _recv(inp)
                if msg == "stop":
                    stop.set()
                else:
                    jobs.put(msg)
        except (EOFError, OSError):
            pass  # the parent closed its end: stop the job and end
        stop.set()
        jobs.put(None)

    threading.Thread(target=listen, daemon=True).start()
    while (job := jobs.get()) is not None:
        stop.clear()
        *job, last = job
        if not _run_job(out, *job, should_stop=stop.is_set):
            return 1
        if last:
            break
    return 0


def _run_job(out: BinaryIO, target: str, args: tuple, kwargs: dict, should_stop: Any) -> bool:
    """Run one job, streaming its items to ``out``; False when the parent is gone."""
    import importlib

    try:
        module, _, name = target.partition(":")
        fn = getattr(importlib.import_module(module), name)
        gen = fn(*args, should_stop=should_stop, **kwargs)
        while True:
            try:
                item = next(gen)
            except StopIteration as done:
                _send(out, ("return", done.value))
                return True
            _send(out, ("yield", item))
    except (BrokenPipeError, OSError) as err:
        if isinstance(err, BrokenPipeError) or out.closed:
            return False
        return _send_error(out, err)
    except BaseException as err:  # noqa: BLE001 (every failure goes back to the parent)
        return _send_error(out, err)


def _send_error(out: BinaryIO, err: BaseException) -> bool:
    text = traceback.format_exc()
    try:
        pickle.dumps(err)
    except Exception:
        err = RuntimeError(f"{type(err).__name__}: {err}")
    try:
        _send(out, ("error", err, text))
    except OSError:
        return False
    return True


if __name__ == "__main__":
    code = _child_main()
    sys.stdout.flush()
    sys.stderr.flush()
    # not sys.exit: interpreter shutdown would wait on the stdin reader thread's lock (a daemon
    # thread blocked in read) and abort; everything the parent needs has been sent
    os._exit(code)
