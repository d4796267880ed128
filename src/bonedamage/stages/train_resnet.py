"""Fine-tune the ResNet of a tissue (``train-resnet``) once per init in params
``resnet.inits``: ``imagenet`` (weights from ``resnet.weights_path`` or the torch cache,
never downloaded), ``procedural``, ``simsiam`` or ``rotation`` (the backbones of the
``pretrain`` stage, ``models/pretrained/<method>.pt``) or ``scratch``. Tracked in
MLflow (params mlflow; MLFLOW_TRACKING_URI overrides). Data-parallel on several processes or
GPUs (rank 0 alone tracks and writes; the batch size stays the global one): ``torchrun
--standalone --nproc-per-node 2 -m bonedamage train-resnet --tissue cortical``
(docs/scale-out.md)."""

from __future__ import annotations

from pathlib import Path

from bonedamage.atomic import require
from bonedamage.config import PRETRAIN_METHODS, PRETRAINED_FOLDER, require_tissue, stage_params
from bonedamage.data.tilestore import require_tables

PARAMS = ("pipeline", "mlflow", "train", "augment", "resnet")


def run_train_resnet(
    params: Path,
    tissue: str,
    tiles: Path | None = None,
    splits: Path | None = None,
    models: Path | None = None,
    pretrained: Path | None = None,
) -> int:
    """Fine-tune one ResNet of a tissue per init in params ``resnet.inits``."""
    cfg = stage_params(params, PARAMS)
    require_tissue(tissue, cfg.pipeline)
    paths = cfg.pipeline.paths
    tiles, splits = Path(tiles or paths.tiles), Path(splits or paths.splits)
    pretrained = Path(pretrained or Path(models or paths.models) / PRETRAINED_FOLDER)
    models = Path(models or paths.models) / tissue
    require_tables(tiles, splits)
    for init in cfg.resnet.inits:
        if init in PRETRAIN_METHODS:
            what = f"{init} pretrained backbone: dvc repro pretrain@{init}, with {init} in params"
            require(pretrained / f"{init}.pt", f"{what} pretrain.methods")

    import pandas as pd

    from bonedamage.data.tilestore import TileStore
    from bonedamage.learn.distributed import print_once
    from bonedamage.learn.recipes import train_resnet
    from bonedamage.learn.train import TrainConfig
    from bonedamage.lifecycle.training_runs import log_fit, stage_run, training_session

    resnet = cfg.resnet.model_dump()
    loop = TrainConfig.from_params(
        cfg.train.model_dump(),
        **{k: resnet[k] for k in ("epochs", "patience", "lr", "weight_decay", "batch_size")},
        channels_last=resnet["channels_last"],
    )
    logged = {k: resnet[k] for k in ("arch", "stem", "freeze_epochs", "epochs", "lr")}
    logged |= {"lr_schedule": loop.lr_schedule, "weight_decay": resnet["weight_decay"]}
    logged |= {"batch_size": resnet["batch_size"], "channels_last": resnet["channels_last"]}
    scores = {}
    with training_session(loop.device, cfg.mlflow.model_dump()):
        store, table = TileStore(tiles), pd.read_parquet(splits)
        for init in resnet["inits"]:
            tags = {"stage": "train_resnet", "tissue": tissue, "init": init}
            with stage_run(f"resnet_{init}-{tissue}", tags, logged | {"init": init}) as tracks:
                model, result = train_resnet(
                    store, table, tissue, init, resnet, loop, cfg.augment.model_dump(),
                    pretrained_path=pretrained / f"{init}.pt" if init in PRETRAIN_METHODS else None,
                )  # fmt: skip
                if tracks:
                    meta = {"kind": "resnet", "arch": resnet["arch"], "stem": resnet["stem"]}
                    meta |= {"init": init, "tissue": tissue}
                    log_fit(model, result, store, models / "resnet" / f"resnet_{init}.pt", meta)
                scores[f"resnet_{init}"] = result.best_score
        print_once(f"{tissue}: " + ", ".join(f"{k} val {v:.4f}" for k, v in scores.items()))
    return 0
