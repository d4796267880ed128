"""Every model of a tissue scored on the same test split: the CNN, each ResNet, the CNN
trained on the leaky split (on the leaky split's test tiles: the inflation a leaky split
shows), and a hand-crafted-feature baseline; and the tables DVC plots of them: ROC curves,
confusion matrices and training curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bonedamage.atomic import InputError, write_text_atomic
from bonedamage.data.tilestore import TileStore, centre_plane
from bonedamage.learn.checkpoint import load_checkpoint
from bonedamage.learn.datasets import TileDataset, make_loader, split_rows
from bonedamage.learn.scoring import (
    confusion_points,
    evaluate_predictions,
    history_points,
    roc_points,
)
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


def trained_models(models: Path, inits: list[str]) -> dict[str, Path]:
    """The weights of a tissue's trained models (``models``: its folder), by the names
    :func:`score_test_split` scores them under."""
    return {
        "cnn": models / "cnn.pt",
        **{f"resnet_{i}": models / "resnet" / f"resnet_{i}.pt" for i in inits},
        "cnn_leaky_split": models / "cnn_leaky.pt",
    }


def training_histories(models: Path, inits: list[str]) -> dict[str, pd.DataFrame]:
    """The per-epoch history of every trained network of a tissue, from the sidecars the
    training stages write, named after the weights (cnn, resnet_<init>, cnn_leaky); an
    ensemble's members as ``<name>_member<k>`` (k from 1, in the sidecar's order)."""
    out: dict[str, pd.DataFrame] = {}
    for path in trained_models(models, inits).values():
        sidecar, name = path.with_suffix(".json"), path.stem
        meta = json.loads(sidecar.read_text())
        if "member_histories" in meta:
            for k, history in enumerate(meta["member_histories"], 1):
                out[f"{name}_member{k}"] = history_points(history)
        elif "history" in meta:
            out[name] = history_points(meta["history"])
        else:
            raise InputError(
                f"{sidecar}: no training history (a model saved without one: train it again)"
            )
    return out


def write_plots(
    out: Path, frames: dict[str, pd.DataFrame], histories: dict[str, pd.DataFrame]
) -> list[Path]:
    """The tables of a tissue's plots in ``out``, as CSV, atomically; return their paths:
    per scored model (``frames``: its test predictions) ``roc_<model>.csv`` (fpr, tpr,
    threshold) and ``confusion_<model>.csv`` (actual, predicted: one row per tile), per
    trained network (``histories``) ``history_<name>.csv`` (epoch, metrics)."""
    out.mkdir(parents=True, exist_ok=True)
    tables: dict[str, pd.DataFrame] = {}
    for name, frame in frames.items():
        y, prob = frame["label"].to_numpy(), frame["prob"].to_numpy()
        tables[f"roc_{name}.csv"] = roc_points(y, prob)
        tables[f"confusion_{name}.csv"] = confusion_points(y, prob)
    tables |= {f"history_{name}.csv": table for name, table in histories.items()}
    for file, table in tables.items():
        write_text_atomic(out / file, table.to_csv(index=False, lineterminator="\n"))
    return [out / file for file in tables]


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

    weights = trained_models(models, inits)
    test_pos, test_y = split_rows(store, splits, tissue, "grouped", "test")
    for name in ["cnn", *(f"resnet_{i}" for i in inits)]:
        prob = _failed_probability(weights[name], store, test_pos, test_y, device)
        score(name, test_pos, test_y, prob)
    leaky_pos, leaky_y = split_rows(store, splits, tissue, "leaky", "test")
    leaky = _failed_probability(weights["cnn_leaky_split"], store, leaky_pos, leaky_y, device)
    score("cnn_leaky_split", leaky_pos, leaky_y, leaky)
    train_pos, train_y = split_rows(store, splits, tissue, "grouped", "train")
    # the baseline's 2D features look at the tiled plane itself (2.5-D tiles: the middle one)
    clf = baseline.fit_baseline(
        centre_plane(store.tiles(train_pos)), train_y, kind=cfg["baseline"], seed=seed
    )
    test_tiles = centre_plane(store.tiles(test_pos))
    score("baseline", test_pos, test_y, baseline.predict_baseline(clf, test_tiles))
    return results, frames
