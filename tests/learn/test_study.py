"""Optuna search (learn/study.py): small studies, resume, four workers on one storage, the
study's figures and its export as a journal file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from bonedamage.data.tilestore import TileStore
from bonedamage.learn import study as search


def run(learn_data, params: dict, storage: Path, **overrides):
    cfg = {**params["search"], "storage": str(storage), **overrides}
    store, table = TileStore(learn_data[0]), pd.read_parquet(learn_data[1])
    return search.optimize(store, table, "cortical", cfg, params["train"], params["augment"])


def test_small_search_then_resume_keeps_finished_trials(learn_data, learn_params, tmp_path):
    storage = tmp_path / "studies.journal"
    study = run(learn_data, learn_params, storage)
    assert search.n_finished(study) == 3
    best = search.best_config(study)
    assert set(best["arch"]) == set(search.ARCH_KEYS) and 0 <= best["value"] <= 1
    first = [(t.number, t.params, t.value) for t in study.trials]
    # a re-run with the same budget does nothing; a larger budget continues the same study
    assert search.n_finished(run(learn_data, learn_params, storage)) == 3
    resumed = run(learn_data, learn_params, storage, n_trials=4)
    assert search.n_finished(resumed) == 4
    assert [(t.number, t.params, t.value) for t in resumed.trials[:3]] == first
    plots = search.save_plots(resumed, tmp_path / "plots")
    assert (tmp_path / "plots" / "optimization_history.png") in plots
    again = search.save_plots(resumed, tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in plots]


def test_changed_settings_start_a_new_study_in_the_same_storage(learn_data, learn_params):
    store = TileStore(learn_data[0])
    cfg, train, augment = learn_params["search"], learn_params["train"], learn_params["augment"]
    tag = search.fingerprint(store, cfg, train, augment)
    # the budget and the storage do not change what a trial scores; the space does
    assert search.fingerprint(store, {**cfg, "n_trials": 99, "storage": "x"}, train, augment) == tag
    assert search.fingerprint(store, {**cfg, "epochs": cfg["epochs"] + 1}, train, augment) != tag
    assert search.fingerprint(store, cfg, {**train, "seed": 1}, augment) != tag
    # how the figures are drawn is no setting of the trials either
    assert search.fingerprint(store, {**cfg, "min_trials_for_importance": 3}, train, augment) == tag
    assert search.study_name("cortical", cfg, tag) == f"bonedamage-cortical-cnn-{tag}"


def test_pruner_reports_every_epoch(learn_data, learn_params, tmp_path) -> None:
    study = run(
        learn_data,
        learn_params,
        tmp_path / "s.journal",
        n_trials=4,
        pruner={"kind": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
    )
    for trial in study.trials:
        assert len(trial.intermediate_values) == trial.user_attrs.get(
            "epochs_run", len(trial.intermediate_values)
        )
        assert len(trial.intermediate_values) >= 1
    assert search.study_summary(study)["trials"] == 4


WORKER = """
import json, sys, time
from pathlib import Path
import pandas as pd
from bonedamage.data.tilestore import TileStore
from bonedamage.learn import study as search
a = json.loads(sys.argv[1])
done = []

class Record:  # tags each trial with its worker; prints the trials this process finished
    def trial_started(self, trial, params):
        trial.set_user_attr("worker", a["worker"])
    def epoch_end(self, trial, epoch, metrics):
        pass
    def trial_finished(self, trial, state, value):
        done.append(trial.number)

if a.get("gate"):  # a barrier: every worker opens the study at the same moment
    gate = Path(a["gate"])
    (gate / str(a["worker"])).touch()
    deadline = time.monotonic() + 120
    while len(list(gate.iterdir())) < a["workers"]:
        if time.monotonic() > deadline:
            sys.exit("not every worker arrived")
        time.sleep(0.01)
search.optimize(TileStore(a["tiles"]), pd.read_parquet(a["splits"]), "cortical", a["cfg"],
                  a["train"], a["augment"], hooks=Record(), worker=a["worker"])
print(json.dumps(done))
"""


def worker(learn_data, learn_params, cfg: dict, number: int = 0, **extra) -> subprocess.Popen:
    args = {
        "tiles": str(learn_data[0]),
        "splits": str(learn_data[1]),
        "cfg": cfg,
        "train": learn_params["train"],
        "augment": learn_params["augment"],
        "worker": number,
        **extra,
    }
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_killed_search_resumes_with_its_finished_trials(learn_data, learn_params, tmp_path):
    storage = tmp_path / "killed.journal"
    cfg = {**learn_params["search"], "storage": str(storage), "n_trials": 50}
    proc = worker(learn_data, learn_params, cfg)
    deadline = time.monotonic() + 240
    finished: list = []
    while len(finished) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if storage.exists():
            names = optuna.get_all_study_names(search.storage_from(str(storage)))
            if names:
                study = optuna.load_study(
                    study_name=names[0], storage=search.storage_from(str(storage))
                )
                finished = study.get_trials(states=search.FINISHED)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(finished) >= 2, proc.stderr.read() if proc.stderr else ""
    kept = {t.number: (t.params, t.value) for t in finished}
    # the killed worker's last trial stays RUNNING; the budget counts finished trials only
    resumed = run(learn_data, learn_params, storage, n_trials=len(kept) + 1)
    done = resumed.get_trials(states=search.FINISHED)
    assert len(done) == len(kept) + 1
    assert {t.number: (t.params, t.value) for t in done if t.number in kept} == kept


def test_four_worker_processes_share_one_study_without_lock_errors_or_lost_trials(
    learn_data, learn_params, tmp_path
) -> None:
    """Four processes start the same search at the same moment on one storage.

    Storage: a journal file, the plain path that params.yaml ``search.storage`` holds by
    default (``storage_from`` makes it a JournalStorage). Not a ``sqlite:///`` URL: four
    processes opening a new SQLite storage at once race to create its schema (one dies with
    ``UNIQUE constraint failed: alembic_version``, tried with Optuna 5.0), and SQLite lets
    one writer at a time, so busy workers queue on its lock (``database is locked`` once
    they wait too long). The journal is an append-only log guarded by a lock file, meant
    for many processes on one machine or a shared file system; across machines the key
    takes a PostgreSQL URL (docs/scale-out.md).
    """
    n = 4
    storage = tmp_path / "shared.journal"
    cfg = {**learn_params["search"], "storage": str(storage), "n_trials": n, "epochs": 1}
    gate = tmp_path / "gate"
    gate.mkdir()
    procs = [worker(learn_data, learn_params, cfg, w, gate=str(gate), workers=n) for w in range(n)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [err[-2000:] for _, err in outs]
    for _, err in outs:
        assert "database is locked" not in err and "Traceback" not in err, err[-2000:]
    reported = {w: json.loads(out.strip().splitlines()[-1]) for w, (out, _) in enumerate(outs)}
    # four simultaneous create_study(load_if_exists=True) calls made one study
    names = optuna.get_all_study_names(search.storage_from(str(storage)))
    assert len(names) == 1 and names[0].startswith("bonedamage-cortical-cnn-")
    study = optuna.load_study(study_name=names[0], storage=search.storage_from(str(storage)))
    trials = study.get_trials()
    finished = study.get_trials(states=search.FINISHED)
    assert len(finished) == len(trials)  # none left RUNNING, none FAILED
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # distinct, no gap
    # each worker stops once the study holds n finished trials: at most one more each
    assert n <= len(finished) <= 2 * n - 1
    # no lost trial: every trial a worker finished is in the study, under that worker
    everyone = sorted(number for numbers in reported.values() for number in numbers)
    assert everyone == sorted(t.number for t in finished)
    assert all(t.params for t in finished)
    assert all(t.value is not None for t in finished if t.state == TrialState.COMPLETE)
    for w, numbers in reported.items():
        assert numbers, f"worker {w} finished no trial"
        assert sorted(t.number for t in finished if t.user_attrs["worker"] == w) == sorted(numbers)


def test_storage_urls_and_pruners(tmp_path: Path) -> None:
    assert search.storage_from("sqlite:///x.db") == "sqlite:///x.db"
    assert isinstance(
        search.storage_from(str(tmp_path / "a" / "j.log")), optuna.storages.JournalStorage
    )
    assert isinstance(search.make_pruner({"kind": "hyperband"}, 5), optuna.pruners.HyperbandPruner)
    with pytest.raises(ValueError, match="pruner"):
        search.make_pruner({"kind": "nope"}, 5)
    with pytest.raises(ValueError, match=r"search\.pruner\.percentile: unknown key"):
        search.make_pruner({"kind": "median", "percentile": 25}, 5)  # a median has none


@pytest.mark.parametrize(("kind", "pruned"), [("median", False), ("percentile", True)])
def test_percentile_pruner_keeps_only_the_top_quarter(kind: str, pruned: bool) -> None:
    cfg = {"kind": kind, "n_startup_trials": 0, "n_warmup_steps": 0}
    cfg |= {"percentile": 25} if kind == "percentile" else {}
    study = optuna.create_study(direction="maximize", pruner=search.make_pruner(cfg, 4))
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for value in (0.5, 0.6, 0.7, 0.8):  # median 0.65, top-quarter cut 0.725
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": value}, distributions=dist, value=value, intermediate_values={0: value}
            )
        )
    trial = study.ask()
    trial.report(0.72, 0)
    assert bool(trial.should_prune()) is pruned


@pytest.mark.parametrize(
    ("reduction_factor", "step", "value", "pruned"),
    [
        (2, 0, 0.1, False),  # before the first rung (step min_resource = 1): never pruned
        (2, 1, 0.7, False),  # top half of 0.5, 0.6, 0.8 and itself: promoted
        (2, 1, 0.55, True),
        (4, 1, 0.7, True),  # top quarter: only the best of four goes on
    ],
)
def test_successive_halving_keeps_the_top_share_at_each_rung(
    reduction_factor: int, step: int, value: float, pruned: bool
) -> None:
    cfg = {"kind": "successive_halving", "min_resource": 1, "reduction_factor": reduction_factor}
    pruner = search.make_pruner(cfg, 8)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for done in (0.5, 0.6, 0.8):  # what earlier trials scored at the first rung
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": done},
                distributions=dist,
                value=done,
                intermediate_values={0: done, 1: done},
                system_attrs={"completed_rung_0": done},
            )
        )
    trial = study.ask()
    trial.report(value, step)
    assert bool(trial.should_prune()) is pruned


# -- the study's figures and its journal export, on a toy study (no training) -------------

EPOCHS = 4


def toy_study(
    n_trials: int, pruned_after: dict[int, int] | None = None, storage: object = None
) -> optuna.Study:
    """A seeded study of a cheap objective over 3 parameters that reports ``EPOCHS`` scores
    like the search's trials; trial ``n`` in ``pruned_after`` is pruned after that many."""
    pruned_after = pruned_after or {}
    study = optuna.create_study(
        study_name="toy-cortical-cnn",
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        n = trial.suggest_int("n", 1, 4)
        bonus = 0.1 if trial.suggest_categorical("c", ["a", "b"]) == "a" else 0.0
        scores = []
        for epoch in range(EPOCHS):
            scores.append(0.4 + 0.4 * x * (epoch + 1) / EPOCHS + bonus - 0.01 * n)
            trial.report(scores[-1], epoch)
            if pruned_after.get(trial.number) == epoch + 1:
                raise optuna.TrialPruned()
        trial.set_user_attr("epochs_run", EPOCHS)
        return max(scores)

    study.optimize(objective, n_trials=n_trials)
    return study


def test_history_shows_every_trial_pruned_ones_marked_and_the_best_so_far() -> None:
    study = toy_study(6, pruned_after={2: 1, 4: 3})
    fig = search.history_figure(study)
    ax = fig.axes[0]
    points = {c.get_label(): c.get_offsets().tolist() for c in ax.collections}
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert [t.number for t in pruned] == [2, 4]
    # a pruned trial sits at the score of the epoch it stopped at, marked apart
    assert points["pruned: score of the epoch it stopped at"] == [
        [t.number, t.intermediate_values[max(t.intermediate_values)]] for t in pruned
    ]
    assert points["complete: best epoch's score"] == [[t.number, t.value] for t in complete]
    (best,) = [line for line in ax.lines if line.get_label() == "best so far"]
    running = [max(t.value for t in complete[: i + 1]) for i in range(len(complete))]
    assert list(best.get_ydata()) == [*running, running[-1]]
    assert list(best.get_xdata()) == [*(t.number for t in complete), 5]  # to the last trial
    assert ax.get_ylabel() == "validation balanced accuracy (val_balanced_accuracy)"
    assert search.OBJECTIVE == "val_balanced_accuracy"  # the score each trial reports
    assert "6 trials (4 complete, 2 pruned)" in ax.get_title()


def test_importances_from_too_few_complete_trials_say_why_there_are_none() -> None:
    study = toy_study(5, pruned_after={0: 1, 3: 2})
    fig = search.importance_figure(study, seed=0, min_trials=8)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "3 complete trials: too few to rank 3 parameters" in texts
    assert not fig.axes[0].patches  # no bars


def test_importances_rank_every_parameter_from_enough_complete_trials() -> None:
    study = toy_study(9, pruned_after={1: 1})
    fig = search.importance_figure(study, seed=0, min_trials=8)
    ax = fig.axes[0]
    assert len(ax.patches) == 3  # one bar per parameter
    assert {t.get_text() for t in ax.get_yticklabels()} == {"x", "n", "c"}
    assert "from 8 complete trials" in ax.get_title(loc="left")
    assert not [t for t in ax.texts if "too few" in t.get_text()]


def test_save_plots_writes_the_same_bytes_every_time(tmp_path: Path) -> None:
    study = toy_study(6, pruned_after={2: 1})
    first = search.save_plots(study, tmp_path / "a", min_trials_for_importance=3)
    # Optuna's importance plot changes matplotlib's global style: not the next history plot
    again = search.save_plots(study, tmp_path / "b", min_trials_for_importance=3)
    assert [p.name for p in first] == ["optimization_history.png", "param_importances.png"]
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in first]


def load_journal(path: Path) -> optuna.Study:
    return optuna.load_study(study_name=None, storage=JournalStorage(JournalFileBackend(str(path))))


def test_exported_journal_holds_every_finished_trial(tmp_path: Path) -> None:
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "live.journal")))
    study = toy_study(3, pruned_after={1: 2}, storage=storage)
    study.ask()  # left RUNNING, as by a killed process: not a finished trial
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=1)
    path = search.export_journal(study, tmp_path / "out" / search.JOURNAL_NAME)
    loaded = load_journal(path)
    assert loaded.study_name == study.study_name
    assert loaded.metric_names == [search.OBJECTIVE]
    finished = study.get_trials(states=search.FINISHED)
    assert [t.number for t in loaded.trials] == [0, 1, 2, 3]  # renumbered without the gap
    assert [t.state for t in loaded.trials] == [t.state for t in finished]
    assert loaded.trials[1].state == TrialState.PRUNED
    for got, want in zip(loaded.trials, finished, strict=True):
        assert got.params == want.params and got.distributions == want.distributions
        assert got.value == want.value and got.intermediate_values == want.intermediate_values
        assert got.user_attrs == want.user_attrs
        assert got.system_attrs == {}  # no resume state
    assert loaded.best_trial.params == study.best_trial.params


def test_exported_journal_bytes_depend_on_the_trials_only(tmp_path: Path, monkeypatch) -> None:
    """Two runs of the same study (other wall times, other random worker ids, another time
    zone) export the same bytes: the journal is a committed pipeline output."""
    first = search.export_journal(toy_study(4, pruned_after={1: 1}), tmp_path / "a.journal")
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        time.sleep(0.01)
        again = search.export_journal(toy_study(4, pruned_after={1: 1}), tmp_path / "b.journal")
    finally:
        monkeypatch.undo()
        time.tzset()
    assert again.read_bytes() == first.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.journal", "b.journal"]  # no lock files


def test_optuna_dashboard_opens_the_exported_journal(tmp_path: Path) -> None:
    """``optuna-dashboard <file>`` takes the file as its storage: its WSGI app, given the
    path as the CLI gives it, lists the study with every trial (no server started)."""
    from wsgiref.util import setup_testing_defaults

    import optuna_dashboard

    path = search.export_journal(toy_study(4, pruned_after={2: 1}), tmp_path / "s.journal")
    before = path.read_bytes()
    app = optuna_dashboard.wsgi(str(path))

    def get(url: str) -> dict:
        environ = {"PATH_INFO": url, "REQUEST_METHOD": "GET"}
        setup_testing_defaults(environ)
        status: list[str] = []
        body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
        assert status == ["200 OK"], body[:500]
        return json.loads(body)

    (summary,) = get("/api/studies")["study_summaries"]
    assert summary["study_name"] == "toy-cortical-cnn"
    detail = get(f"/api/studies/{summary['study_id']}")
    assert [t["state"] for t in detail["trials"]] == ["Complete", "Complete", "Pruned", "Complete"]
    assert detail["objective_names"] == [search.OBJECTIVE]
    assert len(detail["trials"][2]["intermediate_values"]) == 1
    assert path.read_bytes() == before  # reading leaves the committed file as it was


def test_a_study_whose_trials_were_all_pruned_names_no_best_trial() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for _ in range(2):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        trial.report(0.5, 0)
        study.tell(trial, state=TrialState.PRUNED)
    assert search.study_summary(study)["best_value"] is None
    with pytest.raises(search.SearchError, match="no trial completed"):
        search.best_config(study)
