"""Small matplotlib canvases embedded in the dock: the live loss curve and the clickable UMAP
scatter.  Drawing only; the numbers come from the core."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure

__all__ = ["LossPlot", "ScatterPlot", "cluster_color"]

#: cluster 1, 2, ... take matplotlib's tab10 colours in order; 0 (unassigned) is grey.  The
#: scatter and the clusters Labels layer both use this, so a cluster has one colour everywhere.
_TAB10 = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip


def cluster_color(cluster: int) -> np.ndarray:
    """RGBA (0..1) of a cluster id."""
    if cluster <= 0:
        return np.array([0.6, 0.6, 0.6, 1.0])
    h = _TAB10[(int(cluster) - 1) % len(_TAB10)]
    return np.array([int(h[i : i + 2], 16) / 255 for i in (1, 3, 5)] + [1.0])


def _style(fig: Figure) -> None:
    fig.patch.set_facecolor("#262930")  # napari dark theme background


def _style_axes(ax: Any) -> None:
    ax.set_facecolor("#262930")
    for spine in ax.spines.values():
        spine.set_color("#a0a0a0")
    ax.tick_params(colors="#d0d0d0", labelsize=7)
    ax.xaxis.label.set_color("#d0d0d0")
    ax.yaxis.label.set_color("#d0d0d0")
    ax.title.set_color("#e0e0e0")


class LossPlot(FigureCanvasQTAgg):
    """Loss per step (thin) and per epoch (dots), x in epochs.  Redraws at most twice a second,
    by updating the two lines' data (no new axes), so a fast training loop never floods the
    GUI thread."""

    def __init__(self) -> None:
        # fixed margins: a "tight" layout is recomputed at every draw (most of its cost)
        fig = Figure(figsize=(3.5, 2.0), dpi=90)
        fig.subplots_adjust(left=0.17, right=0.97, bottom=0.22, top=0.95)
        _style(fig)
        super().__init__(fig)
        self.ax = fig.add_subplot(111)
        _style_axes(self.ax)
        self.ax.set_xlabel("epoch", fontsize=8)
        self.ax.set_ylabel("loss", fontsize=8)
        (self._steps_line,) = self.ax.plot([], [], color="#6fa8dc", lw=0.8, alpha=0.7, label="step")
        (self._epochs_line,) = self.ax.plot(
            [], [], "o-", color="#f6b26b", ms=3, lw=1.2, label="epoch"
        )
        self.ax.legend(fontsize=7, loc="upper right", frameon=False, labelcolor="#d0d0d0")
        self.steps_x: list[float] = []
        self.steps_y: list[float] = []
        self.epochs_x: list[float] = []
        self.epochs_y: list[float] = []
        self._last_draw = 0.0
        self.setMinimumHeight(150)
        self.redraw(force=True)

    def clear(self) -> None:
        self.steps_x.clear()
        self.steps_y.clear()
        self.epochs_x.clear()
        self.epochs_y.clear()
        self.redraw(force=True)

    def set_history(self, history: list[dict[str, Any]]) -> None:
        """Show a past run (a checkpoint's history) as the starting point."""
        self.clear()
        for h in history:
            if not h.get("partial"):
                self.epochs_x.append(float(h["epoch"]))
                self.epochs_y.append(float(h["loss"]))
        self.redraw(force=True)

    def add_step(self, x: float, loss: float) -> None:
        self.steps_x.append(x)
        self.steps_y.append(loss)
        self.redraw()

    def add_epoch(self, epoch: float, loss: float) -> None:
        self.epochs_x.append(epoch)
        self.epochs_y.append(loss)
        self.redraw()

    def redraw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.5:
            return
        self._last_draw = now
        self._steps_line.set_data(self.steps_x, self.steps_y)
        self._epochs_line.set_data(self.epochs_x, self.epochs_y)
        self.ax.relim()
        self.ax.autoscale_view()
        self.draw_idle()


class ScatterPlot(FigureCanvasQTAgg):
    """UMAP of the cells coloured by cluster; a click picks the nearest cell and calls
    ``on_pick(row)``, so the user can jump from the plot to the cell in the image."""

    def __init__(self, on_pick: Callable[[int], None] | None = None) -> None:
        fig = Figure(figsize=(3.5, 3.0), dpi=90)
        fig.subplots_adjust(left=0.15, right=0.97, bottom=0.15, top=0.88)
        _style(fig)
        super().__init__(fig)
        self.ax = fig.add_subplot(111)
        self.on_pick = on_pick
        self.xy = np.zeros((0, 2), np.float32)
        self.colors = np.zeros(0, np.int32)
        self.selected: int | None = None
        self.setMinimumHeight(220)
        self.mpl_connect("button_press_event", self._on_click)
        self.redraw()

    def set_points(
        self, xy: np.ndarray, clusters: np.ndarray, title: str = "", draw: bool = True
    ) -> None:
        """Show these points; with ``draw=False`` the plot is only drawn at the next
        :meth:`draw_idle` (a caller that shows results in short steps draws in a step of its
        own: building the plot and rendering it take ~20 and ~60 ms)."""
        self.xy = np.asarray(xy, np.float32)
        self.colors = np.asarray(clusters)
        self.selected = None
        self._title = title
        self.redraw(draw)

    def select(self, row: int | None) -> None:
        self.selected = row
        self.redraw()

    def nearest(self, x: float, y: float) -> int | None:
        """Row of the point nearest to ``(x, y)`` in data units, within 5 % of the plot span."""
        if len(self.xy) == 0 or x is None or y is None:
            return None
        span = np.ptp(self.xy, axis=0)
        span[span == 0] = 1.0
        d = np.hypot((self.xy[:, 0] - x) / span[0], (self.xy[:, 1] - y) / span[1])
        row = int(np.argmin(d))
        return row if d[row] < 0.05 else None

    def _on_click(self, event: Any) -> None:
        if event.inaxes is not self.ax:
            return
        row = self.nearest(event.xdata, event.ydata)
        if row is not None and self.on_pick is not None:
            self.on_pick(row)

    def redraw(self, draw: bool = True) -> None:
        ax = self.ax
        ax.clear()
        _style_axes(ax)
        if len(self.xy):
            ids = [int(v) for v in np.unique(self.colors)]
            for v in ids:  # one call per cluster: its colour and its legend entry
                pts = self.xy[self.colors == v]
                name = f"cluster {v}" if v else "unassigned"
                ax.scatter(pts[:, 0], pts[:, 1], color=cluster_color(v), s=14, label=name)
            if len(ids) <= 10:  # in one row above the plot, never over the points
                ax.legend(
                    fontsize=6,
                    loc="lower center",
                    bbox_to_anchor=(0.5, 1.0),
                    ncol=min(len(ids), 5),
                    frameon=False,
                    labelcolor="#d0d0d0",
                    handletextpad=0.1,
                    columnspacing=0.8,
                )
            if self.selected is not None and 0 <= self.selected < len(self.xy):
                px, py = self.xy[self.selected]
                ax.scatter([px], [py], s=120, facecolors="none", edgecolors="white", lw=1.5)
        else:
            ax.text(
                0.5,
                0.5,
                "encode cells to see the latent space",
                ha="center",
                va="center",
                color="#a0a0a0",
                fontsize=8,
                transform=ax.transAxes,
            )
        title = getattr(self, "_title", "")
        ax.set_xlabel(f"UMAP0 ({title})" if title and len(self.xy) else "UMAP0", fontsize=8)
        ax.set_ylabel("UMAP1", fontsize=8)
        if draw:
            self.draw_idle()
