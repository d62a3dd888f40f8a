"""Shared fixtures: the LINCS example pairs (real cells, read from ../shared, never committed)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEVAE_SHARED", REPO.parent / "shared"))
LINCS = SHARED / "data" / "lincs_example"
LINCS_DIRS = ("InputImages1", "InputImages2", "OutputImages")


def unzip_lincs(dest: Path, n: int, start: int = 0) -> Path:
    """Extract pairs ``Image_start .. Image_{start+n-1}`` of the three folders into ``dest``."""
    if not LINCS.is_dir():
        pytest.skip(f"LINCS example data not found at {LINCS}")
    wanted = {f"Image_{i}.tif" for i in range(start, start + n)}
    for name in LINCS_DIRS:
        with zipfile.ZipFile(LINCS / f"{name}.zip") as zf:
            for member in zf.namelist():
                if Path(member).name in wanted:
                    target = dest / name / "train" / Path(member).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(member))
    return dest


@pytest.fixture(scope="session")
def lincs64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 real LINCS pairs in the reference folder layout (128 px files)."""
    return unzip_lincs(tmp_path_factory.mktemp("lincs64"), 64)


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    import torch

    torch.set_num_threads(2)
    yield
