"""The Export tab: the features table of every field as CSV or Parquet, and the cluster label
image as TIFF."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import QFileDialog, QLabel, QVBoxLayout

from ._panel import Host, Panel, button

__all__ = ["ExportPanel", "source_folder"]


def source_folder(*layers: Any) -> Path:
    """The folder of the first layer napari opened from a file (``layer.source.path``, or that
    of the layer it was made from); else the current directory."""
    for layer in layers:
        seen = 0
        while layer is not None and seen < 10:  # a derived layer: ask the one it came from
            source = getattr(layer, "source", None)
            path = getattr(source, "path", None)
            if path:
                return Path(path).expanduser().absolute().parent
            layer = getattr(source, "parent", None)
            seen += 1
    return Path.cwd()


def _file_name(name: str) -> str:
    """A layer name made safe as a file name (path separators and the like become "_")."""
    return re.sub(r'[\\/:*?"<>|\x00-\x1f]', "_", name).strip().strip(".") or "mevae"


class ExportPanel(Panel):
    """Write the features table (CSV) and the cluster label image (TIFF)."""

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.csv_btn = button(
            "Save features table...",
            self.export_csv,
            "one row per labelled cell of every field, with its source layers: CSV, or "
            "Parquet when the name ends in .parquet",
        )
        self.tiff_btn = button(
            "Save cluster labels TIFF...",
            self.export_clusters_tiff,
            "the cluster label image (several fields: one TIFF per field, in a folder)",
        )
        self.status = QLabel("Encode and cluster the cells first (Analyse tab).")
        self.status.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.addWidget(self.csv_btn)
        lay.addWidget(self.tiff_btn)
        lay.addWidget(self.status)
        lay.addStretch(1)
        self.session.results_changed.connect(self._results)
        self.session.cells_changed.connect(self._results)
        self.session.state_changed.connect(self.update_buttons)
        self.update_buttons()

    def update_buttons(self) -> None:
        s = self.session
        self.csv_btn.setEnabled(s.table is not None)
        layer = s.clusters_layer
        self.tiff_btn.setEnabled(layer is not None and layer in self.viewer.layers)

    def _results(self) -> None:
        s = self.session
        t = s.table
        if t is None:
            self.status.setText("Encode and cluster the cells first (Analyse tab).")
            return
        skipped = 0 if s.cells is None else len(s.cells.skipped)
        extra = f" and {skipped} skipped (rows with the reason, no features)" if skipped else ""
        n = len(s.fields)
        where = f" of {n} fields" if n > 1 else ""
        self.status.setText(f"Ready: {len(t)} cells{where} x {t.shape[1]} columns{extra}.")

    def default_path(self, kind: str) -> Path:
        """Where a file goes unless the user says otherwise: the image's folder (see
        :func:`source_folder`), named after the layers: ``<labels>_features.csv``,
        ``<labels> clusters.tif``."""
        s = self.session
        folder = source_folder(s.image_layer, s.labels_layer)
        labels = s.labels_layer.name if s.labels_layer is not None else "mevae"
        if kind == "csv":
            if len(s.fields) > 1:
                first = s.fields[0].labels.name if s.fields[0].labels is not None else "mevae"
                return folder / f"{_file_name(first)} + {len(s.fields) - 1} fields_features.csv"
            return folder / f"{_file_name(labels)}_features.csv"
        if kind == "tiff":
            layer = s.clusters_layer
            name = layer.name if layer is not None else f"{labels} clusters"
            return folder / f"{_file_name(name)}.tif"
        raise ValueError(f"unknown export kind {kind!r}")

    def _path(self, path: str | Path | None, title: str, default: Path, filt: str) -> Path | None:
        if path is not None:
            return Path(path)
        chosen, chosen_filter = QFileDialog.getSaveFileName(self, title, str(default), filt)
        if not chosen:
            return None
        out = Path(chosen)
        parquet = (chosen_filter or "").startswith("Parquet")  # the filter the user picked
        if parquet and out.suffix.lower() != ".parquet":
            out = out.with_suffix(".parquet")
        return out

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        """One row per labelled cell of every field, field after field: the kept cells with
        their features, the skipped ones with empty features and the reason in ``skipped``;
        then the source layer names (``source_image``, ``source_labels``).  Parquet when the
        file name ends in ``.parquet``, CSV otherwise."""
        s = self.session
        if s.table is None:
            self.error("No features to export: encode and cluster the cells first.")
            return None
        out = self._path(
            path,
            "Save features table",
            self.default_path("csv"),
            "CSV (*.csv);;Parquet (*.parquet)",
        )
        if out is None:
            return None
        from ..fields import whole_table, write_table

        sources = [
            {
                "image": f.image.name if f.image is not None else "",
                "labels": f.labels.name if f.labels is not None else "",
            }
            for f in s.fields
        ]
        try:
            written = write_table(whole_table(s.cells, s.table, sources), out)
        except (OSError, ImportError) as err:
            self.error(f"Cannot write {out}: {err}")
            return None
        self.status.setText(f"Features written to {written}")
        self.info(f"Features written to {written}")
        return written

    def export_clusters_tiff(self, path: str | Path | None = None) -> Path | None:
        """The cluster label image (each cell painted with its cluster id) as TIFF; with several
        fields, one TIFF per field in the folder ``path`` (see :meth:`export_clusters_tiffs`)."""
        s = self.session
        if len(s.fields) > 1:
            return self.export_clusters_tiffs(path)
        layer = s.clusters_layer
        if layer is None or layer not in self.viewer.layers:
            self.error("No cluster label image: cluster the cells first (Analyse tab).")
            return None
        out = self._path(
            path, "Save cluster labels", self.default_path("tiff"), "TIFF (*.tif *.tiff)"
        )
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

    def export_clusters_tiffs(self, folder: str | Path | None = None) -> Path | None:
        """Every field's cluster label image as ``<clusters layer name>.tif`` in ``folder``
        (asked for when not given); returns the folder."""
        s = self.session
        layers = [f.clusters for f in s.fields]
        if any(ly is None or ly not in self.viewer.layers for ly in layers):
            self.error("No cluster label images: cluster the cells first (Analyse tab).")
            return None
        if folder is None:
            start = str(self.default_path("tiff").parent)
            folder = QFileDialog.getExistingDirectory(self, "Folder for the cluster TIFFs", start)
            if not folder:
                return None
        out = Path(folder)
        import tifffile

        from ..outputs import atomic_write

        try:
            out.mkdir(parents=True, exist_ok=True)
            for layer in layers:
                with atomic_write(out / f"{_file_name(layer.name)}.tif", "wb") as fh:
                    data = np.asarray(layer.data, dtype=np.int32)
                    tifffile.imwrite(fh, data, compression="zlib")
        except OSError as err:
            self.error(f"Cannot write the cluster TIFFs to {out}: {err}")
            return None
        self.status.setText(f"{len(layers)} cluster label images written to {out}")
        self.info(f"{len(layers)} cluster label images written to {out}")
        return out
