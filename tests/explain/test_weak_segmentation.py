"""A classifier's Grad-CAM read as a segmentation (explain/weak_segmentation.py): masks only
on tiles called failed, the validation threshold with the best Dice, and the target layers
that explain recorded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bonedamage.explain import gradcam
from bonedamage.explain.weak_segmentation import (
    best_threshold,
    cam_masks,
    cams_and_probs,
    recorded_layers,
)
from bonedamage.learn.models import Ensemble, build_cnn
from conftest import TINY_ARCH

THRESHOLDS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]  # params segment.cam_thresholds


def _ensemble() -> Ensemble:
    torch.manual_seed(0)
    return Ensemble([build_cnn(TINY_ARCH) for _ in range(2)])


def _ramps(n: int = 3) -> np.ndarray:
    """Maps rising along the columns: 0.05, 0.15, ..., 0.95 (no value on a threshold)."""
    return np.broadcast_to(np.arange(10) / 10 + 0.05, (n, 4, 10)).copy()


# ---------------------------------------------------------------------- cam_masks


def test_cam_masks_are_empty_on_tiles_called_pristine() -> None:
    cams = np.full((4, 3, 3), 0.9, np.float32)
    prob = np.array([0.1, 0.5, 0.51, 0.97], np.float32)
    masks = cam_masks(cams, prob, 0.5)
    assert masks.dtype == bool and masks.shape == cams.shape
    assert not masks[:2].any()  # pristine: no damage, however bright the map
    assert masks[2:].all()  # above p(failed) 0.5 a tile is called failed, as classifiers do


def test_cam_masks_are_the_map_at_or_above_the_threshold() -> None:
    cams = np.array([[[0.0, 0.25, 0.5, 0.75, 1.0]]])
    masks = cam_masks(cams, np.array([0.9]), 0.5)
    assert masks[0, 0].tolist() == [False, False, True, True, True]


# ------------------------------------------------------------------ best_threshold


def test_best_threshold_picks_the_threshold_with_the_best_dice() -> None:
    cams = _ramps()
    truth = cams > 0.6  # the 4 columns from 0.65
    prob = np.full(3, 0.9)
    threshold, dice = best_threshold(cams, prob, truth, THRESHOLDS)
    assert threshold == 0.6 and dice == pytest.approx(1.0)
    # 0.5 takes one column too many: 2 * 4 / (5 + 4)
    assert best_threshold(cams, prob, truth, [0.5, 0.7])[0] == 0.5
    assert best_threshold(cams, prob, truth, [0.5])[1] == pytest.approx(8 / 9)


def test_best_threshold_scores_only_tiles_called_failed() -> None:
    """A tile called pristine adds its truth to every threshold's misses alike."""
    cams = _ramps()
    truth = cams > 0.3
    prob = np.array([0.9, 0.9, 0.2])
    threshold, dice = best_threshold(cams, prob, truth, THRESHOLDS)
    assert threshold == 0.3
    assert dice == pytest.approx(2 * 14 / (14 + 21))  # 7 columns x 2 tiles found, of 3


def test_best_threshold_takes_the_lowest_of_tied_thresholds() -> None:
    cams = np.zeros((2, 4, 4))
    cams[:, 1:3, 1:3] = 1.0  # every threshold gives the same masks
    truth = cams > 0
    assert best_threshold(cams, np.full(2, 0.9), truth, THRESHOLDS) == (0.2, 1.0)
    # nothing called failed and nothing to find: every threshold is perfect
    assert best_threshold(cams, np.zeros(2), np.zeros_like(truth), THRESHOLDS) == (0.2, 1.0)


def test_best_threshold_takes_the_lowest_tied_threshold_of_an_unsorted_list() -> None:
    cams = np.zeros((2, 4, 4))
    cams[:, 1:3, 1:3] = 1.0
    truth = cams > 0
    assert best_threshold(cams, np.full(2, 0.9), truth, [0.6, 0.3, 0.45])[0] == 0.3


# ----------------------------------------------------------------- recorded layers


def test_recorded_layers_of_an_ensemble_are_one_module_per_member() -> None:
    model = _ensemble()
    layers = recorded_layers(model, {"layer": "features.0,features.1"})
    assert isinstance(layers, list) and len(layers) == 2
    assert layers[0] is model.members[0].features[0]
    assert layers[1] is model.members[1].features[1]


def test_recorded_layers_pass_one_name_on_and_the_last_conv_block_as_the_default() -> None:
    model = _ensemble()
    assert recorded_layers(model, {"layer": "features.1"}) == "features.1"
    assert recorded_layers(model.members[0], {"layer": "features.0"}) == "features.0"
    assert recorded_layers(model, {"layer": "last conv block"}) is None
    assert recorded_layers(model, {}) is None  # no layer recorded


def test_cams_and_probs_are_the_maps_and_p_failed_of_the_recorded_layers() -> None:
    model = _ensemble()
    tiles = np.random.default_rng(0).random((4, 16, 16), dtype=np.float32)
    layers = recorded_layers(model, {"layer": "features.0,features.1"})
    cams, prob = cams_and_probs(model, tiles, layers, "gradcam", batch_size=3)
    assert cams.shape == (4, 16, 16) and prob.shape == (4,)
    np.testing.assert_array_equal(cams, gradcam.compute_cams(model, tiles, "gradcam", layers, 3))
    np.testing.assert_array_equal(prob, gradcam.failed_probability(model, tiles, 3))
    assert 0.0 <= cams.min() <= cams.max() <= 1.0
