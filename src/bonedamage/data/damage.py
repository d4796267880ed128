"""Microdamage measured on a scan's label volume, per connected component.

Labels (uint8, :mod:`bonedamage.data.labels`): 0 none, 1 microcrack, 2 fracture (gap and
fracture surfaces), 3 buckled bone; a plain 0/1 mask reads as damage of unknown kind, and
every binary read uses ``labels > 0``.
Components are 26-connected (scipy), voxels up to ``gap_vox`` apart joined. Each
component's shape comes from the covariance of its voxel coordinates, read as a flat
elliptical disc, the shape of a penny crack (our own, vectorised over components): a disc
of semi-axes a, b has in-plane variances a^2/4, b^2/4, so length = 4 sqrt(l1), width =
4 sqrt(l2) (l1 >= l2 >= l3 the eigenvalues); orientation = angle of the long axis to the
load axis z. Aperture is the thickest point: 2 max(EDT) - 1
voxel, the Euclidean distance transform counting to the centre of the nearest voxel outside.
Methods and literature ranges: docs/phantoms.md.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from bonedamage.data import labels as kinds
from bonedamage.data.moments import label_moments

KINDS = {"crack": kinds.MICROCRACK, "fracture": kinds.FRACTURE}
_PERCENTILES = {"p10": 10.0, "median": 50.0, "p90": 90.0}


def components(mask: np.ndarray, gap_vox: int = 0) -> tuple[np.ndarray, int]:
    """26-connected components of ``mask``, voxels up to ``gap_vox`` apart joined.

    A crack about one voxel wide breaks up on the grid where its opening tapers below a
    voxel; joining across such gaps counts it once. Only ``mask`` voxels carry an id.
    """
    full = np.ones((3,) * mask.ndim, dtype=bool)  # 26- (8- in 2D) connectivity
    grouped = ndimage.binary_dilation(mask, full, iterations=gap_vox) if gap_vox else mask
    labels, n = ndimage.label(grouped, structure=full)
    return np.where(mask, labels, 0), n


def component_shapes(
    mask: np.ndarray, voxel_um: float, min_voxels: int = 1, gap_vox: int = 0
) -> dict[str, np.ndarray]:
    """Length, width, aperture (um) and long-axis angle to z (deg) of each component
    (:func:`components`).

    Components smaller than ``min_voxels`` are left out (single rasterisation specks have no
    shape).
    """
    labels, n = components(mask, gap_vox)
    empty = {
        k: np.zeros(0) for k in ("voxels", "length_um", "width_um", "aperture_um", "angle_deg")
    }
    if n == 0:
        return empty
    coords = np.nonzero(labels)
    ids = labels[coords]
    counts = np.bincount(ids, minlength=n + 1).astype(np.float64)
    keep = np.flatnonzero(counts >= max(min_voxels, 1))
    keep = keep[keep > 0]
    if keep.size == 0:
        return empty
    _, _, cov = label_moments(ids, [c.astype(np.float64) for c in coords], None, n + 1)
    # a voxel is a unit cube, not a point: add its own variance 1/12 per axis
    eig, vec = np.linalg.eigh(cov[keep] + np.eye(3) / 12.0)
    eig = np.clip(eig, 0.0, None)
    long_axis = vec[:, :, 2]  # eigenvalues ascend: the last column is the long axis
    dist = ndimage.distance_transform_edt(mask)
    max_edt = np.zeros(n + 1)
    np.maximum.at(max_edt, ids, dist[coords])
    max_edt = max_edt[keep]
    return {
        "voxels": counts[keep],
        "length_um": 4.0 * np.sqrt(eig[:, 2]) * voxel_um,
        "width_um": 4.0 * np.sqrt(eig[:, 1]) * voxel_um,
        "aperture_um": (2.0 * max_edt - 1.0) * voxel_um,
        "angle_deg": np.degrees(np.arccos(np.clip(np.abs(long_axis[:, 0]), 0.0, 1.0))),
    }


def traces_per_mm2(mask: np.ndarray, fov: np.ndarray, voxel_um: float, gap_vox: int = 0) -> float:
    """Mean over axial slices of 2D components (8-connected, ``gap_vox`` joined) per mm^2
    of field of view."""
    densities = []
    for kind, field in zip(mask, fov, strict=True):
        area_mm2 = field.sum() * voxel_um**2 * 1e-6
        if area_mm2 > 0:
            n = components(kind & field, gap_vox)[1]
            densities.append(n / area_mm2)
    return float(np.mean(densities)) if densities else 0.0


def _summary(values: np.ndarray, name: str) -> dict[str, float]:
    """10th percentile, median and 90th percentile of ``values`` as ``name_p10`` etc."""
    if values.size == 0:
        return {}
    return {f"{name}_{k}": float(np.percentile(values, q)) for k, q in _PERCENTILES.items()}


def damage_measures(
    labels: np.ndarray,
    bone: np.ndarray,
    fov: np.ndarray,
    voxel_um: float,
    min_voxels: int = 8,
    gap_vox: int = 0,
) -> dict[str, float]:
    """Damaged share of bone, voxels per label kind and per-component crack/fracture shapes
    (components: :func:`components` with ``gap_vox``).

    The reference bone is the segmented bone plus every labelled voxel, inside the field of
    view: crack and fracture-gap voxels are dark in the image but were bone before failure.
    """
    labels = np.where(fov, labels, 0)
    damaged = labels > 0
    reference = (bone & fov) | damaged
    bone_mm3 = reference.sum() * voxel_um**3 * 1e-9
    out: dict[str, float] = {
        "damaged_share_of_bone": float(damaged.sum() / reference.sum()) if reference.any() else 0.0
    }
    for value, name in kinds.NAMES.items():
        if value == kinds.NONE:
            continue
        out[f"voxels_{name}"] = float(np.count_nonzero(labels == value))
    all_components, _ = components(damaged, gap_vox)
    sizes = np.bincount(all_components.ravel())[1:]
    out["largest_component_share"] = float(sizes.max() / sizes.sum()) if sizes.size else 0.0
    for kind, value in KINDS.items():
        mask = labels == value
        shapes = component_shapes(mask, voxel_um, min_voxels, gap_vox)
        count = shapes["voxels"].size
        out[f"{kind}_count"] = float(count)
        out[f"{kind}_per_mm3_bone"] = float(count / bone_mm3) if bone_mm3 else 0.0
        out[f"{kind}_traces_per_mm2"] = traces_per_mm2(mask, fov, voxel_um, gap_vox)
        for key in ("length_um", "width_um", "aperture_um", "angle_deg"):
            out.update(_summary(shapes[key], f"{kind}_{key}"))
    return out
