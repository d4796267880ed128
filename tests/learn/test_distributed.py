"""Data-parallel training under torchrun (learn/distributed.py, and its use by fit and the CLI).

The two-process tests start ``torchrun --standalone --nproc-per-node 2`` on the CPU (gloo)
as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import balanced_accuracy_score

from bonedamage.cli import main
from bonedamage.data.tilestore import TileStore
from bonedamage.learn import distributed
from bonedamage.learn.checkpoint import load_checkpoint
from bonedamage.learn.datasets import TileDataset, make_loader, split_rows
from bonedamage.learn.models import build_cnn
from bonedamage.learn.train import predict
from conftest import TINY_ARCH

TORCHRUN = Path(sys.executable).parent / "torchrun"
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Held-out (val + test) balanced accuracy of the 2-process model may differ from the
# 1-process one by TOLERANCE. Two processes take other steps (other batches per BatchNorm,
# a shard order) and end about like a run with another seed. Chance is 0.5; on the tests'
# small, densely damaged phantoms a 2-epoch CNN reaches about 0.65-0.7 held out (cnn, 128
# tiles of 2 specimens), so 0.6 says it learned the damage.
TOLERANCE = 0.15
WELL_ABOVE_CHANCE = 0.6


def torchrun(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` on the CPU, with ``env`` added."""
    base = {
        k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k not in LAUNCH_ENV
    }
    return subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *args],
        env={**base, "CUDA_VISIBLE_DEVICES": "", **env},
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_helpers_are_no_ops_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: nothing to join either
    loader = make_loader(torch.utils.data.TensorDataset(torch.zeros(8, 1)), 4, shuffle=True)
    model = build_cnn(TINY_ARCH)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with distributed.session("cpu"):
        assert not torch.distributed.is_initialized() and not distributed.active()
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        assert distributed.shard(loader, seed=3) is loader
        assert distributed.wrap(model) is model
        assert distributed.all_sum(1.5, 3) == (1.5, 3)
        assert distributed.agree({"a": 0.25}) == {"a": 0.25}
        distributed.broadcast_buffers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# run under torchrun by the next test: a frozen backbone for epoch 0, unfrozen from epoch 1
FREEZE_SCRIPT = """
import copy, hashlib, json, sys
from pathlib import Path
import pandas as pd, torch
from bonedamage.data.tilestore import TileStore
from bonedamage.learn import distributed
from bonedamage.learn.datasets import TileDataset, make_loader, split_rows
from bonedamage.learn.models import build_cnn, set_backbone_trainable
from bonedamage.learn.train import TrainConfig, fit, seed_everything

tiles, splits, arch, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
store, table = TileStore(tiles), pd.read_parquet(splits)
train = TileDataset(store, *split_rows(store, table, "cortical", "grouped", "train"))
val = TileDataset(store, *split_rows(store, table, "cortical", "grouped", "val"))
cfg = TrainConfig(epochs=3, patience=3, batch_size=16, lr=3e-3, device="cpu", seed=7, threads=1)

def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()

with distributed.session("cpu", timeout_s=60):
    me = distributed.rank()
    seed_everything(cfg.seed + me, cfg.threads)  # different on purpose: DDP broadcasts rank 0's
    model = build_cnn(arch, store.channels("cortical"))
    features0 = digest(model.features.parameters())
    shard = distributed.shard(make_loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed), 0)
    order = []
    for epoch in (0, 1):
        distributed.set_epoch(shard, epoch)
        order.append([int(i) for i in shard.sampler])
    try:
        distributed.shard(make_loader(train, 1, shuffle=True), 0)
        too_small = None
    except ValueError as exc:
        too_small = str(exc)
    trainable, states, features = [], [], []

    def schedule(epoch):
        set_backbone_trainable(model, epoch >= 1)
        trainable.append(sum(p.requires_grad for p in model.parameters()))

    def after(epoch, metrics):  # the weights at the end of every epoch (fit returns the best)
        states.append(digest(model.state_dict().values()))
        features.append(digest(model.features.parameters()))

    result = fit(
        model,
        make_loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed),
        make_loader(val, 64, shuffle=False),
        cfg,
        before_epoch=schedule,
        on_epoch=after,
    )

    # one SGD step of a model without batch statistics: two ranks on 8 tiles each take the
    # step of one process on all 16 (DDP averages the gradients; the batch size is global)
    torch.manual_seed(0)
    net = build_cnn({**arch, "norm": "none"}, store.channels("cortical"))
    whole = copy.deepcopy(net)
    x, y = next(iter(make_loader(train, 16, shuffle=False)))
    half = slice(8 * me, 8 * me + 8)
    for m, xs, ys in ((distributed.wrap(net), x[half], y[half]), (whole, x, y)):
        torch.nn.functional.cross_entropy(m(xs), ys).backward()
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    pairs = zip(net.state_dict().values(), whole.state_dict().values(), strict=True)
    step_error = max(float((a - b).abs().max()) for a, b in pairs)
    (out / f"rank{me}.json").write_text(json.dumps({
        "world": distributed.world_size(),
        "best": digest(model.state_dict().values()),
        "states": states,
        "features": features,
        "features0": features0,
        "history": result.history,
        "order": order,
        "per_rank_batch": shard.batch_size,
        "too_small": too_small,
        "trainable": trainable,
        "step_error": step_error,
    }))
"""


def test_freeze_schedule_under_ddp_keeps_every_rank_identical(learn_data, tmp_path: Path) -> None:
    """Unfreezing at epoch 1 changes what DDP must sync: fit rebuilds the wrapper, so the
    backbone's gradients are averaged too and both ranks end with the same weights."""
    script = tmp_path / "freeze.py"
    script.write_text(textwrap.dedent(FREEZE_SCRIPT))
    done = torchrun(
        [str(script), *map(str, learn_data), json.dumps(TINY_ARCH), str(tmp_path)],
        BONEDAMAGE_DDP_TIMEOUT_S="60",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    a, b = ranks
    assert a["world"] == b["world"] == 2
    # different seeds per rank, yet identical weights, metrics and early-stopping history
    assert a["features0"] != b["features0"]
    assert a["states"] == b["states"] and a["best"] == b["best"]
    assert a["history"] == b["history"] and len(a["history"]) == 3
    # rank 0's initial backbone: frozen in epoch 0, trained (and synced) from epoch 1
    assert a["features"][0] == a["features0"] != a["features"][1] != a["features"][2]
    assert a["trainable"][0] < a["trainable"][1] == a["trainable"][2]
    # shards: disjoint halves of every epoch, a new order each epoch, half the batch size
    store, table = TileStore(learn_data[0]), pd.read_parquet(learn_data[1])
    n = len(split_rows(store, table, "cortical", "grouped", "train")[0])
    for epoch in (0, 1):
        mine, theirs = a["order"][epoch], b["order"][epoch]
        assert len(mine) == len(theirs) == (n + 1) // 2
        assert set(mine) | set(theirs) == set(range(n))
    assert a["order"][0] != a["order"][1]
    assert a["per_rank_batch"] == 8
    assert a["step_error"] < 1e-6 and b["step_error"] < 1e-6, (a["step_error"], b["step_error"])
    assert "smaller than the 2 processes" in a["too_small"]


def write_inputs(tmp: Path, params: dict[str, Any], experiment: str) -> tuple[Path, Path]:
    """A params file (its own MLflow experiment) and a models folder with a search result."""
    train = {"device": "cpu", "threads": 1, "epochs": 16, "patience": 16}
    store = {"db": str(tmp / "mlflow.db"), "artifacts": str(tmp / "art")}
    p = {**params, "train": params["train"] | train, "mlflow": store | {"experiment": experiment}}
    p["train_cnn"] = {"ensemble": 1}  # one network: this test is about the processes
    path = tmp / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump(p))
    models = tmp / experiment
    # twice the tiny CNN's filters: on 2.5-D tiles the tiny one stays at chance for this seed
    arch = {**TINY_ARCH, "base_filters": 8, "dense_units": 16}
    best = {"arch": arch, "lr": 3e-3, "weight_decay": 1e-4, "batch_size": 16}
    (models / "cortical").mkdir(parents=True)
    (models / "cortical" / "cnn_search.json").write_text(json.dumps(best | {"augment_strength": 1}))
    return path, models


def balanced_accuracies(model_path: Path, learn_data, scheme: str) -> dict[str, float]:
    """Balanced accuracy of a saved model on the val and test splits and on both together."""
    store, table = TileStore(learn_data[0]), pd.read_parquet(learn_data[1])
    model, found = load_checkpoint(model_path), {}
    for split in ("val", "test"):
        positions, labels = split_rows(store, table, "cortical", scheme, split)
        loader = make_loader(TileDataset(store, positions, labels), 256, shuffle=False)
        found[split] = predict(model, loader)
    scores = {k: balanced_accuracy_score(y, p.argmax(1)) for k, (p, y) in found.items()}
    prob, y = (np.concatenate(parts) for parts in zip(*found.values(), strict=True))
    return {**scores, "held_out": balanced_accuracy_score(y, prob.argmax(1))}


def test_train_cnn_on_two_processes_matches_one_process(
    learn_data, learn_params, cli_params, tmp_path: Path, capsys
) -> None:
    """`bonedamage train-cnn` under torchrun (2 CPU processes): one MLflow run per model,
    written by rank 0 only, and a model as good as the one-process one within TOLERANCE."""
    common = ["train-cnn", "--tissue", "cortical", "--tiles", str(learn_data[0])]
    common += ["--splits", str(learn_data[1]), "--no-progress"]
    one, one_models = write_inputs(tmp_path, learn_params, "one")
    two, two_models = write_inputs(tmp_path, learn_params, "two")
    assert main([*common, "--params", str(one), "--models", str(one_models)]) == 0
    capsys.readouterr()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = torchrun(
        ["-m", "bonedamage", *common, "--params", str(two), "--models", str(two_models)],
        MLFLOW_TRACKING_URI=uri,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("cortical: cnn val") == 1  # reported once, by rank 0

    client = mlflow.MlflowClient(tracking_uri=uri)
    for experiment, world in (("one", None), ("two", "2")):
        runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert sorted(r.info.run_name for r in runs) == ["cnn-cortical", "cnn_leaky-cortical"]
        assert all(r.info.status == "FINISHED" for r in runs)
        assert [r.data.params.get("world_size") for r in runs] == [world, world]
    for models in (one_models, two_models):
        written = sorted(p.name for p in (models / "cortical").iterdir())
        assert written == [f"cnn{s}.{e}" for s in ("", "_leaky") for e in ("json", "pt")] + [
            "cnn_search.json"
        ]

    for name, scheme in (("cnn", "grouped"), ("cnn_leaky", "leaky")):
        single, double = (
            balanced_accuracies(m / "cortical" / f"{name}.pt", learn_data, scheme)
            for m in (one_models, two_models)
        )
        print(
            f"{name} balanced accuracy, 1 vs 2 processes: "
            + ", ".join(f"{k} {single[k]:.3f} vs {double[k]:.3f}" for k in single)
        )
        assert abs(single["held_out"] - double["held_out"]) <= TOLERANCE
        assert min(single["held_out"], double["held_out"]) >= WELL_ABOVE_CHANCE
