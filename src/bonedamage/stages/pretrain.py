"""Pretrain the ResNet backbone by one method of params ``pretrain.methods`` (``pretrain``):
``procedural`` (the generated corpus, one class per generated scan), ``simsiam``
(self-supervised) or ``rotation`` (which quarter turn), the last two on the corpus and the
train split of every tissue, never a test or validation specimen. One backbone serves
every tissue: ``models/pretrained/<method>.pt`` and its sidecar, which ``train_resnet``
fine-tunes. Tracked in MLflow (params mlflow; MLFLOW_TRACKING_URI overrides).
Data-parallel on several processes or GPUs (rank 0 alone tracks and writes):
``torchrun --standalone --nproc-per-node 2 -m bonedamage pretrain --method procedural``
(docs/scale-out.md)."""

from __future__ import annotations

from pathlib import Path

from bonedamage.atomic import require
from bonedamage.config import PRETRAINED_FOLDER, ConfigError, stage_params
from bonedamage.data.corpus import TILES_DIR
from bonedamage.data.tilestore import require_tables

PARAMS = ("pipeline", "mlflow", "train", "augment", "pretrain", "resnet")


def run_pretrain(
    params: Path,
    method: str,
    tiles: Path | None = None,
    splits: Path | None = None,
    corpus: Path | None = None,
    out: Path | None = None,
) -> int:
    """Pretrain one backbone by ``method`` and save it for the ResNets of every tissue."""
    cfg = stage_params(params, PARAMS)
    if method not in cfg.pretrain.methods:
        raise ConfigError(
            f"pretrain method {method!r}: not in params pretrain.methods {cfg.pretrain.methods}"
        )
    paths = cfg.pipeline.paths
    tiles, splits = Path(tiles or paths.tiles), Path(splits or paths.splits)
    corpus_tiles = Path(corpus or paths.corpus) / TILES_DIR
    out = Path(out or Path(paths.models) / PRETRAINED_FOLDER / f"{method}.pt")
    require_tables(tiles, splits)
    require(corpus_tiles, "pretraining corpus tiles: dvc repro corpus", folder=True)

    from bonedamage.learn.checkpoint import save_checkpoint
    from bonedamage.learn.distributed import print_once
    from bonedamage.learn.pretraining import pretrain_backbone
    from bonedamage.learn.train import TrainConfig
    from bonedamage.lifecycle.tracking import log_history
    from bonedamage.lifecycle.training_runs import stage_run, training_session

    pre, resnet = cfg.pretrain.model_dump(), cfg.resnet
    loop = TrainConfig.from_params(
        cfg.train.model_dump(), epochs=pre["epochs"], patience=pre["epochs"], lr=pre["lr"],
        weight_decay=pre["weight_decay"], batch_size=pre["batch_size"],
        channels_last=resnet.channels_last,
    )  # fmt: skip
    logged = {"method": method, "arch": resnet.arch, "stem": resnet.stem, "epochs": pre["epochs"]}
    logged |= {k: pre[k] for k in ("batch_size", "weight_decay", "augment_strength")}
    logged |= {"lr_schedule": loop.lr_schedule, "channels_last": loop.channels_last}
    logged |= (
        {f"simsiam.{k}": v for k, v in pre["simsiam"].items()}
        if method == "simsiam"
        else {"lr": pre["lr"], "val_fraction": pre["val_fraction"]}
    )
    with training_session(loop.device, cfg.mlflow.model_dump()):
        with stage_run(
            f"pretrain-{method}", {"stage": "pretrain", "method": method}, logged
        ) as tracks:
            model, result = pretrain_backbone(
                method, corpus_tiles, tiles, splits, cfg.pipeline.tissues, resnet.arch,
                resnet.stem, pre, loop, cfg.augment.model_dump(),
            )  # fmt: skip
            if tracks:
                log_history(result.history)
                save_checkpoint(out, model, result.meta)
        print_once(f"pretrain {method}: {result.summary}")
    return 0
