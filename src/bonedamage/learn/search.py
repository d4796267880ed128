"""Optuna search of the CNN family: one study per tissue, objective = validation balanced accuracy.

The objective reads like the search space in ``params.yaml`` (``search.space``): each
trial suggests an architecture, optimiser settings and an augmentation strength, trains
on the specimen-grouped train split and reports the validation balanced accuracy after
every epoch so the pruner can stop hopeless trials early. Studies live in a persistent
storage: a re-run continues the same study and keeps its finished trials, and any number
of worker processes (or machines, with a database URL) pointed at the same storage share
one study. Logging is injected through :class:`SearchHooks` (MLflow lives in
``lifecycle``), so this module runs with or without tracking.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import optuna
import pandas as pd
from optuna.importance import FanovaImportanceEvaluator
from optuna.trial import TrialState

from bonedamage.data.tilestore import INDEX_NAME, TileStore
from bonedamage.learn.data import Augment
from bonedamage.learn.final import fit_on_split
from bonedamage.learn.models import build_cnn
from bonedamage.learn.train import TrainConfig, seed_everything

ARCH_KEYS = (
    "n_blocks",
    "base_filters",
    "filter_growth",
    "kernel_size",
    "norm",
    "pool",
    "dropout",
    "dense_units",
)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

optuna.logging.set_verbosity(optuna.logging.WARNING)


class SearchHooks(Protocol):
    """What a tracker sees of a study (all optional to act on)."""

    def trial_started(self, trial: optuna.Trial, params: dict[str, Any]) -> None: ...
    def epoch_end(self, trial: optuna.Trial, epoch: int, metrics: dict[str, float]) -> None: ...
    def trial_finished(self, trial: optuna.Trial, state: str, value: float | None) -> None: ...


def suggest(trial: optuna.Trial, space: dict[str, Any]) -> dict[str, Any]:
    """One point of the search space: architecture, optimiser, augmentation strength."""
    return {
        "n_blocks": trial.suggest_int("n_blocks", *space["n_blocks"]),
        "base_filters": trial.suggest_categorical("base_filters", space["base_filters"]),
        "filter_growth": trial.suggest_float("filter_growth", *space["filter_growth"]),
        "kernel_size": trial.suggest_categorical("kernel_size", space["kernel_size"]),
        "norm": trial.suggest_categorical("norm", space["norm"]),
        "pool": trial.suggest_categorical("pool", space["pool"]),
        "dropout": trial.suggest_float("dropout", *space["dropout"]),
        "dense_units": trial.suggest_categorical("dense_units", space["dense_units"]),
        "lr": trial.suggest_float("lr", *space["lr"], log=True),
        "weight_decay": trial.suggest_float("weight_decay", *space["weight_decay"], log=True),
        "batch_size": trial.suggest_categorical("batch_size", space["batch_size"]),
        "augment_strength": trial.suggest_float("augment_strength", *space["augment_strength"]),
    }


def storage_from(url: str) -> optuna.storages.BaseStorage | str:
    """A database URL (``sqlite:///``, ``postgresql://`` ...) as is; a plain path becomes a
    journal file, which many processes on one machine (or a shared file system) can share
    without SQLite's write locks."""
    if "://" in url:
        return url
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def make_pruner(cfg: dict[str, Any], epochs: int) -> optuna.pruners.BasePruner:
    kind = cfg.get("kind", "median")
    if kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(cfg.get("n_startup_trials", 3)),
            n_warmup_steps=int(cfg.get("n_warmup_steps", 1)),
        )
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"search.pruner.kind={kind!r}: use median, hyperband or none")


def fingerprint(store: TileStore, *configs: dict[str, Any]) -> str:
    """Short hash of the tile index and every setting the objective depends on.

    It goes into the study name, so a re-run with the same data and settings continues
    its study while changed data or settings start a new one in the same storage (a study
    never mixes trials scored on different tiles or search spaces).
    """
    ignored = {"n_trials", "timeout_s", "storage", "study_prefix"}
    settings = [{k: v for k, v in c.items() if k not in ignored} for c in configs]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update((store.root / INDEX_NAME).read_bytes())
    return digest.hexdigest()[:10]


def study_name(tissue: str, cfg: dict[str, Any], tag: str = "") -> str:
    """``<prefix>-<tissue>-cnn[-<fingerprint>]``."""
    name = f"{cfg.get('study_prefix', 'bonedamage')}-{tissue}-cnn"
    return f"{name}-{tag}" if tag else name


def open_study(tissue: str, cfg: dict[str, Any], worker: int = 0, tag: str = "") -> optuna.Study:
    """Create or load the tissue's study (TPE with explicit, seeded settings)."""
    sampler = optuna.samplers.TPESampler(
        seed=int(cfg["seed"]) + worker,
        n_startup_trials=int(cfg.get("n_startup_trials", 5)),
        multivariate=False,
        constant_liar=worker > 0 or bool(cfg.get("constant_liar", False)),
    )
    return optuna.create_study(
        study_name=study_name(tissue, cfg, tag),
        storage=storage_from(str(cfg["storage"])),
        direction="maximize",
        sampler=sampler,
        pruner=make_pruner(cfg.get("pruner", {}), int(cfg["epochs"])),
        load_if_exists=True,
    )


def n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_search(
    store: TileStore,
    splits: pd.DataFrame,
    tissue: str,
    cfg: dict[str, Any],
    train_cfg: dict[str, Any],
    augment_cfg: dict[str, Any],
    *,
    hooks: SearchHooks | None = None,
    worker: int = 0,
) -> optuna.Study:
    """Run the tissue's study until it holds ``n_trials`` finished trials (or ``timeout_s``)."""
    study = open_study(tissue, cfg, worker, fingerprint(store, cfg, train_cfg, augment_cfg))
    target = int(cfg["n_trials"])
    remaining = target - n_finished(study)
    if remaining <= 0:
        return study
    epochs = int(cfg["epochs"])

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, cfg["space"])
        if hooks:
            hooks.trial_started(trial, params)
        tc = TrainConfig.from_params(
            train_cfg,
            epochs=epochs,
            lr=params["lr"],
            weight_decay=params["weight_decay"],
            batch_size=params["batch_size"],
            patience=epochs,
            seed=int(cfg["seed"]) + trial.number,
        )
        seed_everything(tc.seed, tc.threads)
        model = build_cnn({k: params[k] for k in ARCH_KEYS})
        augment = Augment.from_params(augment_cfg, params["augment_strength"])

        def report(epoch: int, metrics: dict[str, float]) -> None:
            trial.report(metrics["val_balanced_accuracy"], epoch)
            if hooks:
                hooks.epoch_end(trial, epoch, metrics)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        result = fit_on_split(model, store, splits, tissue, "grouped", augment, tc, on_epoch=report)
        trial.set_user_attr("epochs_run", len(result.history))
        return result.best_score

    def finished(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if hooks:
            hooks.trial_finished(trial, trial.state.name, trial.value)
        if n_finished(study) >= target:
            study.stop()

    study.optimize(
        objective, n_trials=remaining, timeout=cfg.get("timeout_s"), callbacks=[finished], catch=()
    )
    return study


def best_config(study: optuna.Study) -> dict[str, Any]:
    """The best trial's architecture, optimiser settings and augmentation strength."""
    best = study.best_trial
    return {
        "trial": best.number,
        "value": best.value,
        "arch": {k: best.params[k] for k in ARCH_KEYS},
        **{k: best.params[k] for k in ("lr", "weight_decay", "batch_size", "augment_strength")},
    }


def summary(study: optuna.Study) -> dict[str, Any]:
    """Trial counts by state and epochs spent (pruning saves epochs)."""
    trials = study.get_trials(deepcopy=False)
    states = pd.Series([t.state.name for t in trials]).value_counts().to_dict()
    epochs = [t.user_attrs.get("epochs_run", len(t.intermediate_values)) for t in trials]
    return {
        "trials": len(trials),
        "states": {k: int(v) for k, v in states.items()},
        "epochs_spent": int(np.sum(epochs)) if epochs else 0,
        "best_value": study.best_value if n_finished(study) else None,
    }


def save_plots(study: optuna.Study, out_dir: Path, seed: int = 0) -> list[Path]:
    """Optimisation history and parameter importances as PNGs (matplotlib, headless).

    The importances' fANOVA forest is seeded and the PNGs carry no software metadata, so
    the same study gives the same bytes (the files are pipeline outputs in dvc.lock).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    plots = {
        "optimization_history.png": ovm.plot_optimization_history,
        "param_importances.png": partial(
            ovm.plot_param_importances, evaluator=FanovaImportanceEvaluator(seed=seed)
        ),
    }
    for name, plot in plots.items():
        try:
            ax = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances need 2+ complete trials
            logging.getLogger(__name__).warning("no %s: %s", name, exc)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100, metadata={"Software": None})
        plt.close(fig)
        written.append(out_dir / name)
    return written
