"""Scores of a damage segmentation against the ground-truth labels of the same tiles.

Voxel overlap per class (Dice and IoU pooled over every pixel of every tile, by MONAI's
``compute_dice`` / ``compute_iou`` on the tiles as one image; the mean IoU over all classes,
background included, and over the damage classes alone), the 95th-percentile Hausdorff
distance on the tiles where both masks hold damage (MONAI), object-level detection (a
connected component of a damage kind, matched one-to-one to a true one by IoU: precision,
recall, F1) and the error of the crack count and length per tile (length: the skeleton's
pixel count times the pixel size). Any map can be scored: a segmentation model's labels,
or a classifier's thresholded Grad-CAM (the weakly supervised comparison).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from skimage.morphology import skeletonize

DAMAGE = "damage"  # any damage class, as one


def _one_hot(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """(n, h, w) class indices as a (1, K, n, h, w) one-hot image: the tiles pooled."""
    t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return torch.nn.functional.one_hot(t, n_classes).permute(3, 0, 1, 2)[None].float()


def overlap_scores(pred: np.ndarray, truth: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Pooled Dice and IoU per class and for damage of any kind, and their means (NaN for
    a class absent from both: nothing to score)."""
    from monai.metrics import compute_dice, compute_iou

    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    k = len(classes)
    p, t = _one_hot(pred, k), _one_hot(truth, k)
    dice = compute_dice(p, t, include_background=True, ignore_empty=False)[0].numpy()
    iou = compute_iou(p, t, include_background=True, ignore_empty=False)[0].numpy()
    # MONAI scores a class absent from both as 1 and one found where the truth has none as
    # 0; the first is nothing scored, not a perfect score
    absent = (p.sum((0, 2, 3, 4)) + t.sum((0, 2, 3, 4))).numpy() == 0
    dice, iou = np.where(absent, np.nan, dice), np.where(absent, np.nan, iou)
    out: dict[str, float] = {}
    for i, name in enumerate(classes):
        out[f"dice_{name}"], out[f"iou_{name}"] = float(dice[i]), float(iou[i])
    pb, tb = pred > 0, truth > 0
    inter, total = int((pb & tb).sum()), int(pb.sum()) + int(tb.sum())
    out[f"dice_{DAMAGE}"] = 2 * inter / total if total else math.nan
    out[f"iou_{DAMAGE}"] = inter / (total - inter) if total else math.nan
    out["mean_iou"] = float(np.nanmean(iou)) if not np.isnan(iou).all() else math.nan
    damage = iou[1:]
    out["mean_iou_damage_kinds"] = (
        float(np.nanmean(damage)) if len(damage) and not np.isnan(damage).all() else math.nan
    )
    d = dice[1:]
    out["mean_dice_damage_kinds"] = (
        float(np.nanmean(d)) if len(d) and not np.isnan(d).all() else math.nan
    )
    return out


def hausdorff95_um(pred: np.ndarray, truth: np.ndarray, pixel_um: float) -> float:
    """Median over tiles of the 95th-percentile Hausdorff distance (um) between predicted
    and true damage, on the tiles where both hold damage; NaN when there is none."""
    from monai.metrics import compute_hausdorff_distance

    both = np.flatnonzero((pred > 0).any((1, 2)) & (truth > 0).any((1, 2)))
    if len(both) == 0:
        return math.nan
    p = torch.from_numpy((pred[both] > 0)[:, None]).float()
    t = torch.from_numpy((truth[both] > 0)[:, None]).float()
    with warnings.catch_warnings():  # MONAI 1.6 warns about its own deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95).numpy()
    return float(np.nanmedian(hd)) * pixel_um


def _components(mask: np.ndarray, min_px: int) -> tuple[np.ndarray, int]:
    """8-connected components of a 2D mask, those under ``min_px`` pixels dropped."""
    labels, n = ndimage.label(mask, np.ones((3, 3), bool))
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        small = np.flatnonzero(sizes < min_px)
        small = small[small > 0]
        if len(small):
            labels[np.isin(labels, small)] = 0
            labels, n = ndimage.label(labels > 0, np.ones((3, 3), bool))
    return labels, int(n)


def _matches(pred: np.ndarray, n_pred: int, truth: np.ndarray, n_true: int, iou: float) -> int:
    """One-to-one matches of predicted and true components at IoU >= ``iou`` (greedy, best
    pairs first)."""
    if n_pred == 0 or n_true == 0:
        return 0
    inter = np.zeros((n_pred + 1, n_true + 1), np.int64)
    np.add.at(inter, (pred.ravel(), truth.ravel()), 1)
    area_p, area_t = inter.sum(1), inter.sum(0)
    inter = inter[1:, 1:]
    union = area_p[1:, None] + area_t[None, 1:] - inter
    score = np.where(inter > 0, inter / np.maximum(union, 1), 0.0)
    found, used_p, used_t = 0, set(), set()
    for flat in np.argsort(-score, axis=None):
        i, j = divmod(int(flat), n_true)
        if score[i, j] < iou or score[i, j] == 0:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            found += 1
    return found


def object_scores(
    pred: np.ndarray, truth: np.ndarray, pixel_um: float, min_px: int, iou: float
) -> dict[str, float]:
    """Object detection of damage components per tile (precision, recall, F1 over all
    tiles) and the per-tile errors of their count and skeleton length (mean absolute, and
    the relative error of the totals). ``pred`` / ``truth``: (n, h, w) bool."""
    n_pred = n_true = matched = 0
    count_err, length_err = [], []
    total_len = [0.0, 0.0]
    for p_tile, t_tile in zip(pred, truth, strict=True):
        lp, cp = _components(p_tile, min_px)
        lt, ct = _components(t_tile, min_px)
        matched += _matches(lp, cp, lt, ct, iou)
        n_pred, n_true = n_pred + cp, n_true + ct
        len_p = float(skeletonize(lp > 0).sum()) * pixel_um if cp else 0.0
        len_t = float(skeletonize(lt > 0).sum()) * pixel_um if ct else 0.0
        count_err.append(abs(cp - ct))
        length_err.append(abs(len_p - len_t))
        total_len[0] += len_p
        total_len[1] += len_t
    precision = matched / n_pred if n_pred else math.nan
    recall = matched / n_true if n_true else math.nan
    f1 = 2 * matched / (n_pred + n_true) if n_pred + n_true else math.nan
    return {
        "object_precision": precision,
        "object_recall": recall,
        "object_f1": f1,
        "n_objects_true": float(n_true),
        "n_objects_pred": float(n_pred),
        "count_mae": float(np.mean(count_err)) if count_err else math.nan,
        "length_mae_um": float(np.mean(length_err)) if length_err else math.nan,
        "length_total_rel_error": (
            (total_len[0] - total_len[1]) / total_len[1] if total_len[1] else math.nan
        ),
    }


def segmentation_report(
    pred: np.ndarray,
    truth: np.ndarray,
    classes: Sequence[str],
    pixel_um: float,
    min_object_px: int,
    object_iou: float,
) -> dict[str, Any]:
    """Every score of a class map against the truth (both (n, h, w) class indices): overlap
    per class, Hausdorff, and object scores for damage of any kind (unprefixed) and, with
    several damage kinds, per kind (prefixed ``<kind>_``)."""
    out: dict[str, Any] = overlap_scores(pred, truth, classes)
    out["hd95_um"] = hausdorff95_um(pred, truth, pixel_um)
    out |= object_scores(pred > 0, truth > 0, pixel_um, min_object_px, object_iou)
    if len(classes) > 2:  # several damage kinds: each one's objects too
        for k, name in enumerate(classes[1:], 1):
            kind = object_scores(pred == k, truth == k, pixel_um, min_object_px, object_iou)
            out |= {f"{name}_{key}": value for key, value in kind.items()}
    out["n_tiles"] = int(len(pred))
    out["n_tiles_with_damage"] = int((truth > 0).any((1, 2)).sum())
    return out
