"""The Fig. 2 script's bookkeeping: results measured by an older report are re-measured with
the current one (same draws), and the tables show every content measure.  The published
numbers in docs/benchmarks.md rest on this path (``fig2.py --reuse``).  Then the diagnostics
(benchmarks/diagnostics/) and the training throughput benchmark."""

from __future__ import annotations

import json
import sys
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_mevae.checkpoints import load_checkpoint, save_checkpoint
from napari_mevae.config import preset
from napari_mevae.evaluation import angle_leakage, discrete_leakage, invariance_report
from napari_mevae.folders import FolderTargets, write_image
from napari_mevae.model import MEVAE
from napari_mevae.synthetic import synthetic_crops

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS / "diagnostics"))
# imported, not importorskip'd: a script that moved or broke must fail here, not be skipped
fig2 = import_module("fig2")


@pytest.fixture(scope="module")
def run_and_test(tmp_path_factory):
    root = tmp_path_factory.mktemp("fig2")
    crops, _ = synthetic_crops(24, 32, seed=3)
    for i, crop in enumerate(crops):
        write_image(root / "test" / "OutputImages" / f"Image_{i}.tif", crop)
    torch.manual_seed(0)
    model = MEVAE(preset("tiny", n_encoders=2))
    model.latent_variance.copy_(torch.tensor([1.0, 1.0, 1.0] + [1e-4] * 5))
    run = root / "run_mevae_fresh"
    save_checkpoint(run, model)
    return run, root / "test"


def test_refresh_report_remeasures_old_results_with_the_same_draws(run_and_test):
    run, test = run_and_test
    old = {"rotation_leakage": 0.5, "content_kept": 0.1, "s_per_epoch": 1.5, "wall_s": 20.0}
    rep = fig2.refresh_report(run, test, dict(old), seed=0)
    model = load_checkpoint(run).build_model("cpu")
    crops = np.asarray(FolderTargets(test / "OutputImages", 32, 1).array)
    expected = invariance_report(model, crops, seed=0)
    for key, value in expected.items():
        assert rep[key] == pytest.approx(value, abs=1e-12), key
    assert rep["s_per_epoch"] == 1.5 and rep["wall_s"] == 20.0  # timings kept
    assert rep["model_active_dims"] == 3
    assert json.loads((run / "fig2_result.json").read_text()) == rep  # written back
    # results that already carry the newest key are returned as they are, not re-measured,
    # also when they hold keys the report has dropped since
    current = {**rep, "content_kept": -1.0, "rotation_leakage_2x": 0.5}
    assert fig2.refresh_report(run, test, dict(current), seed=0) == current


def test_tables_show_both_content_measures(run_and_test):
    run, test = run_and_test
    rep = json.loads((run / "fig2_result.json").read_text())
    rep.update(nmi=0.5, purity=0.7, latent_std_max=1.0)
    for table in (
        fig2.lincs_table({"mevae_fresh": rep}, epochs=10),
        fig2.synthetic_table({"mevae_fresh": rep}),
    ):
        header, rule, row = table.splitlines()
        assert "content kept by neighbours: same / paired" in header
        assert header.count("|") == rule.count("|") == row.count("|")
        cells = [c.strip() for c in row.strip("|").split("|")]
        columns = [c.strip() for c in header.strip("|").split("|")]
        neighbours = cells[columns.index("content kept by neighbours: same / paired")]
        same = f"{rep['neighbour_content_kept']:.2f}"
        paired = f"{rep['paired_neighbour_content_kept']:.2f}"
        assert neighbours == f"{same} / {paired}"


feature_scale = import_module("feature_scale")
dims_in_use = import_module("dims_in_use")
latent_directions = import_module("latent_directions")


def test_signed_root_undoes_a_product_and_keeps_the_sign():
    a = np.array([[2.0, -3.0, 0.5, 0.0]])
    assert feature_scale.signed_root(a * a, 2) == pytest.approx(np.abs(a))
    assert feature_scale.signed_root(-(a * a), 2) == pytest.approx(-np.abs(a))
    assert feature_scale.signed_root(a, 1) == pytest.approx(a)


def test_feature_scale_reads_the_reports_paired_features(run_and_test):
    """Its "features" column must be invariance_report's paired numbers (same draws), so the
    root column differs only by the transform."""
    run, test = run_and_test
    model = load_checkpoint(run).build_model("cpu").eval()
    crops = np.asarray(FolderTargets(test / "OutputImages", 32, 1).array)
    rep = invariance_report(model, crops, seed=0)
    out = feature_scale.measure(model, crops, seed=0)
    assert out["K"] == 2 and out["dims"] == 3  # the unused dimensions are 0 in the features
    assert out["content_features"] == pytest.approx(rep["paired_content_kept"], abs=1e-12)
    assert out["neighbours_features"] == pytest.approx(
        rep["paired_neighbour_content_kept"], abs=1e-12
    )
    assert out["rotation_features"] == pytest.approx(rep["paired_rotation_leakage"], abs=1e-12)
    assert out["polarity_features"] == pytest.approx(rep["paired_polarity_leakage"], abs=1e-12)
    assert len(out["per_descriptor_features"]) == len(feature_scale.DESCRIPTORS)
    assert all(0 <= v <= 1 for v in out["per_descriptor_root"])
    assert out["max_abs_skew"] >= 0


def test_feature_scale_one_encoder_root_is_the_features(tmp_path, run_and_test):
    _, test = run_and_test
    torch.manual_seed(1)
    model = MEVAE(preset("tiny", n_encoders=1)).eval()
    crops = np.asarray(FolderTargets(test / "OutputImages", 32, 1).array)
    out = feature_scale.measure(model, crops, seed=0)
    rep = invariance_report(model, crops, seed=0)
    for key, report_key in (
        ("content", "content_kept"),
        ("neighbours", "neighbour_content_kept"),
        ("rotation", "rotation_leakage"),
        ("polarity", "polarity_leakage"),
    ):
        assert out[f"{key}_features"] == out[f"{key}_root"]
        assert out[f"{key}_features"] == pytest.approx(rep[report_key], abs=1e-12)


def test_latent_directions_projection_keeps_the_span_it_is_given():
    """Features of rank 2 in 5 axes plus a tiny extra direction: two directions carry the
    variance; projecting on them removes the tiny one and keeps the rest exactly."""
    rng = np.random.default_rng(0)
    big = rng.normal(size=(200, 2)) @ rng.normal(size=(2, 5))
    tiny = 1e-3 * rng.normal(size=(200, 1)) @ rng.normal(size=(1, 5))
    mean, vt, var = latent_directions.directions(big + tiny)
    assert var[0] > var[1] > 0.1 > 1e-5 > var[2] > 0
    kept = latent_directions.project(big + tiny, mean, vt[var > 1e-4])
    assert np.linalg.matrix_rank(kept - kept.mean(0), tol=1e-8) == 2
    assert kept == pytest.approx(big + tiny, abs=1e-2)
    assert latent_directions.project(big, big.mean(0), vt) == pytest.approx(big)


def test_latent_directions_threshold_zero_is_the_reports_same_protocol(run_and_test):
    """With every direction kept, the probes are the invariance report's (same draws)."""
    run, test = run_and_test
    model = load_checkpoint(run).build_model("cpu").eval()
    crops = np.asarray(FolderTargets(test / "OutputImages", 32, 1).array)
    rep = invariance_report(model, crops, seed=0)
    var, rows = latent_directions.measure(model, crops, crops, thresholds=(0.0, 1e-2), seed=0)
    assert rows[0]["rotation_leakage"] == pytest.approx(rep["rotation_leakage"], abs=1e-6)
    assert rows[0]["polarity_leakage"] == pytest.approx(rep["polarity_leakage"], abs=1e-6)
    assert rows[0]["content_kept"] == pytest.approx(rep["content_kept"], abs=1e-6)
    assert rows[1]["directions"] == (var > 1e-2).sum() <= 3  # 3 axes in use


def test_measured_model_measures_dims_of_old_checkpoints(tmp_path, run_and_test):
    _, test = run_and_test
    torch.manual_seed(2)
    model = MEVAE(preset("tiny", n_encoders=2))
    save_checkpoint(tmp_path / "old", model)  # no trainer record: latent_variance all NaN
    crops = np.asarray(FolderTargets(test / "OutputImages", 32, 1).array)
    measured = dims_in_use.measured_model(str(tmp_path / "old"), crops, seed=0)
    assert measured.activity_measured and not measured.training
    assert torch.isfinite(measured.latent_variance).all()
    # a checkpoint with the trainer's record keeps it
    run, _ = run_and_test
    kept = dims_in_use.measured_model(str(run), crops, seed=0)
    assert kept.latent_variance[:3].tolist() == [1.0, 1.0, 1.0]


def test_dims_in_use_reads_the_reports_features_and_probes_the_axis(run_and_test):
    """``report_features`` must be what invariance_report probes (same draws: its leakage keys
    come out exactly); the axis columns are that rotation probe on twice the angle."""
    run, test = run_and_test
    model = load_checkpoint(run).build_model("cpu").eval()
    crops = np.asarray(FolderTargets(test / "OutputImages", 32, 1).array)
    rep = invariance_report(model, crops, seed=0)
    feats = dims_in_use.report_features(model, crops, seed=0)
    assert set(feats) == {"rotation", "polarity", "paired_rotation", "paired_polarity"}
    for key, (z, truth) in feats.items():
        assert (z[:, 3:] == 0).all()  # the features as exported: unused dimensions 0
        probe = angle_leakage if key.endswith("rotation") else discrete_leakage
        assert probe(z, truth, seed=0) == pytest.approx(rep[f"{key}_leakage"], abs=1e-12), key
    axis = dims_in_use.axis_leakage(model, crops, seed=0)
    assert axis == {
        "axis_leakage": angle_leakage(*feats["rotation"], seed=0, harmonic=2),
        "paired_axis_leakage": angle_leakage(*feats["paired_rotation"], seed=0, harmonic=2),
    }
    torch.manual_seed(3)
    unknown = MEVAE(preset("tiny", n_encoders=3)).eval()  # pair folders: nuisances unknown
    assert set(dims_in_use.axis_leakage(unknown, crops, seed=0)) == {"axis_leakage"}


def test_dims_in_use_prints_one_row_per_run(run_and_test, monkeypatch, capsys):
    run, test = run_and_test
    argv = ["dims_in_use.py", "--train", str(test / "OutputImages")]
    argv += ["--test", str(test / "OutputImages"), str(run), str(run)]
    monkeypatch.setattr(sys, "argv", argv)
    dims_in_use.main()
    header, rule, *rows = capsys.readouterr().out.strip().splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["run", *dims_in_use.KEYS, *dims_in_use.AXIS_KEYS]
    assert len(rows) == 2 and rule.count("|") == rows[0].count("|") == header.count("|")
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[0] == str(run) and cells[1] == "3.000"  # model_active_dims
    assert all(c != "nan" for c in cells)


def test_feature_scale_prints_one_row_per_run(run_and_test, monkeypatch, capsys):
    run, test = run_and_test
    argv = ["feature_scale.py", "--train", str(test / "OutputImages")]
    argv += ["--test", str(test / "OutputImages"), str(run), str(run)]
    monkeypatch.setattr(sys, "argv", argv)
    feature_scale.main()
    header, rule, *rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2
    assert header.count("|") == rule.count("|") == rows[0].count("|")
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[0] == str(run) and cells[1:3] == ["2", "3"]


bench_training = import_module("bench_training")


def test_training_benchmark_runs_end_to_end_on_a_tiny_configuration(capsys):
    """The documented throughput benchmark, shrunk: both sides train in their own process and
    the table comes out with a ratio (the numbers themselves are not asserted: a smoke run)."""
    argv = ["--configs", "16x4", "--rounds", "2", "--block", "0.2", "--warmup", "0.2"]
    assert bench_training.main([*argv, "--images", "8", "--no-write"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 16 | 4 |"))
    cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
    plain, project, ratio = float(cells[2]), float(cells[3]), float(cells[4].rstrip("x"))
    assert plain > 0 and project > 0 and ratio > 0
    assert "torch.mm on cpu" in out


def test_training_benchmark_refuses_a_device_it_cannot_use(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(SystemExit):
        bench_training.main(["--device", "cuda", "--no-write"])
    assert "only cpu, or cuda on a machine with a CUDA GPU" in capsys.readouterr().err


def test_lincs_defaults_table_compares_the_me_vae_with_the_vae():
    bench = import_module("bench_lincs_defaults")
    row = dict.fromkeys(bench.KEYS, 0.0)
    rows = [
        {
            **row,
            "model": m,
            "size": 48,
            "seed": s,
            "epochs": 100,
            "ended": "budget",
            "loss": 137.1,
            "train_s": 300.0,
            "content_kept": c,
            "neighbour_content_kept": n,
            "paired_polarity_leakage": leak,
        }  # fmt: skip
        for m, s, c, n, leak in (
            ("mevae", 1, 0.90, 0.88, 0.01),
            ("mevae", 2, 0.92, 0.86, 0.03),
            ("vae", 1, 0.89, 0.70, 0.77),
        )
    ]
    text = bench.table(rows)
    assert text.count("\n| ME-VAE | 48 |") == 2 and text.count("\n| VAE | 48 |") == 1
    assert "| 100 (budget) | 137.1 | 300 |" in text
    summary = bench.summary(rows)
    # means over seeds, ranges, and the ME-VAE's largest leakage (not the VAE's 0.77)
    assert "ME-VAE 0.91 (0.90-0.92) against the VAE's 0.89 (0.89-0.89)" in summary
    assert "by neighbours 0.87 against 0.70" in summary
    assert summary.endswith("largest leakage 0.03.")


def test_train_overhead_benchmark_counts_checkpoints_and_previews(capsys):
    """Shrunk to 3 epochs: the "before" run writes a checkpoint and a preview after every epoch
    and at the end, the default run after the first epoch and at the end."""
    bench = import_module("bench_train_overhead")
    assert bench.main(["--epochs", "3", "--no-write"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| every epoch")]
    before = [c.strip() for c in rows[0].strip("|").split("|")]
    assert before[1:2] + before[3:4] + before[5:6] == ["3", "4", "4"]
    now = bench.train_once(3, every_epoch=False)
    assert (now["epochs"], now["checkpoints"], now["previews"]) == (3, 2, 2)
    assert now["MB written"] > 0 and now["seconds"] > 0


def test_umap_start_benchmark_times_a_new_process():
    """One process of the benchmark's (the cached kind: a few seconds): its child script runs
    and reports its time."""
    bench = import_module("bench_umap_start")
    assert bench.one("cached") > 0
