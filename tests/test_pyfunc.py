"""The registered model (lifecycle/pyfunc.py) as MLflow serves it: bad requests, bad weights.

The model is saved as registration logs it (model from code, uint16 signature) and loaded
with ``mlflow.pyfunc.load_model``, the wrapper ``mlflow models serve`` calls: an error
with ``INVALID_PARAMETER_VALUE`` is answered as HTTP 400 with its message (the served
shape error is checked over HTTP in test_registry.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode

from bonedamage.learn.models import WeightsError
from bonedamage.lifecycle.pyfunc import RequestError
from conftest import RunsCode, save_tiny_pyfunc

PX = 16
NORM = {"norm_lo": 0.0, "norm_hi": 60000.0}


@pytest.fixture(scope="module")
def served(params: dict, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = save_tiny_pyfunc(tmp_path_factory.mktemp("pyfunc"), params)
    return mlflow.pyfunc.load_model(str(folder))


def tiles(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 60000, (n, PX, PX)).astype(np.uint16)


def test_served_model_answers_a_good_request(served) -> None:
    out = served.predict(tiles(), params=NORM)
    assert list(out.columns) == ["prob_failed", "label", "class"] and len(out) == 3
    assert out["prob_failed"].between(0, 1).all()


BAD_REQUESTS = {
    "float-to-uint16-model": (
        tiles().astype(np.float32) + 0.5,
        NORM,
        "dtype of input float32 does not match expected dtype uint16",
    ),
    "bool-tiles": (tiles() > 100, NORM, "dtype of input bool does not match"),
    "text-tiles": (tiles().astype(str), NORM, "dtype of input <U5 does not match"),
    "wrong-tile-shape": (
        tiles()[:, :, :-1],
        NORM,
        "Shape of input (3, 16, 15) does not match expected shape (-1, 16, 16)",
    ),
    "rgb-tiles": (
        np.repeat(tiles()[..., None], 3, axis=-1),
        NORM,
        "Shape of input (3, 16, 16, 3) does not match",
    ),
    "no-tiles": (tiles(0), NORM, "tiles: the request holds no tiles"),
    "norm-not-a-number": (tiles(), {"norm_lo": "dark", "norm_hi": 1.0}, "'norm_lo'"),
    "norm-range-inverted": (
        tiles(),
        {"norm_lo": 5.0, "norm_hi": 1.0},
        "norm_lo=5.0, norm_hi=1.0: need finite values with hi > lo",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_served_model_refuses_bad_requests_as_400(served, case: str) -> None:
    data, params, fragment = BAD_REQUESTS[case]
    with pytest.raises(MlflowException) as info:
        served.predict(data, params=params)
    assert fragment in info.value.message
    assert info.value.error_code == ErrorCode.Name(ErrorCode.INVALID_PARAMETER_VALUE)  # HTTP 400


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (np.full((1, PX, PX), "x"), "tiles must be numbers"),
        (np.ones((1, PX, PX), np.complex64), "tiles must be numbers"),
        (np.full((1, PX, PX), np.inf, np.float32), "NaN or infinite"),
        (np.ones((2, PX, PX, 3), np.uint8), "tiles must have shape (n, 16, 16)"),
    ],
    ids=["text", "complex", "inf", "rgb"],
)
def test_classifier_checks_requests_without_a_signature(served, data, fragment) -> None:
    """The model's own checks, for callers that bypass MLflow's schema (predict_scan)."""
    model = served.unwrap_python_model()
    with pytest.raises(RequestError) as info:
        model.predict(None, data, {"norm_lo": 0.0, "norm_hi": 1.0})
    assert fragment in str(info.value)


def test_model_whose_weights_are_a_pickled_object_is_refused_unrun(
    params: dict, tmp_path: Path
) -> None:
    evil = tmp_path / "weights.pt"
    torch.save({"conv.weight": RunsCode(tmp_path / "pwned")}, evil)  # a non-tensor object
    folder = save_tiny_pyfunc(tmp_path / "m", params, weights=evil)
    with pytest.raises(WeightsError) as info:
        mlflow.pyfunc.load_model(str(folder))  # what `mlflow models serve` does first
    message = str(info.value)
    assert "weights.pt: not a loadable state-dict file" in message
    assert "weights_only=True" in message
    assert not (tmp_path / "pwned").exists()  # the pickled callable never ran


def test_25d_classifier_takes_three_plane_tiles(tmp_path: Path) -> None:
    from bonedamage.learn.final import save_model
    from bonedamage.learn.models import build_cnn
    from bonedamage.lifecycle.pyfunc import TileClassifier
    from conftest import TINY_ARCH

    torch.manual_seed(0)
    model = build_cnn(TINY_ARCH, 3)
    meta = {"kind": "cnn", "arch": TINY_ARCH, "tile_px": PX, "in_channels": 3}
    save_model(tmp_path / "cnn.pt", model, meta)
    clf = TileClassifier()
    tiling = {"tile_px": PX, "channels": 3, "percentiles": [0.5, 99.5]}
    clf.setup(meta, tiling, tmp_path / "cnn.pt")
    raw = np.random.default_rng(0).integers(0, 60000, (4, 3, PX, PX)).astype(np.uint16)
    prob = clf.failed_probability(raw, **NORM)
    with torch.no_grad():
        x = torch.from_numpy(raw.astype(np.float32) / np.float32(60000.0))
        want = torch.softmax(model.eval()(x), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(prob, want, rtol=1e-5)
    one = clf.failed_probability(raw[0], **NORM)  # a single (3, px, px) tile
    assert one.shape == (1,) and one[0] == pytest.approx(prob[0])
    with pytest.raises(RequestError, match=r"shape \(n, 3, 16, 16\), got \(4, 16, 16\)"):
        clf.failed_probability(raw[:, 0], **NORM)  # one-plane tiles for a 2.5-D model
