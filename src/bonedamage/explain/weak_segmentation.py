"""A classifier's Grad-CAM read as a weakly supervised damage segmentation.

A tile the classifier calls failed (p(failed) > 0.5, the classifiers' threshold) is
labelled damaged where its Grad-CAM map (scaled to [0, 1] per tile) reaches a threshold; a
tile called pristine has no damage. The threshold is the one of ``thresholds`` with the
best Dice on the validation split, so the test figures stay unbiased. Scored with the same
metrics as the segmentation model, this shows what full supervision buys over a
classifier's explanation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from bonedamage.explain import gradcam

FAILED_AT = 0.5  # p(failed) above which a tile is called failed (as the classifiers call it)


def recorded_layers(model: nn.Module, record: dict[str, Any]) -> Any:
    """The target layer(s) ``explain`` chose for this model (its metrics' ``layer``: one
    name per network of an ensemble, comma-separated, one name, or the last conv block)."""
    names = str(record.get("layer", "")).split(",")
    nets = gradcam.networks(model)
    if len(names) == len(nets) and len(nets) > 1:
        return [net.get_submodule(name) for net, name in zip(nets, names, strict=True)]
    if names == ["last conv block"] or names == [""]:
        return None
    return names[0]


def cam_masks(cams: np.ndarray, prob_failed: np.ndarray, threshold: float) -> np.ndarray:
    """Damage masks (n, h, w) bool: the map at or above ``threshold`` on tiles called failed."""
    return (cams >= threshold) & (prob_failed > FAILED_AT)[:, None, None]


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 2 * int((pred & truth).sum()) / total if total else 1.0


def best_threshold(
    cams: np.ndarray, prob_failed: np.ndarray, truth: np.ndarray, thresholds: Sequence[float]
) -> tuple[float, float]:
    """The threshold with the best pooled Dice against ``truth`` (bool), and that Dice; the
    lowest such threshold on ties."""
    ordered = sorted(float(t) for t in thresholds)  # argmax takes the first of a tie
    scores = [_dice(cam_masks(cams, prob_failed, t), truth) for t in ordered]
    best = int(np.argmax(scores))
    return ordered[best], float(scores[best])


def cams_and_probs(
    model: nn.Module, tiles: np.ndarray, layers: Any, method: str, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps of the failed class and p(failed) of ``tiles``."""
    cams = gradcam.compute_cams(model, tiles, method, layers, batch_size)
    return cams, gradcam.failed_probability(model, tiles, batch_size)
