"""Weighted moments of labelled voxels: the mass, centroid and covariance of each label.

One pass of ``np.bincount`` per moment, for every label at once: the shapes of struts,
rigid pieces and crack components are all measured this way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def label_moments(
    ids: np.ndarray, coords: Sequence[np.ndarray], weights: np.ndarray | None, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mass ``(n,)``, centroid ``(n, 3)`` and covariance ``(n, 3, 3)`` of labels ``0..n-1``.

    ``ids`` (int) and ``coords`` (one float array per axis) list the voxels, ``weights``
    their mass (None: 1 each). A label without mass has a zero centroid and covariance.
    """
    w = np.ones(len(ids)) if weights is None else weights
    mass = np.bincount(ids, w, n)
    safe = np.maximum(mass, 1e-9)
    centroid = np.stack([np.bincount(ids, w * c, n) for c in coords], axis=1) / safe[:, None]
    cov = np.empty((n, len(coords), len(coords)))
    for i in range(len(coords)):
        for j in range(i, len(coords)):
            cij = np.bincount(ids, w * coords[i] * coords[j], n) / safe
            cov[:, i, j] = cov[:, j, i] = cij - centroid[:, i] * centroid[:, j]
    return mass, centroid, cov
