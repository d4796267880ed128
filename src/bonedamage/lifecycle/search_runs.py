"""An Optuna study as MLflow runs: a parent ``search`` run with one nested run per trial.

The ``search`` stage logs its trials as they run (:class:`~bonedamage.lifecycle.tracking.
MlflowSearchHooks`). When DVC skips it because its committed outputs are current (a fresh
clone), the tracking store would hold no search at all; the study it exported
(``reports/search/<tissue>/study.journal``) still holds every trial, and
:func:`record_search` replays it into the store, once per study file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from bonedamage.atomic import InputError
from bonedamage.lifecycle.tracking import STUDY_MD5_TAG, process_tags, study_md5, version_tags


def find_search(
    client: MlflowClient, experiment_id: str, tissue: str, md5: str, n_trials: int
) -> str | None:
    """The finished search run of ``tissue`` that holds the study ``md5`` with a nested run
    for each of its ``n_trials`` trials, if any (a search that resumed a finished study
    logs no trial runs: it trains none)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.stage = 'search' and tags.tissue = '{tissue}' and "
            f"tags.`{STUDY_MD5_TAG}` = '{md5}' and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        children = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
            max_results=max(n_trials, 1),
        )
        if len(children) >= n_trials:
            return run.info.run_id
    return None


def _load(journal: Path) -> optuna.Study:
    """The one study an exported study file holds."""
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))
    )
    summaries = optuna.get_all_study_summaries(storage)
    if len(summaries) != 1:
        raise InputError(f"{journal}: {len(summaries)} studies, an exported search holds one")
    return optuna.load_study(study_name=summaries[0].study_name, storage=storage)


def record_search(
    client: MlflowClient, experiment_id: str, tissue: str, journal: Path
) -> tuple[str, bool]:
    """The search run of the study in ``journal`` (``(run id, created)``): the store's own
    when it has one, else a new parent run with one nested run per trial (params, the
    objective per epoch under the study's metric name, state and value)."""
    md5, study = study_md5(journal), _load(journal)
    found = find_search(client, experiment_id, tissue, md5, len(study.trials))
    if found is not None:
        return found, False
    objective = (study.metric_names or ["objective"])[0]
    tags = {
        **version_tags(),  # with the owner process: a killed replay is ended as KILLED
        "stage": "search",
        "tissue": tissue,
        "optuna.study": study.study_name,
        STUDY_MD5_TAG: md5,
        "search.source": f"replayed from {journal.as_posix()}",
    }
    parent = client.create_run(experiment_id, tags={**tags, MLFLOW_RUN_NAME: f"search-{tissue}"})
    parent_id = parent.info.run_id
    try:
        for trial in study.trials:
            _record_trial(client, experiment_id, parent_id, study.study_name, trial, objective)
    except BaseException:
        client.set_terminated(parent_id, "FAILED")  # the next replay starts again
        raise
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        client.log_metric(parent_id, f"best_{objective}", max(t.value for t in complete))
    client.log_param(parent_id, "n_trials", len(study.trials))
    client.set_terminated(parent_id, "FINISHED")
    return parent_id, True


def _record_trial(
    client: MlflowClient,
    experiment_id: str,
    parent_id: str,
    study_name: str,
    trial: optuna.trial.FrozenTrial,
    objective: str,
) -> None:
    tags: dict[str, Any] = {
        MLFLOW_PARENT_RUN_ID: parent_id,
        MLFLOW_RUN_NAME: f"trial-{trial.number:03d}",
        "optuna.study": study_name,
        "optuna.trial": str(trial.number),
        "optuna.state": trial.state.name,
        **process_tags(),
    }
    run = client.create_run(experiment_id, tags=tags)
    run_id = run.info.run_id
    for name, value in trial.params.items():
        client.log_param(run_id, name, value)
    for step, value in sorted(trial.intermediate_values.items()):
        client.log_metric(run_id, objective, float(value), step=int(step))
    if trial.value is not None:
        client.log_metric(run_id, f"objective_{objective}", float(trial.value))
    finished = trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    client.set_terminated(run_id, "FINISHED" if finished else "FAILED")
