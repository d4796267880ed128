"""Every model of a tissue scored on the same test split: the CNN, each ResNet, the CNN
trained on the leaky split (on the leaky split's test tiles: the inflation a leaky split
shows), and a hand-crafted-feature baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bonedamage.data.tilestore import TileStore, centre_plane
from bonedamage.learn.checkpoint import load_checkpoint
from bonedamage.learn.datasets import TileDataset, make_loader, split_rows
from bonedamage.learn.scoring import evaluate_predictions
from bonedamage.learn.train import predict


def prediction_frame(
    store: TileStore, positions: np.ndarray, labels: np.ndarray, prob: np.ndarray
) -> pd.DataFrame:
    """One row per tile: ids, label, failed probability and the tile's damaged share."""
    rows = store.index.iloc[positions]
    return pd.DataFrame(
        {
            "tile_id": rows["tile_id"].to_numpy(),
            "specimen_id": rows["specimen_id"].to_numpy(),
            "scan_id": rows["scan_id"].to_numpy(),
            "label": labels,
            "prob": prob,
            "damage_fraction": rows["damage_fraction"].to_numpy(),
        }
    )


def _failed_probability(
    path: Path, store: TileStore, positions: np.ndarray, labels: np.ndarray, device: torch.device
) -> np.ndarray:
    loader = make_loader(TileDataset(store, positions, labels), 256, shuffle=False)
    prob, _ = predict(load_checkpoint(path), loader, device)
    return prob[:, 1]


def score_test_split(
    store: TileStore,
    splits: pd.DataFrame,
    tissue: str,
    models: Path,
    inits: list[str],
    cfg: dict[str, Any],
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """Metrics (params ``evaluate``: visible damage, bootstrap, seed, baseline) and the
    per-tile predictions of every model of ``tissue`` saved under ``models``."""
    from bonedamage.learn import baseline  # scikit-image and scipy: only this stage needs them

    seed = int(cfg["seed"])
    results: dict[str, Any] = {}
    frames: dict[str, pd.DataFrame] = {}

    def score(name: str, positions: np.ndarray, labels: np.ndarray, prob: np.ndarray) -> None:
        frames[name] = prediction_frame(store, positions, labels, prob)
        results[name] = evaluate_predictions(
            frames[name],
            visible=cfg["visible_damage_fraction"],
            n_boot=int(cfg["bootstrap"]),
            seed=seed,
        )

    test_pos, test_y = split_rows(store, splits, tissue, "grouped", "test")
    for name in ["cnn", *(f"resnet_{i}" for i in inits)]:
        path = models / f"{name}.pt" if name == "cnn" else models / "resnet" / f"{name}.pt"
        score(name, test_pos, test_y, _failed_probability(path, store, test_pos, test_y, device))
    leaky_pos, leaky_y = split_rows(store, splits, tissue, "leaky", "test")
    leaky = _failed_probability(models / "cnn_leaky.pt", store, leaky_pos, leaky_y, device)
    score("cnn_leaky_split", leaky_pos, leaky_y, leaky)
    train_pos, train_y = split_rows(store, splits, tissue, "grouped", "train")
    # the baseline's 2D features look at the tiled plane itself (2.5-D tiles: the middle one)
    clf = baseline.fit_baseline(
        centre_plane(store.tiles(train_pos)), train_y, kind=cfg["baseline"], seed=seed
    )
    test_tiles = centre_plane(store.tiles(test_pos))
    score("baseline", test_pos, test_y, baseline.predict_baseline(clf, test_tiles))
    return results, frames
