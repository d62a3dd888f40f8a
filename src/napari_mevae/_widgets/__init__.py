"""napari widgets of napari-mevae: the host dock (_host) and one file per tab.  Importing this
package is cheap: no torch, no umap (workers and the training process import them)."""

from ._analyse import AnalysePanel
from ._cells import CellsPanel
from ._export import ExportPanel
from ._host import MEVAEWidget, Session
from ._model import ModelPanel

__all__ = ["MEVAEWidget", "CellsPanel", "ModelPanel", "AnalysePanel", "ExportPanel", "Session"]
