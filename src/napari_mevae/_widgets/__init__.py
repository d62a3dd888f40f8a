"""napari widgets of napari-mevae.  Importing this package is cheap: no torch, no umap (the
workers import them when they run)."""

from ._main import AnalysePanel, CellsPanel, ExportPanel, MEVAEWidget, ModelPanel, Session

__all__ = ["MEVAEWidget", "CellsPanel", "ModelPanel", "AnalysePanel", "ExportPanel", "Session"]
