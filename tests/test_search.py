"""Optuna search (learn/search.py): small studies, resume, two workers on one storage."""

from __future__ import annotations

import json
import subprocess
import sys
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


def test_two_worker_processes_share_one_study(learn_data, learn_params, tmp_path) -> None:
    storage = tmp_path / "shared.journal"
    cfg = {**learn_params["search"], "storage": str(storage), "n_trials": 4}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                json.dumps(
                    {
                        "tiles": str(learn_data[0]),
                        "splits": str(learn_data[1]),
                        "cfg": cfg,
                        "train": learn_params["train"],
                        "augment": learn_params["augment"],
                        "worker": w,
                    }
                ),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in (0, 1)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    study = optuna.load_study(
        study_name="bonedamage-cortical-cnn", storage=search.storage_from(str(storage))
    )
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
