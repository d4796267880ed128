"""Benchmark: how much of a scan each champion calls inside its applicability domain.

    python bench/bench_domain.py [--data-root data/raw] [--splits data/splits.parquet]
        [--real ../shared/real/lhdl-3155-trabecular] [--scans 4] [--out reports/domain.md]

For each tissue's champion (``models:/bonedamage-<tissue>@champion``) it predicts, without
Grad-CAM, and reports the share of tiles in the domain, the verdict and the seconds:

- held-out phantoms of the same tissue (test split, ``--scans`` per state);
- phantoms of the other tissue (with ``--allow-resample`` where the voxel is refused);
- the same tissue's held-out phantoms downsampled to 20 and 50 um (area-averaged, as a
  coarser detector integrates; refused by the voxel check, predicted with
  ``--allow-resample`` to measure the feature-space score alone);
- the real laboratory micro-CT stack of intact human trabecular bone (19.5 um voxels).

A scan smaller than one tile at the model's working voxel cannot be predicted at all; the
table says so. Figures only, no pass/fail. Needs the pipeline's outputs and registry.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from bonedamage.data.manifest import read_manifest
from bonedamage.data.tiling import TilingError
from bonedamage.data.volume import open_volume, write_volume
from bonedamage.explain.scan import PredictError, load_registered, predict_scan
from bonedamage.lifecycle.tracking import configure

TISSUES = ("cortical", "trabecular")


def downsample(scan: Path, voxel: float, target: float, out: Path) -> Path:
    """``scan`` averaged down to ``target`` um voxels (block means, any ratio), as a TIFF."""
    with open_volume(scan) as vol:
        data = np.stack([vol.read(z) for z in range(vol.shape[0])]).astype(np.float32)
        dtype = vol.dtype
    factor = voxel / target
    smooth = ndimage.uniform_filter(data, size=max(1, round(1 / factor)), mode="nearest")
    small = ndimage.zoom(smooth, factor, order=1, mode="nearest", grid_mode=True)
    small = np.clip(small.round(), 0, np.iinfo(dtype).max).astype(dtype)
    write_volume(out, iter(small), small.shape, dtype, target)
    return out


def run(model, uri: str, scan: Path, tmp: Path, voxel: float | None = None) -> dict:
    """One prediction's domain figures (``allow_resample`` only where the voxel is refused)."""
    t0 = time.perf_counter()
    try:
        try:
            v = predict_scan(model, scan, tmp / "p", model_uri=uri, cam=False, progress=False,
                             voxel_size_um=voxel)  # fmt: skip
            resampled = False
        except PredictError as exc:
            if "coarser" not in str(exc):
                raise
            v = predict_scan(model, scan, tmp / "p", model_uri=uri, cam=False, progress=False,
                             voxel_size_um=voxel, allow_resample=True, force=True)  # fmt: skip
            resampled = True
    except (PredictError, TilingError) as exc:
        return {"in_domain_tiles": None, "verdict": f"refused: {str(exc).split(': ', 1)[-1]}",
                "model_call": "", "n_tiles": 0, "resampled": False, "s": 0.0}  # fmt: skip
    return {
        "in_domain_tiles": 1 - v["out_of_domain_share"],
        "verdict": v["verdict"],
        "model_call": v["model_call"],
        "n_tiles": v["n_tiles"],
        "resampled": resampled,
        "s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="data/raw")
    ap.add_argument("--splits", default="data/splits.parquet")
    ap.add_argument("--real", default="../shared/real/lhdl-3155-trabecular")
    ap.add_argument("--real-voxel-um", type=float, default=19.5, help="its TIFFs carry none")
    ap.add_argument("--scans", type=int, default=4, help="held-out scans per tissue and state")
    ap.add_argument("--out", default="reports/domain.md")
    args = ap.parse_args()
    configure({"db": "mlflow.db", "artifacts": "mlartifacts", "experiment": "bonedamage"})
    root = Path(args.data_root)
    manifest = read_manifest(root)
    splits = pd.read_parquet(args.splits)
    test = splits[(splits.scheme == "grouped") & (splits.split == "test")]
    held = manifest[manifest.specimen_id.isin(set(test.specimen_id))]
    held = held[held.state.isin(["pristine", "failed"])]
    picks = {
        t: held[held.tissue == t].groupby("state").head(args.scans).sort_values("scan_id")
        for t in TISSUES
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for tissue in TISSUES:
            uri = f"models:/bonedamage-{tissue}@champion"
            model = load_registered(uri)
            cases = [("held-out, same tissue", r) for r in picks[tissue].itertuples()]
            other = next(t for t in TISSUES if t != tissue)
            cases += [("other tissue", r) for r in picks[other].itertuples()]
            for kind, r in cases:
                res = run(model, uri, root / r.path, tmp)
                rows.append({"model": tissue, "case": kind, "scan": r.scan_id, **res})
                print(rows[-1], flush=True)
            for target in (20.0, 50.0):
                for r in picks[tissue].itertuples():
                    if target <= r.voxel_size_um * 1.01:
                        continue  # not coarser than the scan itself
                    small = downsample(root / r.path, r.voxel_size_um, target, tmp / "small.tif")
                    res = run(model, uri, small, tmp)
                    rows.append({"model": tissue, "case": f"held-out at {target:g} um",
                                 "scan": r.scan_id, **res})  # fmt: skip
                    print(rows[-1], flush=True)
            real = Path(args.real)
            if real.is_dir():
                res = run(model, uri, real, tmp, voxel=args.real_voxel_um)
                rows.append({"model": tissue, "case": "real lab micro-CT, 19.5 um",
                             "scan": real.name, **res})  # fmt: skip
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    summary = (
        table.groupby(["model", "case"], sort=False)
        .agg(
            scans=("scan", "size"),
            in_domain_tiles=("in_domain_tiles", "mean"),
            verdicts=("verdict", lambda v: ", ".join(sorted(set(v)))),
        )
        .reset_index()
    )
    text = summary.to_markdown(index=False, floatfmt=".3f")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n\n" + table.to_markdown(index=False) + "\n")
    print(text)


if __name__ == "__main__":
    main()
