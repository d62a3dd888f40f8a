"""Bad input and faults (issue 19): one clear line every time, nothing lost, nothing clobbered.

Every case runs the `mevae` command (in this process, or as a program where signals and
resource limits matter) and checks the exit code, that stderr is ONE line
``mevae <cmd>: error: ...`` (no traceback), and, by hashing every file before and after, that
nothing was lost or half-written.  Small data: 16 LINCS pairs at 32 px, synthetic crops and
a small synthetic segmented image.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from conftest import unzip_lincs
from napari_mevae.checkpoints import load_checkpoint
from napari_mevae.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
SMALL = ["--image_size", "32", "--latent_dim", "8", "--inter_dim", "32", "--batch_size", "8"]
QUIET = ["--verbose", "0", "--seed", "0"]


# -- helpers -----------------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict[str, Any]:
    """Every entry under ``roots``: files by content hash, links by target, special files by
    kind (and device number): equal snapshots = nothing lost, changed or left behind."""
    out: dict[str, Any] = {}
    for root in roots:
        if not os.path.lexists(root):
            out[str(root)] = None
            continue
        entries = [root]
        if root.is_dir() and not root.is_symlink():
            entries += sorted(root.rglob("*"))
        for p in entries:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[str(p)] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISDIR(st.st_mode):
                out[str(p)] = "dir"
            else:
                out[str(p)] = ("special", stat.S_IFMT(st.st_mode), st.st_rdev)
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """``mevae ARGV`` in this process: exit code and stderr's non-empty lines (argparse's own
    errors exit through SystemExit)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.strip()]


def one_error(lines: list[str], command: str) -> str:
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"mevae {command}: error: "), lines
    return lines[0]


def program_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MEVAE_DEBUG", None)
    return env


# -- the data every case uses ------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    from napari_mevae.checkpoints import save_checkpoint
    from napari_mevae.config import MEVAEConfig, preset
    from napari_mevae.model import MEVAE
    from napari_mevae.store import _write_header, write_crops
    from napari_mevae.synthetic import make_synthetic_cells, synthetic_crops

    root = tmp_path_factory.mktemp("bad")
    w: dict[str, Path] = {"root": root}
    w["lincs"] = unzip_lincs(root / "lincs", 16)
    w["pairs"] = [
        "--data_dir",
        w["lincs"] / "InputImages1",
        "--input2_dir",
        w["lincs"] / "InputImages2",
        "--out1_dir",
        w["lincs"] / "OutputImages",
    ]
    w["run"] = root / "run"
    argv = ["train", *w["pairs"], *SMALL, *QUIET, "--epochs", "1", "--save_dir", w["run"]]
    assert main([str(a) for a in argv]) == 0
    crops, _ = synthetic_crops(n=48, size=32, channels=1, seed=0)
    w["crops"] = write_crops(root / "crops.npy", crops, dtype="uint8")
    # a crops file whose header claims 2**40 cells; it holds 20
    w["huge_npy"] = root / "huge.npy"
    with open(w["huge_npy"], "wb") as fh:
        _write_header(fh, np.dtype(np.uint8), (2**40, 1, 32, 32))
        fh.write(np.zeros((20, 1, 32, 32), np.uint8).tobytes())
    syn = make_synthetic_cells(n_cells=12, shape=(200, 200), channels=1, seed=3)
    tifffile.imwrite(root / "img.tif", syn.image)
    tifffile.imwrite(root / "lab.tif", syn.labels)
    tifffile.imwrite(root / "complex.tif", syn.image.astype(np.complex64))
    tifffile.imwrite(root / "lab3d.tif", np.stack([syn.labels] * 2))
    big = syn.labels.astype(np.uint64)
    big[big > 0] += np.uint64(2**64 - 100)
    tifffile.imwrite(root / "lab64.tif", big)
    # checkpoints that must be refused
    good = torch.load(w["run"] / "models" / "checkpoint.pt", weights_only=True)
    nomodel = {k: v for k, v in good.items() if k != "model"}
    torch.save(nomodel, root / "nomodel.pt")
    huge = dict(good, config=dict(good["config"], image_size=2**20))
    torch.save(huge, root / "huge_image_size.pt")
    nan = dict(good, model=dict(good["model"]))
    name = next(k for k in nan["model"] if k.endswith("weight"))
    nan["model"][name] = torch.full_like(nan["model"][name], float("nan"))
    torch.save(nan, root / "nan.pt")
    other = MEVAE(MEVAEConfig.from_dict(good["config"]))  # same architecture, other weights
    save_checkpoint(root / "other.pt", other)
    (root / "classes.csv").write_text("name,class\nImage_0.tif,a\n")
    (root / "old.csv").write_text("filename,z0\nkept,1\n")
    (root / "a dir").mkdir()
    MEVAE(preset("tiny"))  # torch warmed up for the timed cases
    return w


def copy_run(w: dict[str, Path], dest: Path) -> Path:
    shutil.copytree(w["run"], dest)
    return dest


# -- the table ---------------------------------------------------------------------------------
@dataclass
class Case:
    """``argv(w, tmp)`` is run; exit code ``code``; its one line matches ``says``; the files
    ``watch(w, tmp)`` are unchanged by hash."""

    argv: Any
    code: int
    says: str
    watch: Any = None
    setup: Any = None
    max_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _encode(w, out, *more):
    return ["encode", "--checkpoint", w["run"], "--data_dir", w["lincs"] / "InputImages1", *more,
            "--out", out, "--verbose", "0"]  # fmt: skip


def _pairs(w, out, *more, image="img.tif", labels="lab.tif"):
    return ["pairs", "--image", w["root"] / image, "--labels", w["root"] / labels,
            "--out", out, "--size", "32", "--verbose", "0", *more]  # fmt: skip


def _train(w, save_dir, *more):
    return ["train", *w["pairs"], *SMALL, *QUIET, "--epochs", "1", "--save_dir", save_dir, *more]


def _char_device(tmp: Path) -> Path:
    """A copy of /dev/full's device node (1, 7) in tmp: the real one is never at risk."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    node = tmp / "full"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    return node


def _link_to_device(tmp: Path) -> Path:
    link = tmp / "link-to-full"
    link.symlink_to(_char_device(tmp))
    return link


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "fifo")
    return tmp / "fifo"


def _pairs_folder(w, tmp: Path) -> Path:
    """An earlier `mevae pairs` output with 4 crops."""
    out = tmp / "pairs"
    for sub in ("InputImages1", "InputImages2", "OutputImages"):
        (out / sub / "train").mkdir(parents=True)
        for i in range(4):
            (out / sub / "train" / f"Image_{i}.tif").write_bytes(b"old crop %d" % i)
    (out / "cells.csv").write_text("filename,label\nImage_0.tif,1\n")
    return out


def _twins(w, tmp: Path) -> Path:
    folder = tmp / "twins"
    shutil.copytree(w["lincs"] / "InputImages1", folder)
    shutil.copy(folder / "train" / "Image_1.tif", folder / "train" / "Image_1.tiff")
    return folder


def _damaged_tif(w, tmp: Path) -> Path:
    folder = tmp / "damaged"
    shutil.copytree(w["lincs"] / "InputImages1", folder)
    (folder / "train" / "Image_3.tif").write_bytes(b"II*\x00garbage, not an image")
    return folder


def _complex_folder(w, tmp: Path) -> Path:
    folder = tmp / "complex"
    shutil.copytree(w["lincs"] / "InputImages1", folder)
    tifffile.imwrite(folder / "train" / "Image_2.tif", np.ones((32, 32), np.complex64))
    return folder


CASES: dict[str, Case] = {
    # 1. outputs are written through links, non-regular files are refused and stay what they are
    "1-out-device": Case(
        lambda w, t: _encode(w, t / "full"), 2, r"cannot write .*full: it is a character device",
        watch=lambda w, t: [t], setup=_char_device,
    ),
    "1-out-link-to-device": Case(
        lambda w, t: _encode(w, t / "link-to-full"), 2, r"link-to-full -> .*full\): it is a character device",
        watch=lambda w, t: [t], setup=_link_to_device,
    ),
    "1-out-fifo": Case(
        lambda w, t: _encode(w, t / "fifo"), 2, r"it is a FIFO \(named pipe\), not a regular file",
        watch=lambda w, t: [t], setup=_fifo,
    ),
    "1-out-directory": Case(
        lambda w, t: _encode(w, w["root"] / "a dir"), 2, r"it is a directory.*give a file name inside it",
        watch=lambda w, t: [w["root"] / "a dir"],
    ),
    # 2. a crops header claiming 2**40 cells fails at once
    "2-npy-header-2^40-train": Case(
        lambda w, t: ["train", "--targets", w["huge_npy"], *SMALL, *QUIET, "--save_dir", t / "r"],
        2, r"header claims 1099511627776 crops .*\(room for 20 crops\)", watch=lambda w, t: [w["huge_npy"], t],
        max_seconds=1.0,
    ),
    "2-npy-header-2^40-encode": Case(
        lambda w, t: ["encode", "--checkpoint", w["run"], "--targets", w["huge_npy"], "--out", t / "e.csv"],
        2, r"header claims 1099511627776 crops", watch=lambda w, t: [t], max_seconds=1.0,
    ),
    # 3. batch sizes
    "3-encode-batch-size-negative": Case(
        lambda w, t: _encode(w, w["root"] / "old.csv", "--batch_size", "-1"), 2,
        r"argument --batch_size: must be an integer >= 1, got -1", watch=lambda w, t: [w["root"] / "old.csv"],
    ),
    "3-encode-batch-size-zero": Case(
        lambda w, t: _encode(w, w["root"] / "old.csv", "--batch_size", "0"), 2,
        r"argument --batch_size: must be an integer >= 1, got 0", watch=lambda w, t: [w["root"] / "old.csv"],
    ),
    "3-train-batch-size-zero": Case(
        lambda w, t: _train(w, w["run"], "--batch_size", "0"), 2, r"--batch_size: must be an integer >= 1",
        watch=lambda w, t: [w["run"]],
    ),
    # 4. pairs into an earlier output
    "4-pairs-into-non-empty": Case(
        lambda w, t: _pairs(w, t / "pairs"), 2,
        r"--out .*pairs is not empty \(InputImages1, InputImages2, OutputImages, cells.csv\).*--overwrite",
        watch=lambda w, t: [t], setup=_pairs_folder,
    ),
    # 5. the outputs of one model never land beside another's checkpoint
    "5-load-into-another-run": Case(
        lambda w, t: _train(w, w["run"], "--phase", "load", "--checkpoint", w["root"] / "other.pt"),
        2, r"run holds the checkpoint of another model .*write to another folder",
        watch=lambda w, t: [w["run"]],
    ),
    # 7. a run failing at once keeps the old log with the old checkpoint
    "7-nan-at-once-into-a-run": Case(
        lambda w, t: _train(w, w["run"], "--learn_rate", "1e6", "--epochs", "3"), 2,
        r"loss became nan at epoch 1.*last good weights were kept", watch=lambda w, t: [w["run"]],
    ),
    # 8. resume refuses what it cannot change
    "8-resume-other-architecture": Case(
        lambda w, t: _train(w, w["run"], "--checkpoint", w["run"], "--latent_dim", "16", "--image_size", "64"),
        2, r"checkpoint fixes the model.*--image_size 64 \(checkpoint: 32\); --latent_dim 16 \(checkpoint: 8\)",
        watch=lambda w, t: [w["run"]],
    ),
    "8-resume-other-kernel": Case(
        lambda w, t: _train(w, w["run"], "--checkpoint", w["run"], "--kernel_size", "5"),
        2, r"--kernel_size 5 \(checkpoint: 3\)", watch=lambda w, t: [w["run"]],
    ),
    "8-load-other-architecture": Case(
        lambda w, t: _train(w, t / "o", "--phase", "load", "--checkpoint", w["run"], "--nchannel", "3"),
        2, r"--nchannel 3 \(checkpoint: 1\)", watch=lambda w, t: [w["run"], t],
    ),
    # 10. one line where there were tracebacks
    "10-image-size-0": Case(
        lambda w, t: _train(w, t / "r", "--image_size", "0"), 2, r"--image_size must be a positive integer, got 0",
        watch=lambda w, t: [t],
    ),
    "10-device-gpu0": Case(
        lambda w, t: _train(w, t / "r", "--device", "gpu0"), 2, r"unknown device 'gpu0'", watch=lambda w, t: [t],
    ),
    "10-distributed-without-torchrun": Case(
        lambda w, t: _train(w, t / "r", "--distributed"), 2, r"--distributed runs under torchrun",
        watch=lambda w, t: [t],
    ),
    "10-num-save-latent-samp": Case(
        lambda w, t: _train(w, t / "r", "--num_save", "100000", "--latent_samp", "1000000"), 2,
        r"argument --(num_save|latent_samp): must be an integer from", watch=lambda w, t: [t],
    ),
    "10-checkpoint-image-size-2^20": Case(
        lambda w, t: ["encode", "--checkpoint", w["root"] / "huge_image_size.pt", "--data_dir",
                      w["lincs"] / "InputImages1", "--out", t / "e.csv"],  # fmt: skip
        2, r"invalid model config: this model would have .* parameters", watch=lambda w, t: [t],
        max_seconds=2.0,
    ),
    "10-checkpoint-without-model": Case(
        lambda w, t: ["encode", "--checkpoint", w["root"] / "nomodel.pt", "--data_dir",
                      w["lincs"] / "InputImages1", "--out", t / "e.csv"],  # fmt: skip
        2, r"holds no model weights \(no 'model' entry\)", watch=lambda w, t: [t],
    ),
    "10-classes-without-filename": Case(
        lambda w, t: ["evaluate", "--checkpoint", w["run"], "--targets", w["lincs"] / "OutputImages",
                      "--classes", w["root"] / "classes.csv", "--out", t / "r.json"],  # fmt: skip
        2, r"--classes .*classes.csv lacks the column\(s\) filename; it has name, class", watch=lambda w, t: [t],
    ),
    "10-pairs-size-100000": Case(
        lambda w, t: _pairs(w, t / "p", "--size", "100000"), 2, r"argument --size: must be an integer from 4 to 4096",
        watch=lambda w, t: [t],
    ),
    "10-complex-image-pairs": Case(
        lambda w, t: _pairs(w, t / "p", image="complex.tif"), 2, r"complex.tif: its pixels are complex64",
        watch=lambda w, t: [t],
    ),
    "10-complex-image-in-a-folder": Case(
        lambda w, t: ["encode", "--checkpoint", w["run"], "--data_dir", t / "complex", "--out", t / "e.csv"],
        2, r"Image_2.tif: its pixels are complex64", watch=lambda w, t: [t], setup=_complex_folder,
    ),
    "10-save-dir-is-a-file": Case(
        lambda w, t: _train(w, w["root"] / "old.csv"), 2, r"--save_dir .*old.csv exists and is not a folder",
        watch=lambda w, t: [w["root"] / "old.csv"],
    ),
    # 11. absurd runs refused before the work
    "11-kernel-99-at-32px": Case(
        lambda w, t: _train(w, t / "r", "--kernel_size", "99"), 2,
        r"--kernel_size 99 is larger than the feature maps it convolves \(8 px at --image_size 32", watch=lambda w, t: [t],
        max_seconds=2.0,
    ),
    "11-nchannel-0-before-reading": Case(  # the folders do not even exist: checked first
        lambda w, t: ["train", "--data_dir", t / "nowhere", "--input2_dir", t / "nowhere",
                      "--out1_dir", t / "nowhere", "--nchannel", "0", "--save_dir", t / "r"],  # fmt: skip
        2, r"--nchannel must be a positive integer, got 0", watch=lambda w, t: [t],
    ),
    # 12. smaller
    "12-damaged-tif-named": Case(
        lambda w, t: ["encode", "--checkpoint", w["run"], "--data_dir", t / "damaged", "--out", t / "e.csv"],
        2, r"cannot read image .*damaged/train/Image_3.tif: ", watch=lambda w, t: [t], setup=_damaged_tif,
    ),
    "12-nan-weights-checkpoint": Case(
        lambda w, t: ["encode", "--checkpoint", w["root"] / "nan.pt", "--data_dir",
                      w["lincs"] / "InputImages1", "--out", t / "e.csv"],  # fmt: skip
        2, r"holds NaN/inf weights .*diverged", watch=lambda w, t: [t],
    ),
    "12-tif-and-tiff-one-name": Case(
        lambda w, t: ["encode", "--checkpoint", w["run"], "--data_dir", t / "twins", "--out", t / "e.csv"],
        2, r"several images with one name \(Image_1.tif and Image_1.tiff\)", watch=lambda w, t: [t],
        setup=_twins,
    ),
    "12-image-and-labels-differ-flag-named": Case(
        lambda w, t: ["pairs", "--image", t / "two.tif", "--labels", w["root"] / "lab.tif",
                      "--out", t / "p", "--channel-axis", "0", "--verbose", "0"],
        2, r"does not match .*--channel-axis=0", watch=lambda w, t: [t],
        setup=lambda t: tifffile.imwrite(t / "two.tif", np.zeros((2, 100, 100), np.float32)),
    ),
    "12-stack-labels-no-python-hint": Case(
        lambda w, t: _pairs(w, t / "p", labels="lab3d.tif"), 2,
        r"takes one \(Y, X\) label image \(a time or z stack: one plane at a time\)$", watch=lambda w, t: [t],
    ),
    "12-epsilon-std-nan": Case(
        lambda w, t: _train(w, t / "r", "--epsilon_std", "nan"), 2, r"--epsilon_std must be a finite number",
        watch=lambda w, t: [t],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_cli_bad_input(name, world, tmp_path, capsys):
    case = CASES[name]
    if case.setup is not None:
        sig = case.setup.__code__.co_argcount
        case.setup(*((world, tmp_path) if sig == 2 else (tmp_path,)))
    watched = case.watch(world, tmp_path) if case.watch else []
    before = snapshot(*watched)
    argv = case.argv(world, tmp_path)
    t0 = time.perf_counter()
    code, lines = run_cli(argv, capsys)
    seconds = time.perf_counter() - t0
    assert code == case.code, lines
    line = one_error(lines, argv[0])
    assert re.search(case.says, line), line
    assert "stack=True" not in line
    assert snapshot(*watched) == before  # nothing lost, nothing half-written, no temp left
    if case.max_seconds is not None:
        assert seconds < case.max_seconds, seconds


# -- cases that succeed and change files as asked ----------------------------------------------
def test_1_out_through_a_symlink_replaces_its_target(world, tmp_path, capsys):
    target = tmp_path / "real.csv"
    target.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    code, lines = run_cli(_encode(world, link), capsys)
    assert code == 0 and lines == []
    assert link.is_symlink() and os.readlink(link) == str(target)  # still the link
    assert pd.read_csv(target).shape == (16, 9)  # the link's target got the CSV
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "real.csv"]


def test_3_reconstruct_and_encode_refuse_a_bad_batch_size(world):
    from napari_mevae.analysis import encode, reconstruct

    model = load_checkpoint(world["run"]).build_model()
    crops = np.zeros((3, 1, 32, 32), np.float32)
    for bad in (-1, 0, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            reconstruct(model, crops, batch_size=bad)
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            encode(model, crops, batch_size=bad)


def test_4_pairs_overwrite_replaces_only_its_own_outputs(world, tmp_path, capsys):
    out = _pairs_folder(world, tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / ".mevae-pairs.k1ll3d").mkdir()  # the staging folder of a killed run
    code, lines = run_cli([*_pairs(world, out, "--overwrite"), "--max-area", "400"], capsys)
    assert code == 0, lines
    cells = pd.read_csv(out / "cells.csv")
    kept = cells["filename"].dropna().tolist()
    for sub in ("InputImages1", "InputImages2", "OutputImages"):
        files = sorted(p.name for p in (out / sub / "train").iterdir())
        assert files == sorted(
            kept
        )  # the old crops are gone: the folder holds what cells.csv lists
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left


def test_5_full_disk_while_writing_run_outputs_changes_nothing(
    world, tmp_path, capsys, monkeypatch
):
    """ENOSPC half-way through the outputs of `train --phase load` into an existing run: every
    file stays as it was (filenames.csv was cut mid-line while encodings.csv kept old rows)."""
    from napari_mevae import figures

    run = copy_run(world, tmp_path / "run")
    before = snapshot(run)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(figures, "save_png", full)
    argv = ["train", *world["pairs"], "--phase", "load", "--checkpoint", run, "--save_dir", run,
            "--verbose", "0"]  # fmt: skip
    code, lines = run_cli(argv, capsys)
    assert code == 2
    line = one_error(lines, "train")
    assert re.search(r"disk full \(ENOSPC\) while writing .*run/input_images.png$", line), line
    assert snapshot(run) == before


def test_10_read_only_save_dir_is_one_line(world, tmp_path, capsys, monkeypatch):
    from napari_mevae import outputs

    run = copy_run(world, tmp_path / "run")
    before = snapshot(run)

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, "x.tmp"))

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    argv = ["train", *world["pairs"], "--phase", "load", "--checkpoint", run, "--save_dir", run,
            "--verbose", "0"]  # fmt: skip
    code, lines = run_cli(argv, capsys)
    assert code == 2
    line = one_error(lines, "train")
    assert re.search(r"read-only file system \(EROFS\) while writing .*run/filenames.csv$", line)
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "limit, argv, says",
    [
        # the weights files are larger than 100 kB: the set of outputs fails at encoder1.pt
        (
            100_000,
            ["--phase", "load"],
            r"file too large \(EFBIG\) while writing .*models/encoder1.pt",
        ),
        # the checkpoint (2.3 MB) at the end of the first epoch; torch's own writer said
        # "unexpected pos ..." here and never named the disk
        (
            1_000_000,
            ["--epochs", "2"],
            r"file too large \(EFBIG\) while writing .*models/checkpoint.pt",
        ),
    ],
    ids=["run-outputs", "checkpoint"],
)
def test_5_10_a_real_write_error_keeps_the_run_as_it_was(world, tmp_path, limit, argv, says):
    """The OS refuses writes past a file size limit (RLIMIT_FSIZE: EFBIG, as a full disk gives
    ENOSPC): one line naming the file, and every file of the existing run unchanged."""
    resource = pytest.importorskip("resource")
    run = copy_run(world, tmp_path / "run")
    before = snapshot(run)

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    resume = ["--checkpoint", str(run)] if "load" in argv else []  # else a new model
    cmd = [sys.executable, "-m", "napari_mevae", "train", *map(str, world["pairs"]), *SMALL,
           *QUIET, "--save_dir", str(run), *resume, *argv]  # fmt: skip
    proc = subprocess.run(
        cmd, env=program_env(), capture_output=True, text=True, timeout=300, preexec_fn=limited
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(says, one_error(lines, "train")), lines
    assert snapshot(run) == before


def test_6_9_second_run_fails_fast_and_ctrl_c_keeps_what_was_learned(world, tmp_path, capsys):
    """A `mevae train` program holds the save_dir: a second run into it fails at once naming
    the first; then Ctrl-C (SIGINT) mid-epoch: exit 130, one line, and the checkpoint holds
    the weights at the interrupt (it was the last full epoch's)."""
    from napari_mevae.store import write_crops
    from napari_mevae.synthetic import synthetic_crops

    crops, _ = synthetic_crops(n=240, size=32, channels=1, seed=1)
    path = write_crops(tmp_path / "crops.npy", crops, dtype="uint8")
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "napari_mevae", "train", "--targets", str(path),
           "--save_dir", str(save), *SMALL, "--batch_size", "4", "--epochs", "50", "--seed", "0",
           "--verbose", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=program_env(), stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")))
    reader.start()
    try:

        def wait_for(pattern: str, timeout: float = 120) -> None:
            end = time.monotonic() + timeout
            while not re.search(pattern, "".join(err)):
                assert proc.poll() is None and time.monotonic() < end, "".join(err)
                time.sleep(0.02)

        wait_for(r"epoch 1/50  loss")  # printed after the epoch's checkpoint was saved
        first = (save / "models" / "checkpoint.pt").read_bytes()
        lock = json.loads((save / ".mevae.lock").read_text())
        assert lock["pid"] == proc.pid and lock["host"] == socket.gethostname()

        t0 = time.perf_counter()
        code, lines = run_cli(
            ["train", "--targets", path, *SMALL, *QUIET, "--save_dir", save], capsys
        )
        assert time.perf_counter() - t0 < 2.0
        assert code == 2
        line = one_error(lines, "train")
        assert f"is in use by mevae train (pid {proc.pid} on host {socket.gethostname()}" in line

        wait_for(r"epoch 2/50: +\d+%\|[^|]*\| [1-9]\d*/60")  # a step or more into epoch 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join()
    text = "".join(err)
    assert "Traceback" not in text
    last = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()][-1]
    assert last.startswith("mevae train: interrupted: the weights at the interrupt are saved in")
    assert (save / "models" / "checkpoint.pt").read_bytes() != first
    steps = int(re.search(r"after (\d+) training step", last).group(1))
    assert steps % 60, steps  # interrupted inside an epoch (60 steps each)
    ckpt = load_checkpoint(save)
    assert ckpt.epoch == steps // 60  # the full epochs: a resumed run redoes the interrupted one
    assert len(ckpt.history) == ckpt.epoch
    old = torch.load(io.BytesIO(first), weights_only=True, map_location="cpu")["model"]
    assert any(not torch.equal(old[k], ckpt.model_state[k]) for k in old)  # what it learned since
    assert not (save / ".mevae.lock").exists()  # released
    assert len((save / "training.log").read_text().splitlines()) == 1 + ckpt.epoch


def test_6_a_lock_left_by_a_dead_process_does_not_block(world, tmp_path, capsys):
    run = copy_run(world, tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    info = {"pid": int(dead), "host": socket.gethostname(), "command": "mevae train"}
    (run / ".mevae.lock").write_text(json.dumps(info))  # as a kill -9 leaves it
    t0 = time.perf_counter()
    code, lines = run_cli(_train(world, run), capsys)
    assert code == 0, lines
    assert time.perf_counter() - t0 < 60
    assert not (run / ".mevae.lock").exists()


def test_6_the_lock_in_process_is_reentrant_and_named(tmp_path):
    from napari_mevae.config import InputError
    from napari_mevae.outputs import DirLock

    with DirLock(tmp_path, "first"), DirLock(tmp_path, "again"):  # one process: re-entrant
        assert (tmp_path / ".mevae.lock").exists()
        holder = subprocess.run(
            [sys.executable, "-c",
             "import sys; from napari_mevae.outputs import DirLock; "
             f"DirLock({str(tmp_path)!r}, 'second').acquire()"],
            env=program_env(), capture_output=True, text=True,
        )  # fmt: skip
        assert holder.returncode != 0 and "is in use by first (pid" in holder.stderr
    assert not (tmp_path / ".mevae.lock").exists()
    (tmp_path / "file").touch()
    with pytest.raises(InputError, match="exists and is not a folder"):
        DirLock(tmp_path / "file").acquire()
    with DirLock(tmp_path / "new"):  # a folder the lock made, left empty: removed again
        assert (tmp_path / "new").is_dir()
    assert not (tmp_path / "new").exists()


def test_7_a_failed_run_into_a_run_keeps_its_log_and_a_new_one_replaces_it(world, tmp_path, capsys):
    run = copy_run(world, tmp_path / "run")
    old_log = (run / "training.log").read_text()
    code, _ = run_cli(_train(world, run, "--learn_rate", "1e6", "--epochs", "3"), capsys)
    assert code == 2 and (run / "training.log").read_text() == old_log
    code, _ = run_cli(_train(world, run, "--epochs", "2"), capsys)
    assert code == 0
    log = (run / "training.log").read_text().splitlines()
    assert log[0] == "epoch\tloss" and [r.split("\t")[0] for r in log[1:]] == ["0", "1"]
    assert load_checkpoint(run).epoch == 2


def test_8_resume_applies_the_learning_rate_and_says_so(world, tmp_path, capsys):
    run = copy_run(world, tmp_path / "run")
    argv = ["train", *world["pairs"], "--checkpoint", run, "--save_dir", run, "--epochs", "1",
            "--learn_rate", "1e-4", "--beta", "0.5", "--seed", "0"]  # fmt: skip
    code, lines = run_cli(argv, capsys)
    assert code == 0
    said = [ln for ln in lines if ln.startswith("resuming")]
    assert len(said) == 1, lines
    assert re.search(
        r"after epoch 1: learning rate 0.0001 \(was 0.0005; the saved optimizer state is kept\), "
        r"beta 0.5 \(was 0.0625\)$",
        said[0],
    )
    ckpt = load_checkpoint(run)
    assert ckpt.epoch == 2 and ckpt.config.beta == 0.5
    assert ckpt.optimizer_state["param_groups"][0]["lr"] == 1e-4


def test_10_debug_shows_the_traceback(world, tmp_path, monkeypatch, capsys):
    from napari_mevae.config import InputError

    argv = ["train", *map(str, world["pairs"]), "--save_dir", str(tmp_path), "--image_size", "0"]
    with pytest.raises(InputError, match="--image_size must be"):
        main(["--debug", *argv])
    with pytest.raises(InputError, match="--image_size must be"):
        main([*argv, "--debug"])  # after the command too, where users type it
    monkeypatch.setenv("MEVAE_DEBUG", "1")
    with pytest.raises(InputError):
        main(argv)
    monkeypatch.setenv("MEVAE_DEBUG", "0")
    assert main(argv) == 2


def test_10_oserror_and_memory_errors_are_one_line():
    from napari_mevae.cli import explain
    from napari_mevae.outputs import WriteFailed

    assert explain(WriteFailed(errno.ENOSPC, "No space left", "o/e.csv")) == (
        "disk full (ENOSPC) while writing o/e.csv"
    )
    assert explain(PermissionError(errno.EACCES, "Permission denied", "x")) == (
        "permission denied (EACCES) at x"
    )
    assert explain(MemoryError()).startswith("out of memory: try")
    big = "Unable to allocate 2.91 TiB for an array with shape (3, 100000, 100000)"
    assert explain(MemoryError(big)).startswith(f"out of memory ({big})")
    assert explain(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert explain(RuntimeError("some bug")) is None  # a bug keeps its traceback


def test_11_far_larger_images_are_warned_about_once(world, tmp_path, capsys):
    folder = tmp_path / "fields"
    shutil.copytree(world["lincs"] / "InputImages1", folder)
    rng = np.random.default_rng(0)
    for i in (4, 5):
        tifffile.imwrite(
            folder / "train" / f"Image_{i}.tif", rng.integers(0, 255, (1500, 1500), np.uint8)
        )
    argv = ["encode", "--checkpoint", world["run"], "--data_dir", folder, "--out", tmp_path / "e.csv",
            "--verbose", "0"]  # fmt: skip
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # whatever -W the tests run with
        code, lines = run_cli(argv, capsys)
    assert code == 0
    assert len(lines) == 1 and lines[0].startswith("mevae encode: warning: Image_4.tif in ")
    assert "is 1500x1500 px, far larger than the 32 px crops" in lines[0]
    assert time.perf_counter() - t0 < 10


def test_11_12_config_refuses_absurd_and_mistyped_settings():
    from napari_mevae.config import CropSettings, MEVAEConfig

    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer, got 3.5"):
        MEVAEConfig(kernel_size=3.5)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"would have .* parameters"):
        MEVAEConfig(latent_dim=10**12)
    assert time.perf_counter() - t0 < 0.1
    with pytest.raises(ValueError, match="kernel_size 99 is larger"):
        MEVAEConfig(image_size=32, kernel_size=99)
    with pytest.raises(ValueError, match="epsilon_std must be a finite number"):
        MEVAEConfig(epsilon_std=float("nan"))
    with pytest.raises(ValueError, match="size must be an integer from 4 to 4096"):
        CropSettings(size=100_000).check()


def test_2_crops_header_is_checked_against_the_file(world):
    from napari_mevae.store import CropStore

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="claims 1099511627776 crops"):
        CropStore(world["huge_npy"])
    assert time.perf_counter() - t0 < 1.0
    assert len(CropStore(world["crops"])) == 48


def test_12_label_ids_near_2_64_stay_positive(world, tmp_path, capsys):
    code, lines = run_cli(_pairs(world, tmp_path / "p", "--size", "64", labels="lab64.tif"), capsys)
    assert code == 0, lines
    labels = pd.read_csv(tmp_path / "p" / "cells.csv", dtype={"label": "uint64"})["label"]
    assert (labels > np.uint64(2**63)).all()


def test_12_skip_summary_counts_reasons_not_areas(world, tmp_path, capsys):
    code, lines = run_cli(_pairs(world, tmp_path / "p", "--max-area", "50"), capsys)
    assert code == 2
    line = one_error(lines, "pairs")
    assert re.search(r"skip reasons: area above max_area \(> 50\): 12$", line), line


def test_12_train_with_hint_quotes_paths(world, tmp_path, capsys):
    out = tmp_path / "my pairs"
    code, lines = run_cli([*_pairs(world, out), "--verbose", "1"], capsys)
    assert code == 0
    hint = lines[-1].split("train with: ", 1)[1]
    import shlex

    words = shlex.split(hint)
    assert words[words.index("--data_dir") + 1] == str(out / "InputImages1")
    assert words[words.index("--out1_dir") + 1] == str(out / "OutputImages")


def test_4_pairs_overwrite_that_fails_keeps_the_earlier_output(
    world, tmp_path, capsys, monkeypatch
):
    from napari_mevae import folders

    out = _pairs_folder(world, tmp_path)
    before = snapshot(out)
    calls = []
    write = folders.write_image

    def fills_up(path, image):
        calls.append(path)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, image)

    monkeypatch.setattr(folders, "write_image", fills_up)
    code, lines = run_cli([*_pairs(world, out, "--overwrite"), "--max-area", "400"], capsys)
    assert code == 2
    assert re.search(r"disk full \(ENOSPC\) while writing .*/pairs$", one_error(lines, "pairs"))
    assert snapshot(out) == before


def test_10_crops_that_cannot_fit_in_memory_are_refused_before_allocating(world, monkeypatch):
    from napari_mevae import cells
    from napari_mevae.config import InputError

    image = tifffile.imread(world["root"] / "img.tif")
    labels = tifffile.imread(world["root"] / "lab.tif")
    monkeypatch.setattr(cells, "_available_memory", lambda: 2**20)  # 1 MiB free
    with pytest.raises(
        InputError, match=r"cropping 12 cells of 1 channel\(s\) at 4096 px needs 0.75 GiB"
    ):
        cells.extract_cells(image, labels, size=4096)
