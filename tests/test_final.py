"""Final models (learn/final.py): saved checkpoints are reproducible, weights-only files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bonedamage.learn.final import save_model
from bonedamage.learn.models import build_cnn, load_state_dict_file
from conftest import TINY_ARCH as ARCH


def test_the_same_model_saves_to_the_same_bytes_whatever_the_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_cnn(ARCH)
    save_model(tmp_path / "a" / "cnn.pt", model, {"kind": "cnn", "arch": ARCH})
    save_model(tmp_path / "b" / "cnn.pt", model, {"kind": "cnn", "arch": ARCH})
    # DVC hashes these files: a run-dependent byte would break exact reproduction
    assert (tmp_path / "a" / "cnn.pt").read_bytes() == (tmp_path / "b" / "cnn.pt").read_bytes()
    state = load_state_dict_file(tmp_path / "a" / "cnn.pt")
    assert state.keys() == model.state_dict().keys()
    assert json.loads((tmp_path / "a" / "cnn.json").read_text())["arch"] == ARCH
    assert not list((tmp_path / "a").glob(".*.tmp"))
