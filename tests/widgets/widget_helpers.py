"""Shared constants and helpers of the widget tests (a module, so test files can import it)."""

from __future__ import annotations

from typing import Any

N_CELLS = 30
IMAGE = "synthetic cells"
LABELS = "synthetic cells labels"


def wait_idle(qtbot: Any, widget: Any, timeout: int = 120_000) -> None:
    """Wait for every worker of the widget (and chained ones) to finish."""
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)
    qtbot.wait(50)
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)
