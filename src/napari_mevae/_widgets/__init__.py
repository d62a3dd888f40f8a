"""napari widgets of napari-mevae: the host dock (_host), one file per tab and
what the tabs share (_panel).  Importing this
package is cheap: no torch, no umap (workers and the training process import them)."""

from ._analyse import AnalysePanel
from ._cells import CellsPanel
from ._export import ExportPanel
from ._host import MEVAEWidget
from ._model import ModelPanel
from ._panel import Session

__all__ = ["MEVAEWidget", "CellsPanel", "ModelPanel", "AnalysePanel", "ExportPanel", "Session"]
