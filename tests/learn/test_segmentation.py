"""Damage segmentation (learn/segmentation.py): the classes and their label values, the
augmentation that moves tile and label map together, the U-Net's per-pixel probabilities,
the damage Dice, training (it learns, keeps the best epoch, stops early, reproduces) and the
saved model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bonedamage.learn.checkpoint import save_checkpoint
from bonedamage.learn.datasets import Augment
from bonedamage.learn.segmentation import (
    KIND,
    SegDataset,
    build_segmenter,
    class_names,
    damage_dice,
    fit_segmenter,
    load_segmenter,
    predict_probs,
    to_classes,
)
from bonedamage.learn.train import seed_everything

ARCH = {"channels": [8, 16], "strides": [2], "num_res_units": 0, "dropout": 0.0}
FIT = {"loss": "dice_ce", "batch_size": 16, "epochs": 6, "patience": 6, "lr": 1e-2}
FIT["weight_decay"] = 0.0
GEOMETRY_ONLY = Augment(flips=True, rot90=True, gain=0.0, offset=0.0, noise=0.0)


def _label_maps(n: int, seed: int = 0, px: int = 8) -> np.ndarray:
    """Random class maps (values 0-3): no symmetry, so every flip or turn shows."""
    return np.random.default_rng(seed).integers(0, 4, (n, px, px)).astype(np.uint8)


def _dihedral(a: np.ndarray) -> list[np.ndarray]:
    """The 8 mirror images and quarter turns of a 2-D map (index 0: the map itself)."""
    turns = [np.rot90(a, k) for k in range(4)]
    return turns + [t[:, ::-1] for t in turns]


def _which(moved: np.ndarray, original: np.ndarray) -> int:
    """Which of :func:`_dihedral`'s transforms of ``original`` ``moved`` is (-1: none)."""
    for index, candidate in enumerate(_dihedral(original)):
        if np.array_equal(moved, candidate):
            return index
    return -1


def _lines(n: int, seed: int, px: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Noise tiles (n, 1, px, px) with 1-2 bright one-pixel lines, the lines class 1."""
    rng = np.random.default_rng(seed)
    tiles = rng.uniform(0.0, 0.5, (n, px, px)).astype(np.float32)
    labels = np.zeros((n, px, px), np.uint8)
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            j = rng.integers(1, px - 1)
            if rng.random() < 0.5:
                labels[i, j, :] = 1
            else:
                labels[i, :, j] = 1
    tiles[labels == 1] += 0.5
    return tiles[:, None], labels


TRAIN, VAL = _lines(64, 0), _lines(32, 1)


def _fit(seed: int, val=VAL, snapshots: list | None = None, on_epoch=None, **cfg):
    """A tiny U-Net (seeded) fitted on the lines; (model, fit). ``snapshots`` receives the
    weights after every epoch."""
    seed_everything(seed, 1)
    model = build_segmenter(ARCH, 1, 2)
    train = SegDataset(*TRAIN, ["axial"] * len(TRAIN[0]), GEOMETRY_ONLY, seed=seed)

    def epoch_done(epoch: int, metrics: dict) -> None:
        if snapshots is not None:
            snapshots.append(_state(model))
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    return model, fit_segmenter(model, train, val, {**FIT, **cfg}, seed=seed, on_epoch=epoch_done)


def _val_dice(model: torch.nn.Module, val=VAL) -> float:
    return damage_dice(predict_probs(model, val[0]).argmax(1), val[1], 2)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------- classes


def test_class_names_are_background_then_the_damage_kinds_in_params_order() -> None:
    assert class_names(["fracture", "buckled"]) == ["background", "fracture", "buckled"]
    assert class_names(("buckled", "microcrack")) == ["background", "buckled", "microcrack"]


@pytest.mark.parametrize(
    "kinds", [["crack"], ["fracture", "none"], ["background"], [], ()], ids=repr
)
def test_class_names_refuses_unknown_or_no_damage_kinds(kinds) -> None:
    with pytest.raises(ValueError, match=r"choose one or more of .*microcrack") as err:
        class_names(kinds)
    assert f"damage kinds {list(kinds)}" in str(err.value)


def test_class_names_refuses_a_damage_kind_named_twice() -> None:
    with pytest.raises(ValueError, match="fracture"):
        class_names(["fracture", "buckled", "fracture"])


def test_to_classes_maps_label_values_to_the_class_indices() -> None:
    labels = np.array([[[0, 2], [3, 0]], [[3, 3], [2, 0]]], np.uint8)
    got = to_classes(labels, ["background", "fracture", "buckled"])
    assert got.dtype == np.uint8
    assert got.tolist() == [[[0, 1], [2, 0]], [[2, 2], [1, 0]]]
    # the index is the place in the class list, not the label value
    swapped = to_classes(labels, ["background", "buckled", "fracture"])
    assert swapped.tolist() == [[[0, 2], [1, 0]], [[1, 1], [2, 0]]]
    cortical = to_classes(np.array([[1, 2, 0]], np.uint8), ["background", "microcrack", "fracture"])
    assert cortical.tolist() == [[1, 2, 0]]


def test_to_classes_refuses_a_damage_kind_that_is_not_a_class_and_names_it() -> None:
    labels = np.array([[0, 2], [1, 3]], np.uint8)  # 1: microcrack
    with pytest.raises(ValueError, match=r"damage kind\(s\) \['microcrack'\]"):
        to_classes(labels, ["background", "fracture", "buckled"])
    with pytest.raises(ValueError, match=r"\['7'\]"):  # a value no damage kind has
        to_classes(np.array([[0, 7]], np.uint8), ["background", "fracture"])


# --------------------------------------------------------------------- SegDataset


def test_flips_and_quarter_turns_move_tile_and_labels_together() -> None:
    """A tile whose every channel equals its label map stays equal to it, whatever the
    augmentation does; and it does mirror and turn (all 8 of the square's symmetries)."""
    labels = _label_maps(16)
    tiles = np.repeat(labels[:, None].astype(np.float32), 3, axis=1)
    data = SegDataset(tiles, labels, ["axial"] * len(labels), GEOMETRY_ONLY, seed=1)
    seen = set()
    for epoch in range(4):
        data.set_epoch(epoch)
        for i in range(len(data)):
            x, y = data[i]
            assert x.shape == (3, 8, 8) and x.dtype == torch.float32
            assert y.shape == (1, 8, 8) and y.dtype == torch.int64
            for channel in x:
                assert torch.equal(channel, y[0].float())
            moved = _which(y[0].numpy(), labels[i])
            assert moved >= 0, "the label map is not a mirror image or turn of the original"
            seen.add(moved)
    assert seen == set(range(8))


def test_intensity_jitter_changes_the_tile_only() -> None:
    """With gain, offset and noise on, the labels stay integer classes in step with the
    tile's geometry (the tile holds 10 x the labels, plus less than 5 of jitter)."""
    labels = _label_maps(12, seed=2)
    tiles = 10.0 * labels[:, None].astype(np.float32)
    augment = Augment(flips=True, rot90=True, gain=0.1, offset=0.05, noise=0.03)
    data = SegDataset(tiles, labels, ["axial"] * len(labels), augment, seed=4)
    jittered = False
    for i in range(len(data)):
        x, y = data[i]
        assert torch.equal(torch.round(x[0] / 10).long(), y[0])
        assert _which(y[0].numpy(), labels[i]) >= 0
        jittered |= not torch.equal(x[0], 10.0 * y[0].float())
    assert jittered


def test_coronal_tiles_are_mirrored_but_never_turned_when_rot90_planes_is_axial() -> None:
    labels = _label_maps(24, seed=3)
    planes = ["axial", "coronal"] * 12
    augment = Augment(flips=True, rot90=True, rot90_planes=("axial",))
    data = SegDataset(labels[:, None].astype(np.float32), labels, planes, augment, seed=0)
    moves: dict[str, set[int]] = {"axial": set(), "coronal": set()}
    for epoch in range(4):
        data.set_epoch(epoch)
        for i in range(len(data)):
            moves[planes[i]].add(_which(data[i][1][0].numpy(), labels[i]))
    assert moves["coronal"] == {0, 4}  # itself or its mirror image
    assert moves["axial"] - {0, 4}  # quarter turns too


def test_draws_depend_only_on_seed_epoch_and_item() -> None:
    labels = _label_maps(10, seed=5)
    tiles = np.random.default_rng(5).random((10, 3, 8, 8), dtype=np.float32)
    augment = Augment(flips=True, rot90=True, gain=0.1, offset=0.05, noise=0.03)

    def items(seed: int, epoch: int, order=range(10)) -> dict[int, tuple]:
        data = SegDataset(tiles, labels, ["axial"] * 10, augment, seed=seed)
        data.set_epoch(epoch)
        return {i: data[i] for i in order}

    def equal(a: dict, b: dict) -> bool:
        return all(torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]) for i in a)

    first = items(7, 1)
    assert equal(first, items(7, 1, order=reversed(range(10))))  # any reading order
    assert not equal(first, items(7, 2))
    assert not equal(first, items(8, 1))


def test_without_augmentation_the_pairs_are_the_inputs_with_a_channel_axis() -> None:
    labels = _label_maps(3, seed=6)
    tiles = np.random.default_rng(6).random((3, 8, 8), dtype=np.float32)  # one-plane tiles
    data = SegDataset(tiles, labels, ["coronal"] * 3)
    for i in range(3):
        x, y = data[i]
        assert x.shape == (1, 8, 8) and np.array_equal(x[0].numpy(), tiles[i])
        assert y.shape == (1, 8, 8) and np.array_equal(y[0].numpy(), labels[i])
    with pytest.raises(ValueError, match="differ in length"):
        SegDataset(tiles, labels[:2], ["coronal"] * 3)


# ----------------------------------------------------------- predictions and Dice


def test_predict_probs_are_a_distribution_over_the_classes_of_every_pixel() -> None:
    torch.manual_seed(0)
    model = build_segmenter(ARCH, 3, 3)
    tiles = np.random.default_rng(0).random((5, 3, 16, 16), dtype=np.float32)
    prob = predict_probs(model, tiles, batch_size=2)
    assert prob.shape == (5, 3, 16, 16) and prob.dtype == np.float32
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    np.testing.assert_allclose(prob.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(predict_probs(model, tiles), prob, atol=1e-6)  # one batch
    one_plane = build_segmenter(ARCH, 1, 2)
    assert predict_probs(one_plane, tiles[:, 0]).shape == (5, 2, 16, 16)


def test_damage_dice_is_the_pooled_dice_averaged_over_the_damage_classes() -> None:
    truth = np.zeros((2, 4, 4), np.uint8)
    pred = np.zeros_like(truth)
    truth[0, 0, :2] = 1
    truth[1, 2, 2] = 1
    pred[0, 0, 1:3] = 1
    pred[1, 2, 2] = 1
    # class 1, pooled over both tiles: 3 true, 3 predicted, 2 shared -> 2 * 2 / 6
    # class 2 absent from both: 1; background is not counted
    assert damage_dice(pred, truth, 3) == pytest.approx((2 / 3 + 1.0) / 2)
    pred[1, 3, 3] = 2  # class 2 predicted where there is none: 0
    assert damage_dice(pred, truth, 3) == pytest.approx((2 / 3 + 0.0) / 2)
    assert damage_dice(truth, truth, 3) == 1.0
    assert damage_dice(np.zeros_like(truth), truth, 2) == 0.0


# ----------------------------------------------------------------------- training


def test_fit_segmenter_learns_bright_lines_and_hands_back_its_best_epoch() -> None:
    seed_everything(3, 1)
    untrained = _val_dice(build_segmenter(ARCH, 1, 2))
    model, fit = _fit(3)
    scores = [row["val_dice_damage"] for row in fit.history]
    assert fit.best_score == max(scores) == scores[fit.best_epoch]
    assert fit.best_score > 0.7 and fit.best_score > untrained + 0.4
    assert _val_dice(model) == pytest.approx(fit.best_score)  # the model holds those weights
    assert fit.history[-1]["train_loss"] < fit.history[0]["train_loss"]
    assert [row["epoch"] for row in fit.history] == list(range(FIT["epochs"]))
    assert fit.seconds > 0


def test_fit_segmenter_keeps_the_best_epochs_weights_not_the_last() -> None:
    """Scored against the inverse of the lines, the more it learns the worse it scores:
    the best epoch is an early one, and its weights are the ones handed back."""
    inverse = (VAL[0], 1 - VAL[1])
    snapshots: list[dict[str, torch.Tensor]] = []
    model, fit = _fit(3, val=inverse, snapshots=snapshots)
    assert len(snapshots) == len(fit.history) == FIT["epochs"]
    assert fit.best_epoch < len(fit.history) - 1  # the test needs a best epoch before the last
    assert _same(_state(model), snapshots[fit.best_epoch])
    assert _same(fit.state_dict, snapshots[fit.best_epoch])
    assert not _same(_state(model), snapshots[-1])
    assert _val_dice(model, inverse) == pytest.approx(fit.best_score)


@pytest.mark.parametrize("patience", [1, 2])
def test_fit_segmenter_stops_after_patience_epochs_without_improvement(patience: int) -> None:
    seen: list[int] = []
    _, fit = _fit(3, lr=0.0, epochs=10, patience=patience, on_epoch=lambda e, m: seen.append(e))
    assert len(fit.history) == patience + 1  # epoch 0 is the best, then `patience` no better
    assert seen == list(range(patience + 1))
    assert fit.best_epoch == 0


def test_fit_segmenter_is_bit_for_bit_reproducible_on_the_cpu() -> None:
    model_a, a = _fit(5, epochs=3)
    model_b, b = _fit(5, epochs=3)
    assert a.history == b.history and a.best_epoch == b.best_epoch
    assert _same(a.state_dict, b.state_dict)
    assert _same(_state(model_a), _state(model_b))
    _, c = _fit(6, epochs=3)
    assert not _same(a.state_dict, c.state_dict)


def test_make_loss_refuses_an_unknown_loss() -> None:
    from bonedamage.learn.segmentation import make_loss

    with pytest.raises(ValueError, match=r"loss 'dice' is unknown.*dice_ce"):
        make_loss("dice")


# -------------------------------------------------------------------- saved model


def _meta(kind: str = KIND) -> dict:
    classes = ["background", "fracture", "buckled"]
    return {"kind": kind, "arch": ARCH, "in_channels": 3, "classes": classes, "tile_px": 16}


def test_load_segmenter_round_trips_a_saved_model_and_its_sidecar(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = build_segmenter(ARCH, 3, 3)
    path = tmp_path / "seg.pt"
    save_checkpoint(path, model, _meta())
    loaded, meta = load_segmenter(path)
    assert meta == json.loads(json.dumps(_meta())) and meta["kind"] == "segmenter"
    assert not loaded.training
    assert _same(_state(loaded), _state(model))
    tiles = np.random.default_rng(2).random((2, 3, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(predict_probs(loaded, tiles), predict_probs(model, tiles))


def test_load_segmenter_refuses_a_sidecar_of_another_kind(tmp_path: Path) -> None:
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, build_segmenter(ARCH, 3, 3), _meta("cnn"))
    with pytest.raises(ValueError, match=r"cnn\.pt: not a segmentation model \(kind 'cnn'\)"):
        load_segmenter(path)


@pytest.mark.parametrize("kind", ["dice_ce", "dice_focal"])
def test_both_losses_take_one_weight_per_damage_class_and_weigh_it(kind: str) -> None:
    """A weight per damage class (params segment.class_weights) works with either loss,
    and a heavier class costs more when it is missed."""
    from bonedamage.learn.segmentation import make_loss

    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[0, 0, 2, :] = 1  # a thin crack of class 1, missed by the prediction below
    target[0, 0, 5:7, :] = 2
    logits = torch.zeros(1, 3, 8, 8)
    logits[0, 0] = 4.0  # background everywhere
    logits[0, 2, 5:7, :] = 8.0  # class 2 found
    equal = float(make_loss(kind, [1.0, 1.0])(logits, target))
    heavy = float(make_loss(kind, [10.0, 1.0])(logits, target))
    assert heavy > equal
    assert float(make_loss(kind)(logits, target)) == pytest.approx(equal, rel=1e-5)
