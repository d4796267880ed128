"""The MLproject: entry points for every step, runnable with `mlflow run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, small_synth


def test_entry_points_cover_every_pipeline_stage_and_main() -> None:
    project = yaml.safe_load((REPO / "MLproject").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert project["entry_points"]["main"]["command"].startswith("dvc repro")
    assert set(stages) <= set(project["entry_points"])


def test_mlflow_run_of_an_entry_point_works_end_to_end(params, tmp_path: Path) -> None:
    small = dict(params, synth=small_synth(params))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    env.pop("MLFLOW_EXPERIMENT_ID", None)  # mlflow.set_experiment in this process sets it
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("mlflow")), "run", str(REPO), "-e", "synth",
         "--env-manager", "local", "-P", f"params={tmp_path / 'params.yaml'}",
         "-P", f"out={tmp_path / 'raw'}"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = pd.read_csv(tmp_path / "raw" / "manifest.csv")
    assert set(manifest["tissue"]) == {"cortical", "trabecular"}
    (run,) = MlflowClient(uri).search_runs(["0"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "synth"
