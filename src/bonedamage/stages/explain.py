"""Explain a tissue's models (``explain``): Grad-CAM of the CNN and the ResNet the registry
holds, on the test split: overlay grids of true/false positives/negatives, float32 CAM TIFFs
and index.csv under REPORTS/TISSUE/MODEL/, and the CAM energy inside the ground-truth damage
against its area share, a thresholded-CAM IoU and ROAD faithfulness, with uniform and
centre-bias baselines. Logged to each model's MLflow training run. Tracked in MLflow (params
mlflow; MLFLOW_TRACKING_URI overrides)."""

from __future__ import annotations

import json
from pathlib import Path

from bonedamage.atomic import (
    atomic_dir,
    check_output_dir,
    check_output_file,
    require,
    require_json,
)
from bonedamage.config import require_tissue, stage_params
from bonedamage.data.tilestore import require_tables

PARAMS = ("pipeline", "mlflow", "explain", "registry", "resnet", "train")


def run_explain(
    params: Path,
    tissue: str,
    data_root: Path | None = None,
    tiles: Path | None = None,
    splits: Path | None = None,
    models: Path | None = None,
    metrics: Path | None = None,
    reports: Path | None = None,
    out: Path | None = None,
    *,
    force: bool = False,
) -> int:
    """Grad-CAM maps of a tissue's CNN and ResNet: overlays, CAM TIFFs, localization metrics."""
    cfg = stage_params(params, PARAMS)
    require_tissue(tissue, cfg.pipeline)
    paths = cfg.pipeline.paths
    root, tiles, splits = (
        Path(data_root or paths.raw),
        Path(tiles or paths.tiles),
        Path(splits or paths.splits),
    )
    models = Path(models or paths.models) / tissue
    metrics = Path(metrics or Path(paths.metrics) / f"{tissue}.json")
    folder = Path(reports or Path(paths.reports) / "gradcam") / tissue
    out = Path(out or Path(paths.metrics) / f"{tissue}-gradcam.json")
    inputs = (root, tiles, splits, models, metrics)
    check_output_file(out, inputs=(params, *inputs))
    check_output_dir(folder, owner="explain", inputs=inputs, force=force)
    require_tables(tiles, splits)
    require(models / "cnn.pt", "input")
    for path in (metrics, models / "cnn.json"):
        require_json(path, "input")

    import pandas as pd

    from bonedamage.data.tilestore import TileStore
    from bonedamage.explain.exports import damaged_tiles, explain_model
    from bonedamage.learn.datasets import split_rows
    from bonedamage.learn.scoring import write_json
    from bonedamage.learn.train import seed_everything
    from bonedamage.lifecycle.registry import candidates
    from bonedamage.lifecycle.tracking import configure, log_explanation

    configure(cfg.mlflow.model_dump())
    explain = cfg.explain.model_dump()
    seed_everything(int(explain["seed"]), int(cfg.train.threads))
    store, table = TileStore(tiles), pd.read_parquet(splits)
    test = split_rows(store, table, tissue, "grouped", "test")
    val = split_rows(store, table, tissue, "grouped", "val")
    damaged = {"test": damaged_tiles(store, root, *test, explain)}
    damaged["val"] = damaged_tiles(store, root, *val, explain)
    scores = json.loads(metrics.read_text())
    cands = candidates(cfg.registry.prefix, tissue, models, scores, list(cfg.resnet.inits))[:2]
    with atomic_dir(folder, owner="explain", inputs=inputs, force=force) as staging:
        results = {
            c.key: explain_model(c, store, test, damaged, explain, staging / c.key) for c in cands
        }
    write_json(out, results)
    for cand in cands:
        log_explanation(tissue, cand, folder / cand.key, results[cand.key])
    nan = float("nan")
    for name, m in results.items():
        energy, centre = m.get("cam_energy_ratio", nan), m.get("centre_energy_ratio", nan)
        iou, road = m.get("cam_iou", nan), m.get("faithfulness_road", nan)
        print(
            f"{tissue} {name:16s} CAM energy ratio {energy:.2f} (uniform 1.00, centre "
            f"{centre:.2f}) IoU {iou:.3f} ROAD {road:+.3f} on {m.get('n_tiles', 0)} tiles"
        )
    return 0
