"""Grad-CAM core: target layers, maps, localization metrics, faithfulness and export."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from bonedamage.explain import gradcam as gc
from bonedamage.learn.models import Ensemble, build_cnn, build_resnet
from conftest import TINY_ARCH

SIZE, SQUARE = 64, 12


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_cnn(TINY_ARCH)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_resnet("resnet18")


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def _squares(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise tiles; odd tiles (class 1) get a bright square in a random quadrant (the mask)."""
    rng = np.random.default_rng(seed)
    tiles = rng.uniform(0.0, 0.5, (n, SIZE, SIZE)).astype(np.float32)
    labels = np.arange(n) % 2
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    half = SIZE // 2
    for i in np.flatnonzero(labels):
        qy, qx = rng.integers(0, 2, 2)
        y = qy * half + rng.integers(2, half - SQUARE - 2)
        x = qx * half + rng.integers(2, half - SQUARE - 2)
        masks[i, y : y + SQUARE, x : x + SQUARE] = True
    tiles[masks] += 0.5
    return tiles, labels, masks


@pytest.fixture(scope="module")
def square_model() -> nn.Module:
    """TINY CNN trained 40 steps to tell tiles with a bright square (class 1) from noise."""
    tiles, labels, _ = _squares(0, 256)
    rng = np.random.default_rng(0)
    model = _cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(tiles[:, None]), torch.from_numpy(labels)
    model.train()
    for _ in range(40):
        idx = torch.from_numpy(rng.choice(len(x), 32, replace=False))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ------------------------------------------------------------------- target layer


def test_target_layer_default_is_last_conv_block() -> None:
    cnn, res = _cnn(), _resnet()
    assert gc.target_layer(cnn) is cnn.features[-1]
    assert gc.target_layer(res) is res.layer4[-1]


def test_target_layer_override_by_name() -> None:
    cnn, res = _cnn(), _resnet()
    assert gc.target_layer(cnn, "features.0") is cnn.features[0]
    assert gc.target_layer(res, "layer3") is res.layer3
    assert gc.target_layer(res, "layer4.0.conv2") is res.layer4[0].conv2


@pytest.mark.parametrize("build", [_cnn, _resnet])
def test_target_layer_bad_name_is_clear(build) -> None:
    model = build()
    with pytest.raises(ValueError, match=r"no layer 'layer9\.1'") as err:
        gc.target_layer(model, "layer9.1")
    valid = "features.1" if isinstance(model, type(_cnn())) else "layer4.1"
    assert valid in str(err.value)
    with pytest.raises(ValueError, match="non-empty"):
        gc.target_layer(model, "")


# ----------------------------------------------------------------- compute_cams


@pytest.mark.parametrize("build", [_cnn, _resnet])
def test_compute_cams_shape_range_and_no_side_effects(build) -> None:
    model = build().train()
    tiles = np.random.default_rng(1).random((5, SIZE, SIZE), dtype=np.float32)
    hooks = _hooks(model)
    with torch.no_grad():  # the caller's no_grad must not break it, and stays in force
        cams = gc.compute_cams(model, tiles, batch_size=2)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert cams.shape == tiles.shape and cams.dtype == np.float32
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    peaks = cams.reshape(len(cams), -1).max(axis=1)  # scaled per tile: 1, or 0 if no evidence
    assert np.all((np.abs(peaks - 1.0) < 1e-5) | (peaks == 0.0))
    assert _hooks(model) == hooks == 0
    assert not gc.target_layer(model)._forward_hooks
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    np.testing.assert_allclose(gc.compute_cams(model, tiles, batch_size=64), cams, atol=1e-5)


def test_compute_cams_non_square_inference_mode_and_methods() -> None:
    model = _cnn()
    tiles = np.random.default_rng(2).random((3, 48, 64), dtype=np.float32)
    with torch.inference_mode():
        cams = gc.compute_cams(model, tiles, layer="features.0")
    assert cams.shape == (3, 48, 64)
    for method in gc.METHODS:
        out = gc.compute_cams(model, tiles, method=method)
        assert out.shape == (3, 48, 64) and out.dtype == np.float32
        assert 0.0 <= out.min() <= out.max() <= 1.0
    assert _hooks(model) == 0
    with pytest.raises(ValueError, match="unknown CAM method"):
        gc.compute_cams(model, tiles, method="gradcam3000")
    with pytest.raises(
        ValueError, match=r"must be \(n, h, w\) or \(n, channels, h, w\), got \(48, 64\)"
    ):
        gc.compute_cams(model, tiles[0])


def test_compute_cams_frozen_weights_and_deterministic(square_model: nn.Module) -> None:
    tiles, _, _ = _squares(3, 4)
    cams = gc.compute_cams(square_model, tiles)
    np.testing.assert_array_equal(gc.compute_cams(square_model, tiles), cams)
    for p in square_model.parameters():
        p.requires_grad_(False)
    try:
        np.testing.assert_allclose(gc.compute_cams(square_model, tiles), cams, atol=1e-6)
    finally:
        for p in square_model.parameters():
            p.requires_grad_(True)


def test_failed_probability_is_softmax_of_class_1() -> None:
    model = _cnn().train()
    tiles = np.random.default_rng(4).random((5, SIZE, SIZE), dtype=np.float32)
    probs = gc.failed_probability(model, tiles, batch_size=2)
    assert model.training
    with torch.no_grad():
        want = torch.softmax(model.eval()(torch.from_numpy(tiles[:, None])), 1)[:, 1].numpy()
    assert probs.shape == (5,) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, want, atol=1e-6)


# ------------------------------------------------------------------- localization


def test_localization_metrics_known_answers() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4, :4] = True  # a quarter of the tile
    cam = mask.astype(np.float32)
    assert gc.energy_ratio(cam, mask) == pytest.approx(4.0)
    assert gc.cam_iou(cam, mask) == pytest.approx(1.0)
    assert gc.cam_iou(cam, mask, threshold=0.5) == pytest.approx(1.0)
    uniform = gc.uniform_map(mask.shape)
    assert gc.energy_ratio(uniform, mask) == pytest.approx(1.0)
    assert gc.cam_iou(uniform, mask) == pytest.approx(0.25)  # ties keep the whole tile
    half = np.zeros((8, 8), dtype=np.float32)
    half[:4, :] = 1.0  # mask plus the same area outside
    assert gc.energy_ratio(half, mask) == pytest.approx(2.0)
    assert gc.cam_iou(half, mask, threshold=0.5) == pytest.approx(0.5)
    away = 1.0 - cam
    assert gc.energy_ratio(away, mask) == pytest.approx(0.0)
    assert gc.cam_iou(away, mask) == pytest.approx(0.0)
    empty = np.zeros_like(mask)
    assert math.isnan(gc.energy_ratio(cam, empty)) and math.isnan(gc.cam_iou(cam, empty))
    assert math.isnan(gc.energy_ratio(np.zeros((8, 8)), mask))
    with pytest.raises(ValueError, match="same shape"):
        gc.energy_ratio(cam, mask[:4])


def test_centre_bias_map() -> None:
    c = gc.centre_bias_map((9, 9))
    assert c.dtype == np.float32 and c[4, 4] == pytest.approx(1.0) and c.argmax() == 40
    np.testing.assert_allclose(c, c.T)
    np.testing.assert_allclose(c, c[::-1, ::-1])
    mask = np.zeros((9, 9), dtype=bool)
    mask[3:6, 3:6] = True
    assert gc.energy_ratio(c, mask) > 1.5  # it does favour the centre
    assert gc.cam_iou(c, mask) == pytest.approx(1.0)


def test_localization_summary_skips_empty_masks() -> None:
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[0, :4, :4] = True
    masks[2, 4:, 4:] = True
    cams = masks.astype(np.float32)
    cams[2] = 1.0 - cams[2]  # tile 2's map avoids its mask
    s = gc.localization_summary(cams, masks)
    assert s["n_tiles"] == 2
    assert s["cam_energy_ratio"] == pytest.approx((4.0 + 0.0) / 2)
    assert s["cam_iou"] == pytest.approx(0.5)
    assert s["uniform_energy_ratio"] == pytest.approx(1.0)
    assert s["uniform_iou"] == pytest.approx(0.25)
    assert set(s) == {
        "cam_energy_ratio",
        "cam_iou",
        "uniform_energy_ratio",
        "uniform_iou",
        "centre_energy_ratio",
        "centre_iou",
        "n_tiles",
    }
    none = gc.localization_summary(cams[1:2], masks[1:2])
    assert none["n_tiles"] == 0 and math.isnan(none["cam_energy_ratio"])


# --------------------------------------------------- alignment and faithfulness


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_cam_lights_up_the_square(square_model: nn.Module, method: str) -> None:
    tiles, labels, masks = _squares(1, 32)
    probs = gc.failed_probability(square_model, tiles)
    pos = labels == 1
    auc = (probs[pos][:, None] > probs[~pos][None, :]).mean()
    assert auc >= 0.95  # precondition: the model did learn the task
    s = gc.localization_summary(gc.compute_cams(square_model, tiles[pos], method), masks[pos])
    assert s["n_tiles"] == pos.sum()
    assert s["cam_energy_ratio"] > 1.5
    assert s["cam_energy_ratio"] > 2 * s["centre_energy_ratio"]
    assert s["cam_iou"] > 3 * s["uniform_iou"]
    # model-randomisation sanity check (Adebayo et al. 2018): a random net's maps already
    # follow bright edges a little (energy ratio ~2 here), training must do clearly better
    untrained = gc.compute_cams(_cnn(), tiles[pos], method)  # same init as square_model
    assert (
        s["cam_energy_ratio"]
        > 2 * gc.localization_summary(untrained, masks[pos])["cam_energy_ratio"]
    )


def test_an_ensemble_is_explained_through_every_member(square_model: nn.Module) -> None:
    members = [_cnn(), _cnn()]
    ensemble = Ensemble(members)
    assert gc.target_layers(ensemble) == [m.features[-1] for m in members]
    assert gc.target_layers(ensemble, "features.0") == [m.features[0] for m in members]
    assert gc.target_layers(members[0]) == [members[0].features[-1]]
    with pytest.raises(ValueError, match=r"no layer 'members\.0'"):
        gc.target_layers(ensemble, "members.0")
    # two copies of the trained model: the ensemble's maps still find the square
    twins = Ensemble([square_model, copy.deepcopy(square_model)]).eval()
    tiles, labels, masks = _squares(1, 32)
    pos = labels == 1
    cams = gc.compute_cams(twins, tiles[pos])
    assert cams.shape == tiles[pos].shape and 0.0 <= cams.min() <= cams.max() <= 1.0
    assert gc.localization_summary(cams, masks[pos])["cam_energy_ratio"] > 1.5
    assert _hooks(twins) == 0


def test_best_layers_scores_each_candidate_per_member(square_model: nn.Module) -> None:
    """best_layers: each network's energy ratio per named layer, as compute_cams and
    localization_summary give it, the highest chosen; names a network lacks skipped."""
    tiles, labels, masks = _squares(5, 24)
    tiles, masks = tiles[labels == 1], masks[labels == 1]
    other = _cnn()  # untrained: its own, different scores
    names = ["features.0", "features.1", "features.7"]

    def ratios(net: nn.Module) -> dict[str, float]:
        return {
            n: gc.localization_summary(gc.compute_cams(net, tiles, layer=n), masks)[
                "cam_energy_ratio"
            ]
            for n in names[:2]
        }

    expected = [ratios(square_model), ratios(other)]
    chosen, scores = gc.best_layers(Ensemble([square_model, other]), tiles, masks, names)
    assert scores == expected
    assert chosen == [max(r, key=r.__getitem__) for r in expected]
    assert gc.best_layers(square_model, tiles, masks, names) == (chosen[:1], expected[:1])
    with pytest.raises(ValueError, match=r"has none of the layers \['features.7'\]"):
        gc.best_layers(square_model, tiles, masks, ["features.7"])
    # the chosen modules go to compute_cams as a list: one per member, maps averaged
    ensemble = Ensemble([square_model, copy.deepcopy(square_model)])
    layer = [m.get_submodule("features.0") for m in ensemble.members]
    np.testing.assert_allclose(
        gc.compute_cams(ensemble, tiles, layer=layer),
        gc.compute_cams(ensemble, tiles, layer="features.0"),
        atol=1e-6,
    )


def test_faithfulness_prefers_the_real_map(square_model: nn.Module) -> None:
    tiles, labels, _ = _squares(1, 8)
    tiles = tiles[labels == 1]
    cams = gc.compute_cams(square_model, tiles)
    rng_state = torch.get_rng_state()
    real = gc.faithfulness(square_model, tiles, cams, percentiles=(25, 75))
    assert torch.equal(torch.get_rng_state(), rng_state)  # seeded privately
    inverted = gc.faithfulness(square_model, tiles, 1.0 - cams, percentiles=(25, 75))
    assert -0.5 <= inverted < 0.0 < 0.05 < real <= 0.5
    # deterministic, and a tile's score does not depend on the other tiles (seed + index)
    head = gc.faithfulness(square_model, tiles[:2], cams[:2], percentiles=(25, 75))
    tail = gc.faithfulness(square_model, tiles[2:], cams[2:], percentiles=(25, 75), seed=2)
    # (batched forward passes may differ from smaller batches in the last float32 bits)
    assert len(tiles) == 4 and (head + tail) / 2 == pytest.approx(real, abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        gc.faithfulness(square_model, tiles, cams[:2])


@pytest.mark.parametrize("model", ["square", "resnet"])
def test_faithfulness_equals_roadcombined_called_per_tile(
    square_model: nn.Module, model: str
) -> None:
    """Batching the model calls changes nothing: the library's metric, one tile at a time."""
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    net = square_model if model == "square" else _resnet()
    tiles = _squares(3, 4)[0][:, :32, :32]  # small tiles: the imputation dominates the cost
    cams = np.random.default_rng(4).random(tiles.shape).astype(np.float32)
    ranks = np.stack([gc._rank_map(c) for c in cams])
    percentiles = (30, 70)
    metric = ROADCombined(percentiles=list(percentiles))
    target = [ClassifierOutputSoftmaxTarget(gc.FAILED)]
    expected = []
    for i, (tile, rank) in enumerate(zip(tiles, ranks, strict=True)):
        torch.manual_seed(7 + i)
        with torch.no_grad():
            out = metric(torch.from_numpy(tile[None, None]), rank[None], target, net.eval())
        expected.append(float(np.asarray(out)[0]))
    got = gc.faithfulness(net, tiles, cams, percentiles=percentiles, seed=7)
    assert got == pytest.approx(float(np.mean(expected)), abs=1e-6)
    other_seed = gc.faithfulness(net, tiles, cams, percentiles=percentiles, seed=8)
    assert got != pytest.approx(other_seed, abs=1e-6)
    in_pairs = gc.faithfulness(net, tiles, cams, percentiles=percentiles, seed=7, batch_size=2)
    assert in_pairs == pytest.approx(got, abs=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        gc.faithfulness(net, tiles, cams, batch_size=0)


# ------------------------------------------------------------------------- export


def test_write_cam_tiff_round_trip(tmp_path) -> None:
    cam = np.random.default_rng(5).random((48, 64), dtype=np.float32)
    path = tmp_path / "sub" / "cam.tif"
    gc.write_cam_tiff(path, cam)
    back = tifffile.imread(path)
    assert back.dtype == np.float32 and back.shape == cam.shape
    np.testing.assert_array_equal(back, cam)
    assert sorted(p.name for p in path.parent.iterdir()) == ["cam.tif"]  # no temp left
    with pytest.raises(ValueError, match="2D"):
        gc.write_cam_tiff(tmp_path / "bad.tif", cam[None])


def _texts(fig) -> list[str]:
    """Every text a figure shows (titles, labels, ticks, notes)."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def _panels(fig) -> list:
    """The tile panels of an overlay figure (the axes holding images, not the colour bar)."""
    return [ax for ax in fig.axes if len(ax.images) == 2]


def test_overlay_grid_is_byte_identical(tmp_path) -> None:
    rng = np.random.default_rng(6)
    tiles = rng.random((5, 32, 32), dtype=np.float32)
    cams = rng.random((5, 32, 32), dtype=np.float32)
    titles = [f"p(failed) = 0.{i}" for i in range(5)]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    gc.overlay_grid(tiles, cams, titles, a, ncols=3, title="grid", pixel_um=20.0)
    gc.overlay_grid(tiles, cams, titles, b, ncols=3, title="grid", pixel_um=20.0)
    data = a.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data == b.read_bytes()
    assert b"Software" not in data
    gc.overlay_grid(tiles, cams, None, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes() != data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]
    with pytest.raises(ValueError, match="titles"):
        gc.overlay_grid(tiles, cams, titles[:2], tmp_path / "d.png")


def test_overlay_figure_names_the_map_the_panels_and_the_figure() -> None:
    rng = np.random.default_rng(7)
    tiles = rng.random((3, 32, 32), dtype=np.float32)
    cams = rng.random((3, 32, 32), dtype=np.float32)
    labels = ["p(failed) = 0.93", "p(failed) = 0.81", "p(failed) = 0.62"]
    fig = gc.overlay_figure(
        tiles, cams, labels, title="Grad-CAM · trabecular · model cnn · layer features.0",
        note="tp = failed tiles called failed", map_name="Grad-CAM++",
    )  # fmt: skip
    texts = _texts(fig)
    assert "Grad-CAM · trabecular · model cnn · layer features.0" in texts
    assert "tp = failed tiles called failed" in texts
    assert [ax.get_title() for ax in _panels(fig)] == labels
    (bar,) = [ax for ax in fig.axes if ax not in _panels(fig)]
    assert bar.get_ylabel().startswith("Grad-CAM++, 0-1")
    assert [t.get_text() for t in bar.get_yticklabels()] == ["0.0", "0.5", "1.0"]
    # always ncols columns: grids of the same settings have the same width
    assert fig.get_size_inches()[0] == gc.overlay_figure(tiles[:1], cams[:1]).get_size_inches()[0]


def test_the_bone_shows_through_the_map() -> None:
    """Grey tile first, then the map translucent in a perceptual colormap: under one and the
    same map value, bright bone renders brighter than a dark pore."""
    tiles = np.zeros((1, 32, 32), np.float32)
    tiles[:, :, :16] = 1.0  # bone on the left half
    cams = np.full((1, 32, 32), 0.7, np.float32)
    fig = gc.overlay_figure(tiles, cams, ["p(failed) = 0.50"])
    (ax,) = _panels(fig)
    grey, cam = ax.images
    assert grey.get_cmap().name == "gray" and cam.get_cmap().name in (
        "viridis", "inferno", "magma", "plasma", "cividis"
    )  # fmt: skip
    assert 0.2 <= cam.get_alpha() <= 0.6
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)
    x0, y0, x1, y1 = ax.get_window_extent().extents.round().astype(int)
    h = rgb.shape[0]
    panel = rgb[h - y1 + 2 : h - y0 - 2, x0 + 2 : x1 - 2].mean(axis=2)
    left, right = panel[:, : panel.shape[1] // 3], panel[:, -panel.shape[1] // 3 :]
    assert left.mean() > right.mean() + 60  # out of 255


def test_scale_bar_um_is_a_round_share_of_the_tile() -> None:
    assert gc.scale_bar_um(1280.0) == 200.0  # trabecular tiles: 64 px at 20 um
    assert gc.scale_bar_um(102.4) == 20.0  # cortical tiles: 64 px at 1.6 um
    assert gc.scale_bar_um(1000.0) == 200.0  # 500 would cover half the tile
    assert gc.scale_bar_um(3.0) == pytest.approx(0.5)
    for width in (0.0, -5.0, math.nan):
        with pytest.raises(ValueError, match="positive length"):
            gc.scale_bar_um(width)


def test_the_scale_bar_is_as_long_as_its_label_says() -> None:
    rng = np.random.default_rng(8)
    tiles, cams = rng.random((2, 2, 40, 40), dtype=np.float32)
    fig = gc.overlay_figure(tiles, cams, ["a", "b"], pixel_um=20.0)  # 800 um wide tiles
    first, second = _panels(fig)
    (bar,) = [p for p in first.patches if p.get_gid() == "scale-bar"]
    (label,) = [t for t in first.texts if t.get_gid() == "scale-bar-label"]
    assert label.get_text() == "200 µm"
    assert bar.get_width() == pytest.approx(200.0 / 20.0)  # pixels: the panel's data units
    assert bar.get_x() + bar.get_width() <= 40 - 0.5  # inside the tile
    assert not [p for p in second.patches if p.get_gid() == "scale-bar"]  # the first panel only
    bare = gc.overlay_figure(tiles, cams, ["a", "b"])
    assert not [p for ax in bare.axes for p in ax.patches if p.get_gid() == "scale-bar"]
    with pytest.raises(ValueError, match="pixel_um"):
        gc.overlay_figure(tiles, cams, None, pixel_um=0.0)


def test_no_tiles_still_make_a_figure_that_says_so(tmp_path) -> None:
    none = np.empty((0, 32, 32), np.float32)
    path = tmp_path / "fp.png"
    gc.overlay_grid(none, none, [], path, title="false positives", empty="no fp tiles")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = gc.overlay_figure(none, none, [], title="false positives", empty="no fp tiles")
    assert "no fp tiles" in _texts(fig) and "false positives" in _texts(fig)
    assert len(fig.axes) == 1 and not fig.axes[0].images  # a placeholder: no colour bar
    with pytest.raises(ValueError, match="maps for no tiles"):
        gc.overlay_figure(none, np.zeros((1, 32, 32), np.float32))


def test_select_by_outcome_hand_made() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1])
    probs = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.9, 0.1, 0.5])
    sel = gc.select_by_outcome(labels, probs, n_per_group=2)
    assert set(sel) == set(gc.OUTCOMES)
    assert sel["tp"].tolist() == [0, 6]  # 0.9, 0.9 (tie by index); 0.6 and 0.5 dropped
    assert sel["fp"].tolist() == [3]
    assert sel["tn"].tolist() == [4, 7]  # lowest probability first, tie by index
    assert sel["fn"].tolist() == [2, 8]  # 0.5 is not above the 0.5 threshold
    assert all(v.dtype == np.int64 for v in sel.values())
    every = gc.select_by_outcome(labels, probs, n_per_group=10, threshold=0.95)
    assert every["tp"].size == 0 and every["fn"].tolist() == [2, 8, 1, 0, 6]
    with pytest.raises(ValueError, match="0 \\(pristine\\) or 1"):
        gc.select_by_outcome(labels + 1, probs, 1)


def test_rank_map_breaks_ties_by_index() -> None:
    cam = np.array([[0.0, 0.5], [0.0, 0.0]], dtype=np.float32)
    ranks = gc._rank_map(cam)
    np.testing.assert_allclose(ranks, [[2 / 3, 1.0], [1 / 3, 0.0]], rtol=1e-6)
