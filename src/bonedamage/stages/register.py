"""Register a tissue's models (``register``) in the MLflow model registry:
<prefix>-<tissue>-cnn, <prefix>-<tissue>-resnet (the init with the best validation score)
and <prefix>-<tissue> (the better of the two on validation), as pyfuncs that take raw tiles
and carry how the tiles were cut and their applicability domain, and the damage
segmentation model as <prefix>-<tissue>-seg when MODELS/TISSUE/seg.pt and its scores
(METRICS/TISSUE-seg.json) are there; @challenger points at them.
Versions carry the data hashes, git commit, params and test metrics as tags; the pyfunc
and the test metrics are logged in the run that trained the weights when the store has it,
so a version leads to its training run. Idempotent:
weights already registered on the same test set are not registered again. Writes the
deterministic part (weights and test-set hashes, test metrics, domain) as a record. Tracked
in MLflow (params mlflow; MLFLOW_TRACKING_URI overrides)."""

from __future__ import annotations

import json
from pathlib import Path

from bonedamage.atomic import check_output_file, require, require_json, write_text_atomic
from bonedamage.config import require_tissue, stage_params
from bonedamage.data.tilestore import require_tables

PARAMS = ("pipeline", "mlflow", "registry", "resnet", "tile", "domain", "explain")


def run_register(
    params: Path,
    tissue: str,
    tiles: Path | None = None,
    splits: Path | None = None,
    models: Path | None = None,
    metrics: Path | None = None,
    seg_metrics: Path | None = None,
    out: Path | None = None,
) -> int:
    """Register a tissue's CNN, ResNet and tissue model (challenger); write the record."""
    cfg = stage_params(params, PARAMS)
    require_tissue(tissue, cfg.pipeline)
    paths = cfg.pipeline.paths
    tiles, splits = Path(tiles or paths.tiles), Path(splits or paths.splits)
    models = Path(models or paths.models) / tissue
    metrics = Path(metrics or Path(paths.metrics) / f"{tissue}.json")
    seg_metrics = Path(seg_metrics or Path(paths.metrics) / f"{tissue}-seg.json")
    out = Path(out or Path(paths.registry) / f"{tissue}.json")
    require_tables(tiles, splits)
    require(models / "cnn.pt", "input")
    for path in (metrics, models / "cnn.json"):
        require_json(path, "input")
    check_output_file(out, inputs=(params, tiles, splits, models, metrics, seg_metrics))
    segmented = (models / "seg.pt").is_file()
    if segmented:
        require_json(models / "seg.json", "input")
        require_json(seg_metrics, "input")

    import pandas as pd
    from mlflow.tracking import MlflowClient

    from bonedamage.data.tilestore import TileStore
    from bonedamage.lifecycle.registry import (
        Registration,
        candidates,
        fit_domains,
        register_tissue,
        registry_record,
        seg_candidate,
        test_example,
        test_set_fingerprint,
        tiling_info,
    )
    from bonedamage.lifecycle.tracking import configure

    configure(cfg.mlflow.model_dump())
    cands = candidates(
        cfg.registry.prefix, tissue, models, json.loads(metrics.read_text()), list(cfg.resnet.inits)
    )
    if segmented:
        scores = json.loads(seg_metrics.read_text())
        cands.append(seg_candidate(cfg.registry.prefix, tissue, models, scores))
    else:
        print(f"{tissue}: no segmentation model ({models / 'seg.pt'}): none registered")
    store, table = TileStore(tiles), pd.read_parquet(splits)
    test_set = test_set_fingerprint(store, table, tissue)
    meta = cands[0].meta
    tiling = tiling_info(
        cfg.tile.model_dump(), tissue, int(meta["tile_px"]), int(meta.get("in_channels", 1))
    )
    domains = fit_domains(cands, store, table, tiling, cfg.domain.model_dump())
    layers = cfg.explain.model_dump()["layer"]  # one name, or one per architecture
    cam = {a: layers.get(a) if isinstance(layers, dict) else layers for a in ("cnn", "resnet")}
    example = test_example(store, table, tissue)
    done = register_tissue(
        MlflowClient(), cands, tiling, test_set, example, Registration(domains, cam)
    )
    record = registry_record(cands, tiling, test_set, domains)
    write_text_atomic(out, json.dumps(record, indent=2, sort_keys=True) + "\n")
    for row in done:
        state = "new version" if row["created"] else "already registered:"
        print(f"{row['name']}: {state} {row['version']} -> @challenger")
    return 0
