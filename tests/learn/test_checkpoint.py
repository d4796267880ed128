"""Checkpoints (learn/checkpoint.py): reproducible, weights-only files with a sidecar that
rebuilds the module."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bonedamage.learn.checkpoint import load_checkpoint, save_checkpoint
from bonedamage.learn.models import build_cnn, load_state_dict_file
from conftest import TINY_ARCH as ARCH


def test_the_same_model_saves_to_the_same_bytes_whatever_the_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_cnn(ARCH)
    save_checkpoint(tmp_path / "a" / "cnn.pt", model, {"kind": "cnn", "arch": ARCH})
    save_checkpoint(tmp_path / "b" / "cnn.pt", model, {"kind": "cnn", "arch": ARCH})
    # DVC hashes these files: a run-dependent byte would break exact reproduction
    assert (tmp_path / "a" / "cnn.pt").read_bytes() == (tmp_path / "b" / "cnn.pt").read_bytes()
    state = load_state_dict_file(tmp_path / "a" / "cnn.pt")
    assert state.keys() == model.state_dict().keys()
    assert json.loads((tmp_path / "a" / "cnn.json").read_text())["arch"] == ARCH
    assert not list((tmp_path / "a").glob(".*.tmp"))


def test_a_checkpoint_rebuilds_the_same_module_from_its_sidecar(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_cnn(ARCH).eval()
    save_checkpoint(tmp_path / "cnn.pt", model, {"kind": "cnn", "arch": ARCH})
    loaded = load_checkpoint(tmp_path / "cnn.pt").eval()
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(model(x), loaded(x))
    assert type(loaded) is type(model)
