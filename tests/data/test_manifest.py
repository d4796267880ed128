"""Manifest checks on real CSV files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bonedamage.data.manifest import (
    COLUMNS,
    MANIFEST_NAME,
    ManifestError,
    read_manifest,
    write_manifest,
)


def _row(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "scan_id": "S1-pristine",
        "specimen_id": "S1",
        "tissue": "trabecular",
        "species": "bovine",
        "state": "pristine",
        "load_step": 0,
        "applied_strain": "",
        "voxel_size_um": 6.5,
        "path": "trabecular/S1-pristine.tif",
        "mask_path": "",
        "shape": "4x8x8",
        "dtype": "uint8",
        "sha256": "0" * 64,
        "source": "ingest",
    }
    row.update(changes)
    return row


def _write_raw(root: Path, rows: list[dict[str, object]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / MANIFEST_NAME
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(path, index=False)
    return path


def test_round_trip(tmp_path: Path) -> None:
    _write_raw(
        tmp_path,
        [
            _row(),
            _row(
                scan_id="S1-failed",
                state="failed",
                load_step="",
                applied_strain=0.012,
                path="trabecular/S1-failed.tif",
            ),
        ],
    )
    df = read_manifest(tmp_path)
    assert list(df.columns) == list(COLUMNS)
    assert df["load_step"].isna().tolist() == [False, True]
    write_manifest(df, tmp_path)
    again = read_manifest(tmp_path)
    pd.testing.assert_frame_equal(df.sort_values("scan_id").reset_index(drop=True), again)


def test_missing_manifest(tmp_path: Path) -> None:
    assert read_manifest(tmp_path, missing_ok=True).empty
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    ("rows", "fragments"),
    [
        ([_row(path="../outside.tif")], ["path", "../outside.tif", "escapes"]),
        ([_row(path="trabecular/../../outside.tif")], ["path", "escapes"]),
        ([_row(path="/etc/passwd")], ["path", "/etc/passwd", "absolute"]),
        ([_row(mask_path="../mask.tif")], ["mask_path", "escapes"]),
        ([_row(tissue="bone")], ["tissue", "bone"]),
        ([_row(state="broken")], ["state", "broken"]),
        ([_row(), _row()], ["duplicate scan_id", "S1-pristine"]),
        ([_row(voxel_size_um=0)], ["voxel_size_um", "S1-pristine"]),
        ([_row(voxel_size_um=-2.5)], ["voxel_size_um", "-2.5"]),
        ([_row(voxel_size_um=508000.0)], ["508000 is outside 0.1 um-1 mm", "S1-pristine"]),
    ],
    ids=[
        "path-dotdot",
        "path-nested-dotdot",
        "path-absolute",
        "mask-escape",
        "tissue",
        "state",
        "duplicate",
        "voxel-zero",
        "voxel-negative",
        "voxel-in-inches-read-as-um",
    ],
)
def test_read_rejects_bad_rows(tmp_path: Path, rows: list, fragments: list[str]) -> None:
    path = _write_raw(tmp_path, rows)
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_column(tmp_path: Path) -> None:
    path = _write_raw(tmp_path, [_row()])
    pd.read_csv(path).drop(columns=["sha256"]).to_csv(path, index=False)
    with pytest.raises(ManifestError, match="sha256"):
        read_manifest(tmp_path)


def test_write_refuses_invalid_and_keeps_old(tmp_path: Path) -> None:
    path = _write_raw(tmp_path, [_row()])
    before = path.read_bytes()
    bad = read_manifest(tmp_path).assign(tissue="bone")
    with pytest.raises(ManifestError, match="tissue"):
        write_manifest(bad, tmp_path)
    assert path.read_bytes() == before
