"""Generator functions the child-process tests run in a child (importable there: the child
gets the parent's sys.path)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Generator


def count(n: int, *, should_stop: Callable[[], bool]) -> Generator[int, None, str]:
    yield from range(n)
    return f"counted {n}"


def until_stopped(*, should_stop: Callable[[], bool]) -> Generator[int, None, int]:
    i = 0
    while not should_stop():
        yield i
        i += 1
        time.sleep(0.01)
    return i


def fail(*, should_stop: Callable[[], bool]) -> Generator[int, None, None]:
    yield 1
    raise ValueError("bad cells: nothing to crop")


def crash(how: str, *, should_stop: Callable[[], bool]) -> Generator[int, None, None]:
    yield 1
    print("noise on stdout must not break the protocol")
    if how == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    os._exit(3)
    yield 2
