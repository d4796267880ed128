"""Shared fixtures: the repo's params, small phantom configs and the default dataset."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bonedamage.config import load_params
from bonedamage.data.synth.generate import generate_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_STACK = SHARED / "real" / "lhdl-3155-trabecular"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

# the smallest CNN of the family: fast tests of training and checkpoints
TINY_ARCH = {
    "n_blocks": 2,
    "base_filters": 4,
    "filter_growth": 1.0,
    "kernel_size": 3,
    "norm": "batch",
    "pool": "max",
    "dropout": 0.0,
    "dense_units": 8,
}
CHANNELS = 3  # the learning tests' tiles are 2.5-D (learn_params: tile.context_um)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Test files with a ``slow`` test first, each file's tests kept in order: under
    ``pytest -n 2 --dist worksteal`` (scripts/run-tests.sh) the longest ones start at once
    instead of ending the run on one worker while the other idles."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # a stable sort


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_cli() -> str:
    return str(Path(sys.executable).with_name("mlflow"))


@contextlib.contextmanager
def running(cmd: list[str], env: dict[str, str], url: str, log: Path):
    """Start a server process; yield once ``url`` answers; stop the whole process group."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{cmd[:3]} exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"{url} did not answer in 120 s: {log.read_text()[-2000:]}")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):  # the server exited on its own
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def post(url: str, body: dict) -> tuple[int, dict]:
    """POST ``body`` as JSON; (HTTP status, the JSON answer), errors included."""
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class RunsCode:
    """Unpickling this would create ``target``: a stand-in for arbitrary code in a weights
    file (``weights_only`` loading must refuse it without running it)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def write_tiny_models(
    models: Path, tissue: str, seed: int, tile_px: int, val: float = 0.8, channels: int = CHANNELS
) -> None:
    """A tiny CNN and a scratch ResNet-18 with seeded random weights and their sidecars,
    as the training stages write them (models/<tissue>/cnn.pt, resnet/resnet_scratch.pt),
    for tiles of ``channels`` planes (the learning tests' tiles: :data:`CHANNELS`)."""
    import torch

    from bonedamage.learn.checkpoint import save_checkpoint
    from bonedamage.learn.models import build_cnn, build_resnet

    torch.manual_seed(seed)
    meta = {"tissue": tissue, "tile_px": tile_px, "in_channels": channels, "best_epoch": 1}
    cnn = {**meta, "kind": "cnn", "arch": TINY_ARCH, "val_balanced_accuracy": val}
    save_checkpoint(models / "cnn.pt", build_cnn(TINY_ARCH, channels), cnn)
    resnet = {**meta, "kind": "resnet", "arch": "resnet18", "init": "scratch"}
    resnet["val_balanced_accuracy"] = val - 0.1
    save_checkpoint(
        models / "resnet" / "resnet_scratch.pt",
        build_resnet("resnet18", in_channels=channels),
        resnet,
    )


TINY_SEG_ARCH = {"channels": [4, 8], "strides": [2], "num_res_units": 0, "dropout": 0.0}


def write_tiny_seg(
    models: Path, tissue: str, seed: int, tile_px: int, val: float = 0.5, channels: int = CHANNELS
) -> None:
    """A tiny segmentation U-Net with seeded random weights and its sidecar, as ``train-seg``
    writes them (models/<tissue>/seg.pt), for tiles of ``channels`` planes."""
    import torch

    from bonedamage.learn.checkpoint import save_checkpoint
    from bonedamage.learn.segmentation import KIND, build_segmenter

    torch.manual_seed(seed)
    classes = ["background", "microcrack", "fracture"]
    meta = {"kind": KIND, "arch": TINY_SEG_ARCH, "tissue": tissue, "classes": classes}
    meta |= {"tile_px": tile_px, "in_channels": channels, "best_epoch": 0}
    meta["val_dice_damage"] = val
    save_checkpoint(models / "seg.pt", build_segmenter(TINY_SEG_ARCH, channels, 3), meta)


def tiny_seg_metrics(dice: float, f1: float) -> dict[str, Any]:
    """A metrics/<tissue>-seg.json for the tiny segmentation model."""
    row = {"dice_damage": dice, "iou_damage": dice / (2 - dice), "mean_iou": 0.5 + dice / 2}
    row |= {"mean_iou_damage_kinds": dice / 2, "object_f1": f1, "hd95_um": 3.0}
    return {"seg": row}


def tiny_metrics(ba: float, auc: float) -> dict[str, Any]:
    """A metrics/<tissue>.json for the tiny models: the same numbers for both."""
    row = {"balanced_accuracy": ba, "roc_auc": auc, "accuracy": ba, "f1": ba, "ece": 0.05}
    row["scan_accuracy"] = 1.0
    return {"cnn": row, "resnet_scratch": dict(row)}


def write_params(path: Path, params: dict[str, Any], **sections: Any) -> Path:
    """``params`` (with ``sections`` replaced) as a params file at ``path``, for the stages
    that read one; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**params, **sections}, sort_keys=False))
    return path


def with_raw(params: dict[str, Any], root: Path) -> dict[str, Any]:
    """params ``pipeline`` with the data root at ``root``."""
    pipeline = params["pipeline"]
    return {**pipeline, "paths": {**pipeline["paths"], "raw": str(root)}}


@pytest.fixture(scope="session")
def params() -> dict[str, Any]:
    return load_params(REPO / "params.yaml")


def small_synth(params: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The default synth config shrunk to seconds: one specimen per tissue, small scans."""
    cfg = copy.deepcopy(params["synth"])
    cfg["specimens_per_tissue"] = 1
    cfg["workers"] = 1
    for tissue in ("cortical", "trabecular"):
        cfg[tissue]["shape"] = [32, 64, 64]
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory, params: dict[str, Any]) -> Path:
    """Small phantom dataset with an intermediate load step (read-only for tests)."""
    root = tmp_path_factory.mktemp("small") / "raw"
    generate_dataset(small_synth(params, load_steps=[0.0, 0.9, 1.0]), root, progress=False)
    return root


@pytest.fixture(scope="session")
def default_dataset(tmp_path_factory: pytest.TempPathFactory, params: dict[str, Any]) -> Path:
    """The full default phantom dataset, exactly as `bonedamage synth` writes it (~1.5 min).

    ``BONEDAMAGE_SYNTH_DATA`` may name a data root that `bonedamage synth` has just written
    from these params (read-only here): ``.ci/run`` passes the one its data phase rebuilt
    in the fresh clone and checked against data.dvc, so CI makes the phantoms once.
    """
    given = os.environ.get("BONEDAMAGE_SYNTH_DATA")
    if given:
        if not (Path(given) / "manifest.csv").is_file():
            pytest.fail(f"BONEDAMAGE_SYNTH_DATA={given} is not a data root (no manifest.csv)")
        return Path(given)
    root = tmp_path_factory.mktemp("default") / "data" / "raw"
    generate_dataset(params["synth"], root, workers=2, progress=False)
    return root


@pytest.fixture(scope="session")
def learn_params(params: dict[str, Any]) -> dict[str, Any]:
    """params.yaml shrunk for learning tests: 16 px tiles, 1-2 epochs, few trials."""
    p = copy.deepcopy(params)
    p["synth"] = small_synth(params, specimens_per_tissue=3, load_steps=[0.0, 1.0])
    # plenty of damage in these small volumes, so that tiny models learn it in seconds
    p["synth"]["cortical"]["failure"]["crack_density_median_per_mm3"] = 15000
    p["synth"]["trabecular"]["failure"].update(
        band_strain=[0.2, 0.22], effective_length_factor=1.0, bending_strain_at_fracture=0.05
    )
    # every 4th plane, whatever the default: the learning tests' data stay the same
    p["tile"].update(tile_um={"cortical": 25.6, "trabecular": 320.0}, slice_stride=4)
    # 2.5-D tiles of CHANNELS planes, 2 planes apart (1.6 um cortical, 20 um trabecular)
    p["tile"]["context_um"] = {"cortical": 3.2, "trabecular": 40.0}
    p["validate"]["min_tiles_per_class"] = 1
    p["train"].update(epochs=2, patience=2, threads=1)
    p["search"].update(n_trials=3, epochs=2, n_startup_trials=2, timeout_s=None)
    p["search"]["space"].update(n_blocks=[2, 2], base_filters=[4, 8], dense_units=[8])
    p["resnet"].update(epochs=1, freeze_epochs=1, batch_size=32)
    # a corpus of 2 small specimens per tissue, pretrained for one epoch
    p["pretrain"]["corpus"].update(
        specimens_per_tissue=2,
        first_specimen=100,
        shape={t: p["synth"][t]["shape"] for t in ("cortical", "trabecular")},
        slice_stride=4,
    )
    p["pretrain"].update(epochs=1, batch_size=32)
    p["pretrain"]["simsiam"]["crop_px"] = 12
    p["evaluate"]["bootstrap"] = 50
    return p


@pytest.fixture(scope="session")
def learn_data(
    tmp_path_factory: pytest.TempPathFactory, learn_params: dict[str, Any]
) -> tuple[Path, Path]:
    """(tile store, splits table) of 3 small specimens per tissue, as the stages write them."""
    from bonedamage.data.splits import make_splits
    from bonedamage.data.tiling import tile_dataset

    root = tmp_path_factory.mktemp("learn")
    generate_dataset(learn_params["synth"], root / "raw", progress=False)
    index = tile_dataset(root / "raw", root / "tiles", learn_params["tile"], progress=False)
    make_splits(index, learn_params["split"]).to_parquet(root / "splits.parquet", index=False)
    return root / "tiles", root / "splits.parquet"


def save_tiny_pyfunc(
    out: Path, params: dict[str, Any], weights: Path | None = None, domain: bool = False
) -> Path:
    """A trabecular tiny-CNN pyfunc saved to ``out/model`` as registration logs it (model
    from code, weights + sidecars as artifacts, the registry's signature), without a
    tracking store. ``weights`` replaces the CNN's state dict (e.g. a bad file); ``domain`` adds an
    applicability domain fitted on random tiles that accepts every tile; return the model
    folder."""
    import json

    import mlflow
    import numpy as np
    import torch

    from bonedamage.learn.checkpoint import save_checkpoint
    from bonedamage.learn.models import build_cnn
    from bonedamage.lifecycle.pyfunc import MODEL_CODE
    from bonedamage.lifecycle.registry import signature, tiling_info

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    meta = {"kind": "cnn", "arch": TINY_ARCH, "tissue": "trabecular", "tile_px": 16}
    save_checkpoint(out / "cnn.pt", build_cnn(TINY_ARCH), meta)
    tile_um = {"cortical": 25.6, "trabecular": 320.0}
    tile_cfg = dict(params["tile"], tile_um=tile_um, context_um=0.0)  # one-plane tiles
    (out / "tiling.json").write_text(json.dumps(tiling_info(tile_cfg, "trabecular", 16)))
    artifacts = {
        "weights": str(weights or out / "cnn.pt"),
        "meta": str(out / "cnn.json"),
        "tiling": str(out / "tiling.json"),
    }
    if domain:
        from bonedamage.learn import domain as appdomain

        tiles = np.random.default_rng(0).random((64, 16, 16), dtype=np.float32)
        features = appdomain.penultimate_features(build_cnn(TINY_ARCH), tiles)
        intensity = appdomain.intensity_stats(tiles)
        labels = np.arange(64) % 2
        summary, arrays = appdomain.calibrate(
            features, labels, intensity, features, intensity, 0.95
        )
        wide = {**summary["intensity"], "lo": [-1e9] * 2, "hi": [1e9] * 2}
        summary.update(threshold=1e12, intensity=wide, max_voxel_ratio=1.5)
        summary.update(max_out_of_domain_share=0.25)
        appdomain.save(summary, arrays, out / "domain.json", out / "domain.npz")
        artifacts.update(domain=str(out / "domain.json"), domain_arrays=str(out / "domain.npz"))
    with warnings.catch_warnings():  # no input example: saving would load (bad) weights
        warnings.simplefilter("ignore", UserWarning)
        mlflow.pyfunc.save_model(
            str(out / "model"),
            python_model=str(MODEL_CODE),
            artifacts=artifacts,
            signature=signature((16, 16), np.dtype(np.uint16)),
            pip_requirements=[],
        )
    return out / "model"


@pytest.fixture(scope="session")
def _scratch_store_params(tmp_path_factory: pytest.TempPathFactory, params: dict) -> Path:
    tmp = tmp_path_factory.mktemp("cli-store")
    mlflow_cfg = {"db": str(tmp / "mlflow.db"), "artifacts": str(tmp / "art"), "experiment": "x"}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(dict(params, mlflow=mlflow_cfg)))
    return path


@pytest.fixture
def cli_params(_scratch_store_params: Path) -> Path:
    """params.yaml whose MLflow store is a scratch SQLite file, for tracked CLI commands.

    ``tracking.configure`` prefers ``MLFLOW_TRACKING_URI`` to the params, so it is unset
    here; the autouse MLflow isolation below puts it, the URI and the experiment back.
    """
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return _scratch_store_params


# -- MLflow isolation --------------------------------------------------------------------
# ``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI, and ``tracking.configure`` prefers
# that variable to the params it is given: a store one test (or module fixture) configured
# would otherwise receive every later test's runs and models, the repository's own
# mlflow.db included. Both scopes put the URI, the variables and the experiment back.
_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def _repo_store(uri: str | None) -> bool:
    return bool(uri) and uri.removeprefix("sqlite:///") == str(REPO / "mlflow.db")


@contextlib.contextmanager
def mlflow_state_kept(where: str) -> Iterator[None]:
    """Put MLflow's tracking URI, its variables and the experiment back on exit; fail when
    ``where`` left them on the repository's own store."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    env = {k: os.environ.get(k) for k in _MLFLOW_ENV}
    uri, experiment = utils._tracking_uri, fluent._active_experiment_id
    try:
        yield
    finally:
        leaked = os.environ.get("MLFLOW_TRACKING_URI")
        while mlflow.active_run() is not None:
            mlflow.end_run()
        utils._tracking_uri, fluent._active_experiment_id = uri, experiment
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if _repo_store(leaked) and not _repo_store(env["MLFLOW_TRACKING_URI"]):
            pytest.fail(f"{where} pointed MLflow at the repository's own store {leaked}")


@pytest.fixture(autouse=True, scope="module")
def _mlflow_isolated_module(request: pytest.FixtureRequest) -> Iterator[None]:
    with mlflow_state_kept(request.module.__name__):
        yield


@pytest.fixture(autouse=True)
def _mlflow_isolated_test(request: pytest.FixtureRequest) -> Iterator[None]:
    with mlflow_state_kept(request.node.nodeid):
        yield
