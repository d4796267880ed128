"""The pretraining corpus: more phantoms of the embedded dataset's physics, cut into tiles.

A procedural corpus in the spirit of FractalDB (Kataoka et al., IJCV 2022): images made
by a formula, not collected or annotated. Here the formula is the phantom generator
(params ``synth``: structure, failure and imaging), run for other specimens than the
data root's (generator indices from ``pretrain.corpus.first_specimen`` on, so no specimen
of the dataset, train or test, is in it) and on smaller fields of view, then tiled with
the dataset's own tiling (params ``tile``, a denser slice stride). Each generated scan is
one class of the procedural pretraining task: one draw of the generator's parameters and
one load.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd

from bonedamage.config import ConfigError

RAW_DIR = "raw"  # <corpus>/raw: the phantoms, a data root (manifest, TIFFs, labels)
TILES_DIR = "tiles"  # <corpus>/tiles: their tile store


def corpus_synth_config(synth: dict[str, Any], corpus: dict[str, Any]) -> dict[str, Any]:
    """The ``synth`` params of the corpus: the same physics, its own count and shapes.

    Refuses a corpus whose generator indices overlap the dataset's (0 to
    ``synth.specimens_per_tissue`` - 1): those would be the dataset's specimens again.
    """
    if int(corpus["first_specimen"]) < int(synth["specimens_per_tissue"]):
        raise ConfigError(
            f"pretrain.corpus.first_specimen {corpus['first_specimen']}: must be at least "
            f"synth.specimens_per_tissue ({synth['specimens_per_tissue']}), or the corpus "
            "would generate the dataset's own specimens again"
        )
    cfg = copy.deepcopy(synth)
    cfg["specimens_per_tissue"] = int(corpus["specimens_per_tissue"])
    for tissue, shape in corpus["shape"].items():
        cfg[tissue]["shape"] = [int(v) for v in shape]
    return cfg


def corpus_tile_config(tile: dict[str, Any], corpus: dict[str, Any]) -> dict[str, Any]:
    """The ``tile`` params of the corpus: the dataset's tiling at the corpus' slice stride."""
    return {**copy.deepcopy(tile), "slice_stride": int(corpus["slice_stride"])}


def scan_classes(index: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """The procedural task's class of each tile (its scan, as an int) and the class names."""
    classes = pd.Categorical(index["scan_id"].astype(str))
    return classes.codes.astype(np.int64), [str(c) for c in classes.categories]


def holdout(n: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded boolean mask of ``fraction`` of ``n`` items (at least one, not all) to hold
    out for reporting a pretraining task's validation score."""
    if n < 2:
        raise ValueError(f"{n} tiles: at least 2 are needed to hold some out")
    k = min(max(1, int(round(n * fraction))), n - 1)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    return mask
