"""Morphometry and damage coverage of every scan in the data root.

Writes one JSON metrics file (DVC metrics, committed) that says what the dataset is:
per tissue, the morphometry measured on pristine scans (BV/TV, Tb.Th, Tb.Sp for
trabecular; porosity, canal diameter, lacunar density and size for cortical), and for
failed scans with a ground-truth mask the share of tiles that show damage. It reads the
scans only through the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from bonedamage.atomic import MARKER, write_text_atomic
from bonedamage.data import morphometry
from bonedamage.data.manifest import confined, read_manifest
from bonedamage.data.tiling import tile_px, tiles_in_fov
from bonedamage.data.volume import open_volume

_VOI_RADIUS_FRAC = 0.85


def measure_scan(path: Path, tissue: str, voxel_um: float) -> dict[str, float]:
    """Morphometry of one scan in the central box of its field of view."""
    with open_volume(path) as vol:
        box = morphometry.central_box(vol.shape, _VOI_RADIUS_FRAC * (min(vol.shape[1:]) - 1) / 2)
        sub = np.stack([vol.slice(z)[box[1], box[2]] for z in range(box[0].start, box[0].stop)])
    bone = morphometry.segment_bone(sub)
    return (
        morphometry.trabecular(bone, voxel_um)
        if tissue == "trabecular"
        else morphometry.cortical(bone, voxel_um)
    )


def damage_coverage(
    mask_path: Path, voxel_um: float, tile_um: float, stride: int, min_fov: float, visible: float
) -> dict[str, float]:
    """Share of field-of-view tiles (every ``stride`` slices) whose damaged share >= ``visible``."""
    with open_volume(mask_path) as vol:
        tile = tile_px(tile_um, voxel_um)
        origins = tiles_in_fov(vol.shape[1:], tile, min_fov)
        fractions = []
        for z in range(0, vol.shape[0], stride):
            mask = vol.slice(z)
            fractions.extend(mask[y : y + tile, x : x + tile].mean() for y, x in origins)
    arr = np.asarray(fractions, dtype=np.float64)
    if arr.size == 0:
        return {"tiles": 0}
    return {
        "tiles": int(arr.size),
        "tiles_with_damage": float((arr >= visible).mean()),
        "mean_damaged_fraction": float(arr.mean()),
    }


def describe_dataset(
    data_root: Path, cfg: dict[str, Any], tile_um: dict[str, float], *, progress: bool = True
) -> dict[str, Any]:
    """Measure every scan of the manifest; return the nested metrics dict.

    ``tile_um`` (per tissue) is the tile size the ``tile`` stage cuts, so damage coverage
    is counted on tiles of the size the models see.
    """
    manifest = read_manifest(data_root)
    per_scan = []
    for row in tqdm(
        list(manifest.itertuples(index=False)), desc="describe", unit="scan", disable=not progress
    ):
        entry: dict[str, Any] = {"scan_id": row.scan_id, "tissue": row.tissue, "state": row.state}
        path = confined(data_root, row.path, what=f"scan {row.scan_id}: path")
        if row.state == "pristine":
            entry.update(measure_scan(path, row.tissue, row.voxel_size_um))
        if row.state == "failed" and row.mask_path:
            mask = confined(data_root, row.mask_path, what=f"scan {row.scan_id}: mask_path")
            entry.update(
                damage_coverage(
                    mask,
                    row.voxel_size_um,
                    tile_um[row.tissue],
                    cfg["slice_stride"],
                    cfg["min_specimen_fraction"],
                    cfg["visible_damage_fraction"],
                )
            )
        per_scan.append(entry)
    return summarise(pd.DataFrame(per_scan), manifest, data_root)


def summarise(per_scan: pd.DataFrame, manifest: pd.DataFrame, data_root: Path) -> dict[str, Any]:
    """Per-tissue mean/min/max of every measured quantity, plus dataset counts and size."""
    out: dict[str, Any] = {
        "dataset": {
            "scans": len(manifest),
            "specimens": int(manifest["specimen_id"].nunique()),
            # what DVC versions: the output marker is in .dvcignore
            "bytes": int(
                sum(
                    p.stat().st_size
                    for p in data_root.rglob("*")
                    if p.is_file() and p.name != MARKER
                )
            ),
        }
    }
    numeric = [c for c in per_scan.columns if c not in ("scan_id", "tissue", "state")]
    for (tissue, state), group in per_scan.groupby(["tissue", "state"], sort=True):
        stats = {}
        for col in numeric:
            values = group[col].dropna()
            if len(values):
                stats[col] = {
                    "mean": round(float(values.mean()), 6),
                    "min": round(float(values.min()), 6),
                    "max": round(float(values.max()), 6),
                }
        out.setdefault(str(tissue), {})[str(state)] = {"scans": len(group), **stats}
    return out


def write_metrics(metrics: dict[str, Any], path: Path) -> None:
    """The metrics as sorted, indented JSON (a DVC metrics file), written atomically."""
    write_text_atomic(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
