"""The training loop (learn/train.py): determinism, early stopping, callbacks, devices."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bonedamage.config import ConfigError, load_params
from bonedamage.data.tilestore import TileStore
from bonedamage.learn.datasets import TileDataset, make_loader, split_rows
from bonedamage.learn.models import build_cnn
from bonedamage.learn.train import (
    TrainConfig,
    fit,
    numerics_platform,
    predict,
    resolve_device,
    seed_everything,
)
from conftest import CHANNELS, REPO
from conftest import TINY_ARCH as ARCH


def loaders(learn_data: tuple[Path, Path], seed: int = 0):
    store, table = TileStore(learn_data[0]), pd.read_parquet(learn_data[1])
    train = TileDataset(store, *split_rows(store, table, "cortical", "grouped", "train"))
    val = TileDataset(store, *split_rows(store, table, "cortical", "grouped", "val"))
    return make_loader(train, 32, shuffle=True, seed=seed), make_loader(val, 64, shuffle=False)


def train_once(learn_data, cfg: TrainConfig):
    seed_everything(cfg.seed, cfg.threads)
    model = build_cnn(ARCH, CHANNELS)
    return model, fit(model, *loaders(learn_data, cfg.seed), cfg)


def test_same_seed_same_weights_and_metrics_on_the_cpu(learn_data) -> None:
    cfg = TrainConfig(epochs=2, patience=2, device="cpu", seed=5, threads=1)
    _, a = train_once(learn_data, cfg)
    _, b = train_once(learn_data, cfg)
    assert a.history == b.history
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    _, c = train_once(
        learn_data, TrainConfig(epochs=2, patience=2, device="cpu", seed=6, threads=1)
    )
    assert c.history != a.history


def test_channels_last_trains_the_same_model_reproducibly(learn_data) -> None:
    """train.channels_last only changes the memory layout: the same seeded run is
    reproduced exactly, follows the contiguous run up to rounding, and hands back a model
    in the layout of a loaded checkpoint."""
    cfg = TrainConfig(epochs=2, patience=2, device="cpu", seed=5, threads=1, channels_last=True)
    model, a = train_once(learn_data, cfg)
    _, b = train_once(learn_data, cfg)
    assert a.history == b.history
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous() for w in convs)
    contiguous = TrainConfig(epochs=2, patience=2, device="cpu", seed=5, threads=1)
    _, plain = train_once(learn_data, dataclasses.replace(contiguous, channels_last=False))
    assert a.history[0]["train_loss"] == pytest.approx(plain.history[0]["train_loss"], rel=1e-4)
    val = loaders(learn_data)[1]
    nhwc, labels = predict(model, val, channels_last=True)
    nchw, labels2 = predict(model, val)
    assert np.array_equal(labels, labels2) and np.abs(nhwc - nchw).max() < 1e-5


def test_learns_and_keeps_the_best_epoch(learn_data) -> None:
    model, result = train_once(
        learn_data, TrainConfig(epochs=4, patience=4, device="cpu", lr=3e-3, threads=1)
    )
    assert result.best_score == max(h["val_balanced_accuracy"] for h in result.history)
    assert result.history[result.best_epoch]["val_balanced_accuracy"] == result.best_score
    prob, labels = predict(model, loaders(learn_data)[1])
    assert prob.shape == (len(labels), 2) and abs(prob.sum(1) - 1).max() < 1e-5
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]  # it learns


def test_early_stopping_and_callbacks(learn_data) -> None:
    seen, started = [], []
    # no batch statistics: lr 0 changes nothing
    model = build_cnn({**ARCH, "norm": "none"}, CHANNELS)
    cfg = TrainConfig(epochs=10, patience=1, device="cpu", lr=0.0, threads=1)  # lr 0: no progress
    result = fit(
        model,
        *loaders(learn_data),
        cfg,
        on_epoch=lambda e, m: seen.append(e),
        before_epoch=started.append,
    )
    assert len(result.history) == 2 and seen == started == [0, 1]

    class StopError(Exception):
        pass

    def stop(epoch: int, metrics: dict) -> None:
        raise StopError

    with pytest.raises(StopError):
        fit(build_cnn(ARCH, CHANNELS), *loaders(learn_data), cfg, on_epoch=stop)


def test_seed_everything_sets_deterministic_kernels_threads_and_seeds() -> None:
    torch.set_deterministic_debug_mode("default")
    seed_everything(11, 1)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.get_num_threads() == 1
    first = torch.rand(3), np.random.rand()
    seed_everything(11, 1)
    assert torch.equal(first[0], torch.rand(3)) and first[1] == np.random.rand()


def test_cosine_schedule_decays_the_steps_to_nothing(learn_data) -> None:
    """Per-epoch weight change: steady at a constant rate, vanishing at the end of a cosine."""

    def steps(schedule: str) -> list[float]:
        seed_everything(3, 1)
        model = build_cnn({**ARCH, "norm": "none"}, CHANNELS)
        snapshots = [torch.cat([p.detach().flatten() for p in model.parameters()])]

        def snap(_epoch: int, _metrics: dict) -> None:
            snapshots.append(torch.cat([p.detach().flatten() for p in model.parameters()]))

        cfg = TrainConfig(
            epochs=4, patience=4, device="cpu", lr=1e-3, threads=1, lr_schedule=schedule
        )
        fit(model, *loaders(learn_data), cfg, on_epoch=snap)
        return [float((b - a).norm()) for a, b in itertools.pairwise(snapshots)]

    constant, cosine = steps("constant"), steps("cosine")
    assert cosine[-1] < 0.2 * cosine[0]  # last epoch's lr is within 15 % of zero
    assert constant[-1] > 0.3 * constant[0]
    with pytest.raises(ValueError, match=r"lr_schedule 'step'.*cosine"):
        TrainConfig(lr_schedule="step")


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")


def test_the_numerics_platform_names_the_cpu_and_its_instruction_set() -> None:
    got = numerics_platform(torch.device("cpu"))
    assert got["torch"] == torch.__version__
    assert got["device"] == f"cpu {torch.backends.cpu.get_cpu_capability()}"
    assert got["cpu"] and got["machine"] and got["threads"] == str(torch.get_num_threads())
    if Path("/proc/cpuinfo").is_file():
        assert " family " in got["cpu"] and " model " in got["cpu"]


def test_train_config_defaults_are_the_params_train_section() -> None:
    """One place for the defaults: TrainConfig() is params.yaml's ``train`` section."""
    train = load_params(REPO / "params.yaml")["train"]
    defaults = dataclasses.asdict(TrainConfig())
    assert {k: defaults[k] for k in train} == train


def test_an_unknown_training_setting_is_an_error_not_dropped() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting.*lr_shedule"):
        TrainConfig.from_params({"epochs": 2}, lr_shedule="cosine")
    assert TrainConfig.from_params({"epochs": 2}, lr=0.1).lr == 0.1
