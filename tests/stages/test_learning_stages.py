"""The tracked learning stages end to end on a tiny dataset: search, train_cnn, corpus,
pretrain, train_resnet and evaluate (stages/)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from bonedamage.learn.checkpoint import load_checkpoint
from bonedamage.learn.models import Ensemble
from bonedamage.learn.pretraining import METHODS
from bonedamage.learn.train import numerics_platform, resolve_device
from bonedamage.lifecycle import tracking
from bonedamage.stages.corpus import run_corpus
from bonedamage.stages.evaluate import run_evaluate
from bonedamage.stages.pretrain import run_pretrain
from bonedamage.stages.search import run_search
from bonedamage.stages.train_cnn import run_train_cnn
from bonedamage.stages.train_resnet import run_train_resnet
from conftest import write_params


@pytest.fixture(scope="module")
def trained(learn_data, learn_params, tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("runs")
    store = {"db": str(tmp / "m.db"), "artifacts": str(tmp / "art"), "experiment": "runs"}
    tracking.configure(store)
    params = {
        **learn_params,
        "mlflow": store,
        "search": {**learn_params["search"], "storage": str(tmp / "s.journal")},
        "train_cnn": {**learn_params["train_cnn"], "ensemble": 2},  # the ensemble path
        "pretrain": {**learn_params["pretrain"], "methods": list(METHODS)},
        "resnet": {**learn_params["resnet"], "inits": [*METHODS, "scratch"]},
    }
    path = write_params(tmp / "params.yaml", params)
    search = tmp / "models" / "trabecular" / "cnn_search.json"
    assert run_search(path, "trabecular", *learn_data, out=search, reports=tmp / "rep") == 0
    assert run_train_cnn(path, "trabecular", *learn_data, models=tmp / "models") == 0
    assert run_corpus(path, out=tmp / "corpus", progress=False) == 0
    for method in METHODS:
        out = tmp / "models" / "pretrained" / f"{method}.pt"
        assert run_pretrain(path, method, *learn_data, corpus=tmp / "corpus", out=out) == 0
    assert run_train_resnet(path, "trabecular", *learn_data, models=tmp / "models") == 0
    return tmp, params


def test_stage_outputs_are_weights_only_state_dicts_with_sidecars(trained) -> None:
    tmp, params = trained
    models = tmp / "models" / "trabecular"
    for name in ("cnn", "cnn_leaky", *(f"resnet/resnet_{i}" for i in params["resnet"]["inits"])):
        assert (models / f"{name}.pt").is_file()
        meta = json.loads((models / f"{name}.json").read_text())
        assert meta["kind"] in ("cnn", "resnet")
    for method in METHODS:
        model = load_checkpoint(models / "resnet" / f"resnet_{method}.pt")
        assert model.fc.out_features == 2
        meta = json.loads((tmp / "models" / "pretrained" / f"{method}.json").read_text())
        assert (meta["kind"], meta["method"], meta["in_channels"]) == ("pretrained", method, 3)


def test_the_cnns_are_ensembles_of_cnn_ensemble_members(trained) -> None:
    """train_cnn.ensemble (2 in these params) reaches both CNNs, their sidecars and MLflow runs."""
    tmp, params = trained
    k = params["train_cnn"]["ensemble"]
    assert k == 2
    models = tmp / "models" / "trabecular"
    for name, scheme in (("cnn", "grouped"), ("cnn_leaky", "leaky")):
        meta = json.loads((models / f"{name}.json").read_text())
        assert meta["members"] == k and len(meta["member_best_epochs"]) == k
        model = load_checkpoint(models / f"{name}.pt")
        assert isinstance(model, Ensemble) and len(model.members) == k
        run = mlflow.search_runs(
            filter_string=f"tags.stage = 'train_cnn' and tags.scheme = '{scheme}'",
            order_by=["start_time DESC"],
            max_results=1,
        ).iloc[0]
        assert run["params.ensemble"] == str(k)
        assert run["params.channels_last"] == str(params["train"]["channels_last"]) == "True"
        assert run["metrics.best_val_balanced_accuracy"] == meta["val_balanced_accuracy"]
        members = [run[f"metrics.member{i}_best_val_balanced_accuracy"] for i in (1, 2)]
        assert members == meta["member_val_balanced_accuracy"]
        for i in (1, 2):  # each member's per-epoch history, stepped by epoch
            history = mlflow.MlflowClient().get_metric_history(
                run["run_id"], f"member{i}_val_balanced_accuracy"
            )
            best = max(history, key=lambda m: (m.value, -m.step))
            assert (best.step, best.value) == (
                meta["member_best_epochs"][i - 1],
                meta["member_val_balanced_accuracy"][i - 1],
            )


def test_the_fine_stem_goes_from_pretraining_to_the_saved_resnet(trained, learn_data) -> None:
    """resnet.stem reaches the pretrained backbone, the fine-tuned ResNets, their sidecars
    and MLflow params, and load_checkpoint rebuilds a stride-1 first convolution from the
    sidecar."""
    tmp, params = trained
    params = {**params, "resnet": {**params["resnet"], "stem": "fine", "inits": ["rotation"]}}
    path = write_params(tmp / "fine.yaml", params)
    out = tmp / "fine" / "pretrained" / "rotation.pt"
    assert run_pretrain(path, "rotation", *learn_data, corpus=tmp / "corpus", out=out) == 0
    assert run_train_resnet(path, "trabecular", *learn_data, models=tmp / "fine") == 0
    models = tmp / "fine" / "trabecular"
    assert json.loads(out.with_suffix(".json").read_text())["stem"] == "fine"
    assert json.loads((models / "resnet/resnet_rotation.json").read_text())["stem"] == "fine"
    assert load_checkpoint(models / "resnet" / "resnet_rotation.pt").conv1.stride == (1, 1)
    run = mlflow.search_runs(
        filter_string="tags.stage = 'train_resnet'", order_by=["start_time DESC"], max_results=1
    ).iloc[0]
    assert run["params.stem"] == "fine"
    old = load_checkpoint(tmp / "models" / "trabecular" / "resnet" / "resnet_rotation.pt")
    assert old.conv1.stride == (2, 2)  # the default stem: imagenet


def test_evaluate_writes_every_model_and_is_deterministic(trained, learn_data) -> None:
    tmp, params = trained
    out_a, out_b = tmp / "a.json", tmp / "b.json"
    path = write_params(tmp / "params.yaml", params)
    for out in (out_a, out_b):
        run_evaluate(path, "trabecular", *learn_data, tmp / "models", out, tmp / "plots")
    assert out_a.read_bytes() == out_b.read_bytes()
    expected = {
        "cnn",
        "cnn_leaky_split",
        "baseline",
        *(f"resnet_{i}" for i in params["resnet"]["inits"]),
    }
    written = json.loads(out_a.read_text())
    results = {k: v for k, v in written.items() if k != "platform"}
    assert set(results) == expected
    device = resolve_device(params["train"]["device"])
    assert written["platform"] == numerics_platform(device)
    for metrics in results.values():
        for key in (
            "accuracy",
            "balanced_accuracy",
            "roc_auc",
            "f1",
            "ece",
            "accuracy_ci95",
            "scan_accuracy",
            "confusion_matrix",
        ):
            assert key in metrics
    assert (tmp / "plots" / "trabecular" / "roc_cnn.csv").is_file()
    logged = mlflow.search_runs(experiment_names=["runs"], output_format="list")
    stages = {r.data.tags.get("stage") for r in logged}
    assert {"search", "train_cnn", "pretrain", "train_resnet", "evaluate"} <= stages
    assert all(r.data.tags.get("data.raw_md5") for r in logged if r.data.tags.get("stage"))
    evaluated = [r for r in logged if r.data.tags.get("stage") == "evaluate"]
    assert evaluated[0].data.tags["platform.device"] == written["platform"]["device"]
