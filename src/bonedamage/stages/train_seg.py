"""Train a tissue's damage segmentation model (``train-seg``): a MONAI U-Net that labels
every pixel of a tile background or one of the tissue's damage kinds (params
``segment.classes``), on the ground-truth labels of the training specimens' tiles
(specimen-grouped split), kept at its best validation Dice of the damage classes. Writes
MODELS/TISSUE/seg.pt and its sidecar seg.json. Tracked in MLflow (params mlflow;
MLFLOW_TRACKING_URI overrides)."""

from __future__ import annotations

import os
from pathlib import Path

from bonedamage.config import ConfigError, require_tissue, stage_params
from bonedamage.data.tilestore import require_tables

PARAMS = ("pipeline", "mlflow", "train", "augment", "segment")


def run_train_seg(
    params: Path,
    tissue: str,
    data_root: Path | None = None,
    tiles: Path | None = None,
    splits: Path | None = None,
    models: Path | None = None,
) -> int:
    """The segmentation model of a tissue (MODELS/TISSUE/seg.pt)."""
    cfg = stage_params(params, PARAMS)
    require_tissue(tissue, cfg.pipeline)
    paths = cfg.pipeline.paths
    root, tiles = Path(data_root or paths.raw), Path(tiles or paths.tiles)
    splits = Path(splits or paths.splits)
    out = Path(models or paths.models) / tissue / "seg.pt"
    require_tables(tiles, splits)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train-seg runs in one process: start it without torchrun")

    import pandas as pd

    from bonedamage.data.tilestore import TileStore
    from bonedamage.learn.datasets import Augment
    from bonedamage.learn.segmentation import (
        KIND,
        SegDataset,
        build_segmenter,
        class_names,
        fit_segmenter,
        seg_split,
    )
    from bonedamage.learn.train import seed_everything
    from bonedamage.lifecycle.seg_runs import log_seg_fit
    from bonedamage.lifecycle.training_runs import stage_run, training_session

    seg, train = cfg.segment.model_dump(), cfg.train.model_dump()
    classes = class_names(getattr(cfg.segment.classes, tissue))
    seg["class_weights"] = getattr(cfg.segment.class_weights, tissue)
    seed_everything(int(seg["seed"]), int(train["threads"]))
    store, table = TileStore(tiles), pd.read_parquet(splits)
    data = {s: seg_split(store, table, root, tissue, s, classes) for s in ("train", "val")}
    augment = Augment.from_params(cfg.augment.model_dump(), float(seg["augment_strength"]))
    dataset = SegDataset(data["train"].tiles, data["train"].classes, data["train"].planes,
                         augment, seed=int(seg["seed"]))  # fmt: skip
    channels = int(data["train"].tiles.shape[1])
    model = build_segmenter(seg["arch"], channels, len(classes))
    logged = {k: v for k, v in seg.items() if k not in ("classes", "arch", "class_weights")}
    logged |= {**seg["arch"], "class_weights": seg["class_weights"]}
    tags = {"stage": "train_seg", "tissue": tissue}
    logged |= {"classes": ",".join(classes)}
    with (
        training_session(train["device"], cfg.mlflow.model_dump()),
        stage_run(f"seg-{tissue}", tags, logged),
    ):
        fit = fit_segmenter(model, dataset, (data["val"].tiles, data["val"].classes), seg,
                            seed=int(seg["seed"]), device=train["device"])  # fmt: skip
        meta = {"kind": KIND, "arch": seg["arch"], "tissue": tissue, "classes": classes}
        meta |= {"tile_px": int(data["train"].tiles.shape[-1]), "in_channels": channels}
        log_seg_fit(model, fit, out, meta)
    print(f"{tissue}: segmentation val Dice (damage kinds) {fit.best_score:.4f} at epoch "
          f"{fit.best_epoch} of {len(fit.history)} ({fit.seconds:.0f} s)")  # fmt: skip
    return 0
