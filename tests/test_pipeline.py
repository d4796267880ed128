"""The DVC pipeline end to end on a small config: deterministic, and safe to kill.

Two throwaway projects (``dvc.yaml`` and ``src/`` copied from the repo, ``git init``,
``dvc init``, raw data from ``bonedamage synth`` committed as ``data.dvc``) run the same
stages from the same params on the CPU: ``describe`` and ``train_cnn@cortical`` with what
they need (``tile``, ``split``, ``search@cortical``). The learning chain stops there:
``pretrain``, ``train_resnet`` and ``evaluate`` would double the runtime (each stage spends
~10 s importing torch and MLflow), and ``register``, ``promote`` and ``explain`` need a
model registry.

- Project A runs uninterrupted.
- Project B is SIGKILLed (the whole ``dvc repro`` process group) mid-way through ``tile``
  (chunk files staged, no index yet), ``search@cortical`` (a trial running, after a
  finished one) and ``train_cnn@cortical`` (the CNN saved, the leaky-split CNN not yet).
  After each kill the stage's outputs are absent or complete (byte-identical to A's), it
  is not in ``dvc.lock``, ``dvc status`` reports it changed, and the DVC cache gained
  nothing but the outputs (and run-cache entries) of the stages that finished; then
  ``dvc repro`` is run again. The killed search resumes its Optuna study (the killed
  trial stays RUNNING in the journal) and must end exactly as A's did.

At the end both projects hold the same raw data (``data.dvc``), the same ``dvc.lock``
(every stage's deps, params and output hashes: tiles, splits, weights, search result),
byte-identical metrics, the same finished Optuna trials, and a cache whose every object
matches its hash.
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, small_synth

pytestmark = pytest.mark.slow  # ~2 minutes; still part of the default `pytest -q`

BIN = Path(sys.executable).parent
TISSUE = "cortical"
TARGETS = ("describe", f"train_cnn@{TISSUE}")
STAGES = {"describe", "tile", "split", f"search@{TISSUE}", f"train_cnn@{TISSUE}"}
METRICS = ("metrics/data.json", "metrics/splits.json")
JOURNAL = "optuna/studies.journal"


def small_params(params: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """params.yaml shrunk to seconds per stage: 3 small specimens per tissue, 16 px tiles,
    4 search trials of 2 epochs, on the CPU; MLflow artifacts outside the projects."""
    p = copy.deepcopy(params)
    p["synth"] = small_synth(params, specimens_per_tissue=3, load_steps=[0.0, 1.0])
    # every slice: tiling takes ~0.5 s after its first chunk file, time enough to kill it
    p["tile"].update(tile_um={"cortical": 25.6, "trabecular": 320.0}, slice_stride=1)
    p["train"].update(device="cpu", epochs=2, patience=2, threads=1)
    # 4 trials: a kill meant for trial 1 that lands late still finds trial 2 or 3 running
    p["search"].update(n_trials=4, epochs=2, n_startup_trials=2, timeout_s=None)
    p["search"]["space"].update(n_blocks=[2, 2], base_filters=[4, 8], dense_units=[8])
    p["mlflow"] = {"db": "mlflow.db", "artifacts": str(tmp / "mlartifacts"), "experiment": "e2e"}
    return p


def child_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # dvc runs `bonedamage` from here
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",  # one store for A and B
        CUDA_VISIBLE_DEVICES="",
    )
    return env


def run(cwd: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
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

    from bonedamage.learn.search import storage_from

    storage = storage_from(str(project / JOURNAL))
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def finished_trials(project: Path) -> list[tuple[str, dict[str, Any], float | None]]:
    from bonedamage.learn.search import FINISHED

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
    a: Path, b: Path, env: dict[str, str], stage: str, cache_before: dict[str, bytes]
) -> None:
    """After a kill in ``stage``: not done, outputs absent or complete, nothing cached."""
    assert stage not in lock(b), f"{stage} was recorded as done: the kill landed too late"
    assert stage in status(b, env, stage), f"dvc status does not report {stage} as changed"
    for out in stage_outs(b, stage):
        if (b / out).exists():  # then it must be the complete file an uninterrupted run writes
            assert tree_bytes(b / out) == tree_bytes(a / out), f"{out}: half-written after a kill"
    assert_cache_sound(b, cache_before)


def test_pipeline_is_deterministic_and_survives_kills(
    tmp_path: Path, params: dict[str, Any]
) -> None:
    env = child_env(tmp_path)
    params_text = yaml.safe_dump(small_params(params, tmp_path), sort_keys=False)

    # A: uninterrupted
    a = make_project(tmp_path / "a", params_text, env, workers=1)
    dvc(a, env, "repro", *TARGETS)
    assert set(lock(a)) == STAGES

    # B: the same params; killed in tile, search and train_cnn, each time run again
    b = make_project(tmp_path / "b", params_text, env, workers=2)
    assert (b / "data.dvc").read_text() == (a / "data.dvc").read_text()

    # tile: chunk files staged in a temporary sibling of data/tiles, no index written yet
    def tile_landed() -> bool:
        return any((b / "data").glob(".tiles.*.tmp/*/*.npy"))

    cache = cache_files(b)
    kill_mid_stage(b, env, "tile", tile_landed, tmp_path / "kill-tile.log", *TARGETS)
    check_killed(a, b, env, "tile", cache)
    assert not (b / "data" / "tiles").exists()
    staged = list((b / "data").glob(".tiles.*.tmp"))
    assert staged and not any((s / "index.parquet").exists() for s in staged)

    # search: killed in a trial after a finished one (that trial is left RUNNING)
    search = f"search@{TISSUE}"

    def search_landed() -> bool:
        return journal_ops(b).count(4) >= 2

    cache = cache_files(b)
    kill_mid_stage(b, env, search, search_landed, tmp_path / "kill-search.log", *TARGETS)
    check_killed(a, b, env, search, cache)
    assert {"tile", "split"} <= set(lock(b))
    states = [t.state.name for t in study_trials(b)]
    assert "COMPLETE" in states and "RUNNING" in states, f"no trial was running: {states}"

    # train_cnn: the grouped-split CNN saved, the leaky-split one not yet
    train = f"train_cnn@{TISSUE}"
    models = b / "models" / TISSUE

    def train_landed() -> bool:
        return (models / "cnn.json").exists() and not (models / "cnn_leaky.pt").exists()

    cache = cache_files(b)
    kill_mid_stage(b, env, train, train_landed, tmp_path / "kill-train.log", *TARGETS)
    check_killed(a, b, env, train, cache)
    assert search in lock(b) and (models / "cnn.pt").exists()  # complete: equal to A's

    dvc(b, env, "repro", *TARGETS)
    assert status(b, env, *TARGETS) == {}

    # the same bytes everywhere: raw data, every stage's deps/params/outs, metrics, study
    assert (b / "data.dvc").read_text() == (a / "data.dvc").read_text()
    assert lock(b) == lock(a)
    for path in (*METRICS, f"models/{TISSUE}/cnn_search.json"):
        assert (b / path).read_bytes() == (a / path).read_bytes(), path
    assert finished_trials(b) == finished_trials(a)
    assert len(finished_trials(a)) == 4
    for project in (a, b):
        assert_cache_sound(project, {})
