"""Mask-based localisation metrics (Quantus): pointing game, relevance mass/rank, AUC."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from bonedamage.explain.localisation import (
    LOCALISATION_METRICS,
    localisation_per_tile,
    localisation_scores,
)

SIZE = 16


def _masks(n: int = 3, seed: int = 0) -> np.ndarray:
    """n masks of SIZE x SIZE, each a 4 x 6 rectangle of damage at a random place."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    for mask in masks:
        r, c = rng.integers(0, SIZE - 6, size=2)
        mask[r : r + 4, c : c + 6] = True
    return masks


def test_public_names_are_the_four_metrics():
    assert LOCALISATION_METRICS == (
        "pointing_game",
        "relevance_mass_accuracy",
        "relevance_rank_accuracy",
        "auc",
    )


def test_a_map_equal_to_its_mask_scores_one_on_every_metric():
    masks = _masks()
    scores = localisation_scores(masks.astype(np.float32), masks)
    assert set(scores) == {*LOCALISATION_METRICS, "n_scored"}
    for name in LOCALISATION_METRICS:
        assert scores[name] == pytest.approx(1.0), name
    assert scores["n_scored"] == 3.0


def test_scores_do_not_depend_on_the_scale_of_the_map():
    masks = _masks(4, seed=1)
    rng = np.random.default_rng(1)
    maps = rng.random(masks.shape) + 2.0 * masks
    small = localisation_scores(maps, masks)
    large = localisation_scores(1000.0 * maps, masks)
    for name in LOCALISATION_METRICS:
        assert large[name] == pytest.approx(small[name]), name
    assert 0.0 < small["relevance_mass_accuracy"] < 1.0


def test_a_peak_outside_the_mask_loses_the_pointing_game():
    masks = _masks(2)
    maps = masks.astype(np.float64)
    for m, mask in zip(maps, masks, strict=True):
        outside = np.argwhere(~mask)[0]
        m[tuple(outside)] = 5.0  # one hot pixel off the damage, mass still mostly on it
    scores = localisation_scores(maps, masks)
    assert scores["pointing_game"] == 0.0
    assert scores["relevance_mass_accuracy"] > 0.5


def test_pointing_game_is_the_share_of_tiles_whose_peak_hits():
    masks = _masks(2)
    maps = masks.astype(np.float64)
    maps[1][tuple(np.argwhere(~masks[1])[0])] = 5.0  # second tile misses
    assert localisation_scores(maps, masks)["pointing_game"] == pytest.approx(0.5)


def test_an_inverted_map_scores_auc_near_zero_and_no_mass_on_the_damage():
    masks = _masks()
    scores = localisation_scores(1.0 - masks, masks)
    assert scores["auc"] == pytest.approx(0.0, abs=1e-9)
    assert scores["relevance_mass_accuracy"] == 0.0
    assert scores["relevance_rank_accuracy"] == 0.0
    assert scores["pointing_game"] == 0.0


def test_mass_and_rank_accuracy_match_their_definitions():
    mask = np.zeros((1, 8, 8), dtype=bool)
    mask[0, :2, :2] = True  # 4 damaged pixels
    cam = np.full((1, 8, 8), 0.1)
    cam[0, :2, :2] = 1.0  # mass inside: 4 / (4 + 60 * 0.1) = 0.4
    cam[0, 0, 0] = cam[0, 0, 1] = 0.05  # two mask pixels drop below the background
    scores = localisation_scores(cam, mask)
    assert scores["relevance_mass_accuracy"] == pytest.approx(2.1 / (2.1 + 6.0))
    # the 4 highest pixels: two mask pixels (1.0), then two of the tied 0.1 background
    assert scores["relevance_rank_accuracy"] == pytest.approx(0.5)


def test_tiles_with_an_empty_mask_are_skipped():
    masks = _masks(4)
    masks[[1, 3]] = False
    maps = masks.astype(np.float64)
    maps[1] = np.random.default_rng(0).random((SIZE, SIZE))  # would score badly if counted
    maps[3] = 1.0 - maps[3]
    scores = localisation_scores(maps, masks)
    assert scores["n_scored"] == 2.0
    for name in LOCALISATION_METRICS:
        assert scores[name] == pytest.approx(1.0), name
    assert localisation_per_tile(maps, masks)["tile"].tolist() == [0, 2]


def test_all_empty_masks_give_nan_scores_and_zero_count():
    masks = np.zeros((3, SIZE, SIZE), dtype=bool)
    maps = np.random.default_rng(0).random(masks.shape)
    scores = localisation_scores(maps, masks)
    assert scores["n_scored"] == 0.0
    assert all(math.isnan(scores[name]) for name in LOCALISATION_METRICS)


def test_no_tiles_give_nan_scores_and_zero_count():
    scores = localisation_scores(np.zeros((0, SIZE, SIZE)), np.zeros((0, SIZE, SIZE), bool))
    assert scores["n_scored"] == 0.0
    assert all(math.isnan(scores[name]) for name in LOCALISATION_METRICS)


def test_a_flat_map_has_no_peak_and_is_not_scored():
    masks = _masks(2)
    maps = masks.astype(np.float64)
    maps[1] = 0.0  # Grad-CAM's map when there is no positive evidence
    scores = localisation_scores(maps, masks)
    assert scores["n_scored"] == 1.0
    assert scores["pointing_game"] == 1.0
    only_flat = localisation_scores(np.zeros_like(maps), masks)  # Quantus would refuse these
    assert only_flat["n_scored"] == 0.0
    assert math.isnan(only_flat["pointing_game"])


def test_a_mask_covering_the_whole_tile_has_no_auc_but_other_scores():
    masks = _masks(2)
    masks[1] = True
    maps = masks.astype(np.float64)
    maps[1] = np.random.default_rng(0).random((SIZE, SIZE))
    frame = localisation_per_tile(maps, masks)
    assert math.isnan(frame["auc"].iloc[1])
    assert frame["relevance_mass_accuracy"].iloc[1] == pytest.approx(1.0)
    assert localisation_scores(maps, masks)["auc"] == pytest.approx(1.0)  # mean skips NaN


def test_per_tile_frame_has_one_row_per_scored_tile():
    masks = _masks(3)
    masks[0] = False
    maps = masks.astype(np.float64)
    frame = localisation_per_tile(maps, masks)
    assert frame.columns.tolist() == ["tile", *LOCALISATION_METRICS]
    assert frame["tile"].tolist() == [1, 2]
    assert (frame[list(LOCALISATION_METRICS)].to_numpy() == 1.0).all()
    empty = localisation_per_tile(maps[:1], masks[:1])
    assert len(empty) == 0
    assert empty.columns.tolist() == ["tile", *LOCALISATION_METRICS]


def test_shape_mismatch_raises_naming_both_shapes():
    maps = np.zeros((2, SIZE, SIZE))
    masks = np.zeros((2, SIZE, SIZE - 1), dtype=bool)
    with pytest.raises(ValueError, match=r"\(2, 16, 16\).*\(2, 16, 15\)"):
        localisation_scores(maps, masks)
    with pytest.raises(ValueError, match=r"\(16, 16\)"):
        localisation_scores(maps[0], masks[0, :, :SIZE])


def test_negative_or_non_finite_maps_are_refused():
    masks = _masks(1)
    with pytest.raises(ValueError, match="non-negative"):
        localisation_scores(masks - 0.5, masks)
    with pytest.raises(ValueError, match="finite"):
        localisation_scores(np.full(masks.shape, np.nan), masks)


def test_nothing_is_printed_or_warned(capsys, monkeypatch):
    # Quantus 0.6 prints its notes (after a 1 s sleep per metric) only on GitHub Actions
    # unless disable_warnings=True; look as the CI does
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    masks = _masks(4)
    masks[2] = False  # empty: Quantus would warn about it
    masks[3] = True  # full: sklearn would warn that the ROC has no negatives
    maps = np.random.default_rng(0).random(masks.shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        localisation_scores(maps, masks)
    assert [str(w.message) for w in caught] == []
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ""
