"""Train the final CNN of a tissue (``train-cnn``) with the best searched configuration: an
ensemble of params ``train_cnn.ensemble`` networks (seeds ``train.seed``, +1, ...) when
above 1, and the same recipe on the leaky split, for the inflation metric. Tracked in MLflow
(params mlflow; MLFLOW_TRACKING_URI overrides). Data-parallel on several processes or GPUs
(rank 0 alone tracks and writes; the batch size stays the global one): ``torchrun
--standalone --nproc-per-node 2 -m bonedamage train-cnn --tissue cortical``
(docs/scale-out.md)."""

from __future__ import annotations

import json
from pathlib import Path

from bonedamage.atomic import require_json
from bonedamage.config import require_tissue, stage_params
from bonedamage.data.tilestore import require_tables

PARAMS = ("pipeline", "mlflow", "train", "augment", "train_cnn")


def run_train_cnn(
    params: Path,
    tissue: str,
    tiles: Path | None = None,
    splits: Path | None = None,
    models: Path | None = None,
) -> int:
    """The final CNN (ensemble) of a tissue on the grouped split, and on the leaky one."""
    cfg = stage_params(params, PARAMS)
    require_tissue(tissue, cfg.pipeline)
    paths = cfg.pipeline.paths
    tiles, splits = Path(tiles or paths.tiles), Path(splits or paths.splits)
    out_dir = Path(models or paths.models) / tissue
    require_tables(tiles, splits)
    best = json.loads(require_json(out_dir / "cnn_search.json", "input").read_text())

    import pandas as pd

    from bonedamage.data.tilestore import TileStore
    from bonedamage.learn.distributed import print_once
    from bonedamage.learn.recipes import train_cnn_ensemble
    from bonedamage.lifecycle.training_runs import (
        log_ensemble_fit,
        log_fit,
        stage_run,
        training_session,
    )

    train, members = cfg.train.model_dump(), cfg.train_cnn.ensemble
    recipe = {k: best[k] for k in ("lr", "weight_decay", "batch_size", "augment_strength")}
    loop = {"lr_schedule": train["lr_schedule"], "channels_last": train["channels_last"]}
    scores = {}
    with training_session(train["device"], cfg.mlflow.model_dump()):
        store, table = TileStore(tiles), pd.read_parquet(splits)
        for scheme, name in (("grouped", "cnn"), ("leaky", "cnn_leaky")):
            logged = {**best["arch"], **recipe, "scheme": scheme, **loop}
            logged |= {"ensemble": members} if members != 1 else {}
            tags = {"stage": "train_cnn", "tissue": tissue, "scheme": scheme}
            with stage_run(f"{name}-{tissue}", tags, logged) as tracks:
                model, fits, score = train_cnn_ensemble(
                    store, table, tissue, best, train, cfg.augment.model_dump(), members,
                    scheme=scheme,
                )  # fmt: skip
                if tracks:
                    meta = {"kind": "cnn", "arch": best["arch"], "tissue": tissue}
                    meta["scheme"] = scheme
                    path = out_dir / f"{name}.pt"
                    if len(fits) == 1:
                        log_fit(model, fits[0], store, path, meta)
                    else:
                        log_ensemble_fit(model, fits, score, store, path, meta)
                scores[name] = score
        print_once(f"{tissue}: " + ", ".join(f"{k} val {v:.4f}" for k, v in scores.items()))
    return 0
