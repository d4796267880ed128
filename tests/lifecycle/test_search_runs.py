"""An exported Optuna study replayed as MLflow runs (lifecycle/search_runs.py)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from bonedamage.learn.study import export_journal
from bonedamage.lifecycle import search_runs, tracking


def small_study() -> optuna.Study:
    """Four trials: three complete with per-epoch values, one pruned after two epochs."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="bonedamage-cortical", direction="maximize")
    study.set_metric_names(["val_balanced_accuracy"])
    for number in range(4):
        trial = study.ask({"width": optuna.distributions.IntDistribution(8, 64)})
        for epoch in range(2 if number == 3 else 3):
            trial.report(0.5 + 0.1 * number + 0.01 * epoch, epoch)
        if number == 3:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, 0.5 + 0.1 * number)
    return study


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure({"db": "s.db", "artifacts": "art", "experiment": "s"}, tmp_path)
    return MlflowClient()


def test_a_study_becomes_a_parent_run_with_one_nested_run_per_trial(
    client: MlflowClient, tmp_path: Path
) -> None:
    journal = export_journal(small_study(), tmp_path / "study.journal")
    experiment = mlflow.get_experiment_by_name("s").experiment_id
    parent, created = search_runs.record_search(client, experiment, "cortical", journal)
    assert created
    run = client.get_run(parent)
    assert run.info.run_name == "search-cortical" and run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "search" and run.data.tags["tissue"] == "cortical"
    assert run.data.metrics["best_val_balanced_accuracy"] == pytest.approx(0.7)
    trials = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    by_name = {t.info.run_name: t for t in trials}
    assert sorted(by_name) == ["trial-000", "trial-001", "trial-002", "trial-003"]
    pruned = by_name["trial-003"]
    assert pruned.data.tags["optuna.state"] == "PRUNED" and "width" in pruned.data.params
    # Optuna gives a pruned trial the value of the last epoch it ran
    assert pruned.data.metrics["objective_val_balanced_accuracy"] == pytest.approx(0.81)
    curve = client.get_metric_history(by_name["trial-002"].info.run_id, "val_balanced_accuracy")
    assert [(m.step, round(m.value, 3)) for m in curve] == [(0, 0.7), (1, 0.71), (2, 0.72)]


def test_the_same_study_is_recorded_once(client: MlflowClient, tmp_path: Path) -> None:
    journal = export_journal(small_study(), tmp_path / "study.journal")
    experiment = mlflow.get_experiment_by_name("s").experiment_id
    first, _ = search_runs.record_search(client, experiment, "cortical", journal)
    again, created = search_runs.record_search(client, experiment, "cortical", journal)
    assert again == first and not created
    assert len(client.search_runs([experiment], "tags.stage = 'search'")) == 1
    # another tissue's study is its own search
    _, other = search_runs.record_search(client, experiment, "trabecular", journal)
    assert other


def test_a_search_run_without_its_trials_is_completed_by_a_replay(
    client: MlflowClient, tmp_path: Path
) -> None:
    """A search that resumed a finished study trains no trial and logs no trial run."""
    journal = export_journal(small_study(), tmp_path / "study.journal")
    experiment = mlflow.get_experiment_by_name("s").experiment_id
    tags = {
        "stage": "search",
        "tissue": "cortical",
        tracking.STUDY_MD5_TAG: tracking.study_md5(journal),
    }
    with mlflow.start_run(tags=tags) as empty:
        pass
    parent, created = search_runs.record_search(client, experiment, "cortical", journal)
    assert created and parent != empty.info.run_id
