"""Benchmark training: the real data loader against pre-loaded tensors, and pruning's savings.

    python bench/bench_train.py [--tissue trabecular] [--epochs 2] [--repeats 3] [--trials 8]
                                [--trial-epochs N] [--arch searched|small]
                                [--pruner median,percentile,hyperband,successive_halving:4]

Needs the tile store and splits of the default pipeline (``dvc repro split``).
1. Throughput: tiles/s of a CNN trained through the real loader (chunked tile store,
   per-item normalisation and augmentation) against the same model and batches from
   tensors already in memory, ``--repeats`` times each in alternating order; prints each
   pair and the ratio of the medians (goal >= 0.9). ``--arch searched`` (the default when
   ``models/<tissue>/cnn_search.json`` exists): the architecture and batch size the
   pipeline's CNN trains with; ``small``: a fixed 3-block CNN of the search space, batch 64
   (the loader's share of its steps is larger).
2. Pruning: the same Optuna trial budget (``--trials`` of ``--trial-epochs`` epochs)
   without a pruner, then with the pruner of ``search.pruner`` (or each of ``--pruner``;
   ``kind:N`` sets a Hyperband or successive-halving ``reduction_factor`` of N);
   prints the epochs spent and the best validation balanced accuracy of each against no
   pruning (goal: at most half the epochs, the same best accuracy within 1 point).
Figures only, no pass/fail.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from bonedamage.config import load_params
from bonedamage.data.tilestore import TileStore, with_channels
from bonedamage.learn import study as search
from bonedamage.learn.datasets import Augment, TileDataset, make_loader, split_rows
from bonedamage.learn.models import build_cnn
from bonedamage.learn.train import TrainConfig, fit, seed_everything

ARCH = {
    "n_blocks": 3,
    "base_filters": 16,
    "filter_growth": 1.5,
    "kernel_size": 3,
    "norm": "batch",
    "pool": "max",
    "dropout": 0.2,
    "dense_units": 64,
}


def throughput(
    params: dict,
    store: TileStore,
    splits: pd.DataFrame,
    tissue: str,
    epochs: int,
    repeats: int,
    searched: dict | None = None,
) -> None:
    positions, labels = split_rows(store, splits, tissue, "grouped", "train")
    val = make_loader(
        TileDataset(store, *split_rows(store, splits, tissue, "grouped", "val")), 256, shuffle=False
    )
    batch = {"batch_size": searched["batch_size"]} if searched else {}
    cfg = TrainConfig.from_params(params["train"], epochs=epochs, patience=epochs, **batch)
    arch = searched["arch"] if searched else ARCH
    print(f"{'searched' if searched else 'small'} CNN {arch}, batch {cfg.batch_size}")
    augment = Augment.from_params(params["augment"])
    real = make_loader(
        TileDataset(store, positions, labels, augment, cfg.seed),
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
    )
    tensors = TensorDataset(
        torch.from_numpy(with_channels(store.tiles(positions))), torch.from_numpy(labels)
    )
    preloaded = DataLoader(
        tensors,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    loaders = {"real loader": real, "pre-loaded": preloaded}
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    # alternate the order: on a shared 2-core machine one pair of runs is noisier than the gap
    for repeat in range(repeats):
        for name in sorted(loaders, reverse=repeat % 2 == 1):
            seed_everything(cfg.seed, cfg.threads)
            t0 = time.perf_counter()
            fit(build_cnn(arch, store.channels(tissue)), loaders[name], val, cfg)
            rates[name].append(len(positions) * epochs / (time.perf_counter() - t0))
        print(
            f"repeat {repeat + 1}        real loader {rates['real loader'][-1]:6.0f} tiles/s, "
            f"pre-loaded {rates['pre-loaded'][-1]:6.0f} tiles/s, ratio "
            f"{rates['real loader'][-1] / rates['pre-loaded'][-1]:.2f}",
            flush=True,
        )
    median = {name: float(np.median(r)) for name, r in rates.items()}
    for name, rate in median.items():
        print(
            f"{name:12s}    {rate:8.0f} tiles/s (median of {repeats} runs of {epochs} epochs "
            "incl. validation)"
        )
    print(f"ratio           {median['real loader'] / median['pre-loaded']:8.2f}  (goal >= 0.9)")


def pruning(
    params: dict,
    store: TileStore,
    splits: pd.DataFrame,
    tissue: str,
    trials: int,
    trial_epochs: int | None,
    pruners: list[str],
) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("none", *pruners):
            kind, _, eta = name.partition(":")
            cfg = copy.deepcopy(params["search"])
            cfg.update(
                n_trials=trials,
                epochs=trial_epochs or cfg["epochs"],
                storage=str(Path(tmp) / f"{kind}-{eta}.journal"),
                timeout_s=None,
                pruner={**cfg["pruner"], "kind": kind},
            )
            if eta:
                cfg["pruner"]["reduction_factor"] = int(eta)
            t0 = time.perf_counter()
            study = search.optimize(store, splits, tissue, cfg, params["train"], params["augment"])
            s = results[name] = search.study_summary(study)
            ratio = s["epochs_spent"] / results["none"]["epochs_spent"]
            diff = s["best_value"] - results["none"]["best_value"]
            print(
                f"pruner {name:20s} epochs {s['epochs_spent']:4d} ({ratio:.2f} of none; goal "
                f"<= 0.5)  best val balanced accuracy {s['best_value']:.4f} ({diff:+.4f} vs "
                f"none; goal >= -0.01)  states {s['states']}  {time.perf_counter() - t0:.0f} s",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tissue", default="trabecular")
    parser.add_argument("--epochs", type=int, default=2, help="throughput epochs (0: skip)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="throughput runs of each loader, alternating"
    )
    parser.add_argument("--trials", type=int, default=8, help="pruning trials (0: skip)")
    parser.add_argument(
        "--trial-epochs", type=int, help="epochs per trial (default: params.yaml search.epochs)"
    )
    parser.add_argument(
        "--pruner",
        help="pruners compared with none, comma-separated: median, percentile, hyperband, "
        "successive_halving; kind:N sets the reduction factor (default: params.yaml "
        "search.pruner.kind)",
    )
    parser.add_argument(
        "--arch",
        choices=("searched", "small"),
        help="throughput CNN: the committed search's best (models/<tissue>/cnn_search.json; "
        "the default when it exists) or a fixed small one",
    )
    parser.add_argument("--tiles", default="data/tiles")
    parser.add_argument("--splits", default="data/splits.parquet")
    args = parser.parse_args()
    params = load_params(args.params)
    store, splits = TileStore(args.tiles), pd.read_parquet(args.splits)
    if args.epochs:
        print("== throughput")
        best = Path("models") / args.tissue / "cnn_search.json"
        use_search = args.arch == "searched" or (args.arch is None and best.is_file())
        if use_search and not best.is_file():
            parser.error(
                f"--arch searched: {best} is missing (run `dvc repro search@{args.tissue}`)"
            )
        searched = json.loads(best.read_text()) if use_search else None
        throughput(params, store, splits, args.tissue, args.epochs, args.repeats, searched)
    if not args.trials:
        return
    print("== pruning")
    pruners = (args.pruner or params["search"]["pruner"]["kind"]).split(",")
    pruning(params, store, splits, args.tissue, args.trials, args.trial_epochs, pruners)


if __name__ == "__main__":
    main()
