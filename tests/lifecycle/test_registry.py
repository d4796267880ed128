"""MLflow model registry (lifecycle/registry.py and the register and promote stages):
register, promote, the different-data refusal."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bonedamage.cli import main
from bonedamage.data.tilestore import TileStore
from bonedamage.learn import domain
from bonedamage.learn.datasets import split_rows
from bonedamage.lifecycle import registry, tracking
from bonedamage.lifecycle.pyfunc import load_classifier
from bonedamage.stages.promote import run_promote
from bonedamage.stages.register import run_register
from conftest import (
    CHANNELS,
    free_port,
    mlflow_cli,
    post,
    running,
    tiny_metrics,
    tiny_seg_metrics,
    write_params,
    write_tiny_models,
    write_tiny_seg,
)

TISSUE = "cortical"
CFG = {
    "prefix": "t",
    "min_balanced_accuracy": 0.6,
    "tolerance": {"balanced_accuracy": 0.005, "roc_auc": 0.01},
    "segmentation": {"min_dice_damage": 0.2, "tolerance": {"dice_damage": 0.01, "object_f1": 0.02}},
}
SEG = f"t-{TISSUE}-seg"


def printed(stage: Any, *args: Any, **kwargs: Any) -> list[str]:
    """The lines a stage prints; it must succeed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert stage(*args, **kwargs) == 0
    return out.getvalue().splitlines()


def register(env: dict, label: str, record: str) -> list[str]:
    """Register the models under ``tmp/label`` with the metrics ``tmp/label.json``."""
    tmp = env["tmp"]
    return printed(
        run_register, env["path"], TISSUE, *env["data"], models=tmp / label,
        metrics=tmp / f"{label}.json", seg_metrics=tmp / f"{label}-seg.json", out=tmp / record,
    )  # fmt: skip


def write_version(env: dict, label: str, seed: int, ba: float, auc: float, dice: float) -> None:
    """Tiny models and their metrics under ``tmp/label`` (classifiers and segmentation)."""
    tmp = env["tmp"]
    write_tiny_models(tmp / label / TISSUE, TISSUE, seed=seed, tile_px=env["tile_px"])
    write_tiny_seg(tmp / label / TISSUE, TISSUE, seed=seed, tile_px=env["tile_px"])
    (tmp / f"{label}.json").write_text(json.dumps(tiny_metrics(ba, auc)))
    (tmp / f"{label}-seg.json").write_text(json.dumps(tiny_seg_metrics(dice, 0.7)))


@pytest.fixture(scope="module")
def env(learn_data, learn_params, tmp_path_factory) -> dict[str, Any]:
    """A fresh SQLite store with the tiny models of version 1 registered and promoted."""
    tmp = tmp_path_factory.mktemp("registry")
    store_cfg = {"db": str(tmp / "r.db"), "artifacts": str(tmp / "art"), "experiment": "reg"}
    uri = tracking.configure(store_cfg)
    params = copy.deepcopy(learn_params)
    params.update(registry=CFG, mlflow=store_cfg)
    params["resnet"]["inits"] = ["scratch"]
    store = TileStore(learn_data[0])
    tile_px = int(store.index["tile_px"].iloc[0])
    env = {"tmp": tmp, "uri": uri, "params": params, "data": learn_data, "tile_px": tile_px}
    write_version(env, "v1", seed=1, ba=0.80, auc=0.90, dice=0.6)
    env["path"] = write_params(tmp / "params.yaml", params)
    env["registered"] = register(env, "v1", "v1-record.json")
    env["promoted"] = printed(run_promote, env["path"], TISSUE)
    return env


def champion(name: str) -> int:
    return int(MlflowClient().get_model_version_by_alias(name, registry.CHAMPION).version)


def register_version(
    env: dict, label: str, seed: int, ba: float, auc: float, dice: float = 0.6
) -> None:
    mlflow.set_tracking_uri(env["uri"])
    write_version(env, label, seed, ba, auc, dice)
    register(env, label, f"{label}-record.json")


# -- the decision rule -------------------------------------------------------------------
def tags(ba: float, auc: float, test_set: str = "abc") -> dict[str, str]:
    return {"metric.balanced_accuracy": str(ba), "metric.roc_auc": str(auc), "test_set": test_set}


def test_first_validated_challenger_becomes_champion_unless_below_the_floor() -> None:
    assert registry.decide("m", (1, tags(0.9, 0.9)), None, CFG).promote
    low = registry.decide("m", (1, tags(0.55, 0.9)), None, CFG)
    assert not low.promote and "floor" in low.reason


@pytest.mark.parametrize(
    ("ba", "auc", "promoted"),
    [
        (0.91, 0.95, True),  # better
        (0.898, 0.941, True),  # a hair worse, within both tolerances
        (0.89, 0.99, False),  # balanced accuracy drops beyond its tolerance
        (0.95, 0.92, False),  # ROC-AUC drops beyond its tolerance
    ],
)
def test_challenger_must_not_drop_beyond_tolerance(ba: float, auc: float, promoted: bool) -> None:
    d = registry.decide("m", (2, tags(ba, auc)), (1, tags(0.90, 0.95)), CFG)
    assert d.promote is promoted
    assert d.champion_after == (2 if promoted else 1)
    assert d.deltas["balanced_accuracy"] == pytest.approx(ba - 0.90)


def test_versions_on_different_test_data_are_not_compared() -> None:
    with pytest.raises(registry.PromotionError, match="different test data"):
        registry.decide("m", (2, tags(0.99, 0.99, "new")), (1, tags(0.9, 0.9, "old")), CFG)


def test_a_challenger_without_metrics_is_not_validated() -> None:
    with pytest.raises(registry.PromotionError, match=r"metric\.roc_auc"):
        registry.decide("m", (1, {"metric.balanced_accuracy": "0.9"}), None, CFG)


# -- against a real store ----------------------------------------------------------------
def test_register_creates_three_models_with_challenger_and_version_tags(env) -> None:
    names = registry.model_names("t", TISSUE)
    assert env["registered"] == [f"{n}: new version 1 -> @challenger" for n in [*names, SEG]]
    client = MlflowClient()
    for name in names:
        v = client.get_model_version_by_alias(name, registry.CHALLENGER)
        for key in ("data.raw_md5", "git.commit", "params", "test_set", "model.md5"):
            assert v.tags.get(key), (name, key)
        assert float(v.tags["metric.balanced_accuracy"]) == pytest.approx(0.80)
    families = {f"t-{TISSUE}-cnn": "cnn", f"t-{TISSUE}-resnet": "resnet", f"t-{TISSUE}": "tissue"}
    for name, kind in families.items():
        model = client.get_registered_model(name)
        assert model.tags == {"tissue": TISSUE, "family": kind}
        assert TISSUE in model.description and "@champion" in model.description
    descriptions = {client.get_registered_model(name).description for name in [*families, SEG]}
    assert len(descriptions) == 4  # one description per family
    # the tissue model is the CNN: its validation score beats the ResNet's
    tissue = client.get_model_version_by_alias(f"t-{TISSUE}", registry.CHALLENGER)
    assert tissue.tags["architecture"] == "cnn"
    info = mlflow.models.get_model_info(f"models:/t-{TISSUE}@challenger")
    # no input dtype (MLflow would cast JSON tiles to it); the model checks the shape itself
    assert info.signature.inputs is None
    model = load_classifier(f"models:/t-{TISSUE}@challenger")
    assert model.tile_shape == (CHANNELS, env["tile_px"], env["tile_px"])  # 2.5-D tiles
    assert {p.name for p in info.signature.params} == {"norm_lo", "norm_hi"}
    assert info.saved_input_example_info is not None


def test_every_registered_version_carries_its_applicability_domain(env) -> None:
    from bonedamage.lifecycle.pyfunc import load_classifier

    record = json.loads((env["tmp"] / "v1-record.json").read_text())
    client = MlflowClient()
    for name in registry.model_names("t", TISSUE):
        model = load_classifier(f"models:/{name}@challenger")
        summary = model.domain
        assert summary is not None and model.domain_arrays is not None, name
        assert summary == record["models"][name]["domain"]  # what DVC versions
        assert summary["tissue"] == TISSUE
        assert summary["working_voxel_um"] == record["tiling"]["working_voxel_um"]
        assert summary["max_voxel_ratio"] == env["params"]["domain"]["max_voxel_ratio"]
        assert summary["val_accepted"] >= env["params"]["domain"]["accept"] - 0.1  # about
        d = summary["feature_dim"]
        assert model.domain_arrays["precision"].shape == (d, d)
        assert model.domain_arrays["means"].shape == (2, d)  # one mean per class
        version = client.get_model_version_by_alias(name, registry.CHALLENGER)
        layers = env["params"]["explain"]["layer"]  # a changed CAM layer: a new version
        assert version.tags["domain.md5"] == registry.domain_md5({**summary, "cam": layers})
        kind = model.meta["kind"]
        assert model.meta["cam_layer"] == env["params"]["explain"]["layer"][kind]


def test_first_promotion_makes_every_challenger_champion(env) -> None:
    assert len(env["promoted"]) == 4 and not any("refused" in line for line in env["promoted"])
    for line in env["promoted"]:
        assert "promoted" in line and "(first validated challenger becomes champion)" in line
    for name in registry.model_names("t", TISSUE):
        assert champion(name) == 1


def test_registering_the_same_weights_again_adds_no_version(env) -> None:
    tmp = env["tmp"]
    again = register(env, "v1", "again.json")
    names = [*registry.model_names("t", TISSUE), SEG]
    assert again == [f"{name}: already registered: 1 -> @challenger" for name in names]
    assert (tmp / "again.json").read_bytes() == (tmp / "v1-record.json").read_bytes()


def test_champion_predicts_raw_tiles_with_the_training_normalisation(env) -> None:
    store, table = TileStore(env["data"][0]), pd.read_parquet(env["data"][1])
    positions, _ = split_rows(store, table, TISSUE, "grouped", "test")
    positions = positions[:20]
    rows = store.index.iloc[positions]
    assert rows["scan_id"].nunique() >= 1
    scan = rows["scan_id"].iloc[0]
    same = positions[rows["scan_id"].to_numpy() == scan]
    lo, hi = store.index[["norm_lo", "norm_hi"]].iloc[int(same[0])]
    raw = np.stack([store.raw(int(p)) for p in same])
    assert raw.dtype == np.uint16
    model = load_classifier(f"models:/t-{TISSUE}-cnn@champion")
    with torch.inference_mode():
        x = torch.from_numpy(store.tiles(same))  # (n, CHANNELS, px, px)
        expected = torch.softmax(model.module(x), dim=1)[:, 1].numpy()
    got = model.classify(raw, lo, hi)
    np.testing.assert_allclose(got["prob_failed"], expected, rtol=1e-6)
    assert set(got["class"]) <= {"failed", "pristine"}
    assert (got["label"] == (got["prob_failed"] > 0.5)).all()
    # the generic pyfunc path (what `mlflow models serve` runs) gives the same numbers
    pyfunc = mlflow.pyfunc.load_model(f"models:/t-{TISSUE}-cnn@champion")
    served = pyfunc.predict(raw, params={"norm_lo": lo, "norm_hi": hi})  # uint16, as scanned
    np.testing.assert_allclose(served["prob_failed"], expected, rtol=1e-6)
    # and says, tile by tile, whether the answer is inside the model's domain
    features = domain.penultimate_features(model.module, store.tiles(same))
    intensity = domain.intensity_stats(store.tiles(same))
    distance, inside = domain.in_domain(model.domain, model.domain_arrays, features, intensity)
    np.testing.assert_allclose(served["domain_distance"], distance, rtol=1e-5)
    np.testing.assert_array_equal(served["in_domain"], inside.astype(int))
    assert served["in_domain"].mean() > 0.5  # test tiles of the training tissue


def test_bad_requests_name_the_problem(env) -> None:
    model = load_classifier(f"models:/t-{TISSUE}-cnn@champion")
    px, c = env["tile_px"], CHANNELS
    with pytest.raises(ValueError, match=r"shape \(n, "):
        model.classify(np.zeros((2, c, px + 1, px), np.uint16))
    with pytest.raises(ValueError, match=rf"shape \(n, {c}, {px}, {px}\), got \(2, {px}, {px}\)"):
        model.classify(np.zeros((2, px, px), np.uint16))  # one-plane tiles, 2.5-D model
    with pytest.raises(ValueError, match="NaN"):
        model.classify(np.full((1, c, px, px), np.nan, np.float32), 0.0, 1.0)
    with pytest.raises(ValueError, match="both norm_lo and norm_hi"):
        model.classify(np.ones((1, c, px, px), np.uint16), norm_lo=1.0)
    with pytest.raises(ValueError, match="constant"):
        model.classify(np.ones((1, c, px, px), np.uint16))


def test_better_challenger_is_promoted_worse_is_refused_and_champion_stays(env) -> None:
    name = f"t-{TISSUE}-cnn"
    register_version(env, "better", seed=2, ba=0.85, auc=0.93)
    decision = registry.promote(MlflowClient(), name, CFG)
    assert decision.promote and champion(name) == 2
    register_version(env, "worse", seed=3, ba=0.70, auc=0.93)
    decision = registry.promote(MlflowClient(), name, CFG)
    assert not decision.promote and champion(name) == 2
    v3 = MlflowClient().get_model_version(name, "3")
    assert v3.tags["promotion.decision"] == "kept"
    assert "balanced_accuracy -0.1500" in v3.tags["promotion.reason"]
    assert v3.tags["promotion.champion_before"] == "2" == v3.tags["promotion.champion_after"]
    assert v3.tags["promotion.time"].endswith("Z")
    # promoting again changes nothing and keeps the record of the decision that promoted v2
    record = MlflowClient().get_model_version(name, "2").tags
    MlflowClient().set_registered_model_alias(name, registry.CHALLENGER, "2")
    decision = registry.promote(MlflowClient(), name, CFG)
    assert not decision.promote and champion(name) == 2
    again = MlflowClient().get_model_version(name, "2").tags
    assert again == record and again["promotion.decision"] == "promoted"


class FailingStore(MlflowClient):
    """A tracking server that answers 503 to alias lookups."""

    def get_model_version_by_alias(self, name: str, alias: str):
        if alias == registry.CHAMPION:
            raise MlflowException("service unavailable", error_code="TEMPORARILY_UNAVAILABLE")
        return super().get_model_version_by_alias(name, alias)


def test_a_failing_champion_lookup_is_an_error_not_a_first_champion(env) -> None:
    name = f"t-{TISSUE}-cnn"
    before = champion(name)
    with pytest.raises(MlflowException, match="unavailable"):
        registry.promote(FailingStore(), name, CFG)
    assert champion(name) == before


def test_promote_refuses_a_challenger_from_other_test_data(env, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["uri"])
    name = f"t-{TISSUE}-cnn"
    before = champion(name)
    client = MlflowClient()
    latest = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    client.set_model_version_tag(name, str(latest), "test_set", "other-tiles")
    client.set_registered_model_alias(name, registry.CHALLENGER, str(latest))
    params_file = env["path"]
    code = main(["promote", "--tissue", TISSUE, "--params", str(params_file)])
    err = capsys.readouterr().err
    assert code == 2 and "different test data" in err and name in err
    # the pipeline's promote stage records the refusal and goes on
    code = main(["promote", "--tissue", TISSUE, "--params", str(params_file), "--allow-refusal"])
    assert code == 0 and "refused" in capsys.readouterr().out
    assert champion(name) == before
    assert client.get_model_version(name, str(latest)).tags["promotion.decision"] == "refused"


# -- serving and a tracking server -------------------------------------------------------
def child_env(uri: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    env.pop("MLFLOW_EXPERIMENT_ID", None)  # mlflow.set_experiment in this process sets it
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def raw_test_tiles(env: dict) -> tuple[np.ndarray, float, float]:
    store, table = TileStore(env["data"][0]), pd.read_parquet(env["data"][1])
    positions, _ = split_rows(store, table, TISSUE, "grouped", "test")
    p = positions[:4]
    lo, hi = store.index[["norm_lo", "norm_hi"]].iloc[int(p[0])]
    return np.stack([store.raw(int(i)) for i in p]), float(lo), float(hi)


def test_mlflow_models_serve_answers_with_probabilities(env) -> None:
    port = free_port()
    cmd = [mlflow_cli(), "models", "serve", "-m", f"models:/t-{TISSUE}@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    raw, lo, hi = raw_test_tiles(env)
    expected = load_classifier(f"models:/t-{TISSUE}@champion").classify(raw, lo, hi)
    base = f"http://127.0.0.1:{port}"
    with running(cmd, child_env(env["uri"]), f"{base}/ping", env["tmp"] / "serve.log"):
        body = {"inputs": raw.tolist(), "params": {"norm_lo": lo, "norm_hi": hi}}
        status, answer = post(f"{base}/invocations", body)
        assert status == 200, answer
        got = pd.DataFrame(answer["predictions"])
        np.testing.assert_allclose(got["prob_failed"], expected["prob_failed"], rtol=1e-6)
        assert list(got["class"]) == list(expected["class"])
        status, answer = post(f"{base}/invocations", {"inputs": raw[:, :-1].tolist()})
        assert status == 400 and "shape" in answer["message"].lower()


def test_mlflow_models_predict_on_a_file_of_tiles(env) -> None:
    raw, lo, hi = raw_test_tiles(env)
    tmp = env["tmp"]
    (tmp / "tiles.json").write_text(
        json.dumps({"inputs": raw.tolist(), "params": {"norm_lo": lo, "norm_hi": hi}})
    )
    done = subprocess.run(
        [mlflow_cli(), "models", "predict", "-m", f"models:/t-{TISSUE}@champion",
         "-i", str(tmp / "tiles.json"), "-t", "json", "-o", str(tmp / "pred.json"),
         "--env-manager", "local"],
        env=child_env(env["uri"]), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    got = pd.DataFrame(json.loads((tmp / "pred.json").read_text())["predictions"])
    expected = load_classifier(f"models:/t-{TISSUE}@champion").classify(raw, lo, hi)
    np.testing.assert_allclose(got["prob_failed"], expected["prob_failed"], rtol=1e-6)


def test_promote_before_register_exits_2_naming_the_models(cli_params: Path, capsys) -> None:
    """An empty registry: no challenger to promote is an error, and nothing is created."""
    code = main(["promote", "--tissue", "trabecular", "--params", str(cli_params)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:"), err
    for name in registry.model_names("bonedamage", "trabecular"):
        assert f"{name} has no 'challenger' version: run `bonedamage register`" in err
    assert MlflowClient().search_registered_models() == []


# -- concurrent promotions ---------------------------------------------------------------
PROMOTER = """
import json, sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient
from bonedamage.lifecycle import registry
a = json.loads(sys.argv[1])
client, gate, done = MlflowClient(a["uri"]), Path(a["gate"]), []
for r, name in enumerate(a["names"]):
    (gate / f"{r}.{a['me']}").touch()  # a barrier per round: both start together
    deadline = time.monotonic() + 60
    while not (gate / f"{r}.{1 - a['me']}").exists():
        if time.monotonic() > deadline:
            sys.exit("the other promoter never arrived")
        time.sleep(0.001)
    try:  # an error is reported, and the next round still meets the other process
        client.set_registered_model_alias(name, registry.CHALLENGER, str(a["version"]))
        d = registry.promote(client, name, a["cfg"])
        done.append([name, d.challenger, d.promote, None])
    except Exception as exc:
        done.append([name, None, False, repr(exc)[:2000]])
print(json.dumps(done))
"""


def metric_pair(tags: dict[str, str]) -> tuple[float, float]:
    return float(tags["metric.balanced_accuracy"]), float(tags["metric.roc_auc"])


def at_least_as_good(a: dict[str, str], b: dict[str, str]) -> bool:
    """``a``'s metrics do not drop below ``b``'s beyond the promotion tolerance."""
    tol = CFG["tolerance"]
    (a_ba, a_auc), (b_ba, b_auc) = metric_pair(a), metric_pair(b)
    return a_ba >= b_ba - tol["balanced_accuracy"] - 1e-9 and a_auc >= b_auc - tol["roc_auc"] - 1e-9


@pytest.fixture(scope="module")
def scratch_registry(tmp_path_factory) -> str:
    """An empty SQLite registry of its own (the module's global store serves other tests)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('race') / 'race.db'}"
    MlflowClient(uri).search_registered_models()  # creates the schema
    return uri


def scratch_model(client: MlflowClient, name: str, *versions: dict[str, str]) -> None:
    """``name`` with these versions (tags only: promote reads nothing else), v1 champion."""
    client.create_registered_model(name)
    for t in versions:
        client.create_model_version(name, "file:///nowhere", tags=t)
    client.set_registered_model_alias(name, registry.CHAMPION, "1")
    client.set_registered_model_alias(name, registry.CHALLENGER, "1")


def test_two_promotions_at_once_never_lose_the_champion_or_a_better_one(
    scratch_registry, tmp_path
) -> None:
    """Two OS processes register (point @challenger at) and promote at the same moment
    against one SQLite registry, round after round: v1 is champion, one process brings a
    better v2, the other a worse v3 (even rounds: within tolerance of v1 but not of v2, so
    a promotion that compares it with a stale champion would demote v2; odd rounds: worse
    than v1 beyond tolerance). Whatever the interleaving, the model keeps a champion, it is
    no worse than v1 nor than any version a process reported promoted, and the store reads.
    """
    uri, client = scratch_registry, MlflowClient(scratch_registry)
    v1, v2 = tags(0.80, 0.90, "same"), tags(0.85, 0.93, "same")
    worse = [tags(0.797, 0.895, "same"), tags(0.70, 0.93, "same")]
    names = [f"race-{r}" for r in range(12)]
    for r, name in enumerate(names):
        scratch_model(client, name, v1, v2, worse[r % 2])
    (tmp_path / "gate").mkdir()
    procs = []
    for me, version in ((0, 2), (1, 3)):
        args = {"uri": uri, "gate": str(tmp_path / "gate"), "me": me, "version": version}
        cmd = [sys.executable, "-c", PROMOTER, json.dumps({**args, "names": names, "cfg": CFG})]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        procs.append(subprocess.Popen(cmd, env=child_env(uri), **pipes))
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "database is locked" not in err and "IntegrityError" not in err, err[-3000:]
    rounds = [row for out, _ in outs for row in json.loads(out)]
    assert len(rounds) == 2 * len(names)
    assert [row for row in rounds if row[3]] == []  # no promotion failed
    promoted = {(n, v) for n, v, ok, _ in rounds if ok}
    fresh = MlflowClient(uri)
    for name in names:
        versions = {
            int(v.version): dict(v.tags) for v in fresh.search_model_versions(f"name = '{name}'")
        }
        assert sorted(versions) == [1, 2, 3]
        champ = int(fresh.get_model_version_by_alias(name, registry.CHAMPION).version)
        best = versions[champ]
        assert at_least_as_good(best, v1), (name, champ)
        for n, v in promoted:
            if n == name:  # a version once promoted is never replaced by a worse one
                assert at_least_as_good(best, versions[v]), (name, champ, v)
        if champ != 1:
            assert best["promotion.decision"] == "promoted", (name, best)
            assert best["promotion.champion_after"] == str(champ)
        for v, t in versions.items():  # every decision left one complete record
            if "promotion.decision" in t:
                assert {"promotion.time", "promotion.reason"} <= set(t), (name, v, t)


class MovingChampion(MlflowClient):
    """A registry where another promotion moves @champion to v2 right after it is read."""

    moved = False

    def get_model_version_by_alias(self, name: str, alias: str):
        found = super().get_model_version_by_alias(name, alias)
        if alias == registry.CHAMPION and not self.moved:
            self.moved = True
            self.set_registered_model_alias(name, registry.CHAMPION, "2")
        return found


def test_promote_compares_with_the_champion_of_the_moment_it_moves_the_alias(
    scratch_registry,
) -> None:
    """A tracking server has no lock: the champion is read again before the alias moves."""
    client = MovingChampion(scratch_registry)
    v3 = tags(0.797, 0.895, "same")  # as good as v1 within tolerance, not as good as v2
    scratch_model(client, "moving", tags(0.80, 0.90, "same"), tags(0.85, 0.93, "same"), v3)
    client.set_registered_model_alias("moving", registry.CHALLENGER, "3")
    decision = registry.promote(client, "moving", CFG)
    assert client.moved and not decision.promote
    assert decision.champion_before == 2 and "worse" in decision.reason
    assert int(client.get_model_version_by_alias("moving", registry.CHAMPION).version) == 2


def test_a_version_leads_to_the_run_that_trained_its_weights(env) -> None:
    """The pyfunc is logged in the training run found in the store (its test metrics
    too), so the version's source run is that run, not a run of the registration."""
    mlflow.set_tracking_uri(env["uri"])
    tmp = env["tmp"]
    write_version(env, "trained", seed=11, ba=0.71, auc=0.81, dice=0.6)
    weights = tracking.file_md5(tmp / "trained" / TISSUE / "cnn.pt")
    trained = {"stage": "train_cnn", "scheme": "grouped", "tissue": TISSUE}
    # a later run of the same stage that saved other weights is not the source
    with mlflow.start_run(tags={**trained, "model.md5": weights}) as run:
        pass
    with mlflow.start_run(tags={**trained, "model.md5": "other weights"}):
        pass
    register(env, "trained", "trained-record.json")
    client = MlflowClient()
    for name in (f"t-{TISSUE}-cnn", f"t-{TISSUE}"):  # the tissue model is the same CNN
        version = client.get_model_version_by_alias(name, registry.CHALLENGER)
        assert version.run_id == run.info.run_id, name
    after = client.get_run(run.info.run_id)
    assert after.data.metrics["test_balanced_accuracy"] == pytest.approx(0.71)
    assert after.data.tags["stage"] == "train_cnn" and after.info.status == "FINISHED"
    resnet = client.get_model_version_by_alias(f"t-{TISSUE}-resnet", registry.CHALLENGER)
    assert client.get_run(resnet.run_id).data.tags["stage"] == "register"  # none in the store


# -- the segmentation model ----------------------------------------------------------------
def test_the_segmentation_model_is_registered_with_its_scores_and_segments_raw_tiles(env) -> None:
    from bonedamage.lifecycle.seg_pyfunc import TileSegmenter, load_segmenter_model

    client = MlflowClient()
    version = client.get_model_version_by_alias(SEG, registry.CHALLENGER)
    assert version.tags["architecture"] == "segmenter"
    assert float(version.tags["metric.dice_damage"]) == pytest.approx(0.6)
    assert float(version.tags["metric.object_f1"]) == pytest.approx(0.7)
    assert "metric.balanced_accuracy" not in version.tags
    model_tags = client.get_registered_model(SEG).tags
    assert model_tags == {"tissue": TISSUE, "family": "segmenter"}
    model = load_segmenter_model(f"models:/{SEG}@challenger")
    assert isinstance(model, TileSegmenter) and model.domain is not None
    store, table = TileStore(env["data"][0]), pd.read_parquet(env["data"][1])
    positions, _ = split_rows(store, table, TISSUE, "grouped", "test")
    raw = np.stack([store.raw(int(p)) for p in positions[:4]])
    lo, hi = store.index[["norm_lo", "norm_hi"]].iloc[int(positions[0])]
    labels = model.segment(raw, float(lo), float(hi))
    assert labels.shape == (4, env["tile_px"], env["tile_px"]) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}
    prob = model.probabilities(raw, float(lo), float(hi))
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(prob.argmax(axis=1), labels)
    with pytest.raises(TypeError, match="not a bonedamage segmentation model"):
        load_segmenter_model(f"models:/t-{TISSUE}-cnn@challenger")


@pytest.mark.parametrize(
    ("dice", "f1", "promoted"),
    [
        (0.65, 0.70, True),  # better Dice, same F1
        (0.595, 0.69, True),  # a hair worse, within both tolerances
        (0.55, 0.90, False),  # Dice drops beyond its tolerance
        (0.62, 0.60, False),  # object F1 drops beyond its tolerance
    ],
)
def test_a_segmentation_challenger_is_judged_by_dice_and_object_f1(
    dice: float, f1: float, promoted: bool
) -> None:
    def seg_tags(d: float, f: float) -> dict[str, str]:
        return {"metric.dice_damage": str(d), "metric.object_f1": str(f), "test_set": "abc"}

    d = registry.decide(SEG, (2, seg_tags(dice, f1)), (1, seg_tags(0.60, 0.70)), CFG)
    assert d.promote is promoted and set(d.deltas) == {"dice_damage", "object_f1"}
    low = registry.decide(SEG, (1, seg_tags(0.1, 0.9)), None, CFG)
    assert not low.promote and "dice damage 0.1000 below the floor 0.2" in low.reason


def test_the_same_weights_scored_anew_make_a_new_version_with_the_new_scores(env) -> None:
    """Versions are reused only for the same weights, test set, domain and test metrics:
    otherwise a version's metric tags would say what the metrics file no longer does."""
    mlflow.set_tracking_uri(env["uri"])
    client = MlflowClient()
    before = int(client.get_model_version_by_alias(SEG, registry.CHALLENGER).version)
    tmp = env["tmp"]
    write_version(env, "rescored", seed=21, ba=0.8, auc=0.9, dice=0.6)
    register(env, "rescored", "rescored-record.json")
    first = client.get_model_version_by_alias(SEG, registry.CHALLENGER)
    assert int(first.version) == before + 1
    (tmp / "rescored-seg.json").write_text(json.dumps(tiny_seg_metrics(0.61, 0.7)))
    lines = register(env, "rescored", "rescored-record.json")
    assert f"{SEG}: new version {before + 2} -> @challenger" in lines
    again = client.get_model_version_by_alias(SEG, registry.CHALLENGER)
    assert float(again.tags["metric.dice_damage"]) == pytest.approx(0.61)
    assert again.tags["model.md5"] == first.tags["model.md5"]
