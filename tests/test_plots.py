"""What `dvc plots show` draws from dvc.yaml's top-level plots and the tables evaluate
writes (learn/comparison.py write_plots), read from the rendered Vega-Lite specifications
(`dvc plots show --json`) in a copy of the project's dvc.yaml and params.yaml: per tissue,
the ROC curves of every model (TPR against FPR), a confusion matrix per model (actual
against predicted class) and the training curves of every trained network (validation
balanced accuracy and loss against epoch); nothing else, and no table left undrawn."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from bonedamage.learn.comparison import trained_models, training_histories, write_plots

REPO = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
TISSUES: list[str] = PARAMS["pipeline"]["tissues"]
INITS: list[str] = PARAMS["resnet"]["inits"]
MEMBERS: int = PARAMS["train_cnn"]["ensemble"]


def _history(epochs: int, seed: int) -> list[dict[str, float]]:
    """A fit's per-epoch history, as training records it."""
    rng = np.random.default_rng(seed)
    return [
        {
            "epoch": epoch,
            "train_loss": float(0.7 - 0.05 * epoch),
            "val_loss": float(0.7 - 0.04 * epoch + 0.02 * rng.random()),
            "val_balanced_accuracy": float(0.5 + 0.04 * epoch + 0.02 * rng.random()),
            "val_accuracy": float(0.5 + 0.04 * epoch),
        }
        for epoch in range(epochs)
    ]


def _write_tables(plots: Path, models: Path) -> set[str]:
    """Sidecars as the training stages write them (the CNNs: ensembles of
    ``train_cnn.ensemble`` networks) and test predictions of every model evaluate scores
    (the trained ones and the baseline); evaluate's tables of them; return their names."""
    weights = trained_models(models, INITS)
    for seed, path in enumerate(weights.values()):
        path.parent.mkdir(parents=True, exist_ok=True)
        ensemble = path.stem.startswith("cnn") and MEMBERS > 1
        histories = [_history(4 + k, seed * 10 + k) for k in range(MEMBERS if ensemble else 1)]
        meta = {"member_histories": histories} if ensemble else {"history": histories[0]}
        path.with_suffix(".json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    frames = {}
    for name in [*weights, "baseline"]:
        label = np.tile([0, 1], 8)
        frames[name] = pd.DataFrame({"label": label, "prob": 0.3 * label + 0.7 * rng.random(16)})
    return {p.name for p in write_plots(plots, frames, training_histories(models, INITS))}


@pytest.fixture(scope="module")
def shown(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, set]]:
    """(the rendered plots by id, the tables evaluate wrote per tissue)."""
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=root, env=env, check=True)
    paths = PARAMS["pipeline"]["paths"]
    written = {
        tissue: _write_tables(root / paths["plots"] / tissue, root / paths["models"] / tissue)
        for tissue in TISSUES
    }
    show = subprocess.run(
        [*dvc, "plots", "show", "--json"], cwd=root, env=env, check=True, capture_output=True
    )
    # a plot whose tables DVC cannot read is listed without a specification
    data = json.loads(show.stdout)["data"]
    rendered = {key: specs[0]["content"] if specs else None for key, specs in data.items()}
    return rendered, written


KINDS = ("roc", "confusion", "training-balanced-accuracy", "training-loss")


def test_four_plots_per_tissue_and_no_other(shown) -> None:
    """The tables are not drawn again one by one (as a plot output of evaluate would be)."""
    rendered, _ = shown
    assert set(rendered) == {f"{kind}-{tissue}" for kind in KINDS for tissue in TISSUES}
    assert all(rendered.values()), [key for key, spec in rendered.items() if not spec]


def _spec(shown, key: str) -> dict[str, Any]:
    spec = shown[0].get(key)
    assert spec, f"DVC drew no {key}"
    return spec


def _drawn(spec: dict[str, Any]) -> set[str]:
    return {row["filename"] for row in spec["data"]["values"]}


def _written(shown, tissue: str, prefix: str) -> set[str]:
    return {name for name in shown[1][tissue] if name.startswith(prefix)}


@pytest.mark.parametrize("tissue", TISSUES)
def test_every_table_evaluate_writes_is_drawn(shown, tissue: str) -> None:
    drawn = set().union(*(_drawn(_spec(shown, f"{kind}-{tissue}")) for kind in KINDS))
    assert drawn == shown[1][tissue]


@pytest.mark.parametrize("tissue", TISSUES)
def test_the_roc_plot_draws_tpr_against_fpr_a_line_per_model(shown, tissue: str) -> None:
    spec = _spec(shown, f"roc-{tissue}")
    assert spec["mark"]["type"] == "line"
    x, y = spec["encoding"]["x"], spec["encoding"]["y"]
    assert (x["field"], x["title"]) == ("fpr", "false positive rate")
    assert (y["field"], y["title"]) == ("tpr", "true positive rate")
    models = _written(shown, tissue, "roc_")
    assert len(models) == len(INITS) + 3  # the CNN, each ResNet, the leaky-split CNN, baseline
    assert set(spec["encoding"]["strokeDash"]["scale"]["domain"]) == models == _drawn(spec)
    assert tissue in spec["title"]["text"]


@pytest.mark.parametrize("tissue", TISSUES)
def test_the_confusion_plot_counts_actual_against_predicted_per_model(shown, tissue: str) -> None:
    spec = _spec(shown, f"confusion-{tissue}")
    assert spec["facet"]["row"]["field"] == "filename"  # a matrix per model
    cell = spec["spec"]
    assert cell["encoding"]["x"]["field"] == "actual"
    assert cell["encoding"]["y"]["field"] == "predicted"
    assert cell["transform"][0]["aggregate"] == [{"op": "count", "as": "xy_count"}]
    assert cell["layer"][0]["mark"] == "rect"
    assert _drawn(spec) == _written(shown, tissue, "confusion_")
    classes = {(r["actual"], r["predicted"]) for r in spec["data"]["values"]}
    assert {c for pair in classes for c in pair} == {"pristine", "failed"}


@pytest.mark.parametrize(
    ("kind", "field"),
    [("training-balanced-accuracy", "val_balanced_accuracy"), ("training-loss", "val_loss")],
)
@pytest.mark.parametrize("tissue", TISSUES)
def test_the_training_curves_draw_a_metric_against_epoch_a_line_per_network(
    shown, tissue: str, kind: str, field: str
) -> None:
    spec = _spec(shown, f"{kind}-{tissue}")
    assert spec["mark"]["type"] == "line"
    assert spec["encoding"]["x"]["field"] == "epoch"
    assert spec["encoding"]["y"]["field"] == field
    networks = _written(shown, tissue, "history_")
    assert len(networks) == 2 * MEMBERS + len(INITS)  # the two CNN ensembles, each ResNet
    assert set(spec["encoding"]["strokeDash"]["scale"]["domain"]) == networks == _drawn(spec)
    assert all(row[field] != "" for row in spec["data"]["values"])
