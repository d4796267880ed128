"""The classical baseline: handcrafted tile features and a scikit-learn classifier.

It answers "how much of the task needs deep learning at all?". The features are the
measures an image analyst would try first: intensity statistics, bone fraction (fixed
and per-tile Otsu threshold), edge strength (Sobel, Laplacian), grey-level co-occurrence
texture and a local-binary-pattern histogram. If this baseline matches the CNN, the task
(or the phantoms) is too easy; if the CNN is far ahead, it sees more than texture.

Features come from NumPy/SciPy/scikit-image, computed tile by tile in the plane (a
filter never mixes neighbouring tiles of a batch); the classifier is a scikit-learn
pipeline, features -> (scaler) -> logistic regression or random forest, deterministic
for a seed.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage, stats
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
from skimage.filters import threshold_otsu
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

BONE_THRESHOLD = 0.5  # fixed bone / background threshold on normalised intensities
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 2)
GLCM_ANGLES = (0.0, np.pi / 2)
GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")
LBP_POINTS, LBP_RADIUS = 8, 1  # "uniform" LBP: LBP_POINTS + 2 codes
CHUNK = 1024  # tiles per vectorised block (bounds memory of the filter intermediates)

FEATURES: tuple[str, ...] = (
    "mean",
    "std",
    "p5",
    "p25",
    "p50",
    "p75",
    "p95",
    "skewness",
    "kurtosis",
    "bone_fraction",
    "otsu_threshold",
    "otsu_fraction",
    "sobel_mean",
    "laplace_var",
    *(f"glcm_{p}_d{d}" for p in GLCM_PROPS for d in GLCM_DISTANCES),
    *(f"lbp_{c}" for c in range(LBP_POINTS + 2)),
    "lbp_entropy",
)


def _sobel(tiles: np.ndarray, axis: int) -> np.ndarray:
    """2D Sobel derivative of each tile of an (n, H, W) stack along ``axis`` (1 or 2).

    ``ndimage.sobel`` on the stack would also smooth across the tile axis.
    """
    derivative = ndimage.correlate1d(tiles, [-1.0, 0.0, 1.0], axis=axis, mode="reflect")
    return ndimage.correlate1d(derivative, [1.0, 2.0, 1.0], axis=3 - axis, mode="reflect")


def _intensity_edges(tiles: np.ndarray) -> np.ndarray:
    """Vectorised intensity, bone-fraction and edge features of an (n, H, W) block."""
    n = len(tiles)
    flat = tiles.reshape(n, -1).astype(np.float64)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # constant tile: no skew/kurtosis
        skew = stats.skew(flat, axis=1)
        kurt = stats.kurtosis(flat, axis=1)
    otsu = np.array([threshold_otsu(t) for t in tiles], dtype=np.float64)
    grad = np.hypot(_sobel(tiles, 1), _sobel(tiles, 2)).reshape(n, -1)
    lap = ndimage.laplace(tiles, mode="reflect", axes=(1, 2)).reshape(n, -1)
    return np.column_stack(
        [
            flat.mean(1),
            flat.std(1),
            np.percentile(flat, [5, 25, 50, 75, 95], axis=1).T,
            skew,
            kurt,
            (flat > BONE_THRESHOLD).mean(1),
            otsu,
            (flat > otsu[:, None]).mean(1),
            grad.mean(1, dtype=np.float64),
            lap.var(1, dtype=np.float64),
        ]
    )


def _texture(tiles: np.ndarray) -> np.ndarray:
    """GLCM properties (averaged over the angles) and the uniform-LBP histogram per tile.

    The LBP histogram counts interior pixels only: at the border, scikit-image samples
    neighbours outside the tile as 0, which would read as a bright rim.
    """
    levels = np.clip(np.floor(tiles * GLCM_LEVELS), 0, GLCM_LEVELS - 1).astype(np.uint8)
    grey = np.clip(np.round(tiles * 255), 0, 255).astype(np.uint8)
    n_codes, r = LBP_POINTS + 2, LBP_RADIUS
    glcm_props = np.empty((len(tiles), len(GLCM_PROPS) * len(GLCM_DISTANCES)))
    hist = np.empty((len(tiles), n_codes))
    for i in range(len(tiles)):
        glcm = graycomatrix(
            levels[i],
            distances=list(GLCM_DISTANCES),
            angles=list(GLCM_ANGLES),
            levels=GLCM_LEVELS,
            symmetric=True,
            normed=True,
        )
        glcm_props[i] = [v for p in GLCM_PROPS for v in graycoprops(glcm, p).mean(axis=1)]
        codes = local_binary_pattern(grey[i], LBP_POINTS, r, method="uniform")[r:-r, r:-r]
        hist[i] = np.bincount(codes.astype(np.int64).ravel(), minlength=n_codes) / codes.size
    return np.column_stack([glcm_props, hist, stats.entropy(hist, axis=1)])


def tile_features(tiles: np.ndarray) -> np.ndarray:
    """Handcrafted features of (n, H, W) normalised tiles: float64 (n, len(FEATURES)).

    Undefined values (skewness of a constant tile, ...) are 0; the result is finite.
    """
    tiles = np.asarray(tiles, dtype=np.float32)
    if tiles.ndim != 3:
        raise ValueError(f"tiles must be an (n, H, W) stack, got shape {tiles.shape}")
    blocks = [
        np.hstack([_intensity_edges(block), _texture(block)])
        for block in (tiles[i : i + CHUNK] for i in range(0, len(tiles), CHUNK))
    ]
    out = np.vstack(blocks) if blocks else np.empty((0, len(FEATURES)))
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def fit_baseline(
    train_tiles: np.ndarray, train_labels: np.ndarray, kind: str = "logistic", seed: int = 0
) -> Pipeline:
    """Fit the baseline on training tiles; the pipeline takes raw (n, H, W) tiles.

    ``kind``: ``"logistic"`` (features -> StandardScaler -> LogisticRegression) or
    ``"forest"`` (features -> RandomForestClassifier, 200 trees, one job).
    """
    labels = np.asarray(train_labels)
    if set(np.unique(labels).tolist()) != {0, 1}:
        raise ValueError(f"training labels must hold both 0 and 1, got {np.unique(labels)}")
    features = FunctionTransformer(tile_features)
    if kind == "logistic":
        model = make_pipeline(
            features, StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)
        )
    elif kind == "forest":
        model = make_pipeline(
            features, RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=1)
        )
    else:
        raise ValueError(f"baseline kind {kind!r}: use 'logistic' or 'forest'")
    return model.fit(np.asarray(train_tiles, dtype=np.float32), labels)


def predict_baseline(model: Pipeline, tiles: np.ndarray) -> np.ndarray:
    """Failed-class (label 1) probabilities of the baseline for (n, H, W) tiles."""
    proba = model.predict_proba(np.asarray(tiles, dtype=np.float32))
    return proba[:, list(model.classes_).index(1)]
