"""Tracked runs of the learning stages: search, train_cnn, pretrain, train_resnet, evaluate.

Each function is one DVC stage for one tissue: it reads the tile store and splits,
calls the pure ``learn`` code, writes the stage's outputs (atomically) and records the
run in MLflow with its params, per-epoch metrics, artifacts and the data/code version.

Under ``torchrun`` the final-training stages (train_cnn, pretrain, train_resnet) run on
every rank, which all train together; rank 0 alone records the runs (with a
``world_size`` param) and writes the outputs (see docs/scale-out.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from bonedamage.atomic import write_text_atomic
from bonedamage.data.tilestore import TileStore, centre_plane
from bonedamage.learn import distributed, evaluate, search
from bonedamage.learn.data import TileDataset, make_loader, split_rows
from bonedamage.learn.final import save_model, train_cnn_ensemble, train_resnet
from bonedamage.learn.models import DEFAULT_STEM, build_module, pretext_model
from bonedamage.learn.pretext import pretrain
from bonedamage.learn.train import (
    FitResult,
    TrainConfig,
    numerics_platform,
    predict,
    resolve_device,
    seed_everything,
)
from bonedamage.lifecycle.tracking import MlflowSearchHooks, log_history, version_tags


def _inputs(tiles: Path, splits: Path) -> tuple[TileStore, pd.DataFrame]:
    return TileStore(tiles), pd.read_parquet(splits)


def _loop_params(params: dict[str, Any]) -> dict[str, Any]:
    """The shared training-loop settings a run logs (``train``: learning-rate schedule,
    memory layout)."""
    cfg = TrainConfig.from_params(params["train"])
    return {"lr_schedule": cfg.lr_schedule, "channels_last": cfg.channels_last}


@contextmanager
def _stage_run(name: str, tags: dict[str, str], params: dict[str, Any]) -> Iterator[bool]:
    """An MLflow run with the version tags, ``tags`` and ``params``; yield whether this rank
    tracks. Under ``torchrun`` only rank 0 does (it adds ``world_size`` to the params);
    the other ranks get no run and only train, so that their collectives match rank 0's."""
    if not distributed.is_main():
        yield False
        return
    if distributed.world_size() > 1:
        params = {**params, "world_size": distributed.world_size()}
    with mlflow.start_run(run_name=name, tags={**version_tags(), **tags}):
        mlflow.log_params(params)
        yield True


def run_search(
    params: dict[str, Any],
    tissue: str,
    tiles: Path,
    splits: Path,
    out: Path,
    reports: Path,
    worker: int = 0,
) -> dict[str, Any]:
    """Optuna study of the CNN family; write the best configuration and the study plots."""
    store, table = _inputs(tiles, splits)
    cfg = params["search"]
    with mlflow.start_run(
        run_name=f"search-{tissue}", tags={**version_tags(), "stage": "search", "tissue": tissue}
    ):
        mlflow.log_params(
            {
                "n_trials": cfg["n_trials"],
                "epochs": cfg["epochs"],
                **_loop_params(params),
                "storage": cfg["storage"],
                "pruner": json.dumps(cfg["pruner"]),
                "space": json.dumps(cfg["space"], sort_keys=True),
            }
        )
        study = search.run_search(
            store,
            table,
            tissue,
            cfg,
            params["train"],
            params["augment"],
            hooks=MlflowSearchHooks(),
            worker=worker,
        )
        best = {
            **search.best_config(study),
            "study": study.study_name,
            "summary": search.summary(study),
        }
        mlflow.set_tag("optuna.study", study.study_name)
        mlflow.log_metric("best_val_balanced_accuracy", best["value"])
        for plot in search.save_plots(study, reports / tissue, seed=int(cfg["seed"])):
            mlflow.log_artifact(str(plot), "plots")
    write_text_atomic(out, json.dumps(best, indent=2, sort_keys=True) + "\n")
    return best


def run_train_cnn(
    params: dict[str, Any], tissue: str, tiles: Path, splits: Path, best: Path, out_dir: Path
) -> dict[str, float]:
    """The final CNN on the grouped split, and the same recipe on the leaky split; each is
    an ensemble of ``cnn.ensemble`` networks (seeds ``train.seed``, +1, ...) when above 1."""
    store, table = _inputs(tiles, splits)
    config = json.loads(best.read_text())
    recipe = {k: config[k] for k in ("lr", "weight_decay", "batch_size", "augment_strength")}
    members = params.get("cnn", {}).get("ensemble", 1)
    loop = _loop_params(params)
    scores = {}
    for scheme, name in (("grouped", "cnn"), ("leaky", "cnn_leaky")):
        with _stage_run(
            f"{name}-{tissue}",
            {"stage": "train_cnn", "tissue": tissue, "scheme": scheme},
            {
                **config["arch"],
                **recipe,
                "scheme": scheme,
                **loop,
                **({"ensemble": members} if members != 1 else {}),
            },
        ) as tracks:
            model, fits, score = train_cnn_ensemble(
                store,
                table,
                tissue,
                config,
                params["train"],
                params["augment"],
                members,
                scheme=scheme,
            )
            if tracks:
                meta = {"kind": "cnn", "arch": config["arch"], "tissue": tissue, "scheme": scheme}
                if len(fits) == 1:
                    _finish(model, fits[0], store, out_dir / f"{name}.pt", meta)
                else:
                    _finish_ensemble(model, fits, score, store, out_dir / f"{name}.pt", meta)
            scores[name] = score
    return scores


def _finish_ensemble(
    model: torch.nn.Module,
    fits: list[FitResult],
    score: float,
    store: TileStore,
    path: Path,
    meta: dict[str, Any],
) -> None:
    """:func:`_finish` for an ensemble: each member's history under ``member<k>_``, the
    ensemble's validation score, and a sidecar naming the members."""
    for k, member in enumerate(fits, 1):
        log_history(member.history, prefix=f"member{k}_")
    mlflow.log_metrics(
        {
            "best_val_balanced_accuracy": score,
            "train_seconds": sum(f.seconds for f in fits),
            **{
                f"member{k}_best_val_balanced_accuracy": f.best_score for k, f in enumerate(fits, 1)
            },
        }
    )
    _save_with_sidecar(
        model,
        store,
        path,
        {
            **meta,
            "members": len(fits),
            "member_best_epochs": [f.best_epoch for f in fits],
            "member_val_balanced_accuracy": [f.best_score for f in fits],
            "val_balanced_accuracy": score,
        },
    )


def _finish(
    model: torch.nn.Module, result: FitResult, store: TileStore, path: Path, meta: dict[str, Any]
) -> None:
    """Log a fit's history and score to the active run; save the model and its sidecar."""
    log_history(result.history)
    mlflow.log_metrics(
        {"best_val_balanced_accuracy": result.best_score, "train_seconds": result.seconds}
    )
    _save_with_sidecar(
        model,
        store,
        path,
        {**meta, "best_epoch": result.best_epoch, "val_balanced_accuracy": result.best_score},
    )


def _save_with_sidecar(
    model: torch.nn.Module, store: TileStore, path: Path, meta: dict[str, Any]
) -> None:
    """Save the model with a sidecar that adds the tiles' size and channels; log the sidecar."""
    meta = {
        **meta,
        "tile_px": int(store.index["tile_px"].iloc[0]),
        "in_channels": store.channels(meta["tissue"]),
    }
    save_model(path, model, meta)
    mlflow.log_artifact(str(path.with_suffix(".json")), "model")


def run_pretrain(
    params: dict[str, Any], tissue: str, tiles: Path, splits: Path, out: Path
) -> float:
    """Rotation-prediction pretraining of the ResNet backbone on train-split tiles."""
    store, table = _inputs(tiles, splits)
    rcfg = params["resnet"]
    cfg = TrainConfig.from_params(
        {**params["train"], **rcfg}, epochs=rcfg["pretext_epochs"], patience=rcfg["pretext_epochs"]
    )
    seed_everything(cfg.seed, cfg.threads)
    stem = rcfg.get("stem", DEFAULT_STEM)
    model = pretext_model(rcfg["arch"], stem, store.channels(tissue))
    train = TileDataset(store, *split_rows(store, table, tissue, "grouped", "train"))
    val = TileDataset(store, *split_rows(store, table, tissue, "grouped", "val"))
    with _stage_run(
        f"pretext-{tissue}",
        {"stage": "pretrain", "tissue": tissue},
        {
            "arch": rcfg["arch"],
            "stem": stem,
            "task": "rotation",
            "epochs": cfg.epochs,
            "lr_schedule": cfg.lr_schedule,
            "channels_last": cfg.channels_last,
        },
    ) as tracks:
        result = pretrain(model, train, val, cfg)
        if tracks:
            log_history(result.history)
            save_model(
                out,
                model,
                {
                    "kind": "pretext",
                    "arch": rcfg["arch"],
                    "stem": stem,
                    "task": "rotation",
                    "in_channels": store.channels(tissue),
                    "val_balanced_accuracy": result.best_score,
                },
            )
    return result.best_score


def run_train_resnet(
    params: dict[str, Any], tissue: str, tiles: Path, splits: Path, pretext: Path, out_dir: Path
) -> dict[str, float]:
    """Fine-tune one ResNet per init in ``resnet.inits``."""
    store, table = _inputs(tiles, splits)
    defaults = {"stem": DEFAULT_STEM, **_loop_params(params)}
    rcfg = {**defaults, **params["train"], **params["resnet"]}
    scores = {}
    logged = ("arch", "stem", "freeze_epochs", "epochs", "lr", "lr_schedule", "weight_decay")
    logged += ("batch_size", "channels_last")
    for init in params["resnet"]["inits"]:
        with _stage_run(
            f"resnet_{init}-{tissue}",
            {"stage": "train_resnet", "tissue": tissue, "init": init},
            {k: rcfg[k] for k in logged} | {"init": init},
        ) as tracks:
            model, result = train_resnet(
                store,
                table,
                tissue,
                init,
                rcfg,
                params["augment"],
                pretext_path=pretext if init == "pretext" else None,
            )
            if tracks:
                meta = {"kind": "resnet", "arch": rcfg["arch"], "stem": rcfg["stem"]}
                meta |= {"init": init, "tissue": tissue}
                _finish(model, result, store, out_dir / f"resnet_{init}.pt", meta)
            scores[f"resnet_{init}"] = result.best_score
    return scores


def load_model(path: Path) -> torch.nn.Module:
    """Rebuild a saved model from its JSON sidecar and state dict (weights_only load)."""
    return build_module(json.loads(path.with_suffix(".json").read_text()), path)


def _frame(
    store: TileStore, positions: np.ndarray, labels: np.ndarray, prob: np.ndarray
) -> pd.DataFrame:
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


def run_evaluate(
    params: dict[str, Any],
    tissue: str,
    tiles: Path,
    splits: Path,
    models: Path,
    out: Path,
    plots: Path,
) -> dict[str, Any]:
    """Test-split metrics of every model of a tissue, the baseline, and the leaky inflation."""
    from bonedamage.learn import baseline  # scikit-image and scipy: this stage alone needs them

    store, table = _inputs(tiles, splits)
    cfg = params["evaluate"]
    device = resolve_device(params["train"]["device"])
    seed_everything(int(cfg["seed"]), int(params["train"]["threads"]))
    test_pos, test_y = split_rows(store, table, tissue, "grouped", "test")
    leaky_pos, leaky_y = split_rows(store, table, tissue, "leaky", "test")
    names = ["cnn", *(f"resnet_{i}" for i in params["resnet"]["inits"])]
    results: dict[str, Any] = {}
    frames = {}

    def score(name: str, positions: np.ndarray, labels: np.ndarray, prob: np.ndarray) -> dict:
        frame = _frame(store, positions, labels, prob)
        frames[name] = frame
        return evaluate.evaluate_predictions(
            frame,
            visible=cfg["visible_damage_fraction"],
            n_boot=int(cfg["bootstrap"]),
            seed=int(cfg["seed"]),
        )

    for name in names:
        model = load_model(
            models / f"{name}.pt" if name == "cnn" else models / "resnet" / f"{name}.pt"
        )
        prob, _ = predict(
            model, make_loader(TileDataset(store, test_pos, test_y), 256, shuffle=False), device
        )
        results[name] = score(name, test_pos, test_y, prob[:, 1])
    leaky = load_model(models / "cnn_leaky.pt")
    prob, _ = predict(
        leaky, make_loader(TileDataset(store, leaky_pos, leaky_y), 256, shuffle=False), device
    )
    results["cnn_leaky_split"] = score("cnn_leaky_split", leaky_pos, leaky_y, prob[:, 1])
    train_pos, train_y = split_rows(store, table, tissue, "grouped", "train")
    # the baseline's 2D features look at the tiled plane itself (2.5-D tiles: the middle one)
    clf = baseline.fit_baseline(
        centre_plane(store.tiles(train_pos)), train_y, kind=cfg["baseline"], seed=int(cfg["seed"])
    )
    test_tiles = centre_plane(store.tiles(test_pos))
    results["baseline"] = score(
        "baseline", test_pos, test_y, baseline.predict_baseline(clf, test_tiles)
    )
    # where the numbers were made: the gate reproduces them exactly only on the same platform
    platform = numerics_platform(device)
    evaluate.write_json(out, {**results, "platform": platform})
    plots.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        roc = evaluate.roc_points(frame["label"].to_numpy(), frame["prob"].to_numpy())
        write_text_atomic(plots / f"roc_{name}.csv", roc.to_csv(index=False))
    with mlflow.start_run(
        run_name=f"evaluate-{tissue}",
        tags={
            **version_tags(),
            **{f"platform.{k}": v for k, v in platform.items()},
            "stage": "evaluate",
            "tissue": tissue,
        },
    ):
        for name, metrics in results.items():
            mlflow.log_metrics(
                {
                    f"{name}.{k}": float(v)
                    for k, v in metrics.items()
                    if isinstance(v, int | float) and v is not None
                }
            )
        mlflow.log_artifact(str(out))
    return results
