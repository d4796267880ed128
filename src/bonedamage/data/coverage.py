"""Realism report of every scan in the data root: morphometry, microdamage and coverage.

Writes one JSON metrics file (DVC metrics, committed) that says what the dataset is. Every
scan is segmented inside its own field of view (morphometry.py); then

- trabecular: BV/TV, Tb.Th, Tb.Sp, degree of anisotropy, connectivity density;
- cortical: porosity inside the slice-wise envelope, canal diameter, lacunar density/size;
- scans with a damage label file (intermediate and failed): damaged share of bone, voxels
  per label kind, crack and fracture components (damage.py) and the share of tiles that
  show damage;
- trabecular failed scans whose collapse band is known (``phantoms.json`` from synth, key
  ``band_z_scan``): BV/TV in the band over the pristine scan's BV/TV (``bvtv_band_ratio``).

Output: per tissue and state the mean/min/max of every quantity, ``per_scan`` (keyed by
scan id) and ``per_specimen`` (the band ratio), all rounded to 6 digits. Methods and
literature ranges: docs/phantoms.md. It reads the scans only through the manifest.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from bonedamage.atomic import MARKER, write_text_atomic
from bonedamage.config import DescribeSection
from bonedamage.data import damage, morphometry
from bonedamage.data.manifest import confined, read_manifest
from bonedamage.data.tiling import tile_px, tiles_in_fov
from bonedamage.data.volume import open_volume

_VOI_RADIUS_FRAC = 0.85
PHANTOMS_NAME = "phantoms.json"  # written by synth next to the manifest
_ID_COLUMNS = ("scan_id", "specimen_id", "tissue", "state")
# the optional keys of the ``describe`` section, with the defaults its schema gives them
DEFAULTS: dict[str, Any] = {
    name: info.default
    for name, info in DescribeSection.model_fields.items()
    if not info.is_required()
}


def read_stack(path: Path) -> np.ndarray:
    """The whole scan as a (z, y, x) array (the default scans are a few MB)."""
    with open_volume(path) as vol:
        return np.stack([vol.slice(z) for z in range(vol.shape[0])])


def band_rows(band: tuple[int, int] | list[int], nz: int) -> slice:
    """Scan rows ``z0..z1`` (both included) of a collapse band, clipped to the scan."""
    z0, z1 = int(band[0]), int(band[1])
    return slice(max(z0, 0), min(z1 + 1, nz))


def measure_scan(
    path: Path,
    tissue: str,
    voxel_um: float,
    *,
    smooth_vox: float | None = None,
    mask_path: Path | None = None,
    band: list[int] | None = None,
    min_voxels: int = DEFAULTS["min_component_voxels"],
    merge_gap_vox: int = DEFAULTS["merge_gap_vox"],
) -> dict[str, float]:
    """Morphometry of one scan inside its field of view, and its damage when labelled.

    Trabecular bone is measured in the field shrunk to ``_VOI_RADIUS_FRAC`` of its radius
    (Tb.Th and Tb.Sp on unlabelled, i.e. pristine, scans only), cortical bone inside its
    slice-wise envelope. ``band`` (scan rows) adds the BV/TV of the
    collapse band, ``bv_tv_band``.
    """
    if smooth_vox is None:
        smooth_vox = DEFAULTS["smooth_sigma_vox"][tissue]
    image = read_stack(path)
    fov = morphometry.field_of_view(image)
    bone = morphometry.segment_bone(image, smooth_vox, fov)
    if tissue == "trabecular":
        voi = morphometry.inner_voi(fov, _VOI_RADIUS_FRAC)
        # thickness and separation of the pristine structure only: the slow part
        out = morphometry.trabecular(bone, voxel_um, voi, thickness=mask_path is None)
        if band is not None:
            rows = band_rows(band, bone.shape[0])
            out["bv_tv_band"] = morphometry.bv_tv(bone[rows], voi[rows])
    else:
        out = morphometry.cortical(bone, voxel_um, fov)
    if mask_path is not None:
        labels = read_stack(mask_path)
        out.update(damage.damage_measures(labels, bone, fov, voxel_um, min_voxels, merge_gap_vox))
    return out


def damage_coverage(
    mask_path: Path, voxel_um: float, tile_um: float, stride: int, min_fov: float, visible: float
) -> dict[str, float]:
    """Share of field-of-view tiles (every ``stride`` slices) whose damaged share >= ``visible``.

    Damaged = label > 0 (microcrack, fracture or buckled bone).
    """
    with open_volume(mask_path) as vol:
        tile = tile_px(tile_um, voxel_um)
        origins = tiles_in_fov(vol.shape[1:], tile, min_fov)
        fractions = []
        for z in range(0, vol.shape[0], stride):
            mask = vol.slice(z) > 0
            fractions.extend(mask[y : y + tile, x : x + tile].mean() for y, x in origins)
    arr = np.asarray(fractions, dtype=np.float64)
    if arr.size == 0:
        return {"tiles": 0}
    return {
        "tiles": int(arr.size),
        "tiles_with_damage": float((arr >= visible).mean()),
        "mean_damaged_fraction": float(arr.mean()),
    }


def read_bands(data_root: Path) -> dict[str, list[int]]:
    """Collapse-band rows per scan id from ``phantoms.json``; empty for real data."""
    path = data_root / PHANTOMS_NAME
    if not path.is_file():
        return {}
    phantoms = json.loads(path.read_text())
    return {
        scan["scan_id"]: scan["band_z_scan"]
        for meta in phantoms.values()
        if isinstance(meta, dict)
        for scan in meta.get("scans", [])
        if isinstance(scan, dict) and scan.get("band_z_scan") is not None
    }


def _scan_job(job: dict[str, Any]) -> dict[str, Any]:
    """Measurements of one manifest row (runs in a worker process)."""
    entry = {k: job[k] for k in _ID_COLUMNS}
    entry.update(
        measure_scan(
            job["path"],
            job["tissue"],
            job["voxel_um"],
            smooth_vox=job["smooth_vox"],
            mask_path=job["mask_path"],
            band=job["band"],
            min_voxels=job["min_voxels"],
            merge_gap_vox=job["merge_gap_vox"],
        )
    )
    if job["mask_path"] is not None:
        entry.update(damage_coverage(job["mask_path"], job["voxel_um"], *job["coverage"]))
    return entry


def describe_dataset(
    data_root: Path, cfg: dict[str, Any], tile_um: dict[str, float], *, progress: bool = True
) -> dict[str, Any]:
    """Measure every scan of the manifest; return the nested metrics dict.

    ``tile_um`` (per tissue) is the tile size the ``tile`` stage cuts, so damage coverage
    is counted on tiles of the size the models see. The output does not depend on
    ``cfg["workers"]``.
    """
    cfg = {**DEFAULTS, **cfg}
    smooth = {**DEFAULTS["smooth_sigma_vox"], **cfg["smooth_sigma_vox"]}
    manifest = read_manifest(data_root)
    bands = read_bands(data_root)
    jobs = []
    for row in manifest.itertuples(index=False):
        labelled = row.state != "pristine" and isinstance(row.mask_path, str) and row.mask_path
        jobs.append(
            {
                "scan_id": row.scan_id,
                "specimen_id": row.specimen_id,
                "tissue": row.tissue,
                "state": row.state,
                "path": confined(data_root, row.path, what=f"scan {row.scan_id}: path"),
                "voxel_um": float(row.voxel_size_um),
                "smooth_vox": float(smooth[row.tissue]),
                "min_voxels": int(cfg["min_component_voxels"]),
                "merge_gap_vox": int(cfg["merge_gap_vox"]),
                "mask_path": (
                    confined(data_root, row.mask_path, what=f"scan {row.scan_id}: mask_path")
                    if labelled
                    else None
                ),
                "band": bands.get(row.scan_id) if row.state != "pristine" else None,
                "coverage": (
                    tile_um[row.tissue],
                    cfg["slice_stride"],
                    cfg["min_specimen_fraction"],
                    cfg["visible_damage_fraction"],
                ),
            }
        )
    bar = tqdm(total=len(jobs), desc="describe", unit="scan", disable=not progress)
    per_scan = []
    workers = max(int(cfg["workers"]), 1)
    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                per_scan.append(_scan_job(job))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for entry in pool.map(_scan_job, jobs):
                    per_scan.append(entry)
                    bar.update()
    finally:
        bar.close()
    table = add_band_ratio(pd.DataFrame(per_scan))
    return summarise(table, manifest, data_root)


def add_band_ratio(per_scan: pd.DataFrame) -> pd.DataFrame:
    """``bvtv_band_ratio`` = band BV/TV of a scan / BV/TV of its specimen's pristine scan."""
    if "bv_tv_band" not in per_scan.columns:
        return per_scan
    pristine = per_scan[per_scan["state"] == "pristine"].drop_duplicates("specimen_id")
    reference = pristine.set_index("specimen_id")["bv_tv"]
    base = per_scan["specimen_id"].map(reference)
    out = per_scan.copy()
    out["bvtv_band_ratio"] = (out["bv_tv_band"] / base).where(base > 0)
    return out


def _finite(value: Any) -> bool:
    """Whether ``value`` is a finite number (what a DVC metric can hold)."""
    return isinstance(value, (int, float, np.number)) and math.isfinite(float(value))


def _rounded(value: float) -> float | int:
    """A number rounded to 6 digits (integers stay integers)."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    return round(float(value), 6)


def summarise(per_scan: pd.DataFrame, manifest: pd.DataFrame, data_root: Path) -> dict[str, Any]:
    """Per-tissue-and-state mean/min/max of every quantity, the per-scan and per-specimen
    tables, dataset counts and size."""
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
    numeric = [c for c in per_scan.columns if c not in _ID_COLUMNS]
    for (tissue, state), group in per_scan.groupby(["tissue", "state"], sort=True):
        stats = {}
        for col in numeric:
            values = group[col].replace([np.inf, -np.inf], np.nan).dropna()
            if len(values):
                stats[col] = {
                    "mean": round(float(values.mean()), 6),
                    "min": round(float(values.min()), 6),
                    "max": round(float(values.max()), 6),
                }
        out.setdefault(str(tissue), {})[str(state)] = {"scans": len(group), **stats}
    out["per_scan"] = {
        str(row["scan_id"]): {k: _rounded(row[k]) for k in numeric if _finite(row[k])}
        for _, row in per_scan.iterrows()
    }
    if "bvtv_band_ratio" in per_scan.columns:
        failed = per_scan[(per_scan["state"] == "failed") & per_scan["bvtv_band_ratio"].notna()]
        out["per_specimen"] = {
            str(r.specimen_id): {"bvtv_band_ratio": _rounded(r.bvtv_band_ratio)}
            for r in failed.itertuples(index=False)
            if _finite(r.bvtv_band_ratio)
        }
    return out


def write_metrics(metrics: dict[str, Any], path: Path) -> None:
    """The metrics as sorted, indented JSON (a DVC metrics file), written atomically."""
    write_text_atomic(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
