"""Bone morphometry measured on scans, the way a lab would measure a real stack.

Used to check that the phantoms fall in the bovine ranges and to describe any dataset
(phantom or real). Segmentation: light Gaussian smoothing, then Otsu's threshold
(scikit-image) inside a box inscribed in the specimen. Thickness and separation: the
standard sphere-fitting local thickness (Hildebrand & Rüegsegger 1997, the ``localthickness``
package), mean over the phase; also the distance transform sampled on the 3D skeleton
(``*_skel_um``), the estimate the real reference stack in ``shared/real`` was described
with, which reads lower on the same bone. Pore analysis
for cortical bone uses connected components (scipy) and region properties (scikit-image).
"""

from __future__ import annotations

from typing import Any

import localthickness
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import regionprops
from skimage.morphology import skeletonize

_LACUNA_VOLUME_UM3 = (20.0, 2000.0)  # lacunae are ~100-600 um^3; canals are far larger


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


def segment_bone(volume: np.ndarray, smooth_vox: float = 0.5) -> np.ndarray:
    """Binary bone mask by Otsu's threshold on a lightly smoothed copy."""
    smooth = volume.astype(np.float32)
    if smooth_vox > 0:
        smooth = ndimage.gaussian_filter(smooth, smooth_vox)
    return smooth > threshold_otsu(smooth)


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


def trabecular(bone: np.ndarray, voxel_um: float) -> dict[str, float]:
    """BV/TV, Tb.Th, Tb.Sp (um) and an axial anisotropy of a bone mask (box VOI)."""
    return {
        "bv_tv": float(bone.mean()),
        "tb_th_um": _local_thickness(bone) * voxel_um,
        "tb_sp_um": _local_thickness(~bone) * voxel_um,
        "tb_th_skel_um": _skeleton_thickness(bone) * voxel_um,
        "tb_sp_skel_um": _skeleton_thickness(~bone) * voxel_um,
        "anisotropy_z": _chord_anisotropy(~bone),
    }


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


def cortical(bone: np.ndarray, voxel_um: float) -> dict[str, Any]:
    """Porosity, canal size and lacunar density/size of a cortical bone mask (box VOI)."""
    pores = ~bone
    labels, n = ndimage.label(pores)
    voxel_um3 = voxel_um**3
    volumes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * voxel_um3
    lac_ids = (
        np.flatnonzero((volumes >= _LACUNA_VOLUME_UM3[0]) & (volumes <= _LACUNA_VOLUME_UM3[1])) + 1
    )
    canal_ids = np.flatnonzero(volumes > _LACUNA_VOLUME_UM3[1]) + 1
    canal_mask = np.isin(labels, canal_ids)
    voi_mm3 = bone.size * voxel_um3 * 1e-9
    props = [p for p in regionprops(np.where(np.isin(labels, lac_ids), labels, 0)) if p.area >= 3]
    major = [p.axis_major_length * voxel_um for p in props]
    minor = [p.axis_minor_length * voxel_um for p in props]
    return {
        "porosity": float(pores.mean()),
        "canal_porosity": float(canal_mask.mean()),
        "canal_diameter_um": _canal_diameter(canal_mask) * voxel_um,
        "lacuna_density_per_mm3": float(len(lac_ids) / voi_mm3),
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
