"""The scan manifest: one row per scan in ``data/raw/manifest.csv``.

Both the phantom generator and ``ingest`` write it; every later stage reads scans only
through it. Paths in it are relative to the data root and must stay inside it.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import pandas as pd

from bonedamage.atomic import write_text_atomic
from bonedamage.data.volume import VOXEL_RANGE_TEXT, voxel_size_in_range

MANIFEST_NAME = "manifest.csv"
TISSUES = ("cortical", "trabecular")
STATES = ("pristine", "intermediate", "failed")
COLUMNS = (
    "scan_id",
    "specimen_id",
    "tissue",
    "species",
    "state",
    "load_step",
    "applied_strain",
    "voxel_size_um",
    "path",
    "mask_path",
    "shape",
    "dtype",
    "sha256",
    "source",
)
DTYPES = {
    "scan_id": "string",
    "specimen_id": "string",
    "tissue": "string",
    "species": "string",
    "state": "string",
    "load_step": "Int64",
    "applied_strain": "Float64",
    "voxel_size_um": "float64",
    "path": "string",
    "mask_path": "string",
    "shape": "string",
    "dtype": "string",
    "sha256": "string",
    "source": "string",
}


class ManifestError(ValueError):
    """The manifest (or a row of it) is invalid; the message names the file and field."""


def manifest_path(data_root: str | os.PathLike[str]) -> Path:
    return Path(data_root) / MANIFEST_NAME


def confined(root: str | os.PathLike[str], relpath: str, *, what: str = "path") -> Path:
    """Resolve ``relpath`` under ``root``; refuse absolute paths and any that escape ``root``."""
    root_resolved = Path(root).resolve()
    if os.path.isabs(relpath):
        raise ManifestError(f"{what} {relpath!r} is absolute; it must be relative to {root}")
    resolved = (root_resolved / relpath).resolve()
    if not resolved.is_relative_to(root_resolved):
        raise ManifestError(f"{what} {relpath!r} escapes the data root {root_resolved}")
    return resolved


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=DTYPES[c]) for c in COLUMNS})


def read_manifest(data_root: str | os.PathLike[str], *, missing_ok: bool = False) -> pd.DataFrame:
    """Read and check the manifest of ``data_root``.

    Checks columns, allowed tissue/state values, unique scan ids, positive voxel sizes
    and that every path stays inside the data root.
    """
    path = manifest_path(data_root)
    if not path.exists():
        if missing_ok:
            return empty_manifest()
        raise ManifestError(f"{path}: no manifest; run `bonedamage synth` or `bonedamage ingest`")
    try:
        df = pd.read_csv(
            path,
            dtype=DTYPES,
            keep_default_na=False,
            na_values={"load_step": [""], "applied_strain": [""]},
        )
    except (ValueError, pd.errors.ParserError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from exc
    check_manifest(df, data_root, source=path)
    return df


def check_manifest(df: pd.DataFrame, data_root: str | os.PathLike[str], *, source: object) -> None:
    """Raise :class:`ManifestError` naming ``source`` and the field when ``df`` is invalid."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{source}: missing column(s) {missing}")
    for column, allowed in (("tissue", TISSUES), ("state", STATES)):
        bad = sorted(set(df[column]) - set(allowed))
        if bad:
            raise ManifestError(f"{source}: unknown {column} {bad}; allowed: {list(allowed)}")
    dup = df["scan_id"][df["scan_id"].duplicated()].tolist()
    if dup:
        raise ManifestError(f"{source}: duplicate scan_id {dup}")
    for row in df.itertuples(index=False):
        if not (math.isfinite(row.voxel_size_um) and row.voxel_size_um > 0):
            raise ManifestError(
                f"{source}: scan {row.scan_id}: voxel_size_um={row.voxel_size_um}; it must be > 0"
            )
        if not voxel_size_in_range(row.voxel_size_um):
            raise ManifestError(
                f"{source}: scan {row.scan_id}: voxel_size_um={row.voxel_size_um:g} is outside "
                f"{VOXEL_RANGE_TEXT}; correct the row (micrometres)"
            )
        confined(data_root, row.path, what=f"{source}: scan {row.scan_id}: path")
        if row.mask_path:
            confined(data_root, row.mask_path, what=f"{source}: scan {row.scan_id}: mask_path")


def write_manifest(df: pd.DataFrame, data_root: str | os.PathLike[str]) -> Path:
    """Check and write the manifest atomically, rows sorted by scan id (stable bytes)."""
    check_manifest(df, data_root, source=manifest_path(data_root))
    out = df.loc[:, list(COLUMNS)].sort_values("scan_id", kind="stable").reset_index(drop=True)
    buffer = io.StringIO()
    out.to_csv(buffer, index=False, lineterminator="\n", float_format="%.6g")
    path = manifest_path(data_root)
    write_text_atomic(path, buffer.getvalue())
    return path


def scan_path(data_root: str | os.PathLike[str], row: pd.Series) -> Path:
    """Absolute path of a manifest row's scan, confined to the data root."""
    return confined(data_root, row["path"], what=f"scan {row['scan_id']}: path")


def format_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.split("x"))
    if len(parts) != 3:
        raise ManifestError(f"shape {text!r} is not ZxYxX")
    return parts  # type: ignore[return-value]
