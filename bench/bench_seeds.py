"""Benchmark how much the final CNN's test accuracy moves with the training seed alone.

    python bench/bench_seeds.py [--tissue trabecular cortical] [--seeds 5]

Needs the tile store, splits and search result of the default pipeline (``dvc repro
search``). Trains the final CNN of ``models/<tissue>/cnn_search.json`` exactly as the
``train_cnn`` stage does (params.yaml's ``train`` and ``augment``), once per seed
(``train.seed``, then +1, +2, ...), and prints per seed the best epoch, the validation
balanced accuracy that chose it, and test accuracy on the held-out specimens; then the
mean, standard deviation and range over seeds. Seeds change the weight initialisation,
the shuffling and the augmentation draws; data, architecture and recipe stay fixed, so
the spread is what a single run's figure can be trusted to. Then the test accuracy of the
ensembles of the first 2, 3, ... seeds' models (the mean of their probabilities): what
training several seeds would buy. Figures only, no pass/fail.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from bonedamage.config import load_params
from bonedamage.data.tilestore import TileStore
from bonedamage.learn.datasets import TileDataset, make_loader, split_rows
from bonedamage.learn.recipes import train_cnn
from bonedamage.learn.train import predict, resolve_device


def seed_runs(
    params: dict, store: TileStore, splits: pd.DataFrame, tissue: str, best: dict, seeds: int
) -> list[dict[str, float]]:
    test = make_loader(
        TileDataset(store, *split_rows(store, splits, tissue, "grouped", "test")),
        256,
        shuffle=False,
    )
    device = resolve_device(params["train"]["device"])
    rows, probs = [], []
    for k in range(seeds):
        train_cfg = {**params["train"], "seed": int(params["train"]["seed"]) + k}
        t0 = time.perf_counter()
        model, result = train_cnn(store, splits, tissue, best, train_cfg, params["augment"])
        prob, label = predict(model, test, device)
        probs.append(prob[:, 1])
        pred = (prob[:, 1] > 0.5).astype(int)
        row = {
            "seed": train_cfg["seed"],
            "best_epoch": result.best_epoch,
            "val_bal_acc": result.best_score,
            "test_acc": accuracy_score(label, pred),
            "test_bal_acc": balanced_accuracy_score(label, pred),
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"{tissue:10s} seed {row['seed']}  epoch {row['best_epoch']:2d}  "
            f"val {row['val_bal_acc']:.4f}  test acc {row['test_acc']:.4f}  "
            f"test bal acc {row['test_bal_acc']:.4f}  ({row['seconds']:.0f} s)",
            flush=True,
        )
    for k in range(2, seeds + 1):
        pred = (np.mean(probs[:k], axis=0) > 0.5).astype(int)
        print(
            f"{tissue:10s} ensemble of seeds 1-{k}: test acc {accuracy_score(label, pred):.4f}  "
            f"test bal acc {balanced_accuracy_score(label, pred):.4f}",
            flush=True,
        )
    return rows


def summary(tissue: str, rows: list[dict[str, float]]) -> None:
    for key in ("val_bal_acc", "test_acc"):
        v = np.array([r[key] for r in rows])
        print(
            f"{tissue:10s} {key:12s} mean {v.mean():.4f}  sd {v.std(ddof=1):.4f}  "
            f"range {v.min():.4f}-{v.max():.4f}  over {len(v)} seeds"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tissue", nargs="+", default=["trabecular", "cortical"])
    parser.add_argument("--seeds", type=int, default=5, help="runs per tissue (at least 2)")
    parser.add_argument("--tiles", default="data/tiles")
    parser.add_argument("--splits", default="data/splits.parquet")
    parser.add_argument("--models", default="models", help="holds <tissue>/cnn_search.json")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 for a spread")
    params = load_params(args.params)
    store = TileStore(Path(args.tiles))
    splits = pd.read_parquet(args.splits)
    results = {}
    for tissue in args.tissue:
        best = json.loads((Path(args.models) / tissue / "cnn_search.json").read_text())
        results[tissue] = seed_runs(params, store, splits, tissue, best, args.seeds)
    for tissue, rows in results.items():
        summary(tissue, rows)


if __name__ == "__main__":
    main()
