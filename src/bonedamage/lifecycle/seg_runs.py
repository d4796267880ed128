"""MLflow runs of the segmentation stages: ``train_seg`` logs a run per tissue (params,
per-epoch loss and validation Dice, the sidecar, the weights' md5); ``evaluate_seg`` adds
the test scores to that run, found by the md5 of the weights it scored (a new
``evaluate_seg`` run when the store does not have it: weights pulled by DVC)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow

from bonedamage.learn.checkpoint import save_checkpoint
from bonedamage.lifecycle.tracking import WEIGHTS_MD5_TAG, file_md5, log_history, version_tags

if TYPE_CHECKING:
    import torch

    from bonedamage.learn.segmentation import SegFit


def log_seg_fit(model: torch.nn.Module, fit: SegFit, path: Path, meta: dict[str, Any]) -> None:
    """Log a fit's history and best score to the active run; save the model and its sidecar
    (with the history: the curves travel with the model); tag the run with the weights' md5."""
    log_history(fit.history)
    mlflow.log_metrics({"best_val_dice_damage": fit.best_score, "train_seconds": fit.seconds})
    meta = {**meta, "best_epoch": fit.best_epoch, "history": fit.history}
    save_checkpoint(path, model, {**meta, "val_dice_damage": fit.best_score})
    mlflow.log_artifact(str(path.with_suffix(".json")), "model")
    mlflow.set_tag(WEIGHTS_MD5_TAG, file_md5(path))


def seg_training_run(tissue: str, weights: Path) -> str | None:
    """The finished ``train_seg`` run that saved these weights, if the store has it."""
    where = (
        f"tags.stage = 'train_seg' and tags.tissue = '{tissue}' and attributes.status = "
        f"'FINISHED' and tags.`{WEIGHTS_MD5_TAG}` = '{file_md5(weights)}'"
    )
    runs = mlflow.search_runs(
        filter_string=where, order_by=["attributes.start_time DESC"], max_results=1,
        output_format="list",
    )  # fmt: skip
    return runs[0].info.run_id if runs else None


def log_seg_scores(tissue: str, weights: Path, scores: dict[str, Any], report: Path) -> str:
    """Numeric test scores (``test_<part>_<metric>``) and the report file, logged to the run
    that trained ``weights`` (re-opened; its status is restored) or to a new run."""
    numbers = {
        f"test_{part}_{key}": float(value)
        for part, values in scores.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and value == value
    }
    run_id = seg_training_run(tissue, weights)
    tags = {**version_tags(), "stage": "evaluate_seg", "tissue": tissue}
    if run_id is None:
        with mlflow.start_run(run_name=f"evaluate_seg-{tissue}", tags=tags) as run:
            mlflow.log_metrics(numbers)
            mlflow.log_artifact(str(report), "evaluation")
            return run.info.run_id
    client = mlflow.MlflowClient()
    info = client.get_run(run_id).info
    try:
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics(numbers)
            mlflow.log_artifact(str(report), "evaluation")
    finally:  # the training run ends as it was, whatever happens here
        client.set_terminated(run_id, info.status, end_time=info.end_time)
    return run_id
