"""Optuna search of the CNN family: one study per tissue, objective = validation balanced accuracy.

The objective reads like the search space in ``params.yaml`` (``search.space``): each
trial suggests an architecture, optimiser settings and an augmentation strength, trains
on the specimen-grouped train split and reports the validation balanced accuracy after
every epoch so the pruner can stop hopeless trials early. Studies live in a persistent
storage: a re-run continues the same study and keeps its finished trials, and any number
of worker processes (or machines, with a database URL) pointed at the same storage share
one study. A search killed mid-trial and run again ends with the same trials, scores and
best configuration as one never interrupted (see ``RESUME_KEY``). Logging is injected
through :class:`SearchHooks` (MLflow lives in ``lifecycle``), so this module runs with or
without tracking. The finished study's figures (:func:`save_plots`) and the study itself as
a journal file (:func:`export_journal`) are committed outputs, with bytes that depend on
the trials only, so Optuna's views open a study the pipeline did not re-run.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import itertools
import json
import os
import warnings
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import optuna
import pandas as pd
from optuna.importance import FanovaImportanceEvaluator
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import FrozenTrial, TrialState

from bonedamage.atomic import atomic_path, write_text_atomic
from bonedamage.config import pruner_settings
from bonedamage.data.tilestore import INDEX_NAME, TileStore
from bonedamage.learn.datasets import Augment
from bonedamage.learn.models import build_cnn
from bonedamage.learn.recipes import fit_on_split
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
OBJECTIVE = "val_balanced_accuracy"  # the metric each trial reports per epoch and maximises
OBJECTIVE_LABEL = "validation balanced accuracy"

MIN_TRIALS_FOR_IMPORTANCE = 8
"""Complete trials below which ``param_importances.png`` ranks nothing and says why: a
fANOVA forest fit on a handful of points ranks a dozen parameters by noise. The default
of params ``search.min_trials_for_importance``."""

JOURNAL_NAME = "study.journal"  # the exported study, next to the plots
_EXPORT_WORKER = "bonedamage-export"
_EXPORT_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

# Every trial records in its system attributes the worker that ran it, its slot (how many
# trials that worker had finished before it) and the sampler's random state once the trial's
# parameters are drawn. A worker resuming a study restores the random state of its last
# finished trial and seeds its next trial by slot: the trial a killed process left RUNNING
# is drawn and trained again exactly as an uninterrupted run would have, so the resumed
# study's finished trials, scores and best configuration are those of an uninterrupted one.
RESUME_KEY = "bonedamage:resume"
_ATTR_CHUNK = 2045  # RDB storages keep a system attribute value under 2046 characters

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


# Optuna releases whose sampler internals ``_sampler_random_states`` was checked against
# (tests/learn/test_optuna_private.py); other releases fail loudly on resume, not silently.
_OPTUNA_VERIFIED_MAJOR = 5


def _sampler_random_states(sampler: optuna.samplers.BaseSampler) -> list[np.random.RandomState]:
    """The NumPy random states the TPE sampler draws its suggestions from: its own (the TPE
    candidates) and that of its startup :class:`~optuna.samplers.RandomSampler`.

    The only place this module reads Optuna internals: ``sampler._rng.rng`` and
    ``sampler._random_sampler._rng.rng`` (Optuna 5.0's ``TPESampler`` keeps each
    ``RandomState`` in a private ``LazyRandomState``). Optuna has no public way to read or
    set a sampler's random state (``reseed_rng`` only reseeds from entropy), and resuming a
    stopped study must continue the same sequence of suggestions as an uninterrupted run,
    so :func:`_record_trial` saves these states and :func:`_resume` restores them.

    Raises:
        RuntimeError: the sampler does not hold them where Optuna 5 does (another sampler,
            or an Optuna release that moved them): re-verify these internals.
    """
    try:
        states = [sampler._rng.rng, sampler._random_sampler._rng.rng]  # type: ignore[attr-defined]
    except AttributeError as exc:
        missing = f"{type(exc).__name__}: {exc}"
    else:
        if all(isinstance(s, np.random.RandomState) for s in states):
            return states
        missing = f"not numpy RandomStates but {[type(s).__name__ for s in states]}"
    raise RuntimeError(
        f"cannot save or restore the random state of {type(sampler).__name__} under Optuna "
        f"{optuna.__version__} (verified for Optuna {_OPTUNA_VERIFIED_MAJOR}.x TPESampler: "
        f"sampler._rng.rng and sampler._random_sampler._rng.rng; {missing}); resuming a "
        "study needs them, re-verify them with tests/learn/test_optuna_private.py"
    )


def _record_trial(trial: optuna.Trial, worker: int, slot: int) -> None:
    """Tag ``trial`` with its worker and slot and the sampler's state after its draws."""
    states = []
    for rng in _sampler_random_states(trial.study.sampler):
        _, key, pos, has_gauss, gauss = rng.get_state(legacy=True)
        raw = base64.b64encode(np.asarray(key, dtype="<u4").tobytes()).decode("ascii")
        states.append({"key": raw, "pos": int(pos), "has_gauss": int(has_gauss), "gauss": gauss})
    text = json.dumps(states)
    chunks = [text[i : i + _ATTR_CHUNK] for i in range(0, len(text), _ATTR_CHUNK)]
    # Optuna 5's Trial has no public system-attribute setter; the storage's has, keyed by
    # the trial's storage id, which the storage looks up from the study name and number.
    storage = trial.storage
    study_id = storage.get_study_id_from_name(trial.study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    for i, chunk in enumerate(chunks):
        storage.set_trial_system_attr(trial_id, f"{RESUME_KEY}:rng:{i}", chunk)
    tag = {"worker": worker, "slot": slot, "rng_chunks": len(chunks)}
    storage.set_trial_system_attr(trial_id, RESUME_KEY, tag)


def _resume(study: optuna.Study, worker: int) -> int:
    """Restore the sampler state of ``worker``'s last finished trial; return its next slot."""
    mine = [
        t
        for t in study.get_trials(deepcopy=False, states=FINISHED)
        if (t.system_attrs.get(RESUME_KEY) or {}).get("worker") == worker
    ]
    if not mine:
        return 0
    last = max(mine, key=lambda t: t.system_attrs[RESUME_KEY]["slot"])
    tag = last.system_attrs[RESUME_KEY]
    text = "".join(last.system_attrs[f"{RESUME_KEY}:rng:{i}"] for i in range(tag["rng_chunks"]))
    for rng, state in zip(_sampler_random_states(study.sampler), json.loads(text), strict=True):
        key = np.frombuffer(base64.b64decode(state["key"]), dtype="<u4").astype(np.uint32)
        rng.set_state(("MT19937", key, state["pos"], state["has_gauss"], state["gauss"]))
    return int(tag["slot"]) + 1


class JournalFlock:
    """An exclusive ``flock`` on ``<journal>.flock`` around each journal write (the lock
    interface of Optuna's journal file backend: ``acquire`` and ``release``).

    The kernel drops it when its holder dies, so a search killed while writing never blocks
    the next one. (Optuna's default lock is a symlink that a killed writer leaves behind; for
    a relative journal path it dangles, its grace period never expires, and every later
    search spins forever waiting for it.)
    """

    def __init__(self, journal: Path) -> None:
        self._path = f"{journal}.flock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # releases the lock


def storage_from(url: str) -> optuna.storages.BaseStorage | str:
    """A database URL (``sqlite:///``, ``postgresql://`` ...) as is; a plain path becomes a
    journal file, which many processes on one machine (or a shared file system) can share
    without SQLite's write locks."""
    if "://" in url:
        return url
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(str(path), lock_obj=JournalFlock(path))
    return optuna.storages.JournalStorage(backend)


def make_pruner(cfg: dict[str, Any], epochs: int) -> optuna.pruners.BasePruner:
    """The pruner of ``search.pruner``: ``median``; ``percentile`` (keeps the trials in the
    top ``percentile`` % at each epoch: 25 prunes harder than the median's 50);
    ``hyperband``; ``successive_halving`` (one Hyperband bracket: at epochs
    ``min_resource`` x ``reduction_factor``^k it keeps the top 1 / ``reduction_factor``);
    ``none``."""
    cfg = pruner_settings(cfg)
    kind = cfg["kind"]
    # Steps are 0-based epochs: a rung at step 1 compares trials after their second epoch.
    warmup = {k: cfg[k] for k in ("n_startup_trials", "n_warmup_steps") if k in cfg}
    rungs = {k: cfg[k] for k in ("min_resource", "reduction_factor") if k in cfg}
    if kind == "median":
        return optuna.pruners.MedianPruner(**warmup)
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(float(cfg["percentile"]), **warmup)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(max_resource=epochs, **rungs)
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**rungs)
    return optuna.pruners.NopPruner()  # kind "none": pruner_settings allows no other


def fingerprint(store: TileStore, *configs: dict[str, Any]) -> str:
    """Short hash of the tile index and every setting the objective depends on.

    It goes into the study name, so a re-run with the same data and settings continues
    its study while changed data or settings start a new one in the same storage (a study
    never mixes trials scored on different tiles or search spaces).
    """
    ignored = {"n_trials", "timeout_s", "storage", "study_prefix", "min_trials_for_importance"}
    settings = [{k: v for k, v in c.items() if k not in ignored} for c in configs]
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update((store.root / INDEX_NAME).read_bytes())
    return digest.hexdigest()[:10]


def study_name(tissue: str, cfg: dict[str, Any], tag: str = "") -> str:
    """``<prefix>-<tissue>-cnn[-<fingerprint>]``."""
    name = f"{cfg['study_prefix']}-{tissue}-cnn"
    return f"{name}-{tag}" if tag else name


def open_study(tissue: str, cfg: dict[str, Any], worker: int = 0, tag: str = "") -> optuna.Study:
    """Create or load the tissue's study (TPE with explicit, seeded settings)."""
    sampler = optuna.samplers.TPESampler(
        seed=int(cfg["seed"]) + worker,
        n_startup_trials=int(cfg["n_startup_trials"]),
        multivariate=False,
        constant_liar=worker > 0,  # workers sharing a study must not draw the same points
    )
    return optuna.create_study(
        study_name=study_name(tissue, cfg, tag),
        storage=storage_from(str(cfg["storage"])),
        direction="maximize",
        sampler=sampler,
        pruner=make_pruner(cfg["pruner"], int(cfg["epochs"])),
        load_if_exists=True,
    )


def n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def n_complete(study: optuna.Study) -> int:
    """Trials that ran all their epochs (pruned ones have no final value to rank)."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


class SearchError(RuntimeError):
    """A search that cannot name a best trial (every trial pruned or failed)."""


def optimize(
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
    channels = store.channels(tissue)
    slots = itertools.count(_resume(study, worker))

    def objective(trial: optuna.Trial) -> float:
        slot = next(slots)  # = trial.number in an uninterrupted single-worker study
        params = suggest(trial, cfg["space"])
        _record_trial(trial, worker, slot)
        if hooks:
            hooks.trial_started(trial, params)
        tc = TrainConfig.from_params(
            train_cfg,
            epochs=epochs,
            lr=params["lr"],
            weight_decay=params["weight_decay"],
            batch_size=params["batch_size"],
            patience=epochs,
            seed=int(cfg["seed"]) + slot,
        )
        seed_everything(tc.seed, tc.threads)
        model = build_cnn({k: params[k] for k in ARCH_KEYS}, channels)
        augment = Augment.from_params(augment_cfg, params["augment_strength"])

        def report(epoch: int, metrics: dict[str, float]) -> None:
            trial.report(metrics[OBJECTIVE], epoch)
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
        objective, n_trials=remaining, timeout=cfg["timeout_s"], callbacks=[finished], catch=()
    )
    return study


def best_config(study: optuna.Study) -> dict[str, Any]:
    """The best trial's architecture, optimiser settings and augmentation strength.

    ``trial`` is its position among the study's finished trials (Optuna's numbers also
    count the trials that killed processes left unfinished).
    """
    if not n_complete(study):
        raise SearchError(
            f"study {study.study_name}: no trial completed ({study_summary(study)['states']}): "
            "nothing to choose; run more trials (params search.n_trials) or prune less "
            "(search.pruner)"
        )
    best = study.best_trial
    finished = [t.number for t in study.get_trials(deepcopy=False, states=FINISHED)]
    return {
        "trial": finished.index(best.number),
        "value": best.value,
        "arch": {k: best.params[k] for k in ARCH_KEYS},
        **{k: best.params[k] for k in ("lr", "weight_decay", "batch_size", "augment_strength")},
    }


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """Finished trials by state and the epochs they spent (pruning saves epochs); trials
    left unfinished (by a killed process, or another worker still running) are not counted."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    states = pd.Series([t.state.name for t in trials]).value_counts().to_dict()
    epochs = [t.user_attrs.get("epochs_run", len(t.intermediate_values)) for t in trials]
    return {
        "trials": len(trials),
        "states": {k: int(v) for k, v in states.items()},
        "epochs_spent": int(np.sum(epochs)) if epochs else 0,
        "best_value": study.best_value if n_complete(study) else None,
    }


def finished_study(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of ``study`` holding its finished trials only, numbered 0, 1, ...
    as in a study never interrupted (the stored study keeps the number of a trial that a
    killed process left unfinished)."""
    copy = optuna.create_study(study_name=study.study_name, directions=study.directions)
    copy.add_trials(study.get_trials(deepcopy=False, states=FINISHED))
    return copy


def save_plots(
    study: optuna.Study,
    out_dir: Path,
    seed: int = 0,
    min_trials_for_importance: int = MIN_TRIALS_FOR_IMPORTANCE,
) -> list[Path]:
    """Optimisation history and parameter importances as PNGs (matplotlib, headless).

    Both show the :func:`finished_study`, so a resumed study gives the figures of an
    uninterrupted one. The importances' fANOVA forest is seeded and the PNGs carry no
    software metadata, so the same study gives the same bytes (the files are committed
    pipeline outputs). With fewer than ``min_trials_for_importance`` complete trials the
    importances figure says so instead of ranking the parameters.
    """
    study = finished_study(study)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "optimization_history.png": partial(history_figure, study),
        "param_importances.png": partial(importance_figure, study, seed, min_trials_for_importance),
    }
    written = []
    for name, figure in figures.items():
        # Optuna's plots switch the global style: each figure starts from the default
        with plt.style.context("default"):
            fig = figure()
            with atomic_path(out_dir / name) as tmp:  # a killed search leaves no truncated PNG
                fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
        plt.close(fig)
        written.append(out_dir / name)
    return written


def history_figure(study: optuna.Study) -> Any:
    """Every trial's value by trial number: complete trials (their objective, the best
    epoch's score), pruned ones (the score of the epoch they stopped at, Optuna's value of a
    pruned trial) and the best value so far among complete trials."""
    import matplotlib.pyplot as plt

    trials = study.get_trials(deepcopy=False, states=FINISHED)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.value is not None]
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    ax.scatter(
        [t.number for t in complete],
        [t.value for t in complete],
        color="tab:blue",
        zorder=3,
        label="complete: best epoch's score",
    )
    ax.scatter(
        [t.number for t in pruned],
        [t.value for t in pruned],
        marker="x",
        color="tab:red",
        zorder=3,
        label="pruned: score of the epoch it stopped at",
    )
    if complete:
        best = np.maximum.accumulate([t.value for t in complete])
        numbers = [t.number for t in complete]
        last = max(t.number for t in trials)
        ax.step(
            [*numbers, last],
            [*best, best[-1]],
            where="post",
            color="tab:green",
            label="best so far",
        )
    counts = f"{len(complete)} complete, {len(trials) - len(complete)} pruned"
    ax.set_title(f"{study.study_name}: {len(trials)} trials ({counts})", fontsize=10)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{OBJECTIVE_LABEL} ({OBJECTIVE})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    return fig


def importance_figure(study: optuna.Study, seed: int, min_trials: int) -> Any:
    """fANOVA importances of the parameters for the objective (seeded forest), or a figure
    that says why there are none: fewer than ``min_trials`` complete trials."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    n_params = len({name for t in study.get_trials(deepcopy=False) for name in t.params})
    if len(complete) >= max(min_trials, 2):
        with warnings.catch_warnings():  # the plots are stable API in all but name
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ax = ovm.plot_param_importances(
                study,
                evaluator=FanovaImportanceEvaluator(seed=seed),
                target_name=OBJECTIVE,
            )
        fig = ax.figure
        fig.set_size_inches(8, 5)
        ax.set_title(
            f"{study.study_name}: importances from {len(complete)} complete trials",
            loc="left",
            fontsize=10,
        )
        ax.set_xlabel(f"importance for the {OBJECTIVE_LABEL} (fANOVA)")
        fig.tight_layout()
        return fig
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_axis_off()
    trials = "trial" if len(complete) == 1 else "trials"
    ax.text(
        0.5,
        0.55,
        f"{len(complete)} complete {trials}: too few to rank {n_params} parameters",
        ha="center",
        va="center",
        fontsize=14,
    )
    ax.text(
        0.5,
        0.4,
        f"importances need at least {min_trials} complete trials "
        "(params search.min_trials_for_importance)",
        ha="center",
        va="center",
        fontsize=10,
        color="dimgray",
    )
    ax.set_title(f"{study.study_name}: parameter importances", fontsize=10)
    return fig


class _MemoryJournal(BaseJournalBackend):
    """A journal backend holding its logs in memory, for :func:`export_journal`."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        return self.logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self.logs.extend(json.loads(json.dumps(log)) for log in logs)


def _exported_trial(trial: FrozenTrial) -> FrozenTrial:
    """``trial`` without its system attributes (the resume state) and with datetimes made
    from its number: trial n starts at 2000-01-01 00:00 UTC + n hours and lasts one minute
    per epoch it reported (the wall times are in MLflow)."""
    start = _EXPORT_EPOCH + timedelta(hours=trial.number)
    exported = optuna.trial.create_trial(
        state=trial.state,
        value=trial.value,
        params=trial.params,
        distributions=trial.distributions,
        user_attrs=trial.user_attrs,
        intermediate_values=trial.intermediate_values,
    )
    exported.datetime_start = start
    exported.datetime_complete = start + timedelta(minutes=len(trial.intermediate_values))
    return exported


def export_journal(study: optuna.Study, path: Path) -> Path:
    """Write the :func:`finished_study` as an Optuna journal file that
    ``optuna.load_study(storage=JournalStorage(JournalFileBackend(path)))`` and
    ``optuna-dashboard <path>`` open: every finished trial, pruned ones included, with its
    parameters, value, intermediate values and user attributes, and the objective's name.

    The bytes depend on the trials only (a committed pipeline output): the datetimes come
    from the trial numbers (:func:`_exported_trial`) and every log names one worker,
    where Optuna would write wall times and a random worker id. The dashboard appends the
    notes and attributes written in it to the file it opens: annotate a copy.
    """
    backend = _MemoryJournal()
    export = optuna.create_study(
        storage=optuna.storages.JournalStorage(backend),
        study_name=study.study_name,
        directions=study.directions,
        sampler=optuna.samplers.RandomSampler(seed=0),  # draws nothing: trials are added
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        export.set_metric_names([OBJECTIVE])
    export.set_user_attr(
        "datetimes", "trial n: 2000-01-01 UTC + n hours, one minute per epoch (not wall time)"
    )
    for trial in finished_study(study).get_trials(deepcopy=False):
        export.add_trial(_exported_trial(trial))
    lines = [
        json.dumps({**log, "worker_id": _EXPORT_WORKER}, separators=(",", ":"))
        for log in backend.logs
    ]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
