"""Final models of a tissue: the best searched CNN and the transfer-learned ResNets.

The CNN can be an ensemble (``train_cnn.ensemble``): the same recipe trained with successive
seeds, whose mean probability is the prediction. One run's test accuracy moves by about a
point with the seed alone (bench/bench_seeds.py); the mean of a few runs moves less.

Both train on the train split with early stopping on the validation split of the same
scheme (``grouped`` by default; ``leaky`` to measure how much a leaky split inflates
accuracy). The ResNet's backbone can stay frozen for the first ``freeze_epochs`` while
the new head settles, then everything trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from bonedamage.config import ConfigError
from bonedamage.data.tilestore import TileStore
from bonedamage.learn.datasets import Augment, TileDataset, make_loader, split_rows
from bonedamage.learn.models import (
    Ensemble,
    build_cnn,
    resnet_from_init,
    set_backbone_trainable,
)
from bonedamage.learn.train import (
    EpochCallback,
    FitResult,
    TrainConfig,
    fit,
    predict,
    resolve_device,
    seed_everything,
)


def fit_on_split(
    model: nn.Module,
    store: TileStore,
    splits: pd.DataFrame,
    tissue: str,
    scheme: str,
    augment: Augment,
    cfg: TrainConfig,
    **callbacks: Any,
) -> FitResult:
    """Fit on the train split (augmented) with early stopping on the val split of ``scheme``."""
    train = TileDataset(
        store, *split_rows(store, splits, tissue, scheme, "train"), augment, cfg.seed
    )
    val = TileDataset(store, *split_rows(store, splits, tissue, scheme, "val"))
    return fit(
        model,
        make_loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed),
        make_loader(val, 256, shuffle=False),
        cfg,
        **callbacks,
    )


def train_cnn(
    store: TileStore,
    splits: pd.DataFrame,
    tissue: str,
    best: dict[str, Any],
    train_cfg: dict[str, Any],
    augment_cfg: dict[str, Any],
    *,
    scheme: str = "grouped",
    on_epoch: EpochCallback | None = None,
) -> tuple[nn.Module, FitResult]:
    """Train the CNN of the best trial (``best``: :func:`bonedamage.learn.study.best_config`)."""
    cfg = TrainConfig.from_params(
        train_cfg, lr=best["lr"], weight_decay=best["weight_decay"], batch_size=best["batch_size"]
    )
    seed_everything(cfg.seed, cfg.threads)
    model = build_cnn(best["arch"], store.channels(tissue))
    augment = Augment.from_params(augment_cfg, best["augment_strength"])
    result = fit_on_split(model, store, splits, tissue, scheme, augment, cfg, on_epoch=on_epoch)
    return model, result


def train_cnn_ensemble(
    store: TileStore,
    splits: pd.DataFrame,
    tissue: str,
    best: dict[str, Any],
    train_cfg: dict[str, Any],
    augment_cfg: dict[str, Any],
    members: int,
    *,
    scheme: str = "grouped",
) -> tuple[nn.Module, list[FitResult], float]:
    """``members`` CNNs of the best trial, trained as :func:`train_cnn` with seeds
    ``train.seed``, +1, ...: one CNN as it is, several as an :class:`Ensemble`. Returns the
    model, each member's fit, and the model's validation balanced accuracy."""
    if not (isinstance(members, int) and members >= 1):
        raise ConfigError(f"train_cnn.ensemble {members!r}: must be a positive integer")
    seed = int(train_cfg["seed"])
    fits = [
        train_cnn(
            store, splits, tissue, best, {**train_cfg, "seed": seed + k}, augment_cfg, scheme=scheme
        )
        for k in range(members)
    ]
    if members == 1:
        model, result = fits[0]
        return model, [result], result.best_score
    model = Ensemble([m for m, _ in fits])
    val = TileDataset(store, *split_rows(store, splits, tissue, scheme, "val"))
    prob, label = predict(
        model, make_loader(val, 256, shuffle=False), resolve_device(train_cfg["device"])
    )
    return model, [r for _, r in fits], float(balanced_accuracy_score(label, prob.argmax(1)))


def train_resnet(
    store: TileStore,
    splits: pd.DataFrame,
    tissue: str,
    init: str,
    resnet_cfg: dict[str, Any],
    loop: TrainConfig,
    augment_cfg: dict[str, Any],
    *,
    pretrained_path: Path | None = None,
    on_epoch: EpochCallback | None = None,
) -> tuple[nn.Module, FitResult]:
    """Fine-tune a ResNet (``init``: imagenet, a pretraining method with its weights at
    ``pretrained_path``, or scratch) on the grouped split with the optimisation settings
    ``loop``; ``resnet_cfg`` is params ``resnet``."""
    seed_everything(loop.seed, loop.threads)
    model = resnet_from_init(
        resnet_cfg["arch"],
        init,
        weights_path=resnet_cfg["weights_path"],
        pretrained_path=pretrained_path,
        stem=resnet_cfg["stem"],
        in_channels=store.channels(tissue),
    )
    freeze = int(resnet_cfg["freeze_epochs"]) if init != "scratch" else 0

    def schedule(epoch: int) -> None:
        set_backbone_trainable(model, epoch >= freeze)

    augment = Augment.from_params(augment_cfg, float(resnet_cfg["augment_strength"]))
    result = fit_on_split(
        model,
        store,
        splits,
        tissue,
        "grouped",
        augment,
        loop,
        on_epoch=on_epoch,
        before_epoch=schedule,
    )
    set_backbone_trainable(model, True)
    return model, result
