"""Morphometry (data/morphometry.py) on shapes of known size and on the real stack."""

from __future__ import annotations

import numpy as np
import pytest

from bonedamage.data import morphometry
from bonedamage.data.volume import open_volume
from conftest import REAL_STACK


def plates(thickness: int, gap: int, n: int = 4) -> np.ndarray:
    """Parallel plates normal to x: bone ``thickness`` voxels, marrow ``gap`` voxels."""
    period = thickness + gap
    x = np.arange(n * period)
    bone = (x % period >= gap // 2) & (x % period < gap // 2 + thickness)  # none on the border
    return np.broadcast_to(bone, (24, 24, n * period)).copy()


def test_plate_thickness_separation_and_volume_fraction() -> None:
    bone = plates(thickness=6, gap=14)
    m = morphometry.trabecular(bone, voxel_um=10.0)
    assert m["bv_tv"] == pytest.approx(6 / 20)
    assert m["tb_th_um"] == pytest.approx(60.0, rel=0.1)
    assert m["tb_sp_um"] == pytest.approx(140.0, rel=0.1)


def test_chord_anisotropy_sees_elongation_along_z() -> None:
    rng = np.random.default_rng(0)
    blobs = np.zeros((64, 64, 64), bool)
    for z, y, x in rng.integers(0, 64, size=(40, 3)):
        blobs[max(z - 8, 0) : z + 8, max(y - 2, 0) : y + 2, max(x - 2, 0) : x + 2] = True
    assert morphometry.trabecular(~blobs, 1.0)["anisotropy_z"] > 2.0


def test_cortical_canals_and_lacunae_are_counted_and_sized() -> None:
    voxel = 2.0
    bone = np.ones((40, 80, 80), bool)
    yy, xx = np.meshgrid(np.arange(80), np.arange(80), indexing="ij")
    bone[:, np.hypot(yy - 40, xx - 40) < 10] = False  # canal, 40 um across
    centres = [(10, 10, 10), (10, 70, 70), (30, 10, 70), (30, 70, 10), (20, 15, 60)]
    zz, y3, x3 = np.meshgrid(np.arange(40), np.arange(80), np.arange(80), indexing="ij")
    for cz, cy, cx in centres:  # lacunae: 16 x 6 x 6 um ellipsoids
        bone[((zz - cz) / 4) ** 2 + ((y3 - cy) / 1.5) ** 2 + ((x3 - cx) / 1.5) ** 2 <= 1] = False
    m = morphometry.cortical(bone, voxel)
    volume_mm3 = bone.size * voxel**3 * 1e-9
    assert m["lacuna_density_per_mm3"] == pytest.approx(len(centres) / volume_mm3)
    assert m["canal_diameter_um"] == pytest.approx(40.0, rel=0.1)
    assert m["lacuna_length_um"] == pytest.approx(16.0, rel=0.25)
    assert m["lacuna_width_um"] < m["lacuna_length_um"] / 2
    assert m["porosity"] == pytest.approx(1 - bone.mean())


@pytest.mark.skipif(not REAL_STACK.is_dir(), reason="../shared/real is absent")
def test_real_stack_matches_its_published_description() -> None:
    """shared/real/README: BV/TV ~0.19, Tb.Th ~140 um, Tb.Sp ~360 um (Otsu + skeleton EDT)."""
    with open_volume(REAL_STACK) as vol:
        stack = np.stack(list(vol.iter_slices()))
    m = morphometry.trabecular(morphometry.segment_bone(stack, smooth_vox=0.0), voxel_um=19.5)
    assert m["bv_tv"] == pytest.approx(0.19, abs=0.02)
    assert m["tb_th_skel_um"] == pytest.approx(140, rel=0.1)
    assert m["tb_sp_skel_um"] == pytest.approx(360, rel=0.1)
    # the standard sphere-fitting figures are larger on the same bone
    assert m["tb_th_um"] > m["tb_th_skel_um"] and m["tb_sp_um"] > m["tb_sp_skel_um"]
