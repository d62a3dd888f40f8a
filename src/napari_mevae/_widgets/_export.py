"""The Export tab: the features table as CSV and the cluster label image as TIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtWidgets import QFileDialog, QLabel, QVBoxLayout

from ._panel import Host, Panel, button

__all__ = ["ExportPanel"]


class ExportPanel(Panel):
    """Write the features table (CSV) and the cluster label image (TIFF)."""

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.csv_btn = button("Save features CSV...", self.export_csv)
        self.tiff_btn = button("Save cluster labels TIFF...", self.export_clusters_tiff)
        self.status = QLabel("Encode and cluster the cells first (Analyse tab).")
        self.status.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.addWidget(self.csv_btn)
        lay.addWidget(self.tiff_btn)
        lay.addWidget(self.status)
        lay.addStretch(1)
        self.session.results_changed.connect(self._results)

    def _results(self) -> None:
        t = self.session.table
        if t is not None:
            self.status.setText(f"Ready: {len(t)} cells x {t.shape[1]} columns.")

    def _path(self, path: str | Path | None, title: str, default: str, filt: str) -> Path | None:
        if path is not None:
            return Path(path)
        chosen, _ = QFileDialog.getSaveFileName(self, title, default, filt)
        return Path(chosen) if chosen else None

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        """One row per cell with its features and the source layer names."""
        s = self.session
        if s.table is None:
            self.error("No features to export: encode and cluster the cells first.")
            return None
        out = self._path(path, "Save features CSV", "mevae_features.csv", "CSV (*.csv)")
        if out is None:
            return None
        from ..analysis import export_features_csv

        sources = {
            "image": s.image_layer.name if s.image_layer is not None else "",
            "labels": s.labels_layer.name if s.labels_layer is not None else "",
        }
        try:
            written = export_features_csv(s.table, out, sources=sources)
        except OSError as err:
            self.error(f"Cannot write {out}: {err}")
            return None
        self.status.setText(f"Features written to {written}")
        self.info(f"Features written to {written}")
        return written

    def export_clusters_tiff(self, path: str | Path | None = None) -> Path | None:
        """The cluster label image (each cell painted with its cluster id) as TIFF."""
        s = self.session
        layer = s.clusters_layer
        if layer is None or layer not in self.viewer.layers:
            self.error("No cluster label image: cluster the cells first (Analyse tab).")
            return None
        out = self._path(path, "Save cluster labels", f"{layer.name}.tif", "TIFF (*.tif *.tiff)")
        if out is None:
            return None
        import tifffile

        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(out, np.asarray(layer.data, dtype=np.int32), compression="zlib")
        except OSError as err:
            self.error(f"Cannot write {out}: {err}")
            return None
        self.status.setText(f"Cluster labels written to {out}")
        self.info(f"Cluster labels written to {out}")
        return out
