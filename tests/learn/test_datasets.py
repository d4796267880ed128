"""Training datasets and CT augmentation (learn/datasets.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonedamage.data.tilestore import TileStore
from bonedamage.learn.datasets import Augment, TileDataset, make_loader, split_rows


def test_split_rows_select_one_tissue_scheme_and_split(learn_data: tuple[Path, Path]) -> None:
    tiles, splits = learn_data
    store, table = TileStore(tiles), pd.read_parquet(splits)
    positions, labels = split_rows(store, table, "cortical", "grouped", "test")
    rows = store.index.iloc[positions]
    assert (rows["tissue"] == "cortical").all() and set(labels) == {0, 1}
    assert (rows["label"].to_numpy() == labels).all()
    chosen = table[
        (table.tissue == "cortical") & (table.scheme == "grouped") & (table.split == "test")
    ]
    assert set(rows["tile_id"]) == set(chosen["tile_id"])


def test_split_rows_refuses_tiles_missing_from_the_store(learn_data: tuple[Path, Path]) -> None:
    tiles, splits = learn_data
    table = pd.read_parquet(splits)
    table.loc[0, "tile_id"] = "nope"
    with pytest.raises(ValueError, match="not in the tile store"):
        split_rows(
            TileStore(tiles),
            table,
            table.loc[0, "tissue"],
            table.loc[0, "scheme"],
            table.loc[0, "split"],
        )


def test_augmentation_is_physical_and_seeded() -> None:
    tile = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    geometric = Augment(flips=True, rot90=True)
    out = geometric(tile, np.random.default_rng(1))
    # flips and quarter turns only move pixels: the same multiset of values
    assert np.array_equal(np.sort(out.ravel()), np.sort(tile.ravel()))
    assert np.array_equal(out, geometric(tile, np.random.default_rng(1)))
    jitter = Augment.from_params({"gain": 0.1, "offset": 0.05, "noise": 0.03}, strength=0.5)
    assert (jitter.gain, jitter.offset, jitter.noise) == pytest.approx((0.05, 0.025, 0.015))
    assert np.abs(jitter(tile, np.random.default_rng(2)) - tile).max() < 0.2
    assert (
        Augment.from_params({"noise": 0.03}, strength=0.0)(tile, np.random.default_rng(0)).tolist()
        == tile.tolist()
    )


def test_every_channel_of_a_25d_tile_gets_the_same_transform() -> None:
    rng = np.random.default_rng(1)
    planes = rng.random((3, 16, 16), dtype=np.float32)
    augment = Augment(flips=True, rot90=True)
    for seed in range(8):
        stacked = augment(planes, np.random.default_rng(seed), "axial")
        for c in range(3):
            alone = augment(planes[c], np.random.default_rng(seed), "axial")
            np.testing.assert_array_equal(stacked[c], alone)


def test_quarter_turns_only_for_planes_normal_to_the_load_axis() -> None:
    tile = np.arange(64, dtype=np.float32).reshape(8, 8)  # no symmetry: every pose differs
    aug = Augment.from_params({"flips": True, "rot90": True, "rot90_planes": ["axial"]})
    assert aug.rot90_planes == ("axial",) and aug.rotates("axial")
    assert not aug.rotates("coronal") and not aug.rotates(None)
    poses = {
        plane: {aug(tile, np.random.default_rng(s), plane).tobytes() for s in range(64)}
        for plane in ("axial", "coronal", "sagittal")
    }
    # the 8 poses of the square for axial tiles; only the mirror image where z is a row axis
    assert len(poses["axial"]) == 8
    mirror = {tile.tobytes(), np.ascontiguousarray(tile[:, ::-1]).tobytes()}
    assert poses["coronal"] == poses["sagittal"] == mirror
    # no plane list: every plane turns, as before
    assert Augment(flips=False, rot90=True).rotates("coronal")


def test_dataset_turns_tiles_by_their_plane(learn_data: tuple[Path, Path]) -> None:
    tiles, splits = learn_data
    store, table = TileStore(tiles), pd.read_parquet(splits)
    planes = {}
    for tissue in ("cortical", "trabecular"):
        positions, labels = split_rows(store, table, tissue, "grouped", "train")
        plane = planes[tissue] = store.index["plane"].iloc[positions[0]]
        aug = Augment(flips=True, rot90=True, rot90_planes=("axial",))
        raw = TileDataset(store, positions, labels)
        turned = 0
        for epoch in range(6):
            ds = TileDataset(store, positions, labels, aug, 5)
            ds.set_epoch(epoch)
            x, r = ds[0][0][0].numpy(), raw[0][0][0].numpy()
            assert np.array_equal(np.sort(x.ravel()), np.sort(r.ravel()))
            turned += not (np.array_equal(x, r) or np.array_equal(x, r[:, ::-1]))
        assert (turned > 0) == (plane == "axial"), (tissue, plane)
    assert "axial" in planes.values() and set(planes.values()) != {"axial"}  # both kinds seen


def test_dataset_items_and_epochs(learn_data: tuple[Path, Path]) -> None:
    tiles, splits = learn_data
    store, table = TileStore(tiles), pd.read_parquet(splits)
    positions, labels = split_rows(store, table, "trabecular", "grouped", "train")
    ds = TileDataset(store, positions, labels, Augment(flips=True, rot90=True, noise=0.01), 7)
    x, y = ds[3]
    # the default params cut 2.5-D tiles: the tiled plane and its two neighbours
    assert x.shape == (3, 16, 16) and x.dtype.is_floating_point and y == labels[3]
    again = TileDataset(store, positions, labels, ds.augment, 7)[3][0]
    assert x.equal(again)  # the same item of the same epoch is the same tile
    ds.set_epoch(1)
    assert not ds[3][0].equal(x)
    batches = [b[1].tolist() for b in make_loader(ds, 16, shuffle=True, seed=3)]
    assert batches == [b[1].tolist() for b in make_loader(ds, 16, shuffle=True, seed=3)]
