"""The evaluate stage (stages/evaluate.py) on tiny models of a small dataset, saved as the
training stages save them: the metrics file, and the tables of the plots dvc.yaml declares
(a ROC curve and the test predictions of every model, the training curves of every trained
network), the same bytes on a rerun."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from bonedamage.atomic import InputError
from bonedamage.data.tilestore import TileStore
from bonedamage.learn.models import Ensemble, build_cnn, build_resnet
from bonedamage.learn.train import FitResult
from bonedamage.lifecycle import tracking
from bonedamage.lifecycle.training_runs import log_ensemble_fit, log_fit
from bonedamage.stages.evaluate import run_evaluate
from conftest import CHANNELS, TINY_ARCH, write_params

TISSUE = "trabecular"
MODELS = ("cnn", "resnet_scratch", "cnn_leaky_split", "baseline")
NETWORKS = ("cnn_member1", "cnn_member2", "cnn_leaky_member1", "cnn_leaky_member2")
NETWORKS += ("resnet_scratch",)


def _fit(epochs: int, seed: int) -> FitResult:
    """A fit's result as training returns it, with a made-up per-epoch history."""
    noise = np.random.default_rng(seed).random((epochs, 2)) / 100
    history = [
        {
            "epoch": epoch,
            "train_loss": 0.7 - 0.05 * epoch,
            "val_loss": 0.7 - 0.03 * epoch + float(noise[epoch, 0]),
            "val_balanced_accuracy": 0.5 + 0.05 * epoch + float(noise[epoch, 1]),
            "val_accuracy": 0.5 + 0.05 * epoch,
        }
        for epoch in range(epochs)
    ]
    best = max(history, key=lambda row: row["val_balanced_accuracy"])
    return FitResult({}, best["epoch"], best["val_balanced_accuracy"], history)


def _save_models(store: TileStore, models: Path) -> None:
    """Two-member CNN ensembles (grouped and leaky split) and a scratch ResNet, with random
    weights, saved through the training stages' own calls (their sidecars)."""
    torch.manual_seed(0)
    meta = {"kind": "cnn", "arch": TINY_ARCH, "tissue": TISSUE}
    for name, scheme, seed in (("cnn", "grouped", 1), ("cnn_leaky", "leaky", 3)):
        fits = [_fit(3, seed), _fit(4, seed + 1)]
        model = Ensemble([build_cnn(TINY_ARCH, CHANNELS) for _ in fits])
        score = max(f.best_score for f in fits)
        log_ensemble_fit(
            model, fits, score, store, models / f"{name}.pt", meta | {"scheme": scheme}
        )
    resnet = {"kind": "resnet", "arch": "resnet18", "init": "scratch", "tissue": TISSUE}
    path = models / "resnet" / "resnet_scratch.pt"
    log_fit(build_resnet("resnet18", in_channels=CHANNELS), _fit(2, 5), store, path, resnet)


@pytest.fixture(scope="module")
def evaluated(learn_data, learn_params, tmp_path_factory) -> tuple[Path, Path]:
    """(the run's folder, its params file): two evaluations, into a/ and b/."""
    tmp = tmp_path_factory.mktemp("evaluate")
    store = {"db": str(tmp / "m.db"), "artifacts": str(tmp / "art"), "experiment": "evaluate"}
    tracking.configure(store)
    resnet = {**learn_params["resnet"], "inits": ["scratch"]}
    path = write_params(tmp / "params.yaml", learn_params, mlflow=store, resnet=resnet)
    with mlflow.start_run(run_name="training"):
        _save_models(TileStore(learn_data[0]), tmp / "models" / TISSUE)
    for run in ("a", "b"):
        out = tmp / run / "metrics.json"
        assert run_evaluate(path, TISSUE, *learn_data, tmp / "models", out, tmp / run) == 0
    return tmp, path


def test_evaluate_writes_a_roc_curve_and_the_test_predictions_of_every_model(evaluated) -> None:
    tmp, _ = evaluated
    metrics = json.loads((tmp / "a" / "metrics.json").read_text())
    assert set(metrics) - {"platform"} == set(MODELS)
    for name in MODELS:
        roc = pd.read_csv(tmp / "a" / TISSUE / f"roc_{name}.csv")
        assert list(roc.columns) == ["fpr", "tpr", "threshold"]
        predicted = pd.read_csv(tmp / "a" / TISSUE / f"confusion_{name}.csv")
        assert list(predicted.columns) == ["actual", "predicted"]
        assert len(predicted) == metrics[name]["n"]  # one row per test tile
        counts = pd.crosstab(predicted["actual"], predicted["predicted"]).reindex(
            index=["pristine", "failed"], columns=["pristine", "failed"], fill_value=0
        )
        assert counts.to_numpy().tolist() == metrics[name]["confusion_matrix"]


def test_evaluate_writes_the_training_curves_of_every_trained_network(evaluated) -> None:
    tmp, _ = evaluated
    models = tmp / "models" / TISSUE
    sidecars = {
        "cnn": json.loads((models / "cnn.json").read_text())["member_histories"],
        "cnn_leaky": json.loads((models / "cnn_leaky.json").read_text())["member_histories"],
    }
    expected = {
        f"{name}_member{k}": history
        for name, histories in sidecars.items()
        for k, history in enumerate(histories, 1)
    }
    expected["resnet_scratch"] = json.loads(
        (models / "resnet" / "resnet_scratch.json").read_text()
    )["history"]
    assert set(expected) == set(NETWORKS)
    for name, history in expected.items():
        curve = pd.read_csv(tmp / "a" / TISSUE / f"history_{name}.csv")
        assert list(curve.columns) == [
            "epoch",
            "train_loss",
            "val_accuracy",
            "val_balanced_accuracy",
            "val_loss",
        ]
        assert curve["epoch"].tolist() == [row["epoch"] for row in history]
        for column in curve.columns[1:]:
            assert curve[column].tolist() == pytest.approx(
                [row[column] for row in history], abs=1e-6
            )


def test_evaluate_writes_these_tables_only_and_the_same_bytes_on_a_rerun(evaluated) -> None:
    tmp, _ = evaluated
    written = {p.name: p.read_bytes() for p in sorted((tmp / "a" / TISSUE).iterdir())}
    assert set(written) == {
        *(f"{kind}_{name}.csv" for kind in ("roc", "confusion") for name in MODELS),
        *(f"history_{name}.csv" for name in NETWORKS),
    }
    assert written == {p.name: p.read_bytes() for p in sorted((tmp / "b" / TISSUE).iterdir())}
    assert (tmp / "a" / "metrics.json").read_bytes() == (tmp / "b" / "metrics.json").read_bytes()


def test_a_model_saved_without_its_history_is_refused_before_scoring(evaluated, learn_data) -> None:
    tmp, path = evaluated
    models = tmp / "old" / TISSUE
    shutil.copytree(tmp / "models" / TISSUE, models)
    sidecar = models / "resnet" / "resnet_scratch.json"
    meta = json.loads(sidecar.read_text())
    del meta["history"]
    sidecar.write_text(json.dumps(meta))
    out = tmp / "c" / "metrics.json"
    with pytest.raises(InputError, match=r"resnet_scratch\.json: no training history"):
        run_evaluate(path, TISSUE, *learn_data, tmp / "old", out, tmp / "c")
    assert not out.exists()
