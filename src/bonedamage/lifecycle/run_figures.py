"""Figures of a model's test scores, logged to the MLflow run that trained it.

The ``evaluate`` stage writes each model's ROC points (``roc_<key>.csv``: fpr, tpr,
threshold) and per-tile verdicts (``confusion_<key>.csv``: actual, predicted) for DVC's
plots. ``track`` runs on every ``dvc repro``, also when DVC skipped ``evaluate`` because
its committed outputs are current; it draws the same files here, so that the training
run's page shows the ROC curve and the confusion matrix next to its learning curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

CLASSES = ("pristine", "failed")


def _figure(size: tuple[float, float]) -> Figure:
    """A matplotlib figure on an Agg canvas (no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def roc_figure(points: pd.DataFrame, title: str) -> Figure:
    """The ROC curve (TPR against FPR) with its area and the chance diagonal."""
    fpr, tpr = points["fpr"].to_numpy(float), points["tpr"].to_numpy(float)
    order = np.lexsort((tpr, fpr))
    auc = float(np.trapezoid(tpr[order], fpr[order]))
    fig = _figure((4.2, 4.2))
    ax = fig.add_subplot()
    ax.plot(fpr[order], tpr[order], lw=2, label=f"ROC (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal", title=title)
    ax.set_xlabel("false positive rate (pristine tiles called failed)")
    ax.set_ylabel("true positive rate (failed tiles found)")
    ax.legend(loc="lower right")
    return fig


def confusion_counts(verdicts: pd.DataFrame) -> np.ndarray:
    """2 x 2 counts, rows actual, columns predicted, in :data:`CLASSES` order."""
    index = {name: i for i, name in enumerate(CLASSES)}
    counts = np.zeros((2, 2), dtype=np.int64)
    for actual, predicted in zip(verdicts["actual"], verdicts["predicted"], strict=True):
        counts[index[actual], index[predicted]] += 1
    return counts


def confusion_figure(verdicts: pd.DataFrame, title: str) -> Figure:
    """The confusion matrix of the test tiles, with counts and row shares."""
    counts = confusion_counts(verdicts)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = _figure((4.2, 3.8))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), n in np.ndenumerate(counts):
        colour = "white" if share[i, j] > 0.5 else "black"
        ax.text(j, i, f"{n}\n({share[i, j]:.0%})", ha="center", va="center", color=colour)
    ax.set_xticks([0, 1], CLASSES)
    ax.set_yticks([0, 1], CLASSES)
    ax.set(xlabel="predicted", ylabel="actual", title=title)
    fig.colorbar(image, ax=ax, label="share of the actual class")
    return fig


def log_test_figures(
    client: MlflowClient, run_id: str, plots: Path, key: str, title: str
) -> list[str]:
    """Log the ROC and confusion figures of model ``key`` (files in ``plots``) to ``run_id``;
    return the artifact paths logged (none when evaluate wrote no file for it)."""
    logged = []
    sources = (("roc", roc_figure), ("confusion", confusion_figure))
    for kind, draw in sources:
        path = plots / f"{kind}_{key}.csv"
        if not path.is_file():
            continue
        fig = draw(pd.read_csv(path), f"{title}: {kind.replace('roc', 'ROC')} (test split)")
        artifact = f"evaluation/{kind}.png"
        client.log_figure(run_id, fig, artifact)
        logged.append(artifact)
    return logged
