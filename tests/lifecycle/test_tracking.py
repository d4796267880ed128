"""MLflow tracking (lifecycle/tracking.py): store, version tags, nested search runs."""

from __future__ import annotations

import copy
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from bonedamage.data.tilestore import TileStore
from bonedamage.lifecycle import tracking
from bonedamage.stages.search import run_search
from conftest import REPO, tiny_metrics, write_params, write_tiny_models


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.configure({"db": "t.db", "artifacts": "art", "experiment": "test"}, tmp_path)
    assert uri == f"sqlite:///{tmp_path / 't.db'}"
    return uri


def test_the_experiment_is_marked_for_model_development(store: str, tmp_path: Path) -> None:
    experiment = mlflow.get_experiment_by_name("test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment made before (or by MLflow's UI) gets the mark on the next configure
    client = mlflow.MlflowClient()
    client.set_experiment_tag(
        experiment.experiment_id, "mlflow.experimentKind", "genai_development"
    )
    tracking.configure({"db": "t.db", "artifacts": "art", "experiment": "test"}, tmp_path)
    again = mlflow.get_experiment_by_name("test")
    assert again.tags["mlflow.experimentKind"] == "custom_model_development"


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
    search = {**learn_params["search"], "storage": str(tmp_path / "s.journal")}
    store_cfg = {"db": str(tmp_path / "t.db"), "artifacts": "art", "experiment": "test"}
    path = write_params(tmp_path / "params.yaml", learn_params, search=search, mlflow=store_cfg)
    run_search(
        path, "cortical", *learn_data, out=tmp_path / "best.json", reports=tmp_path / "reports"
    )
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["summary"]["trials"] == 3
    found = mlflow.search_runs(experiment_names=["test"], output_format="list")
    parents = [r for r in found if r.data.tags.get("stage") == "search"]
    assert len(parents) == 1
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 3
    assert {c.data.tags["optuna.state"] for c in children} <= {"COMPLETE", "PRUNED"}
    assert all("val_balanced_accuracy" in c.data.metrics for c in children)
    # a killed search's trial run can be ended by the next command (owner tags)
    assert {c.data.tags["process.pid"] for c in [*parents, *children]} == {str(os.getpid())}
    assert parents[0].data.tags["data.raw_md5"]
    artifacts = mlflow.artifacts.list_artifacts(
        run_id=parents[0].info.run_id, artifact_path="plots"
    )
    assert any(a.path.endswith("optimization_history.png") for a in artifacts)


# -- a tracking server that does not answer ---------------------------------------------
def closed_port() -> int:
    """A local port nobody listens on (bound, then released): connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_passes_any_answer_and_fails_fast_on_none() -> None:
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:  # e.g. a proxy without /health: it answered, so MLflow can take it from here
        tracking.check_reachable(f"http://127.0.0.1:{server.server_port}/")
    finally:
        server.shutdown()
        server.server_close()
    tracking.check_reachable("sqlite:///nowhere/at/all.db")  # not a server: nothing to probe
    url = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=f"{url} does not answer"):
        tracking.check_reachable(url)
    assert time.monotonic() - start < 10
    with pytest.raises(tracking.TrackingError) as failed:  # a password is not repeated
        tracking.check_reachable(url.replace("//", "//me:secret@"))
    assert url in str(failed.value) and "secret" not in str(failed.value)


def test_an_unreachable_tracking_server_stops_register_at_once_writing_nothing(
    learn_data, learn_params, tmp_path
) -> None:
    """`bonedamage register` with MLFLOW_TRACKING_URI on a closed port: exit 2 in seconds
    with an error naming the URI, no traceback, and no registry record (its DVC output).
    Unprobed, MLflow's client retries the dead server for minutes before it fails."""
    params = copy.deepcopy(learn_params)
    params["registry"] = {**params["registry"], "prefix": "t"}
    params["resnet"]["inits"] = ["scratch"]
    params["mlflow"] = {"db": str(tmp_path / "unused.db"), "artifacts": "a", "experiment": "e"}
    write_params(tmp_path / "params.yaml", params)
    models = tmp_path / "models"
    tile_px = int(TileStore(learn_data[0]).index["tile_px"].iloc[0])
    write_tiny_models(models / "cortical", "cortical", seed=1, tile_px=tile_px)
    (tmp_path / "metrics.json").write_text(json.dumps(tiny_metrics(0.8, 0.9)))
    url = f"http://127.0.0.1:{closed_port()}"
    out = tmp_path / "registry" / "cortical.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=url)
    cmd = [str(Path(sys.executable).with_name("bonedamage")), "register", "--tissue", "cortical",
           "--params", str(tmp_path / "params.yaml"), "--tiles", str(learn_data[0]),
           "--splits", str(learn_data[1]), "--models", str(models),
           "--metrics", str(tmp_path / "metrics.json"), "--out", str(out)]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(f"error: MLflow tracking server {url} does not answer")
    assert "Traceback" not in done.stderr
    assert elapsed < 20, f"took {elapsed:.0f} s"
    assert not out.exists() and not out.parent.exists()
    assert not (tmp_path / "unused.db").exists() and not (tmp_path / "a").exists()


# -- runs of killed processes --------------------------------------------------------------
def test_runs_of_killed_processes_on_this_host_are_marked_killed(store, tmp_path) -> None:
    """A SIGKILLed stage leaves its run RUNNING; the next tracked command ends it as KILLED,
    and leaves the runs of live processes, of other hosts and without owner tags alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()
    client = mlflow.tracking.MlflowClient()
    experiment = mlflow.get_experiment_by_name("test").experiment_id
    owners = {
        "killed": {"process.host": host, "process.pid": str(dead.pid)},
        "live": {"process.host": host, "process.pid": str(live.pid)},
        "other host": {"process.host": f"not-{host}", "process.pid": str(dead.pid)},
        "no owner": {},
    }
    try:
        ids = {
            name: client.create_run(experiment, tags=tags, run_name=name).info.run_id
            for name, tags in owners.items()
        }
        tracking.configure({"db": "t.db", "artifacts": "art", "experiment": "test"}, tmp_path)
        status = {name: client.get_run(i).info.status for name, i in ids.items()}
    finally:
        live.kill()
        live.wait()
    assert status == {"killed": "KILLED", "live": "RUNNING", "other host": "RUNNING",
                      "no owner": "RUNNING"}  # fmt: skip


def test_every_stage_run_names_its_owner_process() -> None:
    tags = tracking.version_tags(REPO)
    assert tags["process.pid"] == str(os.getpid())
    assert tags["process.host"] == socket.gethostname()
