"""Shared fixtures: the repo's params, small phantom configs and the default dataset."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

from bonedamage.config import load_params
from bonedamage.data.synth.generate import generate_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_STACK = SHARED / "real" / "lhdl-3155-trabecular"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


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
    generate_dataset(small_synth(params, load_steps=[0.0, 0.75, 1.0]), root, progress=False)
    return root


@pytest.fixture(scope="session")
def default_dataset(tmp_path_factory: pytest.TempPathFactory, params: dict[str, Any]) -> Path:
    """The full default phantom dataset, exactly as `bonedamage synth` writes it (~1.5 min)."""
    root = tmp_path_factory.mktemp("default") / "data" / "raw"
    generate_dataset(params["synth"], root, workers=2, progress=False)
    return root
