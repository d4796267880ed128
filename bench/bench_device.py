"""Benchmark the GPU paths: the default Optuna search, and longer CNN / ResNet training.

    python bench/bench_device.py [--tissues trabecular,cortical] [--search cuda,cuda-fp32,cpu]
                                 [--cnn-epochs 30] [--resnet-epochs 16] [--stems imagenet,fine]

Needs the tile store and splits of the default pipeline (``dvc repro split``).
1. Search: the default study of ``params.yaml`` (trials, epochs per trial, pruner) in a
   fresh journal, once per device: ``cuda`` (mixed precision, as ``device: auto`` runs
   it on a GPU), ``cuda-fp32`` (no mixed precision), ``cpu`` (``train.threads`` threads,
   or ``cpu:N`` for N). Prints the wall time, the epochs spent and the best value.
2. CNN: the best trial of the first search, trained ``--cnn-epochs`` epochs (cosine decay,
   early stopping on val), test accuracy on the held-out specimens.
3. ResNet: ``resnet.arch`` from scratch with each stem, ``--resnet-epochs`` epochs, test
   accuracy. These show what the defaults, sized for 2 CPU cores, leave on the table.
Figures only, no pass/fail.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from bonedamage.config import load_params
from bonedamage.data.tilestore import TileStore
from bonedamage.learn import study as optuna_study
from bonedamage.learn.datasets import Augment, TileDataset, make_loader, split_rows
from bonedamage.learn.models import build_cnn
from bonedamage.learn.recipes import fit_on_split, train_resnet
from bonedamage.learn.train import TrainConfig, predict, seed_everything


def device_settings(name: str, train_cfg: dict) -> dict:
    """``cuda``, ``cuda-fp32``, ``cpu`` or ``cpu:N`` (N threads) as ``train`` overrides."""
    if name == "cuda":
        return {"device": "cuda", "amp": True}
    if name == "cuda-fp32":
        return {"device": "cuda", "amp": False}
    if name.startswith("cpu"):
        threads = int(name.split(":")[1]) if ":" in name else int(train_cfg["threads"])
        return {"device": "cpu", "threads": threads}
    raise SystemExit(f"unknown device {name!r}")


def held_out_scores(
    model: torch.nn.Module, store: TileStore, splits: pd.DataFrame, tissue: str
) -> str:
    data = TileDataset(store, *split_rows(store, splits, tissue, "grouped", "test"))
    device = next(model.parameters()).device
    prob, labels = predict(model, make_loader(data, 256, shuffle=False), device)
    pred = prob.argmax(1)
    return (
        f"test accuracy {accuracy_score(labels, pred):.4f}  balanced "
        f"{balanced_accuracy_score(labels, pred):.4f}  ({len(labels)} tiles)"
    )


def run_search(
    params: dict, store: TileStore, splits: pd.DataFrame, tissue: str, name: str, tmp: Path
) -> optuna_study.optuna.Study:
    cfg = {**copy.deepcopy(params["search"]), "storage": str(tmp / f"{tissue}-{name}.journal")}
    train_cfg = {**params["train"], **device_settings(name, params["train"])}
    t0 = time.perf_counter()
    study = optuna_study.optimize(store, splits, tissue, cfg, train_cfg, params["augment"])
    s = optuna_study.study_summary(study)
    seconds = time.perf_counter() - t0
    print(
        f"  search {name:10s} {seconds:7.1f} s  epochs {s['epochs_spent']:3d}  "
        f"({seconds / max(s['epochs_spent'], 1):.2f} s/epoch)  best {s['best_value']:.4f}  "
        f"states {s['states']}",
        flush=True,
    )
    return study


def train_best_cnn(
    params: dict,
    store: TileStore,
    splits: pd.DataFrame,
    tissue: str,
    best: dict,
    epochs: int,
    device: str,
) -> None:
    cfg = TrainConfig.from_params(
        params["train"],
        **device_settings(device, params["train"]),
        epochs=epochs,
        patience=epochs,
        lr=best["lr"],
        weight_decay=best["weight_decay"],
        batch_size=best["batch_size"],
    )
    seed_everything(cfg.seed, cfg.threads)
    model = build_cnn(best["arch"], store.channels(tissue))
    augment = Augment.from_params(params["augment"], best["augment_strength"])
    result = fit_on_split(model, store, splits, tissue, "grouped", augment, cfg)
    print(
        f"  cnn {epochs} epochs {result.seconds:6.1f} s  best val {result.best_score:.4f} "
        f"(epoch {result.best_epoch})  {held_out_scores(model, store, splits, tissue)}",
        flush=True,
    )


def train_scratch_resnet(
    params: dict,
    store: TileStore,
    splits: pd.DataFrame,
    tissue: str,
    stem: str,
    epochs: int,
    device: str,
) -> None:
    resnet = {**params["resnet"], "stem": stem}
    loop = TrainConfig.from_params(
        params["train"],
        **device_settings(device, params["train"]),
        epochs=epochs,
        patience=epochs,
        **{k: resnet[k] for k in ("lr", "weight_decay", "batch_size", "channels_last")},
    )
    model, result = train_resnet(store, splits, tissue, "scratch", resnet, loop, params["augment"])
    print(
        f"  resnet {stem:8s} {epochs} epochs {result.seconds:6.1f} s  best val "
        f"{result.best_score:.4f} (epoch {result.best_epoch})  "
        f"{held_out_scores(model, store, splits, tissue)}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tissues", default="trabecular,cortical")
    parser.add_argument(
        "--search",
        default="cuda,cuda-fp32,cpu",
        help="devices to run the default search on; the first also trains",
    )
    parser.add_argument("--cnn-epochs", type=int, default=30, help="0 skips the CNN")
    parser.add_argument("--resnet-epochs", type=int, default=16, help="0 skips the ResNets")
    parser.add_argument("--stems", default="imagenet,fine")
    parser.add_argument("--tiles", default="data/tiles")
    parser.add_argument("--splits", default="data/splits.parquet")
    args = parser.parse_args()
    params = load_params(args.params)
    store, splits = TileStore(args.tiles), pd.read_parquet(args.splits)
    devices = args.search.split(",")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for tissue in args.tissues.split(","):
            print(f"== {tissue}", flush=True)
            studies = [run_search(params, store, splits, tissue, d, Path(tmp)) for d in devices]
            if args.cnn_epochs:
                best = optuna_study.best_config(studies[0])
                train_best_cnn(params, store, splits, tissue, best, args.cnn_epochs, devices[0])
            for stem in args.stems.split(",") if args.resnet_epochs else ():
                train_scratch_resnet(
                    params, store, splits, tissue, stem, args.resnet_epochs, devices[0]
                )


if __name__ == "__main__":
    main()
