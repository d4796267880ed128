"""The segmentation stages end to end on the small learning dataset (its phantoms' damage
label volumes): train_seg (stages/train_seg.py) writes the model, its sidecar and a tracked
run; evaluate_seg (stages/evaluate_seg.py) scores it and the CNN's Grad-CAM on the test
split and logs the scores into that run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import torch

from bonedamage.atomic import InputError
from bonedamage.learn.checkpoint import save_checkpoint
from bonedamage.learn.models import Ensemble, build_cnn
from bonedamage.learn.segmentation import load_segmenter
from bonedamage.learn.train import numerics_platform
from bonedamage.lifecycle import tracking
from bonedamage.lifecycle.tracking import file_md5
from bonedamage.stages.evaluate_seg import run_evaluate_seg
from bonedamage.stages.train_seg import run_train_seg
from conftest import CHANNELS, TINY_ARCH, write_params

TISSUE = "trabecular"  # its phantoms hold fracture and buckled bone
CLASSES = ["background", "fracture", "buckled"]
ARCH = {"channels": [8, 16], "strides": [2], "num_res_units": 0, "dropout": 0.0}
LAYER = "features.0,features.1"  # explain's choice, one layer per ensemble member
QUANTUS = {"pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy", "auc"}

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecations


def _store(folder: Path) -> dict[str, str]:
    return {"db": str(folder / "m.db"), "artifacts": str(folder / "art"), "experiment": "seg"}


def _client(store: dict[str, str]) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(store['db']).resolve()}")


def _runs(store: dict[str, str], stage: str) -> list:
    client = _client(store)
    experiment = client.get_experiment_by_name(store["experiment"])
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.stage = '{stage}'")


def _seg_params(learn_params: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """params segment shrunk to seconds: a tiny U-Net, 2 epochs."""
    return {**learn_params["segment"], "arch": ARCH, "epochs": 2, "patience": 2, **changes}


def _save_cnn(models: Path) -> None:
    """A two-member tiny CNN ensemble with seeded random weights, as train_cnn saves it."""
    torch.manual_seed(0)
    model = Ensemble([build_cnn(TINY_ARCH, CHANNELS) for _ in range(2)])
    meta = {"kind": "cnn", "arch": TINY_ARCH, "members": 2, "in_channels": CHANNELS}
    save_checkpoint(models / "cnn.pt", model, {**meta, "tissue": TISSUE, "tile_px": 16})


@pytest.fixture(scope="module")
def seg_run(learn_data, learn_params, tmp_path_factory) -> dict[str, Any]:
    """train_seg then evaluate_seg of the trabecular tissue, tracked in a fresh store."""
    tmp = tmp_path_factory.mktemp("seg")
    store = _store(tmp)
    tracking.configure(store)
    path = write_params(
        tmp / "params.yaml", learn_params, mlflow=store, segment=_seg_params(learn_params)
    )
    data = (learn_data[0].parent / "raw", *learn_data)
    assert run_train_seg(path, TISSUE, *data, models=tmp / "models") == 0
    models = tmp / "models" / TISSUE
    trained_md5 = file_md5(models / "seg.pt")
    _save_cnn(models)
    explained = tmp / "metrics" / f"{TISSUE}-gradcam.json"
    explained.parent.mkdir()
    explained.write_text(json.dumps({"cnn": {"layer": LAYER, "cam_energy_ratio": 0.42}}))
    out = tmp / "metrics" / f"{TISSUE}-seg.json"
    assert run_evaluate_seg(path, TISSUE, *data, tmp / "models", explained, out) == 0
    return {"tmp": tmp, "store": store, "params": path, "data": data, "models": models,
            "explained": explained, "out": out, "trained_md5": trained_md5}  # fmt: skip


def _test_tiles(learn_data) -> int:
    splits = pd.read_parquet(learn_data[1])
    chosen = (splits["tissue"] == TISSUE) & (splits["scheme"] == "grouped")
    return int((chosen & (splits["split"] == "test")).sum())


# ------------------------------------------------------------------------ train_seg


def test_train_seg_writes_the_model_and_a_segmenter_sidecar_with_its_history(seg_run) -> None:
    models, meta = seg_run["models"], json.loads((seg_run["models"] / "seg.json").read_text())
    assert (models / "seg.pt").is_file()
    assert meta["kind"] == "segmenter" and meta["tissue"] == TISSUE
    assert meta["classes"] == CLASSES
    assert meta["arch"] == ARCH and meta["in_channels"] == CHANNELS and meta["tile_px"] == 16
    history = meta["history"]
    assert [row["epoch"] for row in history] == list(range(len(history)))
    assert 1 <= len(history) <= 2
    assert set(history[0]) == {"epoch", "train_loss", "val_dice_damage"}
    best = history[meta["best_epoch"]]["val_dice_damage"]
    assert meta["val_dice_damage"] == best == max(row["val_dice_damage"] for row in history)
    model, loaded = load_segmenter(models / "seg.pt")
    assert loaded == meta and model.out_channels == len(CLASSES)


def test_train_seg_tracks_a_run_tagged_with_the_stage_and_the_weights_md5(seg_run) -> None:
    (run,) = _runs(seg_run["store"], "train_seg")
    meta = json.loads((seg_run["models"] / "seg.json").read_text())
    assert run.info.status == "FINISHED"
    assert run.data.tags["tissue"] == TISSUE
    assert run.data.tags["model.md5"] == seg_run["trained_md5"]
    assert run.data.tags["model.md5"] == file_md5(seg_run["models"] / "seg.pt")
    assert run.data.params["classes"] == ",".join(CLASSES)
    assert run.data.params["loss"] == "dice_focal" and run.data.params["epochs"] == "2"
    assert run.data.metrics["best_val_dice_damage"] == pytest.approx(meta["val_dice_damage"])
    history = _client(seg_run["store"]).get_metric_history(run.info.run_id, "val_dice_damage")
    assert [m.step for m in history] == [row["epoch"] for row in meta["history"]]
    assert [m.value for m in history] == pytest.approx(
        [row["val_dice_damage"] for row in meta["history"]]
    )
    logged = [a.path for a in _client(seg_run["store"]).list_artifacts(run.info.run_id, "model")]
    assert logged == ["model/seg.json"]


def test_train_seg_with_the_same_seed_writes_the_same_weights(
    seg_run, learn_params, tmp_path
) -> None:
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # params mlflow: a store of its own
    store = _store(tmp_path)
    path = write_params(
        tmp_path / "params.yaml", learn_params, mlflow=store, segment=_seg_params(learn_params)
    )
    assert run_train_seg(path, TISSUE, *seg_run["data"], models=tmp_path / "models") == 0
    again = tmp_path / "models" / TISSUE
    assert file_md5(again / "seg.pt") == seg_run["trained_md5"]
    assert (
        json.loads((again / "seg.json").read_text())["history"]
        == json.loads((seg_run["models"] / "seg.json").read_text())["history"]
    )


def test_train_seg_refuses_labels_of_a_damage_kind_that_is_not_a_class(
    seg_run, learn_params, tmp_path
) -> None:
    classes = {**learn_params["segment"]["classes"], TISSUE: ["fracture"]}  # no buckled
    path = write_params(
        tmp_path / "params.yaml",
        learn_params,
        mlflow=_store(tmp_path),
        segment=_seg_params(learn_params, classes=classes),
    )
    with pytest.raises(ValueError, match=r"\['buckled'\].*not classes"):
        run_train_seg(path, TISSUE, *seg_run["data"], models=tmp_path / "models")
    assert not (tmp_path / "models" / TISSUE / "seg.pt").exists()


# --------------------------------------------------------------------- evaluate_seg


def test_evaluate_seg_writes_the_segmentation_and_gradcam_scores_and_the_platform(
    seg_run, learn_data, learn_params
) -> None:
    scores = json.loads(seg_run["out"].read_text())
    assert set(scores) == {"seg", "seg_damage", "gradcam_cnn", "platform"}
    assert scores["platform"] == numerics_platform(torch.device("cpu"))
    seg, binary = scores["seg"], scores["seg_damage"]
    for name in CLASSES:
        assert f"dice_{name}" in seg and f"iou_{name}" in seg
    for kind in CLASSES[1:]:
        assert f"{kind}_object_f1" in seg and f"{kind}_length_mae_um" in seg
    assert "dice_fracture" not in binary and "dice_background" in binary  # damage or not
    for key in ("mean_iou", "mean_iou_damage_kinds", "hd95_um", "object_f1", "count_mae"):
        assert key in seg, key
    n_test = _test_tiles(learn_data)
    assert seg["n_tiles"] == binary["n_tiles"] == scores["gradcam_cnn"]["n_tiles"] == n_test
    assert 0 < seg["n_tiles_with_damage"] <= n_test
    # the binary report merges the kinds: damage of any kind scores the same in both
    for key in ("dice_damage", "iou_damage", "object_f1", "hd95_um"):
        assert binary[key] == pytest.approx(seg[key], abs=1e-6), key


def test_evaluate_seg_scores_the_cnns_gradcam_at_its_validation_threshold(
    seg_run, learn_params
) -> None:
    cam = json.loads(seg_run["out"].read_text())["gradcam_cnn"]
    assert cam["cam_threshold"] in learn_params["segment"]["cam_thresholds"]
    assert 0.0 <= cam["val_dice_damage"] <= 1.0
    assert cam["layer"] == LAYER
    assert cam["explain_cam_energy_ratio"] == 0.42  # explain's figure, carried over
    assert {f"quantus_{k}" for k in QUANTUS} | {"quantus_n_scored"} <= set(cam)
    assert 0 < cam["quantus_n_scored"] <= cam["n_tiles_with_damage"]
    assert 0.0 <= cam["quantus_auc"] <= 1.0
    assert "dice_damage" in cam and "object_f1" in cam


def test_evaluate_seg_logs_test_scores_into_the_training_run_which_stays_finished(
    seg_run,
) -> None:
    (run,) = _runs(seg_run["store"], "train_seg")
    assert _runs(seg_run["store"], "evaluate_seg") == []  # no run of its own
    assert run.info.status == "FINISHED"
    scores = json.loads(seg_run["out"].read_text())
    metrics = run.data.metrics
    for part in ("seg", "seg_damage", "gradcam_cnn"):
        for key, value in scores[part].items():
            name = f"test_{part}_{key}"
            if isinstance(value, int | float):
                assert metrics[name] == pytest.approx(value, abs=1e-6), name
            else:  # a layer name, or NaN (written as null): not a metric
                assert name not in metrics, name
    assert metrics["test_gradcam_cnn_cam_threshold"] == scores["gradcam_cnn"]["cam_threshold"]
    client = _client(seg_run["store"])
    evaluated = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")]
    assert evaluated == [f"evaluation/{TISSUE}-seg.json"]


def test_evaluate_seg_of_weights_the_store_lacks_is_a_run_of_its_own_with_the_same_scores(
    seg_run, learn_params, tmp_path
) -> None:
    """Weights pulled by DVC: the store has no training run for them."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # params mlflow: a store of its own
    store = _store(tmp_path)
    path = write_params(
        tmp_path / "params.yaml", learn_params, mlflow=store, segment=_seg_params(learn_params)
    )
    out = tmp_path / "seg.json"
    models = seg_run["models"].parent
    assert run_evaluate_seg(path, TISSUE, *seg_run["data"], models, seg_run["explained"], out) == 0
    assert out.read_bytes() == seg_run["out"].read_bytes()  # deterministic
    (run,) = _runs(store, "evaluate_seg")
    assert run.data.tags["tissue"] == TISSUE and run.info.status == "FINISHED"
    assert "test_seg_mean_iou" in run.data.metrics
    assert _runs(store, "train_seg") == []


def test_evaluate_seg_without_the_segmentation_model_names_the_missing_file(
    seg_run, tmp_path
) -> None:
    models = tmp_path / "models"
    _save_cnn(models / TISSUE)
    out = tmp_path / "seg.json"
    with pytest.raises(InputError, match=r"seg\.pt: no such file"):
        run_evaluate_seg(
            seg_run["params"], TISSUE, *seg_run["data"], models, seg_run["explained"], out
        )
    assert not out.exists()
