"""Scores of a damage segmentation (learn/seg_scoring.py) on hand-made maps: pooled Dice and
IoU per class (MONAI), the 95th-percentile Hausdorff distance, object detection with
one-to-one matching, count and length errors, and the report's keys."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bonedamage.learn.seg_scoring import (
    hausdorff95_um,
    object_scores,
    overlap_scores,
    segmentation_report,
)

CLASSES = ["background", "microcrack", "fracture", "buckled"]
OBJECT_KEYS = {
    "object_precision",
    "object_recall",
    "object_f1",
    "n_objects_true",
    "n_objects_pred",
    "count_mae",
    "length_mae_um",
    "length_total_rel_error",
}

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecations


def _hand_made() -> tuple[np.ndarray, np.ndarray]:
    """Two 4 x 4 tiles. Truth: 4 px of microcrack (tile 0, row 0). Prediction: 4 px of
    microcrack, 2 of them on the true ones; 2 px of fracture (tile 1), which the truth
    does not have; buckled bone nowhere."""
    truth = np.zeros((2, 4, 4), np.uint8)
    pred = np.zeros_like(truth)
    truth[0, 0, :] = 1
    pred[0, 0, 2:] = 1
    pred[0, 1, :2] = 1
    pred[1, 3, 2:] = 2
    return pred, truth


# ---------------------------------------------------------------------- overlap


def test_overlap_scores_are_the_pooled_dice_and_iou_of_every_class() -> None:
    scores = overlap_scores(*_hand_made(), CLASSES)
    # background: 26 px predicted, 28 true, 24 shared (32 px in all, 8 damage in either)
    assert scores["dice_background"] == pytest.approx(2 * 24 / (26 + 28))
    assert scores["iou_background"] == pytest.approx(24 / (26 + 28 - 24))
    assert scores["dice_microcrack"] == pytest.approx(2 * 2 / (4 + 4))
    assert scores["iou_microcrack"] == pytest.approx(2 / 6)
    # any kind of damage: 6 px predicted, 4 true, 2 shared
    assert scores["dice_damage"] == pytest.approx(2 * 2 / (6 + 4))
    assert scores["iou_damage"] == pytest.approx(2 / 8)
    assert set(scores) == {
        *(f"{m}_{c}" for m in ("dice", "iou") for c in [*CLASSES, "damage"]),
        "mean_iou",
        "mean_iou_damage_kinds",
        "mean_dice_damage_kinds",
    }


def test_a_class_found_where_the_truth_has_none_scores_0_and_one_absent_from_both_nan() -> None:
    scores = overlap_scores(*_hand_made(), CLASSES)
    assert scores["dice_fracture"] == 0.0 and scores["iou_fracture"] == 0.0
    assert math.isnan(scores["dice_buckled"]) and math.isnan(scores["iou_buckled"])


def test_mean_iou_counts_the_background_and_the_damage_kinds_mean_does_not() -> None:
    scores = overlap_scores(*_hand_made(), CLASSES)
    background, microcrack, fracture = 24 / 30, 2 / 6, 0.0  # buckled: NaN, left out
    assert scores["mean_iou"] == pytest.approx((background + microcrack + fracture) / 3)
    assert scores["mean_iou_damage_kinds"] == pytest.approx((microcrack + fracture) / 2)
    assert scores["mean_dice_damage_kinds"] == pytest.approx((0.5 + 0.0) / 2)


def test_overlap_is_pooled_over_tiles_not_averaged_per_tile() -> None:
    """Tile 0 found perfectly (4 px), tile 1 missed (1 px): pooled 2 * 4 / 9, not 0.5."""
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0, 0, :] = 1
    truth[1, 2, 2] = 1
    pred = truth.copy()
    pred[1] = 0
    scores = overlap_scores(pred, truth, ["background", "microcrack"])
    assert scores["dice_microcrack"] == pytest.approx(8 / 9)


def test_maps_without_damage_score_only_the_background() -> None:
    empty = np.zeros((2, 4, 4), np.uint8)
    scores = overlap_scores(empty, empty, CLASSES)
    assert scores["dice_background"] == scores["iou_background"] == scores["mean_iou"] == 1.0
    for key in ("dice_damage", "iou_damage", "mean_iou_damage_kinds", "mean_dice_damage_kinds"):
        assert math.isnan(scores[key]), key


def test_overlap_scores_refuse_maps_of_different_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 5\).*differ in shape"):
        overlap_scores(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 5), np.uint8), CLASSES)


# -------------------------------------------------------------------- Hausdorff


def _single_pixels() -> tuple[np.ndarray, np.ndarray]:
    """Three tiles, one true and one predicted damage pixel each, 4, 1 and 10 px apart."""
    pred = np.zeros((3, 16, 16), np.uint8)
    truth = np.zeros_like(pred)
    truth[0, 2, 2], pred[0, 2, 6] = 1, 1
    truth[1, 5, 5], pred[1, 5, 6] = 1, 1
    truth[2, 3, 3], pred[2, 13, 3] = 1, 1
    return pred, truth


def test_hausdorff95_is_the_median_over_tiles_in_micrometres() -> None:
    pred, truth = _single_pixels()
    assert hausdorff95_um(pred, truth, 1.0) == pytest.approx(4.0)  # median of 4, 1, 10 px
    assert hausdorff95_um(pred, truth, 2.5) == pytest.approx(10.0)
    assert hausdorff95_um(pred, truth, 0.7) == pytest.approx(2.8)


def test_hausdorff95_leaves_out_tiles_without_damage_on_both_sides() -> None:
    pred, truth = _single_pixels()
    pred = np.concatenate([pred, np.zeros((2, 16, 16), np.uint8)])
    truth = np.concatenate([truth, np.zeros((2, 16, 16), np.uint8)])
    pred[3, 15, 15] = 2  # predicted only: a false alarm Hausdorff cannot measure
    truth[4, 0, 0] = 1  # true only: a miss
    assert hausdorff95_um(pred, truth, 1.0) == pytest.approx(4.0)
    assert math.isnan(hausdorff95_um(pred[3:], truth[3:], 1.0))
    empty = np.zeros((2, 8, 8), np.uint8)
    assert math.isnan(hausdorff95_um(empty, empty, 1.0))


# ----------------------------------------------------------------------- objects


def _tile(px: int = 32) -> np.ndarray:
    return np.zeros((1, px, px), bool)


def test_one_blob_over_two_true_cracks_matches_only_one_of_them() -> None:
    truth, pred = _tile(16), _tile(16)
    truth[0, 2:14, 4] = True
    truth[0, 2:14, 8] = True
    pred[0, 2:14, 4:9] = True  # IoU 12 / 60 = 0.2 with each crack
    scores = object_scores(pred, truth, 1.0, min_px=4, iou=0.1)
    assert scores["n_objects_true"] == 2.0 and scores["n_objects_pred"] == 1.0
    assert scores["object_precision"] == 1.0
    assert scores["object_recall"] == 0.5
    assert scores["object_f1"] == pytest.approx(2 / 3)


def test_one_true_crack_under_two_predictions_is_found_once() -> None:
    truth, pred = _tile(16), _tile(16)
    truth[0, 2:14, 4] = True
    pred[0, 2:7, 4] = True
    pred[0, 9:14, 4] = True  # two halves, each IoU 5 / 12
    scores = object_scores(pred, truth, 1.0, min_px=4, iou=0.1)
    assert scores["object_precision"] == 0.5 and scores["object_recall"] == 1.0


def test_components_below_min_px_are_not_objects() -> None:
    truth, pred = _tile(), _tile()
    truth[0, 5, 2:12] = True
    pred[0, 5, 2:12] = True
    pred[0, 20:22, 20] = True  # a 2-px speck far from any damage
    truth[0, 28, 28] = True  # a 1-px true speck
    strict = object_scores(pred, truth, 1.0, min_px=4, iou=0.1)
    assert strict["n_objects_pred"] == strict["n_objects_true"] == 1.0
    assert strict["object_precision"] == strict["object_recall"] == 1.0
    assert strict["count_mae"] == 0.0
    loose = object_scores(pred, truth, 1.0, min_px=1, iou=0.1)
    assert loose["n_objects_pred"] == loose["n_objects_true"] == 2.0
    assert loose["object_precision"] == loose["object_recall"] == 0.5


def test_a_match_needs_the_given_iou() -> None:
    truth, band, shifted = _tile(), _tile(), _tile()
    truth[0, 10, 2:22] = True
    band[0, 9:12, 2:22] = True  # covers the crack: IoU 1/3
    shifted[0, 11, 2:22] = True  # one pixel beside it: IoU 0
    assert object_scores(band, truth, 1.0, 4, iou=0.3)["object_recall"] == 1.0
    assert object_scores(band, truth, 1.0, 4, iou=0.5)["object_recall"] == 0.0
    assert object_scores(shifted, truth, 1.0, 4, iou=0.1)["object_recall"] == 0.0


def test_precision_recall_and_f1_count_objects_over_all_tiles() -> None:
    """3 true cracks in 2 tiles; 2 predictions, one of them right."""
    truth, pred = np.zeros((2, 32, 32), bool), np.zeros((2, 32, 32), bool)
    truth[0, 4, 2:20] = truth[0, 14, 2:20] = True
    truth[1, 24, 2:20] = True
    pred[0, 4, 2:20] = True
    pred[1, 8, 2:20] = True  # nowhere near tile 1's crack
    scores = object_scores(pred, truth, 1.0, min_px=4, iou=0.1)
    assert scores["object_precision"] == pytest.approx(1 / 2)
    assert scores["object_recall"] == pytest.approx(1 / 3)
    assert scores["object_f1"] == pytest.approx(2 * 1 / (2 + 3))
    assert scores["count_mae"] == pytest.approx((1 + 0) / 2)  # per tile |2 - 1|, |1 - 1|


def test_a_straight_20_px_crack_is_20_pixels_long() -> None:
    truth = _tile()
    truth[0, 5, 2:22] = True
    pixel_um = 0.7
    missed = object_scores(_tile(), truth, pixel_um, min_px=4, iou=0.1)
    assert missed["length_mae_um"] == pytest.approx(20 * pixel_um)
    assert missed["length_total_rel_error"] == pytest.approx(-1.0)
    assert missed["count_mae"] == 1.0
    assert missed["object_recall"] == 0.0 and missed["object_f1"] == 0.0
    assert math.isnan(missed["object_precision"])  # nothing predicted
    half = _tile()
    half[0, 5, 2:12] = True
    scores = object_scores(half, truth, pixel_um, min_px=4, iou=0.1)
    assert scores["length_mae_um"] == pytest.approx(10 * pixel_um)
    assert scores["length_total_rel_error"] == pytest.approx(-0.5)
    vertical = _tile()
    vertical[0, 3:23, 7] = True
    same = object_scores(vertical, truth, pixel_um, min_px=4, iou=0.1)
    assert same["length_mae_um"] == pytest.approx(0.0)  # same length, other place


def test_object_scores_of_empty_maps_are_nan_not_zero() -> None:
    scores = object_scores(_tile(), _tile(), 1.0, min_px=4, iou=0.1)
    for key in ("object_precision", "object_recall", "object_f1", "length_total_rel_error"):
        assert math.isnan(scores[key]), key
    assert scores["count_mae"] == 0.0 and scores["length_mae_um"] == 0.0


# ------------------------------------------------------------------------ report


def test_segmentation_report_has_overlap_hausdorff_and_per_kind_prefixed_object_scores() -> None:
    """A microcrack found exactly, a fracture missed."""
    classes = ["background", "microcrack", "fracture"]
    truth = np.zeros((2, 32, 32), np.uint8)
    truth[0, 4, 2:22] = 1
    truth[0, 20, 2:22] = 2
    pred = np.where(truth == 1, 1, 0).astype(np.uint8)
    report = segmentation_report(pred, truth, classes, 2.0, min_object_px=4, object_iou=0.1)
    assert set(overlap_scores(pred, truth, classes)) <= set(report)
    assert set(report) >= OBJECT_KEYS  # damage of any kind, unprefixed
    for kind in ("microcrack", "fracture"):
        assert {f"{kind}_{key}" for key in OBJECT_KEYS} <= set(report)
    assert not any(key.startswith("background_") for key in report)
    assert report["microcrack_object_recall"] == 1.0
    assert report["microcrack_length_mae_um"] == 0.0
    assert report["fracture_object_recall"] == 0.0
    assert report["fracture_length_mae_um"] == pytest.approx((20 * 2.0 + 0.0) / 2)  # per tile
    assert report["object_recall"] == 0.5 and report["object_precision"] == 1.0
    assert report["dice_microcrack"] == 1.0 and report["dice_fracture"] == 0.0
    assert report["hd95_um"] == pytest.approx(16 * 2.0)  # the fracture is 16 rows away
    assert report["n_tiles"] == 2 and report["n_tiles_with_damage"] == 1


def test_segmentation_report_of_one_damage_kind_has_no_prefixed_object_scores() -> None:
    """Its objects are those of damage of any kind: no second, prefixed copy."""
    truth = np.zeros((1, 32, 32), np.uint8)
    truth[0, 4, 2:22] = 1
    report = segmentation_report(truth, truth, ["background", "damage"], 1.0, 4, 0.1)
    assert set(report) >= OBJECT_KEYS
    assert not any(key.startswith(("damage_", "background_")) for key in report)
    assert report["object_f1"] == 1.0 and report["dice_damage"] == 1.0
