"""Morphometry and damage coverage (data/coverage.py) on a small phantom dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bonedamage.atomic import MARKER
from bonedamage.data.coverage import describe_dataset, write_metrics


@pytest.fixture(scope="module")
def cfg(params: dict) -> dict:
    return params["describe"]


TILE_UM = {"cortical": 32.0, "trabecular": 400.0}


def test_metrics_cover_every_tissue_and_state(small_dataset: Path, cfg: dict) -> None:
    metrics = describe_dataset(small_dataset, cfg, TILE_UM, progress=False)
    assert metrics["dataset"]["scans"] == 6 and metrics["dataset"]["specimens"] == 2
    assert metrics["dataset"]["bytes"] > 6 * 32 * 64 * 64 * 2
    # the bytes DVC versions: the output marker (in .dvcignore) is not counted
    versioned = [p for p in small_dataset.rglob("*") if p.is_file() and p.name != MARKER]
    assert (small_dataset / MARKER).is_file()
    assert metrics["dataset"]["bytes"] == sum(p.stat().st_size for p in versioned)
    for tissue in ("cortical", "trabecular"):
        assert set(metrics[tissue]) == {"pristine", "intermediate", "failed"}
        failed = metrics[tissue]["failed"]
        assert 0.0 < failed["tiles_with_damage"]["mean"] <= 1.0
        assert 0.0 < failed["mean_damaged_fraction"]["mean"] < 0.5
    assert 0.05 < metrics["trabecular"]["pristine"]["bv_tv"]["mean"] < 0.6
    # a 0.1 mm field of view holds one or two canals of up to 40 um: porosity is noisy
    assert 0.0 < metrics["cortical"]["pristine"]["porosity"]["mean"] < 0.6


def test_metrics_file_is_deterministic(small_dataset: Path, cfg: dict, tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_metrics(describe_dataset(small_dataset, cfg, TILE_UM, progress=False), a)
    write_metrics(describe_dataset(small_dataset, cfg, TILE_UM, progress=False), b)
    assert a.read_bytes() == b.read_bytes()
    assert json.loads(a.read_text())["dataset"]["scans"] == 6
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary behind
