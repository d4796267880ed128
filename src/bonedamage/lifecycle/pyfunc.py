"""The registered model: an MLflow pyfunc that classifies raw tiles, normalisation included.

A registered version carries three artifacts: the state dict (``weights``, loaded with
``weights_only=True``), the sidecar that says how to rebuild the module (``meta``) and the
tiling settings it was trained with (``tiling``: tissue, tile size in px and um, working
voxel size, planes, 2.5-D context, intensity percentiles, decision threshold). ``predict``
takes tiles of raw scan values, shape (n, tile_px, tile_px), or (n, 3, tile_px, tile_px) for
a model trained on 2.5-D tiles (the planes ``context_um`` before, at and after the tiled
one, as ``bonedamage tile`` cuts them), and applies the training normalisation
``(raw - lo) / (hi - lo)`` itself:

- with params ``norm_lo`` / ``norm_hi`` (the scan's intensity range, as ``bonedamage tile``
  recorded it in ``normalization.json``), exactly the transform the training tiles got;
- without them, ``lo`` / ``hi`` are the tiling percentiles of the request's own tiles, a
  good estimate when the request carries many tiles of one scan.

The signature declares the dtype of the training scans' tiles (uint16 for the default
phantoms); :meth:`TileClassifier.classify` takes uint8, uint16 or float32 tiles in-process.
The output has one row per tile: ``prob_failed``, ``label`` (1 = failed) and ``class``.

The model is logged as *code* (:data:`MODEL_CODE`, ``mlflow.models.set_model``), not as a
pickle: loading a registered version never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from bonedamage.data.tilestore import normalize, with_channels
from bonedamage.learn.models import build_module
from bonedamage.lifecycle import tracking  # noqa: F401 - MLflow quiet and offline

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
ARTIFACTS = ("weights", "meta", "tiling")
CLASSES = ("pristine", "failed")
BATCH = 256


class RequestError(MlflowException, ValueError):
    """A request the model cannot answer (wrong shape, non-finite values, bad range).

    An MlflowException with INVALID_PARAMETER_VALUE, so ``mlflow models serve`` answers it
    as a 400 with this message rather than as an internal error.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class TileClassifier(mlflow.pyfunc.PythonModel):
    """Failed-vs-pristine classifier of raw tiles (see the module docstring)."""

    module: torch.nn.Module
    meta: dict[str, Any]
    tiling: dict[str, Any]

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        art = context.artifacts
        self.setup(
            json.loads(Path(art["meta"]).read_text()),
            json.loads(Path(art["tiling"]).read_text()),
            Path(art["weights"]),
        )

    def setup(self, meta: dict[str, Any], tiling: dict[str, Any], weights: Path) -> None:
        """Build the module from its sidecar and weights (also used without MLflow)."""
        self.meta, self.tiling = meta, tiling
        self.module = build_module(meta, weights)

    @property
    def tile_px(self) -> int:
        return int(self.tiling["tile_px"])

    @property
    def channels(self) -> int:
        """Input channels: 1, or 3 for a model of 2.5-D tiles."""
        return int(self.tiling.get("channels", 1))

    @property
    def tile_shape(self) -> tuple[int, ...]:
        """Shape of one request tile: (px, px), or (channels, px, px)."""
        px, c = self.tile_px, self.channels
        return (px, px) if c == 1 else (c, px, px)

    @property
    def threshold(self) -> float:
        return float(self.tiling.get("threshold", 0.5))

    def intensity_range(self, raw: np.ndarray) -> tuple[float, float]:
        """The tiling percentiles of the given raw tiles: the fallback normalisation range."""
        lo, hi = np.percentile(raw, self.tiling["percentiles"])
        if not hi > lo:
            raise RequestError(f"constant tiles (value {lo}): give norm_lo and norm_hi")
        return float(lo), float(hi)

    def check(self, tiles: Any) -> np.ndarray:
        """Tiles as a float32 array (n, *tile_shape); RequestError naming the problem."""
        raw = np.asarray(tiles)
        given, want = raw.shape, self.tile_shape
        if raw.ndim == len(want):
            raw = raw[None]
        if raw.dtype.kind not in "uif":
            raise RequestError(f"tiles must be numbers (uint8, uint16 or float32), got {raw.dtype}")
        if raw.ndim == len(want) + 1 and len(raw) == 0:
            raise RequestError(f"tiles: the request holds no tiles (shape {raw.shape})")
        if raw.ndim != len(want) + 1 or raw.shape[1:] != want:
            shape = ", ".join(str(v) for v in ("n", *want))
            raise RequestError(f"tiles must have shape ({shape}), got {given}")
        raw = raw.astype(np.float32, copy=False)
        if not np.isfinite(raw).all():
            raise RequestError("tiles contain NaN or infinite values")
        return raw

    def failed_probability(
        self, tiles: Any, norm_lo: float | None = None, norm_hi: float | None = None
    ) -> np.ndarray:
        """Failed-class probability of each raw tile (float64, shape (n,))."""
        raw = self.check(tiles)
        if (norm_lo is None) != (norm_hi is None):
            raise RequestError("give both norm_lo and norm_hi, or neither")
        lo, hi = (norm_lo, norm_hi) if norm_lo is not None else self.intensity_range(raw)
        if not (np.isfinite([lo, hi]).all() and hi > lo):
            raise RequestError(f"norm_lo={lo}, norm_hi={hi}: need finite values with hi > lo")
        x = normalize(raw, float(lo), float(hi))
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), BATCH):
                batch = torch.from_numpy(with_channels(x[start : start + BATCH]))
                out.append(torch.softmax(self.module(batch).float(), dim=1)[:, 1].numpy())
        return np.concatenate(out).astype(np.float64)

    def classify(
        self, tiles: Any, norm_lo: float | None = None, norm_hi: float | None = None
    ) -> pd.DataFrame:
        """One row per tile: ``prob_failed``, ``label`` (1 = failed), ``class``."""
        prob = self.failed_probability(tiles, norm_lo, norm_hi)
        label = (prob > self.threshold).astype(np.int64)
        return pd.DataFrame(
            {"prob_failed": prob, "label": label, "class": np.asarray(CLASSES)[label]}
        )

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        params = params or {}
        return self.classify(model_input, params.get("norm_lo"), params.get("norm_hi"))


def load_classifier(uri: str) -> TileClassifier:
    """A registered (``models:/<name>@<alias>``) or logged model, ready to classify."""
    return mlflow.pyfunc.load_model(uri).unwrap_python_model()
