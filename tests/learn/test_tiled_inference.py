"""Whole-plane segmentation from tiles: coverage, blending, padding and MONAI's reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bonedamage.learn.tiled_inference import (
    gaussian_window,
    model_in_channels,
    segment_plane,
    window_origins,
)

TILE = 16
SIZES = [(16, 16), (40, 40), (37, 53), (16, 61), (9, 12), (5, 30), (1, 1)]


def pointwise_model(in_channels: int = 3, classes: int = 4) -> nn.Module:
    """A 1x1 conv: each pixel's logits depend on that pixel only (translation-equivariant,
    so tiling cannot change its output)."""
    torch.manual_seed(0)
    return nn.Conv2d(in_channels, classes, kernel_size=1).eval()


def context_model(in_channels: int = 3, classes: int = 3) -> nn.Module:
    """Fixed-weight 3x3 convs with zero padding: a pixel's logits depend on its neighbours
    and on where the tile's border is (tiling changes the output)."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, classes, 3, padding=1),
    ).eval()


def plane(shape: tuple[int, int], channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(channels, *shape)).astype(np.float32)


def whole_plane(model: nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(image)[None]), dim=1)[0].numpy()


def monai_reference(model: nn.Module, image: np.ndarray, overlap: float) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    with torch.inference_mode():
        out = sliding_window_inference(
            torch.from_numpy(image)[None],
            roi_size=(TILE, TILE),
            sw_batch_size=5,
            predictor=lambda x: torch.softmax(model(x), dim=1),
            overlap=overlap,
            mode="gaussian",
        )
    return out[0].numpy()


def coverage(shape: tuple[int, int], overlap: float) -> np.ndarray:
    height, width = (max(s, TILE) for s in shape)
    count = np.zeros((height, width), dtype=int)
    for y, x in window_origins(shape, TILE, overlap):
        count[y : y + TILE, x : x + TILE] += 1
    return count


# -- window ---------------------------------------------------------------------------------
def test_gaussian_window_is_positive_symmetric_and_peaks_in_the_centre() -> None:
    window = gaussian_window(64)
    assert window.shape == (64, 64) and window.dtype == np.float32
    assert (window > 0).all()
    np.testing.assert_array_equal(window, window.T)
    np.testing.assert_array_equal(window, window[::-1, ::-1])
    assert window[31, 31] == window.max() > 0.99
    assert window[0, 0] == pytest.approx(1e-3)  # the corners are floored, not ~0


def test_gaussian_window_is_monais_importance_map() -> None:
    from monai.data.utils import compute_importance_map

    for tile, sigma in ((64, 0.125), (17, 0.25), (1, 0.125)):
        expected = compute_importance_map((tile, tile), mode="gaussian", sigma_scale=sigma)
        np.testing.assert_allclose(gaussian_window(tile, sigma), expected.numpy(), rtol=1e-6)


def test_gaussian_window_refuses_a_bad_size_or_sigma() -> None:
    with pytest.raises(ValueError, match="tile_px"):
        gaussian_window(0)
    with pytest.raises(ValueError, match="sigma_scale"):
        gaussian_window(8, sigma_scale=0.0)


# -- layout ---------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("shape", SIZES)
def test_tiles_cover_every_pixel_and_the_last_ones_lie_flush_with_the_border(
    shape: tuple[int, int], overlap: float
) -> None:
    origins = window_origins(shape, TILE, overlap)
    height, width = (max(s, TILE) for s in shape)
    assert (coverage(shape, overlap) >= 1).all()
    assert origins.min() == 0
    assert origins[:, 0].max() == height - TILE and origins[:, 1].max() == width - TILE
    assert len(np.unique(origins, axis=0)) == len(origins)  # no tile evaluated twice


def test_tiles_step_by_the_overlap_share_of_a_tile() -> None:
    ys = np.unique(window_origins((64, 100), TILE, 0.5)[:, 0])
    xs = np.unique(window_origins((64, 100), TILE, 0.5)[:, 1])
    np.testing.assert_array_equal(ys, [0, 8, 16, 24, 32, 40, 48])
    np.testing.assert_array_equal(xs, [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 84])
    assert len(window_origins((64, 64), TILE, 0.0)) == 16  # a mosaic: each pixel once
    assert (coverage((64, 64), 0.0) == 1).all()


def test_bad_overlap_or_tile_size_is_refused() -> None:
    model, image = pointwise_model(), plane((20, 20))
    for overlap in (1.0, -0.1):
        with pytest.raises(ValueError, match="overlap"):
            segment_plane(model, image, TILE, overlap)
    with pytest.raises(ValueError, match="tile_px"):
        segment_plane(model, image, 0)
    with pytest.raises(ValueError, match="batch_size"):
        segment_plane(model, image, TILE, batch_size=0)


# -- blending -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SIZES)
def test_probabilities_sum_to_one_at_every_pixel(shape: tuple[int, int]) -> None:
    probs = segment_plane(context_model(), plane(shape), TILE, 0.5)
    assert probs.shape == (3, *shape) and probs.dtype == np.float32
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("shape", SIZES)
def test_a_pointwise_model_gives_the_same_map_tiled_as_on_the_whole_plane(
    shape: tuple[int, int], overlap: float
) -> None:
    model, image = pointwise_model(), plane(shape, seed=2)
    probs = segment_plane(model, image, TILE, overlap, batch_size=3)
    np.testing.assert_allclose(probs, whole_plane(model, image), atol=1e-5)


@pytest.mark.parametrize("shape", SIZES)
def test_tiled_map_agrees_with_monais_sliding_window_for_a_pointwise_model(
    shape: tuple[int, int],
) -> None:
    model, image = pointwise_model(), plane(shape, seed=3)
    for overlap in (0.0, 0.5):
        probs = segment_plane(model, image, TILE, overlap)
        np.testing.assert_allclose(probs, monai_reference(model, image, overlap), atol=1e-5)


@pytest.mark.parametrize("shape", SIZES)
def test_tiled_map_agrees_with_monais_sliding_window_for_a_model_with_context(
    shape: tuple[int, int],
) -> None:
    # same tiles, window and padding as MONAI: equal for any model, not only pointwise ones
    model, image = context_model(), plane(shape, seed=4)
    for overlap in (0.0, 0.5):
        probs = segment_plane(model, image, TILE, overlap)
        np.testing.assert_allclose(probs, monai_reference(model, image, overlap), atol=1e-5)


def test_overlapping_tiles_blend_a_model_with_context_differently_from_a_mosaic() -> None:
    # the test above could pass with any layout MONAI shares; this one fails if the overlap
    # were ignored: a mosaic's tile borders see zero padding, overlapping tiles cover them
    model, image = context_model(), plane((48, 48), seed=5)
    mosaic = segment_plane(model, image, TILE, 0.0)
    blended = segment_plane(model, image, TILE, 0.5)
    assert np.abs(mosaic - blended).max() > 1e-3
    # a pixel near a mosaic seam is closer to the whole-plane answer when blended
    reference = whole_plane(model, image)
    seam = np.s_[:, 8:40, 15:17]
    assert (
        np.abs(blended[seam] - reference[seam]).mean()
        < np.abs(mosaic[seam] - reference[seam]).mean()
    )


def test_batch_size_does_not_change_the_map() -> None:
    model, image = context_model(), plane((45, 38), seed=6)
    one = segment_plane(model, image, TILE, 0.5, batch_size=1)
    np.testing.assert_allclose(
        segment_plane(model, image, TILE, 0.5, batch_size=64), one, atol=1e-6
    )


def test_a_model_left_in_training_mode_is_run_in_eval_mode_and_left_as_it_was() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Dropout(0.5)).train()
    image = plane((30, 30), seed=7)
    first = segment_plane(model, image, TILE)
    assert model.training
    np.testing.assert_array_equal(segment_plane(model, image, TILE), first)  # no dropout
    np.testing.assert_allclose(first, whole_plane(model.eval(), image), atol=1e-5)


def test_segmenting_does_not_change_the_thread_count() -> None:
    threads = torch.get_num_threads()
    segment_plane(pointwise_model(), plane((20, 20)), TILE)
    assert torch.get_num_threads() == threads


# -- bad input ------------------------------------------------------------------------------
def test_a_plane_with_the_wrong_channel_count_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"1 channels but the model takes 3"):
        segment_plane(pointwise_model(in_channels=3), plane((20, 20), channels=1), TILE)
    with pytest.raises(ValueError, match=r"3 channels but the model takes 1"):
        segment_plane(context_model(in_channels=1), plane((20, 20), channels=3), TILE)


def test_a_plane_without_a_channel_axis_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"expected one plane \(C, H, W\)"):
        segment_plane(pointwise_model(in_channels=1), plane((20, 20), channels=1)[0], TILE)


def test_a_model_that_is_not_a_segmenter_is_a_clear_error() -> None:
    classifier = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="segmentation model gives logits"):
        segment_plane(classifier, plane((20, 20)), TILE)


def test_channels_are_read_from_monai_networks_and_from_a_first_layer() -> None:
    from monai.networks.nets import UNet

    unet = UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=(4, 8), strides=(2,))
    assert model_in_channels(unet) == 3
    assert model_in_channels(context_model(in_channels=1)) == 1
    assert model_in_channels(nn.Identity()) is None


def test_a_monai_unet_segments_a_plane_of_any_size() -> None:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    unet = UNet(spatial_dims=2, in_channels=3, out_channels=3, channels=(4, 8), strides=(2,))
    for shape in ((16, 16), (23, 41), (7, 9)):
        probs = segment_plane(unet, plane(shape), TILE, 0.5)
        assert probs.shape == (3, *shape) and np.isfinite(probs).all()
        np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
