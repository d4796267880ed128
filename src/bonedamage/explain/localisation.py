"""Mask-based localisation metrics for explanation maps, computed by Quantus.

Does a map point at the damage? Four of the field's standard answers, scored against a
ground-truth damage mask by Quantus 0.6.0 (one batched call per metric, no model needed):

* ``pointing_game`` (Zhang et al. 2018): 1 if the map's highest pixel lies in the mask
  (any of them, when several pixels share the highest value), else 0;
* ``relevance_mass_accuracy`` (Arras et al. 2022): share of the map's sum inside the mask;
* ``relevance_rank_accuracy`` (Arras et al. 2022): share of the k highest pixels of the map
  that lie in the mask, k = mask area;
* ``auc``: ROC AUC of the map as a pixel score for the mask (0.5: chance, 1: every mask
  pixel above every other pixel).

Maps are passed to Quantus as they are (``normalise=False``, ``abs=False``): all four are
unchanged by scaling a map by a positive factor, so Quantus's default division by the
batch's largest value would only cost time. Maps must be non-negative (the mass share of a
signed map means nothing).

Two kinds of tile get no score: an empty mask (nothing to find; Quantus returns NaN) and a
flat map (one value everywhere, like Grad-CAM's all-zero map when there is no positive
evidence): it has no peak and no ranking, Quantus refuses a batch of only such maps and
would count every pixel of one as its peak (pointing game 1). Compare ``n_scored`` with the
number of non-empty masks to see how many flat maps were left out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd

try:
    import quantus
except ImportError as exc:  # scripts/env.sh installs it; pip would pull the GUI OpenCV
    raise ImportError(
        "the explanation metrics need Quantus: pip install --no-deps quantus==0.6.0 "
        "(scripts/env.sh does; docs/development.md says why without its dependencies)"
    ) from exc

LOCALISATION_METRICS: tuple[str, ...] = (
    "pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "auc",
)
_QUANTUS: dict[str, Callable[..., quantus.Metric]] = {
    "pointing_game": quantus.PointingGame,
    "relevance_mass_accuracy": quantus.RelevanceMassAccuracy,
    "relevance_rank_accuracy": quantus.RelevanceRankAccuracy,
    "auc": quantus.AUC,
}


def _checked(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(
            f"maps {maps.shape} and masks {masks.shape} must have the same shape (n, h, w)"
        )
    if not np.all(np.isfinite(maps)) or np.any(maps < 0):
        raise ValueError("maps must be finite and non-negative")
    return maps, masks


def localisation_per_tile(maps: np.ndarray, masks: np.ndarray) -> pd.DataFrame:
    """One row per scored tile: ``tile`` (its index in ``maps``) and the
    :data:`LOCALISATION_METRICS`.

    ``maps``: ``(n, h, w)`` non-negative explanation maps, any scale; ``masks``: ``(n, h, w)``
    ground-truth damage. Tiles with an empty mask or a flat map are left out (see the
    module docstring). ``auc`` is NaN for a mask that covers the whole tile (no pixel
    outside it to rank below). Quantus stays quiet: no progress bar, prints or warnings.
    """
    maps, masks = _checked(maps, masks)
    n, h, w = maps.shape
    flat = maps.reshape(n, h * w)
    scored = masks.reshape(n, h * w).any(axis=1) & (flat.max(axis=1) > flat.min(axis=1))
    tiles = np.flatnonzero(scored)
    frame = pd.DataFrame({"tile": tiles})
    if len(tiles) == 0:
        return frame.assign(**dict.fromkeys(LOCALISATION_METRICS, np.array([], dtype=float)))
    # Quantus wants channel-first (n, 1, h, w); x_batch only sets the shape, y_batch is unused
    a_batch = maps[tiles, None]
    s_batch = masks[tiles, None]
    y_batch = np.zeros(len(tiles), dtype=np.int64)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # e.g. sklearn's "no negative samples" for a full mask
        for name, metric in _QUANTUS.items():
            scorer = metric(normalise=False, abs=False, disable_warnings=True)
            scores = scorer(
                model=None,
                x_batch=a_batch,
                y_batch=y_batch,
                a_batch=a_batch,
                s_batch=s_batch,
                channel_first=True,
                batch_size=len(tiles),
            )
            frame[name] = np.asarray(scores, dtype=np.float64)
    return frame


def localisation_scores(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """maps: (n, h, w) float explanation maps (non-negative, any scale), masks: (n, h, w) bool
    ground-truth damage.

    Only tiles whose mask is non-empty are scored (an empty mask has no score; nor has a flat
    map, see the module docstring); returns the mean of each metric over those tiles under
    the names of :data:`LOCALISATION_METRICS` (means skip NaN), plus ``"n_scored"`` (float
    count). With no scorable tile every metric is NaN and n_scored 0. Shape mismatch ->
    ValueError naming both shapes.
    """
    frame = localisation_per_tile(maps, masks)
    out: dict[str, float] = {}
    for name in LOCALISATION_METRICS:
        values = frame[name].to_numpy(dtype=np.float64)
        values = values[~np.isnan(values)]
        out[name] = float(values.mean()) if len(values) else math.nan
    out["n_scored"] = float(len(frame))
    return out
