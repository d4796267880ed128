"""The MLflow runs of the training stages (lifecycle/training_runs.py): what a fit logs and
what its model's sidecar holds, the per-epoch history included."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from bonedamage.learn.checkpoint import load_checkpoint
from bonedamage.learn.models import Ensemble, build_cnn
from bonedamage.learn.train import FitResult
from bonedamage.lifecycle import tracking
from bonedamage.lifecycle.training_runs import log_ensemble_fit, log_fit
from conftest import CHANNELS, TINY_ARCH


class _Store:
    """What saving a model asks of a tile store: the tiles' size and channels."""

    index = pd.DataFrame({"tile_px": [16, 16]})

    def channels(self, tissue: str) -> int:
        return CHANNELS


def _fit(best_epoch: int, scores: list[float]) -> FitResult:
    history = [
        {
            "epoch": epoch,
            "train_loss": 0.7 - 0.1 * epoch,
            "val_loss": 0.69 - 0.05 * epoch,
            "val_balanced_accuracy": score,
            "val_accuracy": score + 0.01,
        }
        for epoch, score in enumerate(scores)
    ]
    return FitResult({}, best_epoch, scores[best_epoch], history, seconds=1.5)


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> mlflow.ActiveRun:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure({"db": "t.db", "artifacts": "art", "experiment": "test"}, tmp_path)
    with mlflow.start_run() as active:
        yield active


def _metric(run: mlflow.ActiveRun, key: str) -> list[tuple[int, float]]:
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, key)
    return sorted((m.step, m.value) for m in history)


META = {"kind": "cnn", "arch": TINY_ARCH, "tissue": "trabecular", "scheme": "grouped"}


def test_the_sidecar_of_a_fit_holds_its_history_as_the_run_logs_it(run, tmp_path: Path) -> None:
    fit = _fit(1, [0.6, 0.8, 0.7])
    path = tmp_path / "models" / "cnn.pt"
    log_fit(build_cnn(TINY_ARCH, CHANNELS), fit, _Store(), path, dict(META))
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta == {
        **META,
        "best_epoch": 1,
        "history": fit.history,
        "val_balanced_accuracy": 0.8,
        "tile_px": 16,
        "in_channels": CHANNELS,
    }
    logged = _metric(run, "val_balanced_accuracy")
    assert logged == [(row["epoch"], row["val_balanced_accuracy"]) for row in meta["history"]]
    assert load_checkpoint(path).training is False  # the history does not disturb loading


def test_the_sidecar_of_an_ensemble_holds_each_members_history(run, tmp_path: Path) -> None:
    fits = [_fit(1, [0.6, 0.8]), _fit(2, [0.5, 0.6, 0.75, 0.7])]
    path = tmp_path / "models" / "cnn.pt"
    model = Ensemble([build_cnn(TINY_ARCH, CHANNELS) for _ in fits])
    log_ensemble_fit(model, fits, 0.82, _Store(), path, dict(META))
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["member_histories"] == [fit.history for fit in fits]
    assert meta["members"] == 2 and meta["member_best_epochs"] == [1, 2]
    assert meta["member_val_balanced_accuracy"] == [0.8, 0.75]
    assert meta["val_balanced_accuracy"] == 0.82 and "history" not in meta
    for k, fit in enumerate(fits, 1):
        logged = _metric(run, f"member{k}_val_loss")
        assert logged == [(row["epoch"], row["val_loss"]) for row in fit.history]
    assert isinstance(load_checkpoint(path), Ensemble)
