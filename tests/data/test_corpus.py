"""The pretraining corpus' configuration and classes (data/corpus.py) and the generator's
``first_index`` (data/synth/generate.py), which keeps the corpus' specimens off the dataset's."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bonedamage.config import ConfigError
from bonedamage.data.corpus import corpus_synth_config, corpus_tile_config, holdout, scan_classes
from bonedamage.data.synth.generate import generate_dataset
from bonedamage.data.volume import open_volume, sha256_file
from conftest import small_synth

TISSUES = ("cortical", "trabecular")


def a_corpus(**changes: Any) -> dict[str, Any]:
    corpus = {
        "specimens_per_tissue": 5,
        "first_specimen": 40,
        "shape": {"cortical": [24, 48, 40], "trabecular": [64, 56, 72]},
        "slice_stride": 3,
    }
    return corpus | changes


@pytest.mark.parametrize("first", [0, 15])
def test_a_corpus_overlapping_the_datasets_generator_indices_is_refused(
    params: dict[str, Any], first: int
) -> None:
    synth = {**params["synth"], "specimens_per_tissue": 16}
    with pytest.raises(ConfigError) as err:
        corpus_synth_config(synth, a_corpus(first_specimen=first))
    message = str(err.value)
    assert message.startswith(f"pretrain.corpus.first_specimen {first}: must be at least")
    assert "synth.specimens_per_tissue (16)" in message
    assert corpus_synth_config(synth, a_corpus(first_specimen=16))  # the first one free


def test_the_corpus_keeps_the_synth_physics_with_its_own_count_and_shapes(
    params: dict[str, Any],
) -> None:
    synth = copy.deepcopy(params["synth"])
    before = copy.deepcopy(synth)
    cfg = corpus_synth_config(synth, a_corpus())
    assert synth == before  # the dataset's params are not touched
    assert cfg["specimens_per_tissue"] == 5
    for tissue in TISSUES:
        assert cfg[tissue]["shape"] == a_corpus()["shape"][tissue]
        same = {k: v for k, v in cfg[tissue].items() if k != "shape"}
        assert same == {k: v for k, v in synth[tissue].items() if k != "shape"}
    assert {k: v for k, v in cfg.items() if k not in (*TISSUES, "specimens_per_tissue")} == {
        k: v for k, v in synth.items() if k not in (*TISSUES, "specimens_per_tissue")
    }  # seed, load steps, imaging, dtype, workers: all the dataset's
    cfg["cortical"]["failure"]["crack_density_median_per_mm3"] = -1
    assert synth == before  # a deep copy: changing the corpus' cannot reach the dataset's


def test_the_corpus_tiling_is_the_datasets_at_its_own_slice_stride(
    params: dict[str, Any],
) -> None:
    tile = copy.deepcopy(params["tile"])
    before = copy.deepcopy(tile)
    cfg = corpus_tile_config(tile, a_corpus(slice_stride=3))
    assert tile == before and tile["slice_stride"] != 3
    assert cfg == {**before, "slice_stride": 3}
    cfg["tile_um"]["cortical"] = 1.0
    assert tile == before  # a deep copy


def test_each_scan_is_one_class_of_the_procedural_task() -> None:
    scans = ["t-02-1-failed", "c-01-0-pristine", "t-02-1-failed", "t-02-0-pristine"]
    index = pd.DataFrame({"scan_id": [*scans, "c-01-0-pristine", "c-01-0-pristine"]})
    classes, names = scan_classes(index)
    assert classes.dtype == np.int64 and len(classes) == len(index)
    assert sorted(names) == sorted(set(scans)) and len(names) == 3
    assert [names[c] for c in classes] == index["scan_id"].tolist()  # a tile's class: its scan


@pytest.mark.parametrize(
    ("n", "fraction", "held"),
    [(100, 0.1, 10), (10, 0.25, 2), (2, 0.01, 1), (3, 0.99, 2), (50, 0.5, 25)],
)
def test_holdout_takes_its_fraction_and_leaves_at_least_one_on_each_side(
    n: int, fraction: float, held: int
) -> None:
    mask = holdout(n, fraction, seed=7)
    assert mask.dtype == bool and mask.shape == (n,)
    assert mask.sum() == held and 1 <= held <= n - 1


def test_holdout_is_seeded() -> None:
    first = holdout(200, 0.2, seed=3)
    assert np.array_equal(first, holdout(200, 0.2, seed=3))
    assert not np.array_equal(first, holdout(200, 0.2, seed=4))
    assert not np.array_equal(first[:40], np.ones(40, dtype=bool))  # drawn, not the first ones
    with pytest.raises(ValueError, match="1 tiles: at least 2"):
        holdout(1, 0.5, seed=3)


def test_generating_from_a_later_index_gives_other_specimens_than_the_datasets(
    params: dict[str, Any], tmp_path: Path
) -> None:
    """Specimens ``first_index`` + 1 on: the specimens a longer dataset would have at those
    indices (the seed is the index), never the dataset's own specimens 1, 2, ..."""
    cfg = small_synth(params, specimens_per_tissue=2, load_steps=[0.0, 1.0])
    later = generate_dataset(cfg, tmp_path / "later", progress=False, first_index=3)
    dataset = generate_dataset(cfg, tmp_path / "dataset", progress=False)
    assert sorted(set(later["specimen_id"])) == [
        "cortical-04", "cortical-05", "trabecular-04", "trabecular-05",
    ]  # fmt: skip
    assert sorted(set(dataset["specimen_id"])) == [
        "cortical-01", "cortical-02", "trabecular-01", "trabecular-02",
    ]  # fmt: skip
    assert not set(later["sha256"]) & set(dataset["sha256"])  # no scan of the dataset again
    for row in later.itertuples():
        assert sha256_file(tmp_path / "later" / row.path) == row.sha256
        with open_volume(tmp_path / "later" / row.path) as vol:
            assert vol.shape == tuple(cfg[row.tissue]["shape"])
    longer = generate_dataset(
        {**cfg, "specimens_per_tissue": 4},
        tmp_path / "longer",
        progress=False,
        tissues=["cortical"],
    )
    fourth = longer.loc[longer["specimen_id"] == "cortical-04", "sha256"].tolist()
    assert fourth == later.loc[later["specimen_id"] == "cortical-04", "sha256"].tolist()
