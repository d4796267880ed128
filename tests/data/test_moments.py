"""Weighted moments per label (data/moments.py)."""

from __future__ import annotations

import numpy as np

from bonedamage.data.moments import label_moments


def test_moments_of_a_rod_and_a_weighted_pair_match_their_definition() -> None:
    rod = np.zeros((5, 20, 3), dtype=bool)
    rod[2, 2:18, 1] = True  # 16 voxels along y
    coords = [c.astype(np.float64) for c in np.nonzero(rod)]
    ids = np.zeros(len(coords[0]), dtype=np.int64)
    mass, centroid, cov = label_moments(ids, coords, None, 1)
    assert mass[0] == 16
    np.testing.assert_allclose(centroid[0], [2.0, 9.5, 1.0])
    np.testing.assert_allclose(cov[0], np.diag([0.0, (16**2 - 1) / 12.0, 0.0]), atol=1e-12)

    # label 1: two voxels, the second three times as heavy; label 0 has no voxel
    pair = [np.array([0.0, 4.0]), np.array([0.0, 0.0]), np.array([0.0, 0.0])]
    mass, centroid, cov = label_moments(np.array([1, 1]), pair, np.array([1.0, 3.0]), 2)
    np.testing.assert_allclose(mass, [0.0, 4.0])
    np.testing.assert_allclose(centroid, [[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    assert cov[1, 0, 0] == 3.0  # E[z^2] - E[z]^2 = 12 - 9
    assert not cov[0].any()
