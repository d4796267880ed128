"""MLflow tracking (lifecycle/tracking.py): store, version tags, nested search runs."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml

from bonedamage.lifecycle import runs, tracking
from conftest import REPO


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.configure({"db": "t.db", "artifacts": "art", "experiment": "test"}, tmp_path)
    assert uri == f"sqlite:///{tmp_path / 't.db'}"
    return uri


def test_tracking_uri_env_overrides_the_default(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    uri = tracking.configure({"db": "ignored.db", "artifacts": "a", "experiment": "e"}, tmp_path)
    assert uri.endswith("env.db") and not (tmp_path / "ignored.db").exists()


def test_version_tags_name_the_data_and_the_commit() -> None:
    tags = tracking.version_tags(REPO)
    recorded = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]["md5"]
    assert tags["data.raw_md5"] == recorded
    assert len(tags["git.commit"]) in (40, 7) or tags["git.commit"] == "unknown"


def test_search_is_a_parent_run_with_one_nested_run_per_trial(
    store, learn_data, learn_params, tmp_path
) -> None:
    params = {
        **learn_params,
        "search": {**learn_params["search"], "storage": str(tmp_path / "s.journal")},
    }
    best = runs.run_search(
        params, "cortical", *learn_data, tmp_path / "best.json", tmp_path / "reports"
    )
    assert (tmp_path / "best.json").is_file() and best["summary"]["trials"] == 3
    found = mlflow.search_runs(experiment_names=["test"], output_format="list")
    parents = [r for r in found if r.data.tags.get("stage") == "search"]
    assert len(parents) == 1
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 3
    assert {c.data.tags["optuna.state"] for c in children} <= {"COMPLETE", "PRUNED"}
    assert all("val_balanced_accuracy" in c.data.metrics for c in children)
    assert parents[0].data.tags["data.raw_md5"]
    artifacts = mlflow.artifacts.list_artifacts(
        run_id=parents[0].info.run_id, artifact_path="plots"
    )
    assert any(a.path.endswith("optimization_history.png") for a in artifacts)
