"""Benchmark the ResNet's pretraining methods and the label efficiency of the models.

    python bench/bench_pretrain.py [--methods procedural simsiam rotation] [--sizes 2 4 all]
        [--tissues cortical trabecular] [--seeds 1] [--reuse] [--out reports/bench/pretrain]
        [--plot docs/label-efficiency.png]

Needs the default pipeline's tile store, splits, corpus and search results (``dvc repro
search corpus``). Figures only, no pass/fail; everything is trained as the stages train
it (params.yaml's ``pretrain``, ``resnet``, ``train``, ``augment``) and scored on the test
split's held-out specimens:

1. **methods**: pretrains one backbone per method (or, with ``--reuse``, takes one an
   earlier run left in ``--out`` or the pipeline's ``models/pretrained/<method>.pt``,
   where it exists), then per tissue
   fine-tunes a ResNet from each and from scratch, and trains the searched CNN (the best
   trial of ``models/<tissue>/cnn_search.json``, as ``train_cnn`` does).
2. **label efficiency**: the CNN, the scratch ResNet and the ResNet of ``--curve-init``
   (default: the first method) trained on the first 2, 4, ... train specimens of a seeded
   order (``all``: the whole train split, taken from part 1), validated and tested on the
   full validation and test splits: the study's "few unique training samples" claim as
   test accuracy against the number of training specimens. Labels are what is scarce
   here: ``procedural`` saw no specimen of the dataset, ``simsiam`` and ``rotation`` saw
   every train specimen's tiles without their labels.

Each configuration runs ``--seeds`` times (``train.seed``, +1, ...): a fine-tuned ResNet's
test accuracy moves by several points with the seed alone. Writes ``results.json`` and
``results.md`` under ``--out`` and the plot to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from bonedamage.atomic import atomic_path, write_text_atomic
from bonedamage.config import PRETRAINED_FOLDER, load_params
from bonedamage.data.corpus import TILES_DIR
from bonedamage.data.tilestore import TileStore
from bonedamage.learn.checkpoint import save_checkpoint
from bonedamage.learn.datasets import TileDataset, make_loader, split_rows
from bonedamage.learn.pretraining import METHODS, pretrain_backbone
from bonedamage.learn.recipes import train_cnn, train_resnet
from bonedamage.learn.train import TrainConfig, predict, resolve_device


def train_subset(splits: pd.DataFrame, tissue: str, n: int | None, seed: int) -> pd.DataFrame:
    """``splits`` with the tissue's grouped train split cut to ``n`` specimens (a seeded
    order of them; None: all), so that each has its pristine and failed scans."""
    if n is None:
        return splits
    train = (splits["tissue"] == tissue) & (splits["scheme"] == "grouped")
    train &= splits["split"] == "train"
    specimens = np.array(sorted(splits.loc[train, "specimen_id"].unique()))
    if n > len(specimens):
        raise SystemExit(f"{tissue}: {n} train specimens asked for, the split has {len(specimens)}")
    kept = np.random.default_rng(seed).permutation(specimens)[:n]
    return splits[~train | splits["specimen_id"].isin(kept)]


def test_scores(
    model: Any, store: TileStore, splits: pd.DataFrame, tissue: str, device: Any
) -> dict:
    test = TileDataset(store, *split_rows(store, splits, tissue, "grouped", "test"))
    prob, label = predict(model, make_loader(test, 256, shuffle=False), device)
    pred = prob.argmax(1)
    return {
        "test_acc": float(accuracy_score(label, pred)),
        "test_bal_acc": float(balanced_accuracy_score(label, pred)),
    }


def resnet_loop(params: dict[str, Any], seed: int) -> TrainConfig:
    r = params["resnet"]
    return TrainConfig.from_params(
        {**params["train"], "seed": seed},
        **{k: r[k] for k in ("epochs", "patience", "lr", "weight_decay", "batch_size")},
        channels_last=r["channels_last"],
    )


def run_model(
    model_name: str,
    params: dict[str, Any],
    store: TileStore,
    splits: pd.DataFrame,
    tissue: str,
    seed: int,
    pretrained: Path,
    search: Path,
) -> dict[str, Any]:
    """Train ``model_name`` (``cnn`` or ``resnet_<init>``) on ``splits``; its test scores."""
    t0 = time.perf_counter()
    if model_name == "cnn":
        best = json.loads(search.read_text())
        train_cfg = {**params["train"], "seed": seed}
        model, result = train_cnn(store, splits, tissue, best, train_cfg, params["augment"])
    else:
        init = model_name.removeprefix("resnet_")
        weights = pretrained / f"{init}.pt" if init in METHODS else None
        model, result = train_resnet(
            store, splits, tissue, init, params["resnet"], resnet_loop(params, seed),
            params["augment"], pretrained_path=weights,
        )  # fmt: skip
    scores = test_scores(model, store, splits, tissue, resolve_device(params["train"]["device"]))
    return {"val_bal_acc": result.best_score, **scores, "seconds": time.perf_counter() - t0}


def pretrain_all(
    params: dict[str, Any], methods: list[str], out: Path, reuse: bool
) -> tuple[Path, list[dict[str, Any]]]:
    """A backbone per method in ``out/pretrained`` (or the pipeline's, with ``reuse``)."""
    paths, pre, resnet = params["pipeline"]["paths"], params["pretrain"], params["resnet"]
    folder = out / PRETRAINED_FOLDER
    pipeline = Path(paths["models"]) / PRETRAINED_FOLDER
    rows = []
    for method in methods:
        target = folder / f"{method}.pt"
        if reuse and target.is_file() and target.with_suffix(".json").is_file():
            meta = json.loads(target.with_suffix(".json").read_text())
            rows.append({"method": method, "reused": True, **_task(meta)})
            print(f"pretrain {method}: reused {target}", flush=True)
            continue
        if reuse and (pipeline / f"{method}.pt").is_file():
            meta = json.loads((pipeline / f"{method}.json").read_text())
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                shutil.copyfile(pipeline / f"{method}.pt", tmp)
            write_text_atomic(target.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
            rows.append({"method": method, "reused": True, **_task(meta)})
            print(f"pretrain {method}: reused {pipeline / f'{method}.pt'}", flush=True)
            continue
        loop = TrainConfig.from_params(
            params["train"], epochs=pre["epochs"], patience=pre["epochs"], lr=pre["lr"],
            weight_decay=pre["weight_decay"], batch_size=pre["batch_size"],
            channels_last=resnet["channels_last"],
        )  # fmt: skip
        t0 = time.perf_counter()
        model, result = pretrain_backbone(
            method, Path(paths["corpus"]) / TILES_DIR, Path(paths["tiles"]), Path(paths["splits"]),
            params["pipeline"]["tissues"], resnet["arch"], resnet["stem"], pre, loop,
            params["augment"],
        )  # fmt: skip
        save_checkpoint(target, model, result.meta)
        seconds = time.perf_counter() - t0
        rows.append({"method": method, "reused": False, "seconds": seconds, **_task(result.meta)})
        print(f"pretrain {method}: {result.summary} ({seconds:.0f} s)", flush=True)
    return folder, rows


def _task(meta: dict[str, Any]) -> dict[str, Any]:
    keys = ("tiles", "head_classes", "val_balanced_accuracy", "chance", "final_loss", "z_std")
    return {k: meta[k] for k in keys if k in meta}


def summarise(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    return (
        frame.groupby(["part", "tissue", "model", "train_specimens"], sort=False)
        .agg(
            test_acc=("test_acc", "mean"),
            test_acc_sd=("test_acc", "std"),
            test_bal_acc=("test_bal_acc", "mean"),
            val_bal_acc=("val_bal_acc", "mean"),
            runs=("test_acc", "size"),
            seconds=("seconds", "mean"),
        )
        .reset_index()
    )


def plot(table: pd.DataFrame, models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tissues = list(dict.fromkeys(table["tissue"]))
    fig, axes = plt.subplots(1, len(tissues), figsize=(5.2 * len(tissues), 4.0), squeeze=False)
    for ax, tissue in zip(axes[0], tissues, strict=True):
        part = table[(table["tissue"] == tissue)]
        for model in models:
            rows = part[part["model"] == model].sort_values("train_specimens")
            if rows.empty:
                continue
            sd = rows["test_acc_sd"].fillna(0.0)
            ax.errorbar(
                rows["train_specimens"], rows["test_acc"], yerr=sd, marker="o", capsize=3,
                label=LABELS.get(model, model),
            )  # fmt: skip
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{tissue}")
        ax.set_xlabel("training specimens (each: a pristine and a failed scan)")
        ax.set_ylabel("test accuracy (held-out specimens)")
        ax.set_xticks(sorted(part["train_specimens"].unique()))
        ax.set_ylim(0.4, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("Label efficiency: test accuracy against the number of training specimens")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)


LABELS = {
    "cnn": "searched CNN",
    "resnet_scratch": "ResNet-18, scratch",
    "resnet_procedural": "ResNet-18, procedural pretraining",
    "resnet_simsiam": "ResNet-18, SimSiam pretraining",
    "resnet_rotation": "ResNet-18, rotation pretraining",
    "resnet_imagenet": "ResNet-18, ImageNet",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sizes", nargs="+", default=["2", "4", "all"])
    parser.add_argument("--tissues", nargs="+", default=None)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument(
        "--curve-init", default=None, choices=METHODS, help="pretrained init of the curve"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="take backbones already in OUT or the pipeline's"
    )
    parser.add_argument("--skip-methods", action="store_true", help="only the curve")
    parser.add_argument("--out", default="reports/bench/pretrain")
    parser.add_argument("--plot", default="docs/label-efficiency.png")
    args = parser.parse_args()
    params = load_params(Path(args.params))
    paths = params["pipeline"]["paths"]
    tissues = args.tissues or params["pipeline"]["tissues"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store, splits = TileStore(paths["tiles"]), pd.read_parquet(paths["splits"])
    curve_init = args.curve_init or args.methods[0]
    methods = list(dict.fromkeys([*args.methods, curve_init]))
    pretrained, pre_rows = pretrain_all(params, methods, out, args.reuse)
    seeds = [int(params["train"]["seed"]) + k for k in range(args.seeds)]
    rows: list[dict[str, Any]] = []

    def record(
        part: str, tissue: str, model: str, n: int | None, seed: int, subset: pd.DataFrame
    ) -> None:
        search = Path(paths["models"]) / tissue / "cnn_search.json"
        result = run_model(model, params, store, subset, tissue, seed, pretrained, search)
        specimens = subset[(subset["tissue"] == tissue) & (subset["scheme"] == "grouped")]
        count = specimens.loc[specimens["split"] == "train", "specimen_id"].nunique()
        row = {"part": part, "tissue": tissue, "model": model, "train_specimens": count}
        rows.append(row | {"seed": seed, **result})
        print(
            f"{part:16s} {tissue:10s} {model:18s} n={count:2d} seed {seed}  val "
            f"{result['val_bal_acc']:.4f}  test acc {result['test_acc']:.4f}  bal "
            f"{result['test_bal_acc']:.4f}  ({result['seconds']:.0f} s)",
            flush=True,
        )

    curve_models = ["cnn", "resnet_scratch", f"resnet_{curve_init}"]
    for tissue in tissues:
        if not args.skip_methods:
            for model in ["cnn", *(f"resnet_{m}" for m in args.methods), "resnet_scratch"]:
                for seed in seeds:
                    record("methods", tissue, model, None, seed, splits)
        for size in args.sizes:
            n = None if size == "all" else int(size)
            if n is None and not args.skip_methods:
                continue  # part 1's runs are the curve's "all" point
            for model in curve_models:
                for seed in seeds:
                    subset = train_subset(splits, tissue, n, int(params["split"]["seed"]))
                    record("label_efficiency", tissue, model, n, seed, subset)
    table = summarise(rows)
    curve = table[table["model"].isin(curve_models)].copy()
    if not args.skip_methods:
        curve = curve[(curve["part"] == "label_efficiency") | (curve["part"] == "methods")]
    plot(curve, curve_models, Path(args.plot))
    result = {"pretraining": pre_rows, "runs": rows, "table": table.to_dict("records")}
    write_text_atomic(out / "results.json", json.dumps(result, indent=1, default=float) + "\n")
    write_text_atomic(out / "results.md", table.to_markdown(index=False, floatfmt=".3f") + "\n")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {args.plot}")


if __name__ == "__main__":
    main()
