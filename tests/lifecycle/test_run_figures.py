"""Test figures logged to a model's run (lifecycle/run_figures.py)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bonedamage.lifecycle import run_figures, tracking


def verdicts(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["actual", "predicted"])


def test_confusion_counts_rows_are_actual_columns_predicted() -> None:
    table = verdicts(
        [("failed", "failed")] * 5 + [("failed", "pristine")] * 2 + [("pristine", "failed")]
    )
    counts = run_figures.confusion_counts(table)
    assert counts.tolist() == [[0, 1], [2, 5]]  # pristine row first, as CLASSES


def test_roc_figure_plots_tpr_against_fpr_and_names_its_area() -> None:
    points = pd.DataFrame({"fpr": [0.0, 0.0, 0.5, 1.0], "tpr": [0.0, 0.5, 1.0, 1.0]})
    fig = run_figures.roc_figure(points, "cortical cnn")
    ax = fig.axes[0]
    assert "false positive rate" in ax.get_xlabel() and "true positive rate" in ax.get_ylabel()
    curve = ax.get_lines()[0]
    assert (
        np.array_equal(curve.get_xdata(), points["fpr"]) and curve.get_label() == "ROC (AUC 0.875)"
    )


def test_test_figures_are_logged_to_the_given_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure({"db": "f.db", "artifacts": "art", "experiment": "figs"}, tmp_path)
    plots = tmp_path / "plots"
    plots.mkdir()
    pd.DataFrame({"fpr": [0, 0.2, 1], "tpr": [0, 0.9, 1], "threshold": [1, 0.5, 0]}).to_csv(
        plots / "roc_cnn.csv", index=False
    )
    verdicts([("failed", "failed"), ("pristine", "pristine")]).to_csv(
        plots / "confusion_cnn.csv", index=False
    )
    with mlflow.start_run() as run:
        pass
    client = MlflowClient()
    logged = run_figures.log_test_figures(client, run.info.run_id, plots, "cnn", "cortical cnn")
    assert logged == ["evaluation/roc.png", "evaluation/confusion.png"]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert names == set(logged)
    # a model evaluate wrote no file for gets nothing, and no error
    assert run_figures.log_test_figures(client, run.info.run_id, plots, "resnet_x", "t") == []


@pytest.mark.parametrize("bad", [("failed", "broken")])
def test_an_unknown_class_name_is_an_error(bad: tuple[str, str]) -> None:
    with pytest.raises(KeyError):
        run_figures.confusion_counts(verdicts([bad]))
