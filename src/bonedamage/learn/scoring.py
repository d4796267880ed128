"""Evaluation of tile predictions: what the study reported, and what it could not.

Tile-level metrics come from scikit-learn and torchmetrics (accuracy, balanced accuracy,
ROC-AUC, F1, precision, recall, confusion matrix, expected calibration error). On top:

* a bootstrap interval that resamples *specimens*, not tiles: tiles of one specimen are
  strongly correlated, so resampling tiles would make the interval falsely narrow;
* scan-level accuracy from aggregated tile probabilities (a scan is what a clinician or
  experimenter would actually classify);
* accuracy on failed tiles with and without visible ground-truth damage: a failed tile
  with no damage in view can only be recognised from indirect cues, which tells whether a
  model sees cracks or something else.

Everything here is a pure function of arrays, except :func:`write_json`.

A tile (or scan) counts as failed when its probability is strictly greater than the
threshold (0.5): the same rule as ``argmax`` of two class scores, scikit-learn's
``predict`` and torchmetrics' binary metrics.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

from bonedamage.atomic import write_text_atomic

THRESHOLD = 0.5
ECE_BINS = 15
# the classes of labels 0 and 1 (data.tiling.LABELS), as plots name them
CLASS_NAMES = ("pristine", "failed")


def _both_classes(y: np.ndarray, _pred: np.ndarray) -> bool:
    return len(np.unique(y)) == 2


def _any_true(y: np.ndarray, _pred: np.ndarray) -> bool:
    return bool(y.any())


def _any_predicted(_y: np.ndarray, pred: np.ndarray) -> bool:
    return bool(pred.any())


def _any_positive(y: np.ndarray, pred: np.ndarray) -> bool:
    return bool((y | pred).any())


def _always(_y: np.ndarray, _pred: np.ndarray) -> bool:
    return True


# bootstrap metric -> (score of (y_true, pred, prob), is it defined on this resample?);
# a one-class resample measures one class's recall, not balance, and has no ROC-AUC
_BOOT_METRICS: dict[str, tuple[Callable[..., float], Callable[..., bool]]] = {
    "accuracy": (lambda y, d, _p: skm.accuracy_score(y, d), _always),
    "balanced_accuracy": (lambda y, d, _p: skm.balanced_accuracy_score(y, d), _both_classes),
    "roc_auc": (lambda y, _d, p: skm.roc_auc_score(y, p), _both_classes),
    "f1": (lambda y, d, _p: skm.f1_score(y, d), _any_positive),
    "precision": (lambda y, d, _p: skm.precision_score(y, d), _any_predicted),
    "recall": (lambda y, d, _p: skm.recall_score(y, d), _any_true),
}

# The same two metrics from a resample's summed confusion counts (columns tn, fp, fn, tp),
# all resamples at once: scikit-learn's values on the resampled tiles, bit for bit (tested),
# without its per-call input checks, which took ~15 s of an evaluation (5000 calls).
_COUNT_METRICS: dict[str, tuple[Callable[..., np.ndarray], Callable[..., np.ndarray]]] = {
    "accuracy": (
        lambda c: (c[:, 0] + c[:, 3]) / c.sum(1),
        lambda c: c.sum(1) > 0,
    ),
    "balanced_accuracy": (
        lambda c: (c[:, 0] / (c[:, 0] + c[:, 1]) + c[:, 3] / (c[:, 2] + c[:, 3])) / 2,
        lambda c: (c[:, 0] + c[:, 1] > 0) & (c[:, 2] + c[:, 3] > 0),
    ),
}


def _check(y_true: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated copies: labels in {0, 1}, finite probabilities in [0, 1], same length."""
    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"y_true {y.shape} and prob {p.shape} must be 1-D of equal length")
    if len(y) == 0:
        raise ValueError("no predictions to evaluate")
    if not np.isin(y, [0, 1]).all():
        raise ValueError(f"labels must be 0 or 1 (unlabelled -1 tiles?): {np.unique(y)}")
    if not (np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0):
        # torchmetrics would silently apply a sigmoid to values outside [0, 1]
        raise ValueError("probabilities must be finite and within [0, 1]")
    return y.astype(np.int64), p


def tile_metrics(
    y_true: np.ndarray, prob: np.ndarray, threshold: float = THRESHOLD
) -> dict[str, float | int | list | None]:
    """Tile-level metrics of failed-class probabilities (failed when ``prob > threshold``).

    ``roc_auc`` is None when only one class is present. ``confusion_matrix`` is
    ``[[tn, fp], [fn, tp]]``. ``ece`` is the expected calibration error (L1, 15 bins) of
    the failed-class probability, as torchmetrics' ``binary_calibration_error``.
    """
    # imported here: torchmetrics loads torchvision (~3 s), which importers of this module's
    # constants and bootstrap (the registry, every training stage) do not need
    from torchmetrics.functional.classification import binary_calibration_error

    y, p = _check(y_true, prob)
    pred = (p > threshold).astype(np.int64)
    both = len(np.unique(y)) == 2
    with warnings.catch_warnings():
        # one class only: sklearn warns, but balanced accuracy is still that class's recall
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(skm.balanced_accuracy_score(y, pred))
    return {
        "n": len(y),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": balanced,
        "roc_auc": float(skm.roc_auc_score(y, p)) if both else None,
        "f1": float(skm.f1_score(y, pred, zero_division=0)),
        "precision": float(skm.precision_score(y, pred, zero_division=0)),
        "recall": float(skm.recall_score(y, pred, zero_division=0)),
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        "ece": float(binary_calibration_error(torch.tensor(p), torch.tensor(y), n_bins=ECE_BINS)),
    }


def bootstrap_ci(
    y_true: np.ndarray,
    prob: np.ndarray,
    groups: np.ndarray,
    metric: str = "accuracy",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    threshold: float = THRESHOLD,
) -> tuple[float, float]:
    """Percentile interval of ``metric`` resampling whole groups (specimens) with replacement.

    Each resample draws as many groups as there are, with replacement; every tile of a
    drawn group comes along. Resamples where the metric is undefined (e.g. one class only
    for balanced accuracy or ROC-AUC) are skipped; (nan, nan) when all are. Deterministic
    for a seed. ``metric``: accuracy, balanced_accuracy, roc_auc, f1, precision, recall.
    """
    if metric not in _BOOT_METRICS:
        raise ValueError(f"bootstrap metric {metric!r}: use one of {sorted(_BOOT_METRICS)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    y, p = _check(y_true, prob)
    groups = np.asarray(groups)
    if groups.shape != y.shape:
        raise ValueError(f"groups {groups.shape} must match y_true {y.shape}")
    pred = (p > threshold).astype(np.int64)
    _, codes = np.unique(groups, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    members = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)
    rng = np.random.default_rng(seed)
    draws = [rng.integers(len(members), size=len(members)) for _ in range(n_boot)]
    if metric in _COUNT_METRICS:
        values = _count_bootstrap(metric, y, pred, members, draws)
    else:
        fn, defined = _BOOT_METRICS[metric]
        values = []
        for draw in draws:
            idx = np.concatenate([members[i] for i in draw])
            yb, db = y[idx], pred[idx]
            if defined(yb, db):
                values.append(float(fn(yb, db, p[idx])))
    if not len(values):
        return (math.nan, math.nan)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _count_bootstrap(
    metric: str,
    y: np.ndarray,
    pred: np.ndarray,
    members: list[np.ndarray],
    draws: list[np.ndarray],
) -> np.ndarray:
    """``metric`` of every defined resample, from per-group confusion counts: a resample's
    counts are the sum of its drawn groups' counts (a group drawn twice counts twice)."""
    score, defined = _COUNT_METRICS[metric]
    counts = np.stack([skm.confusion_matrix(y[m], pred[m], labels=[0, 1]).ravel() for m in members])
    drawn = np.stack([np.bincount(draw, minlength=len(members)) for draw in draws])
    totals = drawn @ counts
    return score(totals[defined(totals)])


def scan_level(
    scan_ids: np.ndarray, y_true: np.ndarray, prob: np.ndarray, rule: str = "mean"
) -> dict[str, Any]:
    """Accuracy of per-scan verdicts aggregated from tile probabilities.

    Rules: ``"mean"``: a scan is failed when the mean of its tiles' failed probabilities
    is > 0.5; ``"majority"``: when more than half of its tiles are predicted failed
    (tile probability > 0.5). A scan's true label is its tiles' label, which must be
    unique (ValueError otherwise).
    """
    if rule not in ("mean", "majority"):
        raise ValueError(f"scan aggregation rule {rule!r}: use 'mean' or 'majority'")
    y, p = _check(y_true, prob)
    scans = np.asarray(scan_ids)
    if scans.shape != y.shape:
        raise ValueError(f"scan_ids {scans.shape} must match y_true {y.shape}")
    score = p if rule == "mean" else (p > THRESHOLD).astype(np.float64)
    frame = pd.DataFrame({"scan": scans, "y": y, "score": score})
    per_scan = frame.groupby("scan", sort=True).agg(
        y_min=("y", "min"), y_max=("y", "max"), score=("score", "mean")
    )
    mixed = per_scan.index[per_scan["y_min"] != per_scan["y_max"]]
    if len(mixed):
        raise ValueError(f"{len(mixed)} scan(s) with tiles of both labels, e.g. {mixed[0]!r}")
    verdict = (per_scan["score"].to_numpy() > THRESHOLD).astype(np.int64)
    return {
        "scan_accuracy": float(skm.accuracy_score(per_scan["y_min"].to_numpy(), verdict)),
        "n_scans": len(per_scan),
        "rule": rule,
    }


def damage_breakdown(
    y_true: np.ndarray, prob: np.ndarray, damage_fraction: np.ndarray, visible: float
) -> dict[str, Any]:
    """Accuracy on failed tiles with visible damage and on failed tiles without.

    Visible: ground-truth damage share ``>= visible``; not visible: ``< visible``. Tiles
    with NaN damage fraction (real scans: no ground truth) are left out of both. The
    accuracy of a group is None when it is empty.
    """
    y, p = _check(y_true, prob)
    damage = np.asarray(damage_fraction, dtype=np.float64)
    if damage.shape != y.shape:
        raise ValueError(f"damage_fraction {damage.shape} must match y_true {y.shape}")
    pred = (p > THRESHOLD).astype(np.int64)
    failed = (y == 1) & np.isfinite(damage)
    out: dict[str, Any] = {}
    for name, sel in (
        ("visible_damage", failed & (damage >= visible)),
        ("no_visible_damage", failed & (damage < visible)),
    ):
        out[f"n_{name}"] = int(sel.sum())
        out[f"accuracy_{name}"] = (
            float(skm.accuracy_score(y[sel], pred[sel])) if sel.any() else None
        )
    return out


def evaluate_predictions(
    frame: pd.DataFrame, *, visible: float, n_boot: int, seed: int
) -> dict[str, Any]:
    """All metrics of one model's tile predictions, as one flat dict.

    ``frame`` columns: tile_id, specimen_id, scan_id, label, prob, damage_fraction.
    Returns :func:`tile_metrics` plus ``accuracy_ci95`` / ``balanced_accuracy_ci95``
    (specimen bootstrap), ``n_specimens``, :func:`scan_level` (mean rule; its ``rule`` key
    is named ``scan_rule`` here) and :func:`damage_breakdown`.
    """
    missing = {"specimen_id", "scan_id", "label", "prob", "damage_fraction"} - set(frame)
    if missing:
        raise ValueError(f"prediction frame lacks columns {sorted(missing)}")
    y, p = frame["label"].to_numpy(), frame["prob"].to_numpy()
    groups = frame["specimen_id"].to_numpy()
    out = tile_metrics(y, p)
    for metric in ("accuracy", "balanced_accuracy"):
        out[f"{metric}_ci95"] = list(bootstrap_ci(y, p, groups, metric, n_boot, seed))
    out["n_specimens"] = int(frame["specimen_id"].nunique())
    scans = scan_level(frame["scan_id"].to_numpy(), y, p, rule="mean")
    scans["scan_rule"] = scans.pop("rule")
    out.update(scans)
    out.update(damage_breakdown(y, p, frame["damage_fraction"].to_numpy(), visible))
    return out


def roc_points(y_true: np.ndarray, prob: np.ndarray) -> pd.DataFrame:
    """ROC curve points (columns fpr, tpr, threshold) from sklearn's ``roc_curve``, for plots.

    sklearn's first threshold is +inf (nothing predicted failed); it is written as 1.0 so
    the CSV holds only finite numbers. Values are rounded to 6 digits.
    """
    y, p = _check(y_true, prob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # one class: NaN rates
        fpr, tpr, thr = skm.roc_curve(y, p)
    thr = np.where(np.isfinite(thr), thr, 1.0)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr}).round(6)


def confusion_points(
    y_true: np.ndarray, prob: np.ndarray, threshold: float = THRESHOLD
) -> pd.DataFrame:
    """One row per tile (columns actual, predicted: class names), in the given order, for
    DVC's confusion template: the verdicts (failed when ``prob > threshold``) that
    :func:`tile_metrics` counts in its confusion matrix."""
    y, p = _check(y_true, prob)
    names = np.array(CLASS_NAMES)
    return pd.DataFrame({"actual": names[y], "predicted": names[(p > threshold).astype(np.int64)]})


def history_points(history: list[dict[str, float]]) -> pd.DataFrame:
    """A fit's per-epoch history (rows of epoch and metrics, as training records it) as a
    table for plots: epoch first, then the metrics by name, rounded to 6 digits."""
    if not history:
        raise ValueError("no epochs in the training history")
    frame = pd.DataFrame(history)
    if "epoch" not in frame:
        raise ValueError(f"training history without epochs: columns {list(frame)}")
    metrics = sorted(c for c in frame if c != "epoch")
    frame = frame[["epoch", *metrics]].astype({"epoch": np.int64})
    return frame.round(6)


def _clean(obj: Any) -> Any:
    """JSON-ready copy: numpy scalars/arrays to Python, floats rounded, non-finite to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return round(value, 6) + 0.0 if math.isfinite(value) else None  # + 0.0: no "-0.0"
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as deterministic JSON: sorted keys, indent 2, floats rounded to 6
    digits, NaN/inf as null, trailing newline; atomically (no half-written file)."""
    text = json.dumps(_clean(obj), indent=2, sort_keys=True, allow_nan=False)
    write_text_atomic(Path(path), text + "\n")
