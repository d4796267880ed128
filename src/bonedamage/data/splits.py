"""The ``split`` stage: specimen-grouped train/val/test splits, and a leaky alternative.

All tiles of a specimen (its pristine and failed scans alike) land in one split: the
study this project follows names few unique specimens and correlated neighbouring slices
as its main challenge, and a split by tile would let a model recognise specimens rather
than damage. Splits are drawn per tissue (stratified by tissue) with scikit-learn's
``GroupShuffleSplit``; every specimen carries both states, so each split keeps both
classes. The deliberately leaky scheme (random by tile, stratified by label) is written
beside it so evaluation can report how much leakage inflates accuracy. Intermediate
(unlabelled) tiles are not split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit, train_test_split

SPLITS = ("train", "val", "test")
SCHEMES = ("grouped", "leaky")
COLUMNS = ("tile_id", "specimen_id", "tissue", "label", "scheme", "split")


class SplitError(ValueError):
    """Split settings that cannot be met; the message names the setting or tissue."""


def _fractions(cfg: dict[str, Any]) -> tuple[float, float]:
    frac = cfg["fractions"]
    if set(frac) != set(SPLITS) or min(frac.values()) <= 0:
        raise SplitError(f"split.fractions={frac}: need positive train, val and test")
    total = sum(frac.values())
    return frac["val"] / total, frac["test"] / total


def grouped_split(tiles: pd.DataFrame, cfg: dict[str, Any]) -> pd.Series:
    """Split name per tile; whole specimens per split, drawn separately for each tissue."""
    val, test = _fractions(cfg)
    out = pd.Series(index=tiles.index, dtype="object")
    for tissue, group in tiles.groupby("tissue", sort=True):
        specimens = group["specimen_id"].nunique()
        if specimens < 3:
            raise SplitError(
                f"tissue {tissue}: {specimens} specimen(s); a grouped "
                "train/val/test split needs at least 3"
            )
        seed = int(cfg["seed"])
        outer = GroupShuffleSplit(n_splits=1, test_size=test, random_state=seed)
        rest_idx, test_idx = next(outer.split(group, groups=group["specimen_id"]))
        rest = group.iloc[rest_idx]
        inner = GroupShuffleSplit(n_splits=1, test_size=val / (1.0 - test), random_state=seed)
        train_idx, val_idx = next(inner.split(rest, groups=rest["specimen_id"]))
        out[group.index[test_idx]] = "test"
        out[rest.index[train_idx]] = "train"
        out[rest.index[val_idx]] = "val"
    return out


def leaky_split(tiles: pd.DataFrame, cfg: dict[str, Any]) -> pd.Series:
    """Split name per tile, random by tile (stratified by tissue and label): leaks specimens."""
    val, test = _fractions(cfg)
    strata = tiles["tissue"] + ":" + tiles["label"].astype(str)
    rest, test_part = train_test_split(
        tiles.index, test_size=test, stratify=strata, random_state=int(cfg["seed"])
    )
    train_part, val_part = train_test_split(
        rest, test_size=val / (1.0 - test), stratify=strata[rest], random_state=int(cfg["seed"])
    )
    out = pd.Series(index=tiles.index, dtype="object")
    out[train_part], out[val_part], out[test_part] = "train", "val", "test"
    return out


def make_splits(index: pd.DataFrame, cfg: dict[str, Any]) -> pd.DataFrame:
    """Both schemes for every labelled tile, as one long table (``COLUMNS``)."""
    labelled = index[index["label"] >= 0].reset_index(drop=True)
    if labelled.empty:
        raise SplitError("the tile index has no labelled (pristine or failed) tiles")
    frames = []
    for scheme, split in (
        ("grouped", grouped_split(labelled, cfg)),
        ("leaky", leaky_split(labelled, cfg)),
    ):
        frame = labelled[["tile_id", "specimen_id", "tissue", "label"]].copy()
        frame["scheme"], frame["split"] = scheme, split.to_numpy()
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    out["label"] = out["label"].astype(np.int8)
    return out.loc[:, list(COLUMNS)]


def split_counts(splits: pd.DataFrame) -> dict[str, Any]:
    """Tile and specimen counts per scheme, tissue, split and label (for the metrics file)."""
    out: dict[str, Any] = {}
    for (scheme, tissue, split), group in splits.groupby(["scheme", "tissue", "split"]):
        out.setdefault(scheme, {}).setdefault(tissue, {})[split] = {
            "specimens": int(group["specimen_id"].nunique()),
            "pristine": int((group["label"] == 0).sum()),
            "failed": int((group["label"] == 1).sum()),
        }
    return out
