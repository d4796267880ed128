"""The DVC pipeline end to end on a small config: deterministic, safe to kill, and the
same against an MLflow tracking server as against the local store.

Two throwaway projects (``dvc.yaml`` and ``src/`` copied from the repo, ``git init``,
``dvc init``, raw data from ``bonedamage synth`` committed as ``data.dvc``) run every
stage of one tissue from the same params on the CPU: ``describe``, ``tile``, ``split``,
``search``, ``train_cnn``, ``corpus``, ``pretrain``, ``train_resnet``, ``evaluate``, ``register``,
``promote`` and ``explain`` (``validate`` has its own tests; the other tissue's stages
are the same code).

- Project A runs uninterrupted, tracked in the default store (SQLite file in the
  project, artifacts in a folder).
- Project B, at the same time, is tracked by an ``mlflow server`` the test starts on
  127.0.0.1 (SQLite backend, a separate artifact root). It is SIGKILLed (the whole
  ``dvc repro`` process group) mid-way through ``tile`` (chunk files staged, no index
  yet), ``search`` (a trial running, after a finished one), ``train_cnn`` (the CNN
  saved, the leaky-split CNN not yet) and ``explain`` (Grad-CAM exports staged). After
  each kill the stage's outputs are absent or complete (byte-identical to A's), it is not
  in ``dvc.lock``, ``dvc status`` reports it changed, and the DVC cache gained nothing but
  the outputs (and run-cache entries) of the stages that finished; then ``dvc repro`` is
  run again. The killed search resumes its Optuna study (the killed trial stays RUNNING
  in the journal) and must end exactly as A's did.

At the end both projects hold the same raw data (``data.dvc``), the same ``dvc.lock``
(every stage's deps, params and output hashes: tiles, splits, weights, search result,
Grad-CAM exports), byte-identical metrics (data, splits, test metrics, Grad-CAM) and
registry record, the same finished Optuna trials, and a cache whose every object matches
its hash. In MLflow, every stage's last finished run has the same params and metrics in
both stores, every registered model has a champion, no run is left RUNNING (the runs of
killed stages are marked KILLED), and no killed writer's temporary folder is left behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, free_port, mlflow_cli, mlflow_state_kept, running, small_synth

pytestmark = pytest.mark.slow  # ~3 minutes; still part of the default `pytest -q`

BIN = Path(sys.executable).parent
TISSUE = "cortical"
TARGETS = ("describe", f"explain@{TISSUE}", f"promote@{TISSUE}")
# B's runs that get killed leave out register and promote (always changed: they would run
# again each time); its last run does them once
KILL_TARGETS = TARGETS[:2]
LEARN = (
    "search", "train_cnn", "train_resnet", "train_seg", "evaluate", "evaluate_seg", "register",
    "promote",
)  # fmt: skip
METHOD = "procedural"  # the one pretraining method of these params
STAGES = {
    "describe", "tile", "split", "corpus", f"pretrain@{METHOD}",
    *(f"{s}@{TISSUE}" for s in (*LEARN, "explain")),
}  # fmt: skip
OUTPUTS = (
    "metrics/data.json",
    "metrics/splits.json",
    f"metrics/{TISSUE}.json",
    f"metrics/{TISSUE}-gradcam.json",
    f"registry/{TISSUE}.json",
    f"models/{TISSUE}/cnn_search.json",
)
JOURNAL = "optuna/studies.journal"


def small_params(params: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """params.yaml shrunk to seconds per stage: 3 small specimens per tissue, 16 px tiles,
    4 search trials of 2 epochs, one ResNet init, 2 segmentation epochs, few Grad-CAM tiles,
    on the CPU; MLflow
    artifacts of the local store outside the projects."""
    p = copy.deepcopy(params)
    p["synth"] = small_synth(params, specimens_per_tissue=3, load_steps=[0.0, 1.0])
    # every slice: tiling takes ~0.5 s after its first chunk file, time enough to kill it
    p["tile"].update(tile_um={"cortical": 25.6, "trabecular": 320.0}, slice_stride=1)
    p["train"].update(device="cpu", epochs=2, patience=2, threads=1)
    # 4 trials: a kill meant for trial 1 that lands late still finds trial 2 or 3 running
    p["search"].update(n_trials=4, epochs=2, n_startup_trials=2, timeout_s=None)
    p["search"]["space"].update(n_blocks=[2, 2], base_filters=[4, 8], dense_units=[8])
    p["resnet"].update(inits=[METHOD], epochs=1, batch_size=32)
    p["pretrain"].update(methods=[METHOD], epochs=1, batch_size=32)
    p["pretrain"]["corpus"].update(
        specimens_per_tissue=2,
        first_specimen=3,
        shape={t: p["synth"][t]["shape"] for t in ("cortical", "trabecular")},
        slice_stride=4,
    )
    p["evaluate"]["bootstrap"] = 50
    p["segment"].update(epochs=2, patience=2, batch_size=64)
    p["explain"].update(n_per_outcome=2, localization_tiles=8, faithfulness_tiles=2)
    p["mlflow"] = {"db": "mlflow.db", "artifacts": str(tmp / "mlartifacts"), "experiment": "e2e"}
    return p


def child_env(tmp: Path, tracking_uri: str | None = None) -> dict[str, str]:
    """The stages' environment; MLflow: the project's own store unless ``tracking_uri``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # dvc runs `bonedamage` from here
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"),
        CUDA_VISIBLE_DEVICES="",
    )
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def run(cwd: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (
        f"{' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def dvc(cwd: Path, env: dict[str, str], *args: str) -> str:
    return run(cwd, env, str(BIN / "dvc"), *args)


def make_project(root: Path, params_text: str, env: dict[str, str], workers: int) -> Path:
    """A fresh DVC project with the repo's pipeline and code, and synthesised raw data."""
    root.mkdir()
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(
        REPO / "src" / "bonedamage",
        root / "src" / "bonedamage",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    (root / "params.yaml").write_text(params_text)
    run(root, env, "git", "init", "-q")
    run(root, env, "git", "config", "user.name", "pipeline test")
    run(root, env, "git", "config", "user.email", "pipeline-test@example.invalid")
    dvc(root, env, "init", "-q")
    # --workers differs between A and B: the phantoms must not depend on it
    run(root, env, str(BIN / "bonedamage"), "synth", "--no-progress", "--workers", str(workers))
    # data.dvc at the root, as in the repo (scripts/materialise-data.sh commits it so)
    (root / "data.dvc").write_text("outs:\n- path: data/raw\n  hash: md5\n")
    dvc(root, env, "commit", "--force", "-q", "data.dvc")
    return root


def lock(project: Path) -> dict[str, Any]:
    path = project / "dvc.lock"
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) if path.exists() else {}


def status(project: Path, env: dict[str, str], *targets: str) -> dict[str, Any]:
    return json.loads(dvc(project, env, "status", "--json", *targets) or "{}")


def cache_files(project: Path) -> dict[str, bytes]:
    """Every file of the DVC cache (objects and run cache) with its bytes."""
    cache = project / ".dvc" / "cache"
    return {str(f.relative_to(cache)): f.read_bytes() for f in cache.rglob("*") if f.is_file()}


def assert_cache_sound(project: Path, before: dict[str, bytes]) -> None:
    """The DVC cache holds nothing but the outputs of data.dvc and of the stages done in
    dvc.lock (and their run-cache entries), each object matching its hash; what it held
    ``before`` is unchanged."""
    now = cache_files(project)
    assert {k: now.get(k) for k in before} == before, "cached files were modified"
    outs = yaml.safe_load((project / "data.dvc").read_text())["outs"]
    done = lock(project)
    outs += [o for stage in done.values() for o in stage.get("outs", [])]
    wanted = {o["md5"] for o in outs if "md5" in o}
    for md5 in [m for m in wanted if m.endswith(".dir")]:
        listing = now.get(f"files/md5/{md5[:2]}/{md5[2:]}")  # none for cache: false outs
        wanted |= {entry["md5"] for entry in json.loads(listing or "[]")}
    for name, data in now.items():
        kind, _, rest = name.partition("/")
        if kind == "files":
            md5 = rest.removeprefix("md5/").replace("/", "", 1)
            assert md5 in wanted, f"cache object {name} is not an output of a finished stage"
            assert hashlib.md5(data).hexdigest() == md5.removesuffix(".dir"), f"corrupt {name}"
        else:  # run cache: one entry per finished run of a stage
            cmd = yaml.safe_load(data)["cmd"]
            assert cmd in {stage["cmd"] for stage in done.values()}, f"run cache of {cmd!r}"


def study_trials(project: Path) -> list[Any]:
    """The trials of the project's one Optuna study (search@TISSUE)."""
    import optuna

    from bonedamage.learn.study import storage_from

    storage = storage_from(str(project / JOURNAL))
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def finished_trials(project: Path) -> list[tuple[str, dict[str, Any], float | None]]:
    from bonedamage.learn.study import FINISHED

    return [(t.state.name, t.params, t.value) for t in study_trials(project) if t.state in FINISHED]


def journal_ops(project: Path) -> list[int]:
    """Op codes of the Optuna journal so far (4: a trial was created), read without Optuna:
    cheap enough to poll every few milliseconds."""
    path = project / JOURNAL
    if not path.exists():
        return []
    ops = []
    for line in path.read_text().splitlines():
        try:
            ops.append(json.loads(line)["op_code"])
        except (ValueError, KeyError):  # a line being written
            break
    return ops


def stage_outs(project: Path, stage: str) -> list[str]:
    """Output and metric paths of a stage, as dvc.yaml declares them (foreach expanded)."""
    name, _, item = stage.partition("@")
    spec = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][name]
    spec = spec.get("do", spec)
    paths = [next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", [])]
    paths += [next(iter(o)) if isinstance(o, dict) else o for o in spec.get("metrics", [])]
    table = yaml.safe_load((project / "params.yaml").read_text())["pipeline"]["paths"]
    for key, value in table.items():
        paths = [p.replace(f"${{pipeline.paths.{key}}}", value) for p in paths]
    return [p.replace("${item}", item) for p in paths]


def tree_bytes(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in path.rglob("*") if f.is_file()}


def kill_mid_stage(
    project: Path,
    env: dict[str, str],
    stage: str,
    landed: Callable[[], bool],
    log: Path,
    *args: str,
) -> None:
    """Run ``dvc repro ARGS`` and SIGKILL its whole process group as soon as ``stage`` is
    running and ``landed()`` holds; fail if the command ends first."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "dvc"), "repro", *args],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline, killed = time.monotonic() + 300, False
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if landed() and f"Running stage '{stage}'" in log.read_text():
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        for _ in range(1000):  # the stage's command too, not only dvc
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
        else:
            pytest.fail(f"processes of {stage} survived SIGKILL")
    assert killed and proc.returncode == -signal.SIGKILL, (
        f"dvc repro ended (exit {proc.returncode}) before the kill landed in {stage}:\n"
        + log.read_text()
    )


def check_killed(
    b: Path, env: dict[str, str], stage: str, cache_before: dict[str, bytes]
) -> dict[str, dict[str, bytes]]:
    """After a kill in ``stage``: not done, nothing cached; return the outputs that exist,
    which must later equal the complete ones of the uninterrupted run."""
    assert stage not in lock(b), f"{stage} was recorded as done: the kill landed too late"
    assert stage in status(b, env, stage), f"dvc status does not report {stage} as changed"
    assert_cache_sound(b, cache_before)
    return {out: tree_bytes(b / out) for out in stage_outs(b, stage) if (b / out).exists()}


def tracked_runs(uri: str) -> list[Any]:
    """Every run of the projects' experiment in the store at ``uri``."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("e2e")
    return client.search_runs(
        [experiment.experiment_id], run_view_type=ViewType.ALL, max_results=5000
    )


def last_finished(runs: list[Any]) -> dict[str, tuple[dict, dict]]:
    """Params and metrics (timings aside) of the last finished run of each name; Optuna
    trials aside (a resumed study's trials are spread over two parent runs)."""
    last = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        if run.info.status == "FINISHED" and "optuna.trial" not in run.data.tags:
            metrics = {k: v for k, v in run.data.metrics.items() if "seconds" not in k}
            last[run.info.run_name] = (run.data.params, metrics)
    return last


def champions(uri: str) -> dict[str, int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return {  # (the server says "1", the SQLite store 1)
        m.name: int(client.get_model_version_by_alias(m.name, "champion").version)
        for m in client.search_registered_models()
    }


def champion_probabilities(uri: str, project: Path) -> list[float]:
    """P(failed) of the tissue model's champion, loaded from the registry at ``uri``, on
    four raw tiles of one of the project's scans."""
    import mlflow
    import numpy as np

    from bonedamage.data.tilestore import TileStore
    from bonedamage.lifecycle.pyfunc import load_classifier

    store = TileStore(project / "data" / "tiles")
    index = store.index.reset_index(drop=True)
    rows = index[index["scan_id"] == index.loc[index["tissue"] == TISSUE, "scan_id"].iloc[0]]
    raw = np.stack([store.raw(int(i)) for i in rows.index[:4]])
    lo, hi = (float(v) for v in rows[["norm_lo", "norm_hi"]].iloc[0])
    # not set_tracking_uri(get_tracking_uri()) afterwards: with nothing set, that exports
    # MLflow's default, the repository's own mlflow.db, to every later test
    with mlflow_state_kept("champion_probabilities"):
        mlflow.set_tracking_uri(uri)
        model = load_classifier(f"models:/bonedamage-{TISSUE}@champion")
        return model.classify(raw, lo, hi)["prob_failed"].tolist()


def test_pipeline_is_deterministic_survives_kills_and_tracks_alike_on_a_server(
    tmp_path: Path, params: dict[str, Any]
) -> None:
    small = small_params(params, tmp_path)
    small["registry"]["min_balanced_accuracy"] = 0.0  # a champion whatever the tiny models
    small["registry"]["segmentation"]["min_dice_damage"] = 0.0
    params_text = yaml.safe_dump(small, sort_keys=False)

    # A: uninterrupted, local store; in the background while B is killed and re-run
    env_a = child_env(tmp_path)
    a = make_project(tmp_path / "a", params_text, env_a, workers=1)
    failures: list[BaseException] = []

    def run_a() -> None:
        try:
            dvc(a, env_a, "repro", *TARGETS)
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    thread_a = threading.Thread(target=run_a)
    thread_a.start()

    # B: the same params, tracked by a server; killed in tile, search, train_cnn and explain
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = [mlflow_cli(), "server", "--host", "127.0.0.1", "--port", str(port),
              "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
              "--artifacts-destination", str(tmp_path / "server-artifacts"),
              "--workers", "1"]  # fmt: skip
    partial: dict[str, dict[str, bytes]] = {}  # outputs a killed stage left, by path
    with running(server, child_env(tmp_path), f"{url}/health", tmp_path / "server.log"):
        env = child_env(tmp_path, url)
        # its own local artifact folder (not a DVC param): the server must leave it unused
        small["mlflow"]["artifacts"] = str(tmp_path / "b-local-artifacts")
        b = make_project(tmp_path / "b", yaml.safe_dump(small, sort_keys=False), env, workers=2)

        # tile: chunk files staged in a temporary sibling of data/tiles, no index written yet
        def tile_landed() -> bool:
            return any((b / "data").glob(".tiles.*.tmp/*/*.npy"))

        cache = cache_files(b)
        kill_mid_stage(b, env, "tile", tile_landed, tmp_path / "kill-tile.log", *KILL_TARGETS)
        partial |= check_killed(b, env, "tile", cache)
        assert not (b / "data" / "tiles").exists()
        staged = list((b / "data").glob(".tiles.*.tmp"))
        assert staged and not any((s / "index.parquet").exists() for s in staged)

        # search: killed in a trial after a finished one (that trial is left RUNNING)
        search = f"search@{TISSUE}"

        def search_landed() -> bool:
            return journal_ops(b).count(4) >= 2

        cache = cache_files(b)
        kill_mid_stage(b, env, search, search_landed, tmp_path / "kill-search.log", *KILL_TARGETS)
        partial |= check_killed(b, env, search, cache)
        assert {"tile", "split"} <= set(lock(b))
        assert not list((b / "data").glob(".tiles.*.tmp")), "the killed tile's staging is left"
        states = [t.state.name for t in study_trials(b)]
        assert "COMPLETE" in states and "RUNNING" in states, f"no trial was running: {states}"

        # train_cnn: the grouped-split CNN saved, the leaky-split one not yet
        train = f"train_cnn@{TISSUE}"
        models = b / "models" / TISSUE

        def train_landed() -> bool:
            return (models / "cnn.json").exists() and not (models / "cnn_leaky.pt").exists()

        cache = cache_files(b)
        kill_mid_stage(b, env, train, train_landed, tmp_path / "kill-train.log", *KILL_TARGETS)
        partial |= check_killed(b, env, train, cache)
        assert search in lock(b) and (models / "cnn.pt").exists()  # complete: equal to A's

        # explain: Grad-CAM exports of the first model staged, nothing in place yet
        explain = f"explain@{TISSUE}"
        gradcam = b / "reports" / "gradcam"

        def explain_landed() -> bool:
            return any(gradcam.glob(f".{TISSUE}.*.tmp/*/*"))

        cache = cache_files(b)
        log = tmp_path / "kill-explain.log"
        kill_mid_stage(b, env, explain, explain_landed, log, *KILL_TARGETS)
        partial |= check_killed(b, env, explain, cache)
        assert f"evaluate@{TISSUE}" in lock(b) and f"register@{TISSUE}" not in lock(b)
        assert not (gradcam / TISSUE).exists() and list(gradcam.glob(f".{TISSUE}.*.tmp"))

        dvc(b, env, "repro", *TARGETS)
        assert status(b, env, "describe", explain) == {}  # register/promote: always changed
        runs_b, champions_b = tracked_runs(url), champions(url)
        served_b = champion_probabilities(url, b)

    thread_a.join(timeout=900)
    assert not thread_a.is_alive() and not failures, failures
    assert set(lock(a)) == STAGES

    # what the kills left in place was complete: the bytes an uninterrupted run writes
    for out, files in partial.items():
        assert files == tree_bytes(a / out), f"{out}: half-written after a kill"
    assert not list((b / "data").glob(".tiles.*.tmp")) and not list(gradcam.glob(".*.tmp"))

    # the same bytes everywhere: raw data, every stage's deps/params/outs, metrics, study
    assert (b / "data.dvc").read_text() == (a / "data.dvc").read_text()
    assert lock(b) == lock(a)
    for path in OUTPUTS:
        assert (b / path).read_bytes() == (a / path).read_bytes(), path
    assert finished_trials(b) == finished_trials(a)
    assert len(finished_trials(a)) == 4
    for project in (a, b):
        assert_cache_sound(project, {})

    # MLflow: the server got exactly what the local store got; nothing left RUNNING
    runs_a = tracked_runs(f"sqlite:///{a / 'mlflow.db'}")  # the default store
    assert last_finished(runs_b) == last_finished(runs_a)
    names = set(last_finished(runs_a))
    assert {f"{n}-{TISSUE}" for n in ("search", "cnn", "cnn_leaky", "evaluate")} <= names
    assert {f"pretrain-{METHOD}", f"resnet_{METHOD}-{TISSUE}"} <= names
    store_a = f"sqlite:///{a / 'mlflow.db'}"
    assert champions_b == champions(store_a) and len(champions_b) == 4  # cnn, resnet, tissue, seg
    assert served_b == champion_probabilities(store_a, a) and len(served_b) == 4
    assert not [r for r in runs_a + runs_b if r.info.status == "RUNNING"]
    # the search was killed mid-trial, inside its run (train_cnn may fall between two runs)
    killed = {r.data.tags.get("stage") for r in runs_b if r.info.status == "KILLED"}
    assert "search" in killed, killed
    assert not [r for r in runs_a if r.info.status == "KILLED"]
    # B's artifacts went to the server's artifact root, nothing to a local store
    assert any((tmp_path / "server-artifacts").rglob("MLmodel"))
    assert not (b / "mlflow.db").exists() and not (tmp_path / "b-local-artifacts").exists()
