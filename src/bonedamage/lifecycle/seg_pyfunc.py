"""The registered segmentation model: an MLflow pyfunc that labels every pixel of raw tiles.

It takes what the registered classifier takes (:mod:`bonedamage.lifecycle.pyfunc`): raw
tiles (n, tile_px, tile_px) or (n, 3, tile_px, tile_px), optional params ``norm_lo`` /
``norm_hi`` (the scan's intensity range) and the same checks of the tiles' shape, values
and units. It answers one class map per tile, (n, tile_px, tile_px) uint8:
0 background, then the damage kinds of the model's ``classes`` (its ``meta`` artifact), in
that order. :meth:`TileSegmenter.probabilities` gives the per-class probabilities. The
applicability domain travels with the version (its features: the input of the U-Net's last
transposed convolution, averaged over the pixels) and :meth:`TileSegmenter.assess` flags
each tile; ``bonedamage predict``, which maps whole scans by blending overlapping tiles,
applies it (tiles flagged, a scan outside it *uncertain* or refused). Logged as code, like
the classifier: loading a version unpickles nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from bonedamage.data.tilestore import normalize, with_channels
from bonedamage.learn.models import load_state_dict_file
from bonedamage.learn.segmentation import build_segmenter
from bonedamage.lifecycle.pyfunc import BATCH, TileClassifier

MODEL_CODE = Path(__file__).with_name("seg_pyfunc_model.py")


class TileSegmenter(TileClassifier):
    """Damage segmentation of raw tiles (see the module docstring)."""

    def setup(
        self,
        meta: dict[str, Any],
        tiling: dict[str, Any],
        weights: Path,
        domain: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None,
    ) -> None:
        """Build the U-Net from its sidecar and weights (``weights_only`` load)."""
        self.meta, self.tiling = meta, tiling
        module = build_segmenter(meta["arch"], int(meta["in_channels"]), len(meta["classes"]))
        module.load_state_dict(load_state_dict_file(weights))
        self.module = module.eval()
        self.domain, self.domain_arrays = domain if domain is not None else (None, None)

    @property
    def classes(self) -> list[str]:
        """Class names: background, then the damage kinds."""
        return list(self.meta["classes"])

    def probabilities(
        self, tiles: Any, norm_lo: float | None = None, norm_hi: float | None = None
    ) -> np.ndarray:
        """Per-pixel class probabilities of raw tiles, (n, classes, px, px) float32."""
        raw = self.check(tiles)
        lo, hi = self.intensity_range(raw, norm_lo, norm_hi)
        x = normalize(raw, lo, hi)
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), BATCH):
                batch = torch.from_numpy(with_channels(x[start : start + BATCH]))
                out.append(torch.softmax(self.module(batch).float(), dim=1).numpy())
        return np.concatenate(out)

    def failed_probability(
        self, tiles: Any, norm_lo: float | None = None, norm_hi: float | None = None
    ) -> np.ndarray:
        """The largest damage probability of any pixel of each tile (float64, (n,)): what
        the domain check runs the forward pass for."""
        prob = self.probabilities(tiles, norm_lo, norm_hi)
        return (1.0 - prob[:, 0]).reshape(len(prob), -1).max(axis=1).astype(np.float64)

    def segment(
        self, tiles: Any, norm_lo: float | None = None, norm_hi: float | None = None
    ) -> np.ndarray:
        """Class map of each raw tile, (n, px, px) uint8 (indices of :attr:`classes`)."""
        return self.probabilities(tiles, norm_lo, norm_hi).argmax(axis=1).astype(np.uint8)

    def predict(  # type: ignore[override]
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        """A request's class maps; with ``norm_lo`` / ``norm_hi``, tiles in other units are
        refused as the classifier refuses them."""
        params = params or {}
        lo, hi = params.get("norm_lo"), params.get("norm_hi")
        raw = self.check(model_input)
        if lo is not None:
            self.check_units(raw, *self.intensity_range(raw, lo, hi))
        return self.segment(raw, lo, hi)


def load_segmenter_model(uri: str) -> TileSegmenter:
    """A registered (``models:/<name>@<alias>``) or logged segmentation model."""
    model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not isinstance(model, TileSegmenter):
        raise TypeError(f"{uri}: not a bonedamage segmentation model")
    return model
