"""Final-model recipes (learn/recipes.py): an ensemble is its members trained with
successive seeds."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from bonedamage.config import ConfigError
from bonedamage.data.tilestore import TileStore
from bonedamage.learn.datasets import TileDataset, make_loader, split_rows
from bonedamage.learn.models import CNN, Ensemble
from bonedamage.learn.recipes import train_cnn, train_cnn_ensemble
from bonedamage.learn.train import predict
from conftest import TINY_ARCH as ARCH

BEST = {"arch": ARCH, "lr": 3e-3, "weight_decay": 1e-4, "batch_size": 16, "augment_strength": 1}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_ensemble_is_its_members_trained_with_successive_seeds(learn_data, learn_params) -> None:
    store, table = TileStore(learn_data[0]), pd.read_parquet(learn_data[1])
    train_cfg, augment = learn_params["train"], learn_params["augment"]
    model, fits, score = train_cnn_ensemble(store, table, "cortical", BEST, train_cfg, augment, 2)
    assert isinstance(model, Ensemble) and len(fits) == 2
    one, one_fits, one_score = train_cnn_ensemble(
        store, table, "cortical", BEST, train_cfg, augment, 1
    )
    assert isinstance(one, CNN) and one_score == one_fits[0].best_score == fits[0].best_score
    assert _same_weights(model.members[0], one)  # the first member is the one-network model
    second, second_fit = train_cnn(
        store, table, "cortical", BEST, {**train_cfg, "seed": train_cfg["seed"] + 1}, augment
    )
    assert _same_weights(model.members[1], second) and fits[1].best_score == second_fit.best_score
    assert not _same_weights(model.members[0], model.members[1])
    val = TileDataset(store, *split_rows(store, table, "cortical", "grouped", "val"))
    prob, label = predict(model, make_loader(val, 256, shuffle=False))
    assert score == balanced_accuracy_score(label, prob.argmax(1))
    with pytest.raises(ConfigError, match=r"cnn\.ensemble 0"):
        train_cnn_ensemble(store, table, "cortical", BEST, train_cfg, augment, 0)
