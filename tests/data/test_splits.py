"""Specimen-grouped and leaky splits (data/splits.py) on tile indexes made here."""

from __future__ import annotations

import pandas as pd
import pytest

from bonedamage.data.splits import SplitError, make_splits, split_counts


def tile_index(specimens: int = 8, tiles_per_scan: int = 30) -> pd.DataFrame:
    rows = []
    for tissue in ("cortical", "trabecular"):
        for s in range(specimens):
            for state, label in (("pristine", 0), ("failed", 1), ("intermediate", -1)):
                for t in range(tiles_per_scan):
                    rows.append(
                        {
                            "tile_id": f"{tissue}-{s}-{state}/{t}",
                            "specimen_id": f"{tissue}-{s:02d}",
                            "tissue": tissue,
                            "state": state,
                            "label": label,
                        }
                    )
    return pd.DataFrame(rows)


CFG = {"seed": 7, "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}}


def test_no_specimen_in_two_grouped_splits_and_both_classes_everywhere() -> None:
    splits = make_splits(tile_index(), CFG)
    grouped = splits[splits.scheme == "grouped"]
    assert grouped.groupby("specimen_id")["split"].nunique().max() == 1
    for _, group in grouped.groupby(["tissue", "split"]):
        assert set(group["label"]) == {0, 1}
    per_tissue = grouped.groupby(["tissue", "split"])["specimen_id"].nunique().unstack()
    assert (per_tissue[["train", "val", "test"]].to_numpy() == [[4, 2, 2], [4, 2, 2]]).all()


def test_intermediate_tiles_are_not_split() -> None:
    splits = make_splits(tile_index(), CFG)
    assert set(splits["label"]) == {0, 1}
    assert len(splits) == 2 * 2 * 8 * 2 * 30  # schemes x tissues x specimens x states x tiles


def test_leaky_scheme_mixes_specimens_across_splits() -> None:
    splits = make_splits(tile_index(), CFG)
    leaky = splits[splits.scheme == "leaky"]
    assert leaky.groupby("specimen_id")["split"].nunique().min() > 1
    share = leaky["split"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.6, abs=0.02)


def test_splits_are_deterministic_and_seeded() -> None:
    a, b = make_splits(tile_index(), CFG), make_splits(tile_index(), CFG)
    assert a.equals(b)
    c = make_splits(tile_index(), {**CFG, "seed": 8})
    assert not a.equals(c)


def test_too_few_specimens_is_an_error() -> None:
    with pytest.raises(SplitError, match="at least 3"):
        make_splits(tile_index(specimens=2), CFG)


def test_bad_fractions_are_an_error() -> None:
    with pytest.raises(SplitError, match="fractions"):
        make_splits(tile_index(), {**CFG, "fractions": {"train": 1.0, "test": 0.0}})


def test_summary_counts() -> None:
    s = split_counts(make_splits(tile_index(), CFG))
    assert s["grouped"]["cortical"]["test"] == {"specimens": 2, "pristine": 60, "failed": 60}
