"""Bone morphometry measured on scans, the way a lab would measure a real stack.

Used to check that the phantoms fall in the bovine ranges and to describe any dataset
(phantom or real); the methods and their literature ranges are in docs/phantoms.md.

Field of view: taken from the scan itself. Outside the reconstructed field the image holds
one constant value (the most frequent value on the slice border); the field is the largest
connected region of other values in each slice, holes filled (``field_of_view``).
Segmentation: Gaussian smoothing (sigma ~1 voxel), then Otsu's threshold (scikit-image)
computed inside the field of view only. Trabecular bone is measured in a volume of interest
inside the field (``inner_voi``); cortical bone inside its slice-wise envelope (bone with
its enclosed canals, filled per axial slice), so canals that run through the whole stack
count as pores. Thickness and separation: the standard sphere-fitting local thickness
(Hildebrand & Rüegsegger 1997, the ``localthickness`` package), mean over the phase; also the
distance transform sampled on the 3D skeleton (``*_skel_um``), the estimate the real
reference stack in ``shared/real`` was described with, which reads lower on the same bone.
Degree of anisotropy: mean intercept length (our own implementation over the 13 lattice
directions, see ``mil_anisotropy``). Connectivity density: Euler characteristic
(scikit-image, 26-connectivity) per Odgaard & Gundersen (1993). Pore analysis for cortical
bone uses connected components (scipy) and region properties (scikit-image).
"""

from __future__ import annotations

from typing import Any

import localthickness
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import euler_number, regionprops
from skimage.morphology import skeletonize

_LACUNA_VOLUME_UM3 = (20.0, 2000.0)  # lacunae are ~100-600 um^3; canals are far larger
# the 13 lattice directions (z, y, x) of a 3x3x3 neighbourhood, one of each +/- pair
_DIRECTIONS = np.array([d for d in np.ndindex(3, 3, 3) if d > (1, 1, 1)], dtype=np.int64) - 1


def central_box(
    shape: tuple[int, int, int], radius_vox: float, z_margin: int = 4
) -> tuple[slice, slice, slice]:
    """The largest axis-aligned box inside a centred cylinder of ``radius_vox``."""
    half = int(np.floor(radius_vox / np.sqrt(2.0)))
    cy, cx = (shape[1] - 1) / 2.0, (shape[2] - 1) / 2.0
    return (
        slice(z_margin, shape[0] - z_margin),
        slice(max(int(np.ceil(cy - half)), 0), min(int(np.floor(cy + half)) + 1, shape[1])),
        slice(max(int(np.ceil(cx - half)), 0), min(int(np.floor(cx + half)) + 1, shape[2])),
    )


def fov_slice(image: np.ndarray, min_border_share: float = 0.5) -> np.ndarray:
    """Reconstructed field of view of one slice: the largest region not at the border constant.

    The border constant is the most frequent value on the slice's edge; when fewer than
    ``min_border_share`` of the edge pixels hold it, the slice has no constant surround and
    the whole slice is the field.
    """
    edge = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    values, counts = np.unique(edge, return_counts=True)
    if counts.max() < min_border_share * edge.size:
        return np.ones(image.shape, dtype=bool)
    labels, n = ndimage.label(image != values[counts.argmax()])
    if n == 0:
        return np.zeros(image.shape, dtype=bool)
    largest = np.bincount(labels.ravel())[1:].argmax() + 1
    return ndimage.binary_fill_holes(labels == largest)


def field_of_view(volume: np.ndarray) -> np.ndarray:
    """Field of view of every axial slice of a (z, y, x) scan (see ``fov_slice``)."""
    return np.stack([fov_slice(s) for s in volume])


def inner_voi(fov: np.ndarray, radius_frac: float) -> np.ndarray:
    """Each slice's field of view shrunk to ``radius_frac`` of its equivalent-disc radius.

    Keeps the measurement off the specimen surface (a phantom's specimen fills 90-97 % of
    the field radius) without assuming the field is a centred disc.
    """
    out = np.zeros_like(fov)
    for z, field in enumerate(fov):
        if z and np.array_equal(field, fov[z - 1]):  # the usual case: one field for all slices
            out[z] = out[z - 1]
            continue
        area = int(field.sum())
        if area:
            margin = (1.0 - radius_frac) * np.sqrt(area / np.pi)
            out[z] = ndimage.distance_transform_edt(field) > margin
    return out


def segment_bone(
    volume: np.ndarray, smooth_vox: float = 1.0, fov: np.ndarray | None = None
) -> np.ndarray:
    """Binary bone mask: Otsu's threshold on a smoothed copy, computed inside ``fov``.

    Outside the field the image is set to the field's mean before smoothing, so the
    constant surround neither blurs into the edge nor skews the threshold.
    """
    smooth = volume.astype(np.float32)
    if fov is not None and fov.any():
        smooth[~fov] = smooth[fov].mean()
    if smooth_vox > 0:
        smooth = ndimage.gaussian_filter(smooth, smooth_vox)
    inside = smooth[fov] if fov is not None and fov.any() else smooth
    bone = smooth > threshold_otsu(inside)
    return bone if fov is None else bone & fov


def _skeleton_thickness(phase: np.ndarray) -> float:
    """Twice the mean distance-to-surface on the phase's skeleton, in voxels."""
    if not phase.any():
        return 0.0
    dist = ndimage.distance_transform_edt(phase)
    skeleton = skeletonize(phase)
    if not skeleton.any():
        return float(2.0 * dist[phase].mean())
    return float(2.0 * dist[skeleton].mean())


def _local_thickness(phase: np.ndarray) -> float:
    """Mean sphere-fitting thickness (diameter) over the phase, in voxels."""
    if not phase.any():
        return 0.0
    radius = localthickness.local_thickness(phase)
    return float(2.0 * radius[phase].mean())


def _crop(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The arrays cut to the bounding box of the first one (one voxel of margin)."""
    first = arrays[0]
    box = []
    for axis in range(first.ndim):
        hits = np.flatnonzero(first.any(axis=tuple(a for a in range(first.ndim) if a != axis)))
        if hits.size == 0:
            return arrays
        box.append(slice(max(int(hits[0]) - 1, 0), int(hits[-1]) + 2))
    return tuple(a[tuple(box)] for a in arrays)


def trabecular(
    bone: np.ndarray, voxel_um: float, voi: np.ndarray | None = None, *, thickness: bool = True
) -> dict[str, float]:
    """BV/TV, Tb.Th, Tb.Sp (um), DA, Conn.D (/mm^3) and axial anisotropy inside ``voi``.

    ``thickness=False`` leaves out Tb.Th and Tb.Sp, three quarters of the time.
    """
    voi = np.ones(bone.shape, dtype=bool) if voi is None else voi
    voi, bone = _crop(voi, bone)
    bone = bone & voi
    marrow = ~bone & voi
    n_voi = int(voi.sum())
    out = {
        "bv_tv": float(bone.sum() / n_voi) if n_voi else 0.0,
        "anisotropy_z": _chord_anisotropy(marrow),
        "da": mil_anisotropy(bone, voi),
        "conn_d_per_mm3": connectivity_density(bone, n_voi * voxel_um**3 * 1e-9),
    }
    if thickness:
        out["tb_th_um"] = _local_thickness(bone) * voxel_um
        out["tb_sp_um"] = _local_thickness(marrow) * voxel_um
        out["tb_th_skel_um"] = _skeleton_thickness(bone) * voxel_um
        out["tb_sp_skel_um"] = _skeleton_thickness(marrow) * voxel_um
    return out


def bv_tv(bone: np.ndarray, voi: np.ndarray) -> float:
    """Bone volume fraction inside ``voi`` (0 when the VOI is empty)."""
    n = int(voi.sum())
    return float((bone & voi).sum() / n) if n else 0.0


def _chord_anisotropy(phase: np.ndarray) -> float:
    """Mean chord length of ``phase`` along z over that along y and x (1 = isotropic)."""

    def mean_chord(axis: int) -> float:
        arr = np.moveaxis(phase, axis, -1).reshape(-1, phase.shape[axis]).astype(np.int8)
        edges = np.diff(np.pad(arr, ((0, 0), (1, 1))), axis=1)
        starts, ends = np.count_nonzero(edges == 1), np.count_nonzero(edges == -1)
        n = min(starts, ends)
        return float(arr.sum() / n) if n else 0.0

    lateral = (mean_chord(1) + mean_chord(2)) / 2.0
    return mean_chord(0) / lateral if lateral else 0.0


def _pairs(arr: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The voxels of ``arr`` and their neighbours ``step`` further on (overlapping views)."""
    a, b = [], []
    for s, n in zip(step, arr.shape, strict=True):
        a.append(slice(max(-s, 0), n - max(s, 0)))
        b.append(slice(max(s, 0), n - max(-s, 0)))
    return arr[tuple(a)], arr[tuple(b)]


def intercept_density(bone: np.ndarray, voi: np.ndarray) -> np.ndarray:
    """Bone/marrow interface crossings per voxel length along each of the 13 directions."""
    out = np.zeros(len(_DIRECTIONS))
    for i, step in enumerate(_DIRECTIONS):
        b0, b1 = _pairs(bone, step)
        v0, v1 = _pairs(voi, step)
        both = v0 & v1
        n = int(both.sum())
        out[i] = np.count_nonzero((b0 != b1) & both) / (n * np.linalg.norm(step)) if n else 0.0
    return out


def fabric_tensor(bone: np.ndarray, voi: np.ndarray) -> np.ndarray:
    """MIL fabric: the symmetric M with 1/MIL(d)^2 = d^T M d fitted over the 13 directions.

    MIL(d) = 1 / (interface crossings per unit length along d); constant factors (2 BV/TV)
    cancel in the anisotropy.
    """
    units = _DIRECTIONS / np.linalg.norm(_DIRECTIONS, axis=1, keepdims=True)
    z, y, x = units.T
    design = np.column_stack([z * z, y * y, x * x, 2 * z * y, 2 * z * x, 2 * y * x])
    coef, *_ = np.linalg.lstsq(design, intercept_density(bone, voi) ** 2, rcond=None)
    zz, yy, xx, zy, zx, yx = coef
    return np.array([[zz, zy, zx], [zy, yy, yx], [zx, yx, xx]])


def mil_anisotropy(bone: np.ndarray, voi: np.ndarray | None = None) -> float:
    """Degree of anisotropy MIL_max / MIL_min = sqrt(eig_max / eig_min) of the MIL fabric."""
    voi = np.ones(bone.shape, dtype=bool) if voi is None else voi
    eig = np.linalg.eigvalsh(fabric_tensor(bone, voi))
    if eig[0] <= 0:
        return float("inf") if eig[-1] > 0 else 1.0
    return float(np.sqrt(eig[-1] / eig[0]))


def connectivity_density(bone: np.ndarray, volume_mm3: float) -> float:
    """Conn.D = (1 - chi) / V (Odgaard & Gundersen 1993), chi the 26-connected Euler number.

    No boundary correction: struts cut by the VOI surface count as separate pieces.
    """
    if volume_mm3 <= 0:
        return 0.0
    (cropped,) = _crop(bone)
    chi = euler_number(np.pad(cropped, 1), connectivity=3)
    return float((1 - chi) / volume_mm3)


def slice_envelope(bone: np.ndarray, fov: np.ndarray | None = None) -> np.ndarray:
    """Bone with its enclosed pores, hole-filled slice by slice (axial), inside ``fov``.

    Filled per slice, not in 3D: a canal that runs through the whole stack touches the top
    and bottom faces, so a 3D fill would leave it out.
    """
    fov = np.ones(bone.shape, dtype=bool) if fov is None else fov
    inside = bone & fov
    return np.stack([ndimage.binary_fill_holes(s) for s in inside]) & fov


def cortical(bone: np.ndarray, voxel_um: float, fov: np.ndarray | None = None) -> dict[str, Any]:
    """Porosity, canal size and lacunar density/size of cortical bone inside its envelope."""
    envelope = slice_envelope(bone, fov)
    pores = envelope & ~bone
    labels, n = ndimage.label(pores)
    voxel_um3 = voxel_um**3
    volumes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * voxel_um3
    lac_ids = (
        np.flatnonzero((volumes >= _LACUNA_VOLUME_UM3[0]) & (volumes <= _LACUNA_VOLUME_UM3[1])) + 1
    )
    canal_ids = np.flatnonzero(volumes > _LACUNA_VOLUME_UM3[1]) + 1
    canal_mask = np.isin(labels, canal_ids)
    n_env = int(envelope.sum())
    voi_mm3 = n_env * voxel_um3 * 1e-9
    props = [p for p in regionprops(np.where(np.isin(labels, lac_ids), labels, 0)) if p.area >= 3]
    major = [p.axis_major_length * voxel_um for p in props]
    minor = [p.axis_minor_length * voxel_um for p in props]
    return {
        "porosity": float(pores.sum() / n_env) if n_env else 0.0,
        "canal_porosity": float(canal_mask.sum() / n_env) if n_env else 0.0,
        "canal_diameter_um": _canal_diameter(canal_mask) * voxel_um,
        "lacuna_density_per_mm3": float(len(lac_ids) / voi_mm3) if voi_mm3 else 0.0,
        "lacuna_length_um": float(np.median(major)) if major else 0.0,
        "lacuna_width_um": float(np.median(minor)) if minor else 0.0,
    }


def _canal_diameter(canal_mask: np.ndarray) -> float:
    """Median equivalent-circle diameter of canal cross-sections, sampled every 8 slices."""
    diameters = []
    for z in range(0, canal_mask.shape[0], 8):
        lab, n = ndimage.label(canal_mask[z])
        if n:
            areas = np.bincount(lab.ravel())[1:]
            diameters.extend(2.0 * np.sqrt(areas[areas >= 4] / np.pi))
    return float(np.median(diameters)) if diameters else 0.0
