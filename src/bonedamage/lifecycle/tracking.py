"""MLflow tracking: where runs go, what every run is tagged with, and the search hooks.

Default store: a SQLite file in the repository (``mlflow.db``, embedded, nothing to
start) with artifacts under ``mlartifacts/``; ``MLFLOW_TRACKING_URI`` overrides it (a
remote ``mlflow server``). Every run carries the data version (the DVC hashes of
``data/raw`` and of the tiles and splits) and the git commit, so a metric can always be
traced to the exact data and code that produced it. Telemetry is off. A tracking server
that does not answer stops a command at once (:class:`TrackingError`), before it has
written anything: MLflow's client would retry it for minutes first.

A killed stage cannot end its run, which MLflow would show as RUNNING for ever. Runs are
tagged with the host and process id that own them, and the next tracked command on the
same host marks the runs of processes that are gone as KILLED.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow
import optuna
from mlflow.tracking import MlflowClient

from bonedamage.atomic import pid_alive, require_sqlite
from bonedamage.config import PRETRAIN_METHODS

if TYPE_CHECKING:
    from bonedamage.lifecycle.registry import Candidate

PROBE_TIMEOUT_S = 5.0
STUDY_MD5_TAG = "search.study_md5"  # the exported study file a search run holds
WEIGHTS_MD5_TAG = "model.md5"  # the weights file a training run saved
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"  # the UI then opens on the runs table


class TrackingError(RuntimeError):
    """The tracking server does not answer (check MLFLOW_TRACKING_URI and the server)."""


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`TrackingError` unless the tracking server at ``uri`` answers.

    MLflow's client retries a server that does not answer for minutes
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``); one GET of
    ``<uri>/health`` tells in seconds. Any HTTP answer counts (401 behind a login, 404
    behind a proxy), and so does a TLS handshake this probe cannot verify (MLflow has its
    own certificate settings): only no answer at all is an error. Other stores pass.
    """
    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    # user:password@ stays out of the probe (urllib cannot send it) and of the message
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    try:
        urllib.request.urlopen(shown.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:  # URLError (refused, DNS), timeouts, a bad URL
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return
        raise TrackingError(
            f"MLflow tracking server {shown} does not answer ({reason or type(exc).__name__}): "
            "start it, or fix or unset MLFLOW_TRACKING_URI (unset: the local SQLite store)"
        ) from None


def configure(cfg: dict[str, Any], repo: Path = Path()) -> str:
    """Point MLflow at the configured store and experiment; return the tracking URI.

    A tracking server that does not answer raises :class:`TrackingError` (in seconds); a
    configured SQLite store that is not an SQLite file raises ``InputError``.
    """
    if not os.environ.get("MLFLOW_TRACKING_URI") and cfg.get("db"):
        require_sqlite(repo / cfg["db"], "the MLflow tracking store, params mlflow.db")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(repo / cfg['db']).resolve()}"
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    name = cfg["experiment"]
    if mlflow.get_experiment_by_name(name) is None:
        if uri.startswith(("http://", "https://")):
            artifacts = None  # a tracking server stores (or proxies) artifacts itself
        elif "://" in str(cfg["artifacts"]):
            artifacts = cfg["artifacts"]
        else:
            artifacts = (repo / cfg["artifacts"]).resolve().as_uri()
        mlflow.create_experiment(name, artifact_location=artifacts)
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_DEVELOPMENT:
        # marks the experiment as model development for MLflow (3.17's UI still starts in
        # the GenAI view of its per-browser switch: docs/pipeline.md, Tracking)
        MlflowClient().set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT
        )
    end_orphaned_runs(experiment.experiment_id)
    return uri


def process_tags() -> dict[str, str]:
    """The host and process that own a run (see :func:`end_orphaned_runs`)."""
    return {"process.host": socket.gethostname(), "process.pid": str(os.getpid())}


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of ``experiment_id`` whose owning process (tags from
    :func:`process_tags`) no longer exists on this host; return their ids.

    Runs of other hosts, of live processes and without owner tags are left alone. Hosts
    must not share a name across pid namespaces (containers with the host's UTS namespace
    but their own pids tracking to one server): a live run there could look orphaned.
    """
    owner = process_tags()
    client = MlflowClient()
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    ended = []
    for run in running:
        tags = run.data.tags
        pid = tags.get("process.pid", "")
        if tags.get("process.host") != owner["process.host"] or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and not pid_alive(int(pid)):
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


def _dvc_out_md5(stage_file: Path, path: str | None) -> str | None:
    """The md5 DVC recorded for output ``path`` in a .dvc file or dvc.lock."""
    if not stage_file.exists():
        return None
    doc = yaml.safe_load(stage_file.read_text()) or {}
    outs = list(doc.get("outs", []))
    for stage in (doc.get("stages") or {}).values():
        outs += stage.get("outs", [])
    return next((o.get("md5") for o in outs if o.get("path") == path), None)


def _pipeline_paths(repo: Path) -> dict[str, str]:
    """params.yaml ``pipeline.paths`` of ``repo`` (empty when it has none)."""
    try:
        params = yaml.safe_load((repo / "params.yaml").read_text()) or {}
        return dict(params["pipeline"]["paths"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return {}


def version_tags(repo: Path = Path()) -> dict[str, str]:
    """Data and code version of this run (DVC hashes of the raw data, tiles and splits
    named in params ``pipeline.paths``; git commit) and its owner process."""
    paths = _pipeline_paths(repo)
    tags = {
        **process_tags(),
        "data.raw_md5": _dvc_out_md5(repo / "data.dvc", paths.get("raw")),
        "data.tiles_md5": _dvc_out_md5(repo / "dvc.lock", paths.get("tiles")),
        "data.splits_md5": _dvc_out_md5(repo / "dvc.lock", paths.get("splits")),
    }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "params.yaml"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        tags["git.commit"] = commit
        tags["git.dirty"] = str(bool(dirty.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        tags["git.commit"] = "unknown"
    return {k: v for k, v in tags.items() if v is not None}


def file_md5(path: Path) -> str:
    """The md5 of a file (weights, an exported study): what a run or version holds."""
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def study_md5(journal: Path) -> str:
    """The md5 of an exported study file: which study a search run holds."""
    return file_md5(journal)


def log_history(history: list[dict[str, float]], prefix: str = "") -> None:
    """Per-epoch metrics of a fit, stepped by epoch; ``prefix`` tells fits logged to one run
    apart (an ensemble's members)."""
    for row in history:
        mlflow.log_metrics(
            {f"{prefix}{k}": v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
        )


class MlflowSearchHooks:
    """Log every Optuna trial as a nested run of the study's (active) parent run."""

    def trial_started(self, trial: optuna.Trial, params: dict[str, Any]) -> None:
        mlflow.start_run(
            run_name=f"trial-{trial.number:03d}",
            nested=True,
            tags={
                "optuna.study": trial.study.study_name,
                "optuna.trial": str(trial.number),
                **process_tags(),
            },
        )
        mlflow.log_params(params)

    def epoch_end(self, trial: optuna.Trial, epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(metrics, step=epoch)

    def trial_finished(self, trial: optuna.Trial, state: str, value: float | None) -> None:
        run = mlflow.active_run()
        if run is None or run.data.tags.get("optuna.trial") != str(trial.number):
            return
        mlflow.set_tag("optuna.state", state)
        if value is not None:
            mlflow.log_metric("objective_val_balanced_accuracy", value)
        mlflow.end_run(status="FINISHED" if state in ("COMPLETE", "PRUNED") else "FAILED")


def training_run(tissue: str, cand: Candidate) -> str | None:
    """The MLflow run that saved this candidate's weights (its ``model.md5`` tag, latest
    match), if the store has it: weights pulled by DVC or trained elsewhere have none."""
    if cand.architecture == "cnn":
        where = "tags.stage = 'train_cnn' and tags.scheme = 'grouped'"
    elif cand.meta.get("init") in ("imagenet", *PRETRAIN_METHODS, "scratch"):
        where = f"tags.stage = 'train_resnet' and tags.init = '{cand.meta['init']}'"
    else:
        return None
    where += " and attributes.status = 'FINISHED'"
    where += f" and tags.tissue = '{tissue}'"
    where += f" and tags.`{WEIGHTS_MD5_TAG}` = '{file_md5(cand.weights)}'"
    runs = mlflow.search_runs(
        filter_string=where, order_by=["attributes.start_time DESC"], max_results=1,
        output_format="list",
    )  # fmt: skip
    return runs[0].info.run_id if runs else None


def log_explanation(tissue: str, cand: Candidate, out: Path, metrics: dict[str, Any]) -> None:
    """Grad-CAM metrics and exports of a candidate, logged to the run that trained it (a
    new ``explain`` run when the store does not have it)."""
    import numpy as np

    numbers = {f"gradcam_{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    run_id = training_run(tissue, cand)
    if run_id is None:
        with mlflow.start_run(
            run_name=f"explain-{tissue}-{cand.key}",
            tags={**version_tags(), "stage": "explain", "tissue": tissue},
        ) as run:
            run_id = run.info.run_id
    client = MlflowClient()
    for k, v in numbers.items():
        if np.isfinite(v):
            client.log_metric(run_id, k, v)
    client.log_artifacts(run_id, str(out), f"gradcam/{tissue}")
