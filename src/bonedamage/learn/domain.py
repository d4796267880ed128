"""Applicability domain of a tile classifier: which tiles its answers can be trusted on.

A classifier answers for every tile it is handed, with the same confidence inside and
outside the conditions it was trained under. A cortical model shown a lab scan at 50 um
(microcracks of 1-5 um are invisible there) still says *failed* or *pristine*. The domain
says which tiles look like the training tiles, in three parts:

- **acquisition**: the working voxel size and the tissue (``predict`` checks the scan's
  voxel against it before any tile is cut);
- **appearance**: the model's penultimate-layer features (the input of each network's
  last linear layer; the members' features side by side for an ensemble; for a
  segmentation U-Net the input of its last transposed convolution, averaged over the
  pixels). Their training
  distribution is summarised as one Gaussian per class with a shared covariance (Ledoit-
  Wolf shrinkage, since the features outnumber what a few hundred tiles pin down); a
  tile's score is its squared Mahalanobis distance to the nearer class mean (Lee et al.,
  *A simple unified framework for detecting out-of-distribution samples and adversarial
  attacks*, NeurIPS 2018). Scores from the logits (maximum softmax, energy) were not
  chosen: the failure to catch is a confident wrong answer, and a confident answer is
  exactly what those scores reward;
- **intensity**: the range of the normalised tiles' mean and standard deviation on the
  training tiles (0.1 and 99.9 percentiles, widened by a tenth of the range each side).

The feature threshold is calibrated on the validation split, which is in the domain by
construction: the distance under which ``accept`` (default 0.95) of validation tiles fall,
counting those outside the intensity range as rejected (when those alone are more than
``1 - accept``, every validation tile inside the range is accepted and ``val_accepted``
says how many that is). A tile is in the domain when its
distance is at most the threshold and its intensity statistics are inside the range.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bonedamage.atomic import atomic_path, write_text_atomic
from bonedamage.data.tilestore import centre_plane, with_channels

METHOD = "mahalanobis-tied-covariance"
INTENSITY_PERCENTILES = (0.1, 99.9)
INTENSITY_MARGIN = 0.1  # the range widened by this share of its width on each side


def _networks(module: nn.Module) -> list[nn.Module]:
    members = getattr(module, "members", None)  # an Ensemble's networks
    return list(members) if isinstance(members, nn.ModuleList) else [module]


def _feature_layer(net: nn.Module) -> nn.Module:
    """The layer whose input is the network's feature vector: its last linear layer, or for
    a fully convolutional network (a segmentation U-Net) its last transposed convolution,
    whose input is the decoder's last feature map with its skip connection (the last
    plain convolution maps the classes onto themselves)."""
    for kind in (nn.Linear, nn.ConvTranspose2d, nn.Conv2d):
        found = [m for m in net.modules() if isinstance(m, kind)]
        if found:
            return found[-1]
    raise ValueError(f"{type(net).__name__} has no linear or conv layer to take features from")


@contextlib.contextmanager
def feature_capture(module: nn.Module) -> Iterator[Callable[[], np.ndarray]]:
    """Record the penultimate-layer features of every forward pass run inside the block.

    Yields a function that returns the features recorded so far, (n, d) float64, and
    clears them: the input of each network's last linear layer (dropout is off in eval
    mode; a segmentation model's last transposed convolution, averaged over the pixels), an
    ensemble's members side by side, batches one after the other.
    """
    nets = _networks(module)
    captured: list[torch.Tensor] = []

    def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach()
        if x.ndim > 2:  # a feature map: its mean per channel
            x = x.mean(dim=tuple(range(2, x.ndim)))
        captured.append(x.flatten(1).double())

    def take() -> np.ndarray:
        if not captured:
            return np.empty((0, 0))
        per_batch = [
            torch.cat(captured[i : i + len(nets)], dim=1)
            for i in range(0, len(captured), len(nets))
        ]
        captured.clear()
        return torch.cat(per_batch).numpy()

    hooks = [_feature_layer(net).register_forward_pre_hook(record) for net in nets]
    try:
        yield take
    finally:
        for hook in hooks:
            hook.remove()


def penultimate_features(module: nn.Module, tiles: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Penultimate-layer features (see :func:`feature_capture`) of normalised tiles
    (n, [c,] px, px), in eval mode: (n, d) float64."""
    was_training = module.training
    module.eval()
    try:
        with feature_capture(module) as take, torch.inference_mode():
            for start in range(0, len(tiles), batch_size):
                module(torch.from_numpy(with_channels(tiles[start : start + batch_size])))
            return take()
    finally:
        module.train(was_training)


def intensity_stats(tiles: np.ndarray) -> np.ndarray:
    """Mean and standard deviation of each normalised tile's own plane: (n, 2)."""
    plane = centre_plane(tiles).astype(np.float64)
    return np.stack([plane.mean(axis=(1, 2)), plane.std(axis=(1, 2))], axis=1)


def calibrate(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    train_intensity: np.ndarray,
    val_features: np.ndarray,
    val_intensity: np.ndarray,
    accept: float,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The appearance and intensity domain: (summary with thresholds, arrays).

    The arrays (class means, shared precision matrix) are what :func:`score` needs; the
    summary holds the thresholds and how they were calibrated.
    """
    from sklearn.covariance import LedoitWolf

    if not 0 < accept <= 1:
        raise ValueError(f"domain accept={accept}: must be in (0, 1]")
    classes = np.unique(train_labels)
    if len(train_features) < 2 or len(val_features) == 0:
        raise ValueError("the domain needs training and validation tiles")
    means = np.stack([train_features[train_labels == c].mean(axis=0) for c in classes])
    centred = train_features - means[np.searchsorted(classes, train_labels)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    arrays = {"means": means, "precision": precision}
    lo = np.percentile(train_intensity, INTENSITY_PERCENTILES[0], axis=0)
    hi = np.percentile(train_intensity, INTENSITY_PERCENTILES[1], axis=0)
    lo, hi = lo - INTENSITY_MARGIN * (hi - lo), hi + INTENSITY_MARGIN * (hi - lo)
    summary: dict[str, Any] = {
        "method": METHOD,
        "feature_dim": int(train_features.shape[1]),
        "n_train_tiles": len(train_features),
        "n_val_tiles": len(val_features),
        "accept": accept,
        "intensity": {
            "stats": ["mean", "std"],
            "percentiles": list(INTENSITY_PERCENTILES),
            "lo": [round(float(v), 6) for v in lo],
            "hi": [round(float(v), 6) for v in hi],
        },
    }
    inside = _intensity_inside(summary, val_intensity)
    distance = np.where(inside, score(arrays, val_features), np.inf)
    k = max(1, math.ceil(accept * len(distance)))
    ranked = np.sort(distance)
    if not np.isfinite(ranked[0]):
        raise ValueError(
            "no validation tile lies inside the training tiles' intensity range: the "
            "validation split does not look like the training split"
        )
    threshold = ranked[k - 1] if np.isfinite(ranked[k - 1]) else ranked[np.isfinite(ranked)].max()
    summary["threshold"] = math.ceil(float(threshold) * 1e6) / 1e6  # rounded up: kept tiles stay
    summary["val_accepted"] = round(float(np.mean(distance <= summary["threshold"])), 6)
    return summary, arrays


def score(arrays: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each feature row to the nearer class mean."""
    precision = arrays["precision"]
    best = np.full(len(features), np.inf)
    for mean in arrays["means"]:
        diff = features - mean
        best = np.minimum(best, np.einsum("ij,jk,ik->i", diff, precision, diff))
    return best


def _intensity_inside(summary: dict[str, Any], intensity: np.ndarray) -> np.ndarray:
    lo = np.asarray(summary["intensity"]["lo"])
    hi = np.asarray(summary["intensity"]["hi"])
    return np.all((intensity >= lo) & (intensity <= hi), axis=1)


def in_domain(
    summary: dict[str, Any],
    arrays: dict[str, np.ndarray],
    features: np.ndarray,
    intensity: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(distance, in domain) per tile: distance at most the threshold, intensity inside."""
    distance = score(arrays, features)
    return distance, (distance <= summary["threshold"]) & _intensity_inside(summary, intensity)


def save(
    summary: dict[str, Any], arrays: dict[str, np.ndarray], json_path: Path, npz_path: Path
) -> None:
    """Write the summary (JSON) and the arrays (``.npz``, no pickle), atomically."""
    write_text_atomic(json_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    with atomic_path(npz_path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def load_arrays(path: Path, names: Iterable[str] = ("means", "precision")) -> dict[str, np.ndarray]:
    """The arrays of :func:`save` (``allow_pickle=False``: object arrays are refused)."""
    with np.load(path, allow_pickle=False) as npz:
        return {name: np.asarray(npz[name], dtype=np.float64) for name in names}
