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

Tiles may come in any integer or float dtype (a JSON request's numbers arrive as int64 or
float64); :meth:`TileClassifier.check` converts them to float32, which holds every uint8 and
uint16 value exactly, and refuses anything else (bool, text, a wrong shape, NaN or inf) with
a message naming the expected shape. The signature therefore declares no input schema, only
the params and the output: MLflow casts a JSON request to a declared tensor dtype with
``np.array(data, dtype)``, so a uint16 signature would truncate float tiles to 0 and 1 and
answer them without a word, and a float signature would refuse uint16 arrays in-process.

Float tiles are read as what they are. Without ``norm_lo`` / ``norm_hi`` the range is the
request's own percentiles, which move with any increasing affine rescaling of the tiles, so
tiles rescaled to [0, 1] get the same answer as their raw values. With them, tiles and range
must be in the same units: :meth:`TileClassifier.classify` refuses (HTTP 400) a request whose
robust range (the tiling percentiles of its values) spans under 1 % or over 100 times
``norm_hi - norm_lo``, or lies more than that width outside it, such as [0, 1] tiles sent with
the scan's raw range; a uint8 scan with ``norm_hi - norm_lo`` under 100 grey levels is the one
case where [0, 1] tiles still span 1 % of it and pass. The output has one row per tile:
``prob_failed``, ``label`` (1 = failed) and ``class``.

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
from bonedamage.learn.domain import feature_capture, in_domain, intensity_stats, load_arrays
from bonedamage.learn.models import build_module
from bonedamage.lifecycle import tracking  # noqa: F401 - MLflow quiet and offline

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
ARTIFACTS = ("weights", "meta", "tiling", "domain", "domain_arrays")
CLASSES = ("pristine", "failed")
BATCH = 256
RESCALED_MAX = 1.5  # tiles whose values all lie within +-this look rescaled, not raw


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

    domain: dict[str, Any] | None = None  # applicability domain (learn/domain.py), if any
    domain_arrays: dict[str, np.ndarray] | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        art = context.artifacts
        domain = None
        if "domain" in art and "domain_arrays" in art:
            domain = (
                json.loads(Path(art["domain"]).read_text()),
                load_arrays(Path(art["domain_arrays"])),
            )
        self.setup(
            json.loads(Path(art["meta"]).read_text()),
            json.loads(Path(art["tiling"]).read_text()),
            Path(art["weights"]),
            domain,
        )

    def setup(
        self,
        meta: dict[str, Any],
        tiling: dict[str, Any],
        weights: Path,
        domain: tuple[dict[str, Any], dict[str, np.ndarray]] | None = None,
    ) -> None:
        """Build the module from its sidecar and weights (also used without MLflow); the
        domain is the (summary, arrays) pair of :func:`bonedamage.learn.domain.calibrate`."""
        self.meta, self.tiling = meta, tiling
        self.module = build_module(meta, weights)
        self.domain, self.domain_arrays = domain if domain is not None else (None, None)

    def assess(
        self, tiles: Any, norm_lo: float, norm_hi: float
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Failed probability, domain distance and in-domain flag of each raw tile (the
        last two None for a model without a domain), from one forward pass."""
        if self.domain is None or self.domain_arrays is None:
            return self.failed_probability(tiles, norm_lo, norm_hi), None, None
        with feature_capture(self.module) as take:
            prob = self.failed_probability(tiles, norm_lo, norm_hi)
        intensity = intensity_stats(normalize(self.check(tiles), norm_lo, norm_hi))
        distance, inside = in_domain(self.domain, self.domain_arrays, take(), intensity)
        return prob, distance, inside

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

    def intensity_range(
        self, raw: np.ndarray, norm_lo: float | None = None, norm_hi: float | None = None
    ) -> tuple[float, float]:
        """The normalisation range of the given raw tiles: ``norm_lo`` / ``norm_hi`` when
        given (both, finite, hi > lo), else the tiling percentiles of the tiles themselves."""
        if (norm_lo is None) != (norm_hi is None):
            raise RequestError("give both norm_lo and norm_hi, or neither")
        if norm_lo is not None:
            lo, hi = norm_lo, norm_hi
            if not (np.isfinite([lo, hi]).all() and hi > lo):
                raise RequestError(f"norm_lo={lo}, norm_hi={hi}: need finite values with hi > lo")
            return float(lo), float(hi)
        lo, hi = np.percentile(raw, self.tiling["percentiles"])
        if not hi > lo:
            raise RequestError(f"constant tiles (value {lo}): give norm_lo and norm_hi")
        return float(lo), float(hi)

    def check(self, tiles: Any) -> np.ndarray:
        """Tiles of any integer or float dtype as a float32 array (n, *tile_shape) (exact for
        uint8 and uint16 values); RequestError naming the problem."""
        raw = np.asarray(tiles)
        given, want = raw.shape, self.tile_shape
        if raw.ndim == len(want):
            raw = raw[None]
        if raw.dtype.kind not in "uif":
            raise RequestError(
                f"tiles must be numbers (raw scan values, integer or float), got {raw.dtype}"
            )
        if raw.ndim == len(want) + 1 and len(raw) == 0:
            raise RequestError(f"tiles: the request holds no tiles (shape {raw.shape})")
        if raw.ndim != len(want) + 1 or raw.shape[1:] != want:
            shape = ", ".join(str(v) for v in ("n", *want))
            raise RequestError(f"tiles must have shape ({shape}), got {given}")
        raw = raw.astype(np.float32, copy=False)
        if not np.isfinite(raw).all():
            raise RequestError("tiles contain NaN or infinite values")
        return raw

    def check_units(self, raw: np.ndarray, lo: float, hi: float) -> None:
        """RequestError when raw tiles and a given range ``lo`` .. ``hi`` are not in the same
        units (see :meth:`classify`)."""
        p_lo, p_hi = self.tiling["percentiles"]
        t_lo, t_hi = (float(v) for v in np.percentile(raw, [p_lo, p_hi]))
        width, spread, why = hi - lo, t_hi - t_lo, ""
        rescaled = max(abs(t_lo), abs(t_hi)) <= RESCALED_MAX  # values like [0, 1]
        if spread < 0.01 * width and rescaled:  # (flat raw tiles vary little too)
            why = "vary over less than 1% of that width (tiles rescaled, e.g. to [0, 1]?)"
        elif spread > 100 * width:
            why = "vary over more than 100 times that width (a range of rescaled tiles?)"
        elif t_hi < lo - width or t_lo > hi + width:
            why = "lie more than that width outside it (another scan's range?)"
        if why:
            raise RequestError(
                f"tiles span {t_lo:.6g} .. {t_hi:.6g} (their {p_lo:g}-{p_hi:g} "
                f"percentiles) but norm_lo .. norm_hi is {lo:.6g} .. {hi:.6g} (width "
                f"{width:.6g}): the tiles {why}, so tiles and range are not in the same "
                "units; send the raw scan values with the scan's norm_lo/norm_hi, or leave "
                "norm_lo/norm_hi out to normalise by the tiles' own range"
            )

    def failed_probability(
        self, tiles: Any, norm_lo: float | None = None, norm_hi: float | None = None
    ) -> np.ndarray:
        """Failed-class probability of each raw tile (float64, shape (n,)).

        ``norm_lo`` / ``norm_hi`` are taken as given (``predict_scan`` fits them on the scan
        itself); :meth:`classify` also checks that they are in the tiles' units."""
        raw = self.check(tiles)
        lo, hi = self.intensity_range(raw, norm_lo, norm_hi)
        x = normalize(raw, lo, hi)
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), BATCH):
                batch = torch.from_numpy(with_channels(x[start : start + BATCH]))
                out.append(torch.softmax(self.module(batch).float(), dim=1)[:, 1].numpy())
        return np.concatenate(out).astype(np.float64)

    def classify(
        self, tiles: Any, norm_lo: float | None = None, norm_hi: float | None = None
    ) -> pd.DataFrame:
        """One row per tile: ``prob_failed``, ``label`` (1 = failed), ``class``, and for a
        model with an applicability domain ``domain_distance`` and ``in_domain`` (1: the
        tile looks like the training tiles; 0: do not trust its answer).

        With ``norm_lo`` / ``norm_hi``, tiles in other units are refused rather than misread:
        the request's robust range (its tiling percentiles) must not span under 1 % of
        ``norm_hi - norm_lo`` with values within +-1.5 (tiles rescaled to [0, 1] or [-1, 1]
        sent with the scan's raw range), nor over 100 times that width, and must reach
        within that width of the range (the same rescaled tiles without ``norm_lo`` /
        ``norm_hi`` get the answer of their raw values).
        """
        raw = self.check(tiles)
        lo, hi = self.intensity_range(raw, norm_lo, norm_hi)
        if norm_lo is not None:
            self.check_units(raw, lo, hi)
        prob, distance, inside = self.assess(raw, lo, hi)
        label = (prob > self.threshold).astype(np.int64)
        out = {"prob_failed": prob, "label": label, "class": np.asarray(CLASSES)[label]}
        if distance is not None and inside is not None:  # a model with a domain
            out.update(domain_distance=distance, in_domain=inside.astype(np.int64))
        return pd.DataFrame(out)

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
