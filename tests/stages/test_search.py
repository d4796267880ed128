"""The search stage (stages/search.py): its committed outputs are the best configuration, the
study's figures and the study itself as a journal file, each with bytes that depend on the
trials only."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from bonedamage.learn import study as search
from bonedamage.lifecycle import tracking
from bonedamage.stages.search import run_search
from conftest import write_params

OUTPUTS = ("optimization_history.png", "param_importances.png", search.JOURNAL_NAME)


def test_search_commits_its_study_as_a_journal_next_to_the_figures(
    learn_data, learn_params, tmp_path: Path, capsys
) -> None:
    store = {"db": str(tmp_path / "m.db"), "artifacts": str(tmp_path / "art"), "experiment": "s"}
    tracking.configure(store)
    live = tmp_path / "optuna" / "studies.journal"  # the search's own storage (not committed)
    params = {**learn_params, "mlflow": store, "search": {**learn_params["search"]}}
    params["search"]["storage"] = str(live)
    path = write_params(tmp_path / "params.yaml", params)
    best, reports = tmp_path / "models" / "cortical" / "cnn_search.json", tmp_path / "rep"

    assert run_search(path, "cortical", *learn_data, out=best, reports=reports) == 0
    journal = reports / "cortical" / search.JOURNAL_NAME
    assert f"optuna-dashboard {journal}" in capsys.readouterr().out
    assert sorted(p.name for p in (reports / "cortical").iterdir()) == sorted(OUTPUTS)
    exported = optuna.load_study(
        study_name=None, storage=JournalStorage(JournalFileBackend(str(journal)))
    )
    storage = search.storage_from(str(live))
    (study,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=study.study_name, storage=storage).get_trials(
        states=search.FINISHED
    )
    assert exported.study_name == study.study_name
    assert [(t.state, t.params, t.value) for t in exported.trials] == [
        (t.state, t.params, t.value) for t in trials
    ]
    committed = {p: p.read_bytes() for p in [best, *(reports / "cortical").iterdir()]}
    # the search run names the study file it exported: `track` will not replay it
    (run,) = mlflow.search_runs(filter_string="tags.stage = 'search'", output_format="list")
    assert run.data.tags[tracking.STUDY_MD5_TAG] == tracking.study_md5(journal)

    # the study holds its trials: a re-run trains nothing and writes the same bytes
    assert run_search(path, "cortical", *learn_data, out=best, reports=reports) == 0
    assert {p: p.read_bytes() for p in committed} == committed
