"""Morphometry and damage coverage (data/coverage.py) on a small phantom dataset."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonedamage.atomic import MARKER
from bonedamage.data.coverage import (
    PHANTOMS_NAME,
    add_band_ratio,
    band_rows,
    describe_dataset,
    measure_scan,
    write_metrics,
)
from bonedamage.data.manifest import read_manifest
from bonedamage.data.volume import write_volume


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


def test_every_scan_has_its_own_entry_of_finite_numbers(small_dataset: Path, cfg: dict) -> None:
    metrics = describe_dataset(small_dataset, cfg, TILE_UM, progress=False)
    manifest = read_manifest(small_dataset)
    assert set(metrics["per_scan"]) == set(manifest["scan_id"])
    for scan in manifest.itertuples(index=False):
        entry = metrics["per_scan"][scan.scan_id]
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in entry.values())
        if scan.tissue == "trabecular":
            assert {"bv_tv", "da", "conn_d_per_mm3"} <= set(entry)
        else:
            assert {"porosity", "canal_diameter_um", "lacuna_density_per_mm3"} <= set(entry)
        # damage is measured on every labelled (intermediate or failed) scan
        assert ("damaged_share_of_bone" in entry) == (scan.state != "pristine")


def scan_file(path: Path, bone: np.ndarray) -> Path:
    """``bone`` as a uint16 scan: bone 3000, marrow 1000, noise; 0 outside a disc field."""
    rng = np.random.default_rng(0)
    image = np.where(bone, 3000.0, 1000.0) + rng.normal(0, 60, bone.shape)
    yy, xx = np.indices(bone.shape[1:])
    c = (bone.shape[1] - 1) / 2
    image[:, np.hypot(yy - c, xx - c) > c] = 0
    write_volume(path, iter(image.astype(np.uint16)), bone.shape, np.uint16, 20.0)
    return path


def plates_along_x(shape: tuple[int, int, int], period: int, thickness: int = 4) -> np.ndarray:
    x = np.arange(shape[2])
    return np.broadcast_to(x % period < thickness, shape).copy()


def test_band_ratio_is_band_bvtv_over_the_pristine_bvtv(tmp_path: Path) -> None:
    shape = (40, 64, 64)
    pristine = plates_along_x(shape, period=16)  # BV/TV 0.25
    failed = pristine.copy()
    failed[10:20] = plates_along_x((10, *shape[1:]), period=8)  # the band compacted to 0.5
    rows = []
    for state, bone, band in (("pristine", pristine, None), ("failed", failed, [10, 19])):
        m = measure_scan(scan_file(tmp_path / f"{state}.tif", bone), "trabecular", 20.0, band=band)
        rows.append(
            {"scan_id": state, "specimen_id": "s", "tissue": "trabecular", "state": state, **m}
        )
    table = add_band_ratio(pd.DataFrame(rows))
    ratio = table.set_index("state").loc["failed", "bvtv_band_ratio"]
    assert ratio == pytest.approx(2.0, rel=0.1)
    assert np.isnan(table.set_index("state").loc["pristine", "bvtv_band_ratio"])


def test_band_rows_include_both_ends_and_are_clipped_to_the_scan() -> None:
    assert band_rows([3, 5], 10) == slice(3, 6)
    assert band_rows([-2, 40], 10) == slice(0, 10)


def copy_with_band(source: Path, dest: Path, band: list[int] | None) -> Path:
    """A copy of a data root whose phantoms.json gives the failed trabecular scans ``band``
    (``None``: no band recorded, as for real data)."""
    shutil.copytree(source, dest)
    phantoms = json.loads((dest / PHANTOMS_NAME).read_text())
    for meta in phantoms.values():
        for scan in meta["scans"]:
            scan.pop("band_z_scan", None)
            if band and scan["scan_id"].startswith("trabecular") and "failed" in scan["scan_id"]:
                scan["band_z_scan"] = band
    (dest / PHANTOMS_NAME).write_text(json.dumps(phantoms))
    return dest


def test_band_ratio_is_reported_per_specimen_when_phantoms_record_the_band(
    small_dataset: Path, cfg: dict, tmp_path: Path
) -> None:
    root = copy_with_band(small_dataset, tmp_path / "raw", [8, 23])
    metrics = describe_dataset(root, cfg, TILE_UM, progress=False)
    trabecular = read_manifest(root).query("tissue == 'trabecular'")["specimen_id"].unique()
    assert set(metrics["per_specimen"]) == set(trabecular)
    assert all(v["bvtv_band_ratio"] > 0 for v in metrics["per_specimen"].values())
    assert "bvtv_band_ratio" in metrics["trabecular"]["failed"]


def test_no_band_ratio_without_a_recorded_band(
    small_dataset: Path, cfg: dict, tmp_path: Path
) -> None:
    root = copy_with_band(small_dataset, tmp_path / "raw", None)
    metrics = describe_dataset(root, cfg, TILE_UM, progress=False)
    assert "per_specimen" not in metrics
    assert "bvtv_band_ratio" not in metrics["trabecular"]["failed"]
    (root / PHANTOMS_NAME).unlink()  # real data: no phantoms.json at all
    assert "per_specimen" not in describe_dataset(root, cfg, TILE_UM, progress=False)
