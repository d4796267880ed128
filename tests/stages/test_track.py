"""The track stage (stages/track.py): what DVC's skipped stages would have logged."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bonedamage.atomic import InputError
from bonedamage.learn.study import export_journal
from bonedamage.lifecycle import registry, tracking
from bonedamage.stages.track import run_track
from conftest import write_params

TISSUE = "cortical"


def study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.create_study(study_name=f"bonedamage-{TISSUE}", direction="maximize")
    s.set_metric_names(["val_balanced_accuracy"])
    for number in range(3):
        trial = s.ask({"n_blocks": optuna.distributions.IntDistribution(2, 4)})
        trial.report(0.6 + 0.1 * number, 0)
        s.tell(trial, 0.6 + 0.1 * number)
    return s


@pytest.fixture
def pipeline(params: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The committed outputs track reads, in tmp: a study journal, evaluate's tables of the
    CNN, a registry record; and a store whose CNN version came from a training run."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = {"db": str(tmp_path / "t.db"), "artifacts": str(tmp_path / "art"), "experiment": "t"}
    paths = {**params["pipeline"]["paths"]}
    for key in ("reports", "plots", "registry"):
        paths[key] = str(tmp_path / key)
    export_journal(study(), tmp_path / "reports" / "search" / TISSUE / "study.journal")
    tables = tmp_path / "plots" / TISSUE
    tables.mkdir(parents=True)
    pd.DataFrame({"fpr": [0, 0.1, 1], "tpr": [0, 0.9, 1], "threshold": [1, 0.5, 0]}).to_csv(
        tables / "roc_cnn.csv", index=False
    )
    name = f"{params['registry']['prefix']}-{TISSUE}-cnn"
    record = {"models": {name: {"weights_md5": "current"}}}
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / f"{TISSUE}.json").write_text(json.dumps(record))
    pipeline_params = {**params["pipeline"], "paths": paths}
    path = write_params(tmp_path / "params.yaml", params, mlflow=store, pipeline=pipeline_params)
    tracking.configure(store)
    client = MlflowClient()
    client.create_registered_model(name)
    runs = {}
    for weights in ("older", "current"):  # v1 stays champion, v2 is the new challenger
        with mlflow.start_run(tags={"stage": "train_cnn", "tissue": TISSUE}) as run:
            pass
        tags = {"metrics_key": "cnn", "model.md5": weights}
        source = f"runs:/{run.info.run_id}/model"
        version = client.create_model_version(name, source, run.info.run_id, tags=tags)
        runs[weights] = run.info.run_id
    client.set_registered_model_alias(name, registry.CHAMPION, "1")
    client.set_registered_model_alias(name, registry.CHALLENGER, version.version)
    return {"params": path, "run": runs["current"], "older": runs["older"], "tmp": tmp_path}


def test_track_replays_a_skipped_search_once_and_draws_the_test_figures(
    pipeline: dict, capsys
) -> None:
    assert run_track(pipeline["params"], TISSUE) == 0
    out = capsys.readouterr().out
    assert "replayed from" in out and "evaluation/roc.png" in out
    client = MlflowClient()
    searches = mlflow.search_runs(filter_string="tags.stage = 'search'", output_format="list")
    assert len(searches) == 1
    trials = mlflow.search_runs(
        filter_string=f"tags.`mlflow.parentRunId` = '{searches[0].info.run_id}'",
        output_format="list",
    )
    assert len(trials) == 3
    figures = {a.path for a in client.list_artifacts(pipeline["run"], "evaluation")}
    assert figures == {"evaluation/roc.png"}  # evaluate wrote no confusion table here
    # the champion's older weights were not scored by today's evaluate
    assert not client.list_artifacts(pipeline["older"], "evaluation")

    assert run_track(pipeline["params"], TISSUE) == 0  # always run: nothing twice
    assert "already in the store" in capsys.readouterr().out
    assert len(mlflow.search_runs(filter_string="tags.stage = 'search'", output_format="list")) == 1


def test_track_before_the_search_exported_its_study_names_the_missing_file(
    pipeline: dict,
) -> None:
    (pipeline["tmp"] / "reports" / "search" / TISSUE / "study.journal").unlink()
    with pytest.raises(InputError, match=r"study\.journal"):
        run_track(pipeline["params"], TISSUE)
