"""Optuna search (learn/search.py): small studies, resume, two workers on one storage."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from bonedamage.data.tilestore import TileStore
from bonedamage.learn import search


def run(learn_data, params: dict, storage: Path, **overrides):
    cfg = {**params["search"], "storage": str(storage), **overrides}
    store, table = TileStore(learn_data[0]), pd.read_parquet(learn_data[1])
    return search.run_search(store, table, "cortical", cfg, params["train"], params["augment"])


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
    assert search.summary(study)["trials"] == 4


WORKER = """
import json, sys
import pandas as pd
from bonedamage.data.tilestore import TileStore
from bonedamage.learn import search
a = json.loads(sys.argv[1])
search.run_search(TileStore(a["tiles"]), pd.read_parquet(a["splits"]), "cortical", a["cfg"],
                  a["train"], a["augment"], worker=a["worker"])
"""


def worker(learn_data, learn_params, cfg: dict, number: int = 0) -> subprocess.Popen:
    args = {
        "tiles": str(learn_data[0]),
        "splits": str(learn_data[1]),
        "cfg": cfg,
        "train": learn_params["train"],
        "augment": learn_params["augment"],
        "worker": number,
    }
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(args)], stderr=subprocess.PIPE, text=True
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


def test_two_worker_processes_share_one_study(learn_data, learn_params, tmp_path) -> None:
    storage = tmp_path / "shared.journal"
    cfg = {**learn_params["search"], "storage": str(storage), "n_trials": 4}
    procs = [worker(learn_data, learn_params, cfg, w) for w in (0, 1)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    names = optuna.get_all_study_names(search.storage_from(str(storage)))
    assert len(names) == 1 and names[0].startswith("bonedamage-cortical-cnn-")
    study = optuna.load_study(study_name=names[0], storage=search.storage_from(str(storage)))
    finished = study.get_trials(states=search.FINISHED)
    assert 4 <= len(finished) <= 5  # each worker stops once the study holds 4 finished trials
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert not study.get_trials(states=(optuna.trial.TrialState.FAIL,))


def test_storage_urls_and_pruners(tmp_path: Path) -> None:
    assert search.storage_from("sqlite:///x.db") == "sqlite:///x.db"
    assert isinstance(
        search.storage_from(str(tmp_path / "a" / "j.log")), optuna.storages.JournalStorage
    )
    assert isinstance(search.make_pruner({"kind": "hyperband"}, 5), optuna.pruners.HyperbandPruner)
    with pytest.raises(ValueError, match="pruner"):
        search.make_pruner({"kind": "nope"}, 5)
