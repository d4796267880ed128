"""Pretrain the ResNet backbone of a tissue (``pretrain``) without labels: it learns to tell by
how many quarter turns a train-split tile was rotated, so that transfer learning starts from
features of these images when no ImageNet weights are at hand. Tracked in MLflow (params
mlflow; MLFLOW_TRACKING_URI overrides). Data-parallel on several processes or GPUs (rank 0
alone tracks and writes; the batch size stays the global one): ``torchrun --standalone
--nproc-per-node 2 -m bonedamage pretrain --tissue cortical`` (docs/scale-out.md)."""

from __future__ import annotations

from pathlib import Path

from bonedamage.config import require_tissue, stage_params
from bonedamage.data.tilestore import require_tables

PARAMS = ("pipeline", "mlflow", "train", "resnet")


def run_pretrain(
    params: Path,
    tissue: str,
    tiles: Path | None = None,
    splits: Path | None = None,
    models: Path | None = None,
) -> int:
    """Rotation-prediction pretraining of the ResNet backbone on train-split tiles."""
    cfg = stage_params(params, PARAMS)
    require_tissue(tissue, cfg.pipeline)
    paths = cfg.pipeline.paths
    tiles, splits = Path(tiles or paths.tiles), Path(splits or paths.splits)
    out = Path(models or paths.models) / tissue / "pretext.pt"
    require_tables(tiles, splits)

    import pandas as pd

    from bonedamage.data.tilestore import TileStore
    from bonedamage.learn.checkpoint import save_checkpoint
    from bonedamage.learn.datasets import TileDataset, split_rows
    from bonedamage.learn.distributed import print_once
    from bonedamage.learn.models import pretext_model
    from bonedamage.learn.pretext import pretrain
    from bonedamage.learn.train import TrainConfig, seed_everything
    from bonedamage.lifecycle.tracking import log_history
    from bonedamage.lifecycle.training_runs import stage_run, training_session

    resnet = cfg.resnet
    epochs = resnet.pretext_epochs
    loop = TrainConfig.from_params(
        cfg.train.model_dump(), epochs=epochs, patience=epochs, lr=resnet.lr,
        weight_decay=resnet.weight_decay, batch_size=resnet.batch_size,
        channels_last=resnet.channels_last,
    )  # fmt: skip
    with training_session(loop.device, cfg.mlflow.model_dump()):
        seed_everything(loop.seed, loop.threads)
        store, table = TileStore(tiles), pd.read_parquet(splits)
        channels = store.channels(tissue)
        model = pretext_model(resnet.arch, resnet.stem, channels)
        train = TileDataset(store, *split_rows(store, table, tissue, "grouped", "train"))
        val = TileDataset(store, *split_rows(store, table, tissue, "grouped", "val"))
        logged = {"arch": resnet.arch, "stem": resnet.stem, "task": "rotation", "epochs": epochs}
        logged |= {"lr_schedule": loop.lr_schedule, "channels_last": loop.channels_last}
        with stage_run(
            f"pretext-{tissue}", {"stage": "pretrain", "tissue": tissue}, logged
        ) as tracks:
            result = pretrain(model, train, val, loop)
            if tracks:
                log_history(result.history)
                meta = {"kind": "pretext", "arch": resnet.arch, "stem": resnet.stem}
                meta |= {"task": "rotation", "in_channels": channels}
                save_checkpoint(out, model, meta | {"val_balanced_accuracy": result.best_score})
        print_once(f"{tissue}: rotation task val balanced accuracy {result.best_score:.4f}")
    return 0
