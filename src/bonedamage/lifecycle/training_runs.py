"""MLflow runs of the training stages (train_cnn, pretrain, train_resnet): one run per
model, tagged with the data and code version, with its params, per-epoch metrics and the
model's sidecar. Under ``torchrun`` every rank trains and rank 0 alone tracks and writes
(docs/scale-out.md)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow

from bonedamage.learn import distributed
from bonedamage.learn.checkpoint import save_checkpoint
from bonedamage.lifecycle.tracking import (
    WEIGHTS_MD5_TAG,
    configure,
    file_md5,
    log_history,
    version_tags,
)

if TYPE_CHECKING:
    import torch

    from bonedamage.data.tilestore import TileStore
    from bonedamage.learn.train import FitResult


@contextmanager
def training_session(device: str, mlflow_cfg: dict[str, Any]) -> Iterator[None]:
    """The process group of a ``torchrun`` launch (nothing to join without one), with
    MLflow configured on the rank that tracks (rank 0) only."""
    with distributed.session(device):
        if distributed.is_main():
            configure(mlflow_cfg)
        yield


@contextmanager
def stage_run(name: str, tags: dict[str, str], params: dict[str, Any]) -> Iterator[bool]:
    """An MLflow run with the version tags, ``tags`` and ``params``; yield whether this rank
    tracks. Under ``torchrun`` only rank 0 does (it adds ``world_size`` to the params);
    the other ranks get no run and only train, so that their collectives match rank 0's."""
    if not distributed.is_main():
        yield False
        return
    if distributed.world_size() > 1:
        params = {**params, "world_size": distributed.world_size()}
    with mlflow.start_run(run_name=name, tags={**version_tags(), **tags}):
        mlflow.log_params(params)
        yield True


def log_fit(
    model: torch.nn.Module, result: FitResult, store: TileStore, path: Path, meta: dict[str, Any]
) -> None:
    """Log a fit's history and score to the active run; save the model and its sidecar,
    which holds the per-epoch history too: the training curves (``evaluate`` plots them)
    travel with the model, not only with the tracking store."""
    log_history(result.history)
    mlflow.log_metrics(
        {"best_val_balanced_accuracy": result.best_score, "train_seconds": result.seconds}
    )
    _save_logged(
        model,
        store,
        path,
        {
            **meta,
            "best_epoch": result.best_epoch,
            "history": result.history,
            "val_balanced_accuracy": result.best_score,
        },
    )


def log_ensemble_fit(
    model: torch.nn.Module,
    fits: list[FitResult],
    score: float,
    store: TileStore,
    path: Path,
    meta: dict[str, Any],
) -> None:
    """:func:`log_fit` for an ensemble: each member's history under ``member<k>_``, the
    ensemble's validation score, and a sidecar naming the members, with their histories."""
    for k, member in enumerate(fits, 1):
        log_history(member.history, prefix=f"member{k}_")
    mlflow.log_metrics(
        {
            "best_val_balanced_accuracy": score,
            "train_seconds": sum(f.seconds for f in fits),
            **{
                f"member{k}_best_val_balanced_accuracy": f.best_score for k, f in enumerate(fits, 1)
            },
        }
    )
    _save_logged(
        model,
        store,
        path,
        {
            **meta,
            "members": len(fits),
            "member_best_epochs": [f.best_epoch for f in fits],
            "member_histories": [f.history for f in fits],
            "member_val_balanced_accuracy": [f.best_score for f in fits],
            "val_balanced_accuracy": score,
        },
    )


def _save_logged(
    model: torch.nn.Module, store: TileStore, path: Path, meta: dict[str, Any]
) -> None:
    """Save the model with a sidecar that adds the tiles' size and channels; log the sidecar."""
    meta = {
        **meta,
        "tile_px": int(store.index["tile_px"].iloc[0]),
        "in_channels": store.channels(meta["tissue"]),
    }
    save_checkpoint(path, model, meta)
    mlflow.log_artifact(str(path.with_suffix(".json")), "model")
    # what `register` looks the run up by: the version of these weights links to it
    mlflow.set_tag(WEIGHTS_MD5_TAG, file_md5(path))
