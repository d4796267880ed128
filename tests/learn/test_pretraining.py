"""Pretraining of the ResNet backbone (learn/pretraining.py): the rotation task's labels,
SimSiam's views and loop, the pool of unlabelled tiles and the checks of pretrain_backbone."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from bonedamage.config import ConfigError
from bonedamage.data.tilestore import TileStore
from bonedamage.data.tiling import tile_dataset
from bonedamage.learn.datasets import Augment, TileDataset
from bonedamage.learn.models import pretrained_model
from bonedamage.learn.pretraining import (
    RotationDataset,
    TilePool,
    TwoViews,
    pretrain_backbone,
    simsiam,
)
from bonedamage.learn.train import TrainConfig

TILE_PX = 16  # the learning tests' tiles (learn_params)
SHAPES = Augment(flips=True, rot90=True)  # mirrors and quarter turns, intensities kept


class Tiles(Dataset):
    """Random (3, px, px) tiles, labelled by their position; remembers its epoch."""

    def __init__(self, n: int, px: int = TILE_PX, seed: int = 0) -> None:
        self.data = torch.rand(n, 3, px, px, generator=torch.Generator().manual_seed(seed))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.data[i], i


def pool_of(store: TileStore, positions: list[np.ndarray], augment: Augment | None = None):
    parts = [TileDataset(store, p, np.zeros(len(p), dtype=np.int64), augment) for p in positions]
    return TilePool(parts), parts


# -- the rotation task ---------------------------------------------------------------------


def test_a_rotation_label_is_the_quarter_turn_given_to_the_tile() -> None:
    tiles = Tiles(64)
    turned = RotationDataset(tiles, seed=5)
    labels = []
    for i in range(len(turned)):
        tile, k = turned[i]
        assert k in range(4) and tile.shape == tiles.data[i].shape
        assert torch.equal(torch.rot90(tile, -k, dims=(1, 2)), tiles.data[i])  # turned back
        assert torch.equal(tile, tiles.data[i]) == (k == 0)  # a turn changes a random tile
        labels.append(k)
    assert set(labels) == {0, 1, 2, 3}  # every class is seen


def test_rotation_labels_are_the_same_for_the_same_seed_epoch_and_item() -> None:
    def labels(data: RotationDataset) -> list[int]:
        return [data[i][1] for i in range(len(data))]

    tiles = Tiles(48)
    first = RotationDataset(tiles, seed=5)
    again = labels(first)
    assert again == labels(first) == labels(RotationDataset(Tiles(48), seed=5))
    assert labels(RotationDataset(tiles, seed=6)) != again
    first.set_epoch(1)
    assert tiles.epoch == 1  # passed on to the tiles (their augmentation draws)
    other = labels(first)
    assert other != again
    first.set_epoch(0)
    assert labels(first) == again
    assert [first[i][1] for i in reversed(range(48))] == again[::-1]  # by item, not by order


# -- SimSiam's views -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(learn_data: tuple[Path, Path]) -> TileStore:
    """The learning tests' 2.5-D tile store (read-only)."""
    return TileStore(learn_data[0])


def crop_offsets(view: torch.Tensor, tile: np.ndarray) -> list[tuple[int, int, int]]:
    """(symmetry, y, x) of every crop of a mirrored or turned ``tile`` equal to ``view``."""
    crop, found = view.shape[-1], []
    for s, (flip, k) in enumerate(itertools.product((False, True), range(4))):
        turned = np.rot90(tile[..., ::-1] if flip else tile, k, axes=(-2, -1))
        for y, x in itertools.product(range(tile.shape[-1] - crop + 1), repeat=2):
            if np.array_equal(turned[:, y : y + crop, x : x + crop], view.numpy()):
                found.append((s, y, x))
    return found


def test_two_views_are_two_crops_of_the_same_tile(store: TileStore) -> None:
    pool, _ = pool_of(store, [np.arange(0, 40, 2)])
    views = TwoViews(pool, SHAPES, crop=12, seed=3)
    placed = []
    for i in range(len(views)):
        a, b = views[i]
        tile = pool[i][0].numpy()
        assert a.shape == b.shape == (3, 12, 12) and a.dtype == torch.float32
        where_a, where_b = crop_offsets(a, tile), crop_offsets(b, tile)
        assert where_a and where_b, f"view of tile {i} is no crop of it"
        placed.append(not torch.equal(a, b))
    assert sum(placed) >= len(placed) - 2  # two draws: the crops (almost) always differ


def test_views_are_drawn_per_seed_epoch_and_item(store: TileStore) -> None:
    pool, parts = pool_of(store, [np.arange(8)])
    views = TwoViews(pool, SHAPES, 12, seed=3)

    def drawn(data: TwoViews) -> list[torch.Tensor]:
        return [torch.cat(data[i]) for i in range(len(data))]

    first = drawn(views)
    same = drawn(TwoViews(pool, views.augment, 12, seed=3))
    assert all(torch.equal(x, y) for x, y in zip(first, same, strict=True))
    views.set_epoch(1)
    assert parts[0].epoch == 0  # the pool's tiles are not augmented: only the views are drawn
    later = drawn(views)
    assert not any(torch.equal(x, y) for x, y in zip(first, later, strict=True))
    views.set_epoch(0)
    assert all(torch.equal(x, y) for x, y in zip(first, drawn(views), strict=True))


def test_views_of_the_whole_tile_and_no_larger(store: TileStore) -> None:
    pool, _ = pool_of(store, [np.arange(4)])
    still = Augment(flips=False, rot90=False)  # no augmentation
    a, b = TwoViews(pool, still, TILE_PX, seed=0)[2]  # and no room to move
    assert torch.equal(a, pool[2][0]) and torch.equal(b, pool[2][0])
    for crop in (TILE_PX + 1, 0):
        with pytest.raises(ValueError, match=rf"crop of {crop} px: .* tile size {TILE_PX}"):
            TwoViews(pool, SHAPES, crop, seed=0)


# -- the pool ------------------------------------------------------------------------------


def test_the_pool_joins_its_parts_and_passes_the_epoch_on(store: TileStore) -> None:
    pool, parts = pool_of(store, [np.arange(5), np.arange(30, 33)], Augment(noise=0.1))
    assert len(pool) == 8
    assert torch.equal(pool[6][0], parts[1][1][0]) and torch.equal(pool[0][0], parts[0][0][0])
    assert pool.planes.tolist() == [*parts[0].planes, *parts[1].planes]
    before = pool[6][0]
    pool.set_epoch(4)
    assert [p.epoch for p in parts] == [4, 4]
    assert not torch.equal(pool[6][0], before)  # the parts' augmentation of epoch 4


def test_an_empty_pool_is_refused(store: TileStore) -> None:
    for parts in ([], [TileDataset(store, np.arange(0), np.zeros(0, dtype=np.int64))]):
        with pytest.raises(ValueError, match="pool of pretraining tiles is empty"):
            TilePool(parts)


# -- SimSiam's loop ------------------------------------------------------------------------


def loop(**changes: Any) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "batch_size": 4, "device": "cpu", "threads": 1} | changes)


def test_simsiam_trains_the_backbone_and_reports_loss_and_spread(
    store: TileStore, learn_params: dict[str, Any]
) -> None:
    pool, _ = pool_of(store, [np.arange(8)])
    views = TwoViews(pool, Augment.from_params(learn_params["augment"]), 12, seed=0)
    torch.manual_seed(0)
    backbone = pretrained_model("resnet18", "imagenet", 3, 0)
    before = copy.deepcopy(backbone.state_dict())
    seen = []
    result = simsiam(backbone, views, loop(), learn_params["pretrain"]["simsiam"],
                     on_epoch=lambda epoch, metrics: seen.append((epoch, metrics)))  # fmt: skip
    assert math.isfinite(result.final_loss) and -1 <= result.final_loss <= 1
    assert [h["epoch"] for h in result.history] == [0] and len(seen) == 1
    row = result.history[0]
    assert row["train_loss"] == result.final_loss
    assert seen[0] == (0, {"train_loss": row["train_loss"], "z_std": row["z_std"]})
    assert 0 < row["z_std"] <= 1  # the spread of unit vectors' coordinates; 0: collapsed
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("layer4.") for k in changed)  # trained in place, to its last block
    assert next(backbone.parameters()).device.type == "cpu"


def test_simsiam_copes_with_a_last_batch_of_one(
    store: TileStore, learn_params: dict[str, Any]
) -> None:
    pool, _ = pool_of(store, [np.arange(5)])  # batches of 4 and 1
    views = TwoViews(pool, Augment(), 12, seed=0)
    backbone = pretrained_model("resnet18", "imagenet", 3, 0)
    before = copy.deepcopy(backbone.state_dict())
    result = simsiam(backbone, views, loop(), learn_params["pretrain"]["simsiam"])
    assert math.isfinite(result.final_loss) and result.final_loss != 0.0  # the 4 trained
    assert any(not torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


# -- pretrain_backbone's checks ------------------------------------------------------------


@pytest.fixture(scope="module")
def flat_tiles(
    learn_data: tuple[Path, Path], learn_params: dict[str, Any], tmp_path_factory
) -> Path:
    """The learning tests' scans tiled with one plane per tile (tile.context_um 0)."""
    raw = learn_data[0].parent / "raw"
    out = tmp_path_factory.mktemp("flat") / "tiles"
    tile_dataset(raw, out, {**learn_params["tile"], "context_um": 0.0}, progress=False)
    return out


def test_tiles_of_different_shapes_are_refused_before_training(
    flat_tiles: Path, learn_data: tuple[Path, Path], learn_params: dict[str, Any]
) -> None:
    """One backbone for every tissue: a 1-plane corpus does not go with 2.5-D tiles (a
    params error, which the CLI reports in one line)."""
    assert TileStore(flat_tiles).channels("cortical") == 1
    assert TileStore(learn_data[0]).channels("cortical") == 3
    tiles, splits = learn_data
    args = (["cortical", "trabecular"], "resnet18", "imagenet", learn_params["pretrain"], loop())
    with pytest.raises(ConfigError, match=r"tiles of different shapes .*corpus cortical 1 x 16 px"):
        pretrain_backbone("procedural", flat_tiles, tiles, splits, *args, learn_params["augment"])
    with pytest.raises(ConfigError, match=r"tiles of different shapes .*trabecular 1 x 16 px"):
        pretrain_backbone("simsiam", tiles, flat_tiles, splits, *args, learn_params["augment"])


def test_a_simsiam_crop_larger_than_the_tiles_is_refused(
    learn_data: tuple[Path, Path], learn_params: dict[str, Any]
) -> None:
    tiles, splits = learn_data
    settings = copy.deepcopy(learn_params["pretrain"])
    settings["simsiam"]["crop_px"] = 17  # the tiles: 16 px
    with pytest.raises(ConfigError, match=r"pretrain.simsiam.crop_px 17: .* 16 px"):
        pretrain_backbone(
            "simsiam", tiles, tiles, splits, ["cortical", "trabecular"], "resnet18", "imagenet",
            settings, loop(), learn_params["augment"],
        )  # fmt: skip


def test_an_unknown_method_is_refused(
    learn_data: tuple[Path, Path], learn_params: dict[str, Any]
) -> None:
    tiles, splits = learn_data
    with pytest.raises(ValueError, match=r"method 'pretext' is unknown: .*'rotation'"):
        pretrain_backbone(
            "pretext", tiles, tiles, splits, ["cortical"], "resnet18", "imagenet",
            learn_params["pretrain"], loop(), learn_params["augment"],
        )  # fmt: skip
