"""The classical baseline (learn/baseline.py) on synthetic textures made here."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import line

from bonedamage.learn import baseline


def textures(n: int, rng: np.random.Generator, cracks: bool = False, px: int = 32) -> np.ndarray:
    """Smooth noisy textures of random brightness and contrast (so that neither mean nor
    std gives the class away); with ``cracks``, a thin faint dark line crosses each tile."""
    noise = ndimage.gaussian_filter(rng.normal(size=(n, px, px)), sigma=(0, 1.5, 1.5)) * 5.3
    brightness = rng.uniform(0.45, 0.7, size=(n, 1, 1))
    contrast = rng.uniform(0.06, 0.16, size=(n, 1, 1))  # texture std ~0.06-0.16
    tiles = (brightness + contrast * noise).astype(np.float32)
    if cracks:
        for t in tiles:  # from a random point on the left edge to one on the right edge
            rr, cc = line(int(rng.integers(px)), 0, int(rng.integers(px)), px - 1)
            t[rr, cc] -= rng.uniform(0.1, 0.2)
    return tiles


def accuracy(model, tiles: np.ndarray, labels: np.ndarray) -> float:
    return float(((baseline.predict_baseline(model, tiles) > 0.5) == labels).mean())


def test_features_shape_and_finite() -> None:
    rng = np.random.default_rng(0)
    tiles = np.concatenate(
        [
            rng.random((6, 16, 16), dtype=np.float32),
            np.zeros((1, 16, 16), np.float32),  # constant: no skewness, no Otsu split
            np.full((1, 16, 16), 1.3, np.float32),  # beyond the normalised range
            rng.normal(0.5, 1.0, (2, 16, 16)).astype(np.float32),
        ]
    )
    feats = baseline.tile_features(tiles)
    assert feats.shape == (10, len(baseline.FEATURES))
    assert np.isfinite(feats).all()
    assert len(set(baseline.FEATURES)) == len(baseline.FEATURES)
    assert baseline.tile_features(np.empty((0, 16, 16))).shape == (0, len(baseline.FEATURES))
    with pytest.raises(ValueError, match="stack"):
        baseline.tile_features(tiles[0])


def test_features_known_values() -> None:
    tile = np.full((1, 32, 32), 0.2, np.float32)
    tile[0, :, 16:] = 0.8  # half dark, half bright: one vertical edge
    f = dict(zip(baseline.FEATURES, baseline.tile_features(tile)[0], strict=True))
    assert f["mean"] == pytest.approx(0.5) and f["std"] == pytest.approx(0.3)
    assert f["p5"] == pytest.approx(0.2) and f["p95"] == pytest.approx(0.8)
    assert f["bone_fraction"] == pytest.approx(0.5)
    assert f["otsu_fraction"] == pytest.approx(0.5) and 0.2 <= f["otsu_threshold"] < 0.8
    assert f["sobel_mean"] > 0 and f["laplace_var"] > 0
    flat = dict(zip(baseline.FEATURES, baseline.tile_features(tile * 0 + 0.5)[0], strict=True))
    assert flat["sobel_mean"] == 0 and flat["laplace_var"] == 0 and flat["std"] == 0
    assert flat["glcm_contrast_d1"] == 0 and flat["glcm_energy_d1"] == pytest.approx(1.0)


def test_features_do_not_mix_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    # filters run in the plane of each tile: a tile's features ignore its batch neighbours,
    # and the chunked computation matches the one-block one
    rng = np.random.default_rng(3)
    tiles = np.concatenate([textures(3, rng), textures(3, rng, cracks=True)])
    together = baseline.tile_features(tiles)
    alone = np.vstack([baseline.tile_features(t[None]) for t in tiles])
    np.testing.assert_allclose(together, alone, rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(baseline, "CHUNK", 4)
    np.testing.assert_array_equal(baseline.tile_features(tiles), together)


@pytest.fixture(scope="module")
def cracked() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """100 + 100 training tiles, 200 + 200 held-out tiles; class 1 has cracks."""
    rng = np.random.default_rng(1)
    train = np.concatenate([textures(100, rng), textures(100, rng, cracks=True)])
    test = np.concatenate([textures(200, rng), textures(200, rng, cracks=True)])
    return train, np.repeat([0, 1], 100), test, np.repeat([0, 1], 200)


def test_forest_finds_cracks(cracked) -> None:
    train, train_y, test, test_y = cracked
    model = baseline.fit_baseline(train, train_y, kind="forest", seed=0)
    assert accuracy(model, test, test_y) > 0.8
    prob = baseline.predict_baseline(model, test)
    assert prob.shape == (400,) and ((prob >= 0) & (prob <= 1)).all()


def test_logistic_finds_cracks(cracked) -> None:
    train, train_y, test, test_y = cracked
    model = baseline.fit_baseline(train, train_y, kind="logistic")
    assert accuracy(model, test, test_y) > 0.75


def test_same_distribution_stays_near_chance() -> None:
    rng = np.random.default_rng(2)
    train, test = textures(200, rng), textures(400, rng)
    train_y, test_y = np.repeat([0, 1], 100), np.repeat([0, 1], 200)
    for kind in ("forest", "logistic"):
        model = baseline.fit_baseline(train, train_y, kind=kind, seed=0)
        assert accuracy(model, test, test_y) <= 0.65, kind


def test_deterministic_for_a_seed(cracked) -> None:
    train, train_y, test, _ = cracked
    first = baseline.predict_baseline(baseline.fit_baseline(train, train_y, "forest", 5), test)
    again = baseline.predict_baseline(baseline.fit_baseline(train, train_y, "forest", 5), test)
    other = baseline.predict_baseline(baseline.fit_baseline(train, train_y, "forest", 6), test)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_fit_rejects_bad_input(cracked) -> None:
    train, train_y, _, _ = cracked
    with pytest.raises(ValueError, match="kind"):
        baseline.fit_baseline(train, train_y, kind="svm")
    with pytest.raises(ValueError, match="both 0 and 1"):
        baseline.fit_baseline(train, np.ones(len(train), int))
    with pytest.raises(ValueError, match="both 0 and 1"):
        baseline.fit_baseline(train, np.where(train_y == 1, 1, -1))
