"""Morphometry (data/morphometry.py) on shapes of known size and on the real stack."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

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


def disc(shape_yx: tuple[int, int], radius: float) -> np.ndarray:
    """A centred disc of ``radius`` pixels."""
    yy, xx = np.indices(shape_yx)
    return np.hypot(yy - (shape_yx[0] - 1) / 2, xx - (shape_yx[1] - 1) / 2) <= radius


def test_field_of_view_is_the_region_off_the_border_constant_even_with_that_value_inside() -> None:
    rng = np.random.default_rng(1)
    field = disc((48, 48), 20)
    image = np.where(field, rng.integers(100, 4000, (48, 48)), 0).astype(np.uint16)
    image[24, 24] = 0  # a voxel inside the field that happens to hold the border value
    image[2, 2] = 500  # a speck outside the field is not the field
    assert np.array_equal(morphometry.fov_slice(image), field)


def test_a_slice_without_a_constant_border_is_all_field_of_view() -> None:
    image = np.random.default_rng(2).integers(0, 4000, (32, 32)).astype(np.uint16)
    assert morphometry.fov_slice(image).all()


def test_segmentation_ignores_the_constant_outside_the_field_of_view() -> None:
    rng = np.random.default_rng(3)
    field = np.broadcast_to(disc((40, 40), 18), (8, 40, 40))
    bone = np.zeros((8, 40, 40), bool)
    bone[:, ::6] = True  # plates, ~1/6 of the field
    image = np.where(bone, 3000, 1000) + rng.normal(0, 50, bone.shape)
    image = np.where(field, image, 0).astype(np.uint16)
    fov = morphometry.field_of_view(image)
    assert np.array_equal(fov, field)
    seg = morphometry.segment_bone(image, smooth_vox=0.0, fov=fov)
    assert not seg[~field].any()
    assert (seg == bone)[field].mean() > 0.99


def test_inner_voi_shrinks_the_field_radius_by_the_fraction() -> None:
    fov = np.broadcast_to(disc((101, 101), 50), (3, 101, 101))
    voi = morphometry.inner_voi(fov, 0.8)
    assert np.sqrt(voi[1].sum() / np.pi) == pytest.approx(40, abs=1)


def rod_lattice(n: int, spacing: dict[int, int], radius: int = 1) -> np.ndarray:
    """Rods along each axis in ``spacing`` (axis -> spacing between rods, voxels)."""
    bone = np.zeros((n, n, n), bool)
    idx = np.arange(n)
    for axis, step in spacing.items():
        on = np.abs(idx % step - step // 2) <= radius
        section = on[:, None] & on[None, :]  # the rods' cross-section in the other two axes
        bone |= np.moveaxis(np.broadcast_to(section, (n, n, n)), 0, axis)
    return bone


def test_degree_of_anisotropy_is_one_for_a_cubic_lattice_and_high_for_a_z_rod_lattice() -> None:
    cubic = rod_lattice(48, {0: 8, 1: 8, 2: 8})
    assert morphometry.mil_anisotropy(cubic) == pytest.approx(1.0, abs=0.05)
    columns = rod_lattice(48, {0: 6, 1: 16, 2: 16})  # dense z rods, sparse lateral struts
    da = morphometry.mil_anisotropy(columns)
    assert da > 1.3
    # the longest intercepts run along z: the fabric's smallest eigenvector is z
    _, vec = np.linalg.eigh(morphometry.fabric_tensor(columns, np.ones_like(columns)))
    assert abs(vec[0, 0]) > 0.95


def test_degree_of_anisotropy_of_random_spheres_is_near_one() -> None:
    rng = np.random.default_rng(4)
    zz, yy, xx = np.indices((48, 48, 48))
    bone = np.zeros((48, 48, 48), bool)
    for c in rng.uniform(0, 48, (60, 3)):
        bone |= (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 16
    assert morphometry.mil_anisotropy(bone) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("tunnels", [0, 1, 3])
def test_connectivity_density_counts_the_tunnels_through_a_block(tunnels: int) -> None:
    bone = np.zeros((20, 40, 40), bool)
    bone[2:18, 2:38, 2:38] = True
    for k in range(tunnels):  # parallel holes along z: each is one handle
        bone[:, 6 + 10 * k : 9 + 10 * k, 18:21] = False
    assert morphometry.connectivity_density(bone, volume_mm3=0.5) == pytest.approx(tunnels / 0.5)


def test_a_torus_has_one_handle() -> None:
    zz, yy, xx = np.indices((16, 48, 48)) - np.array([7.5, 23.5, 23.5])[:, None, None, None]
    torus = (np.hypot(yy, xx) - 14) ** 2 + zz**2 <= 16
    assert morphometry.connectivity_density(torus, 2.0) == pytest.approx(1 / 2.0)


def test_slice_envelope_counts_a_canal_through_the_whole_stack_but_not_the_outside() -> None:
    shape = (30, 60, 60)
    fov = np.broadcast_to(disc(shape[1:], 29), shape)
    specimen = np.broadcast_to(disc(shape[1:], 24), shape)  # smaller than the field
    canal = np.broadcast_to(disc(shape[1:], 5), shape)  # runs through every slice
    bone = specimen & ~canal
    # a 3D hole fill would not see the canal: it opens on the top and bottom faces
    assert not (ndimage.binary_fill_holes(bone) & canal).any()
    m = morphometry.cortical(bone, voxel_um=2.0, fov=fov)
    assert m["porosity"] == pytest.approx(canal.sum() / specimen.sum(), rel=1e-6)
    assert m["canal_diameter_um"] == pytest.approx(20.0, rel=0.1)


def test_trabecular_measures_only_inside_the_voi() -> None:
    bone = plates(thickness=6, gap=14)
    voi = np.zeros(bone.shape, bool)
    voi[:, :, 20:60] = True
    bone_outside = bone | ~voi  # anything outside the VOI must not count
    m = morphometry.trabecular(bone_outside, voxel_um=10.0, voi=voi, thickness=False)
    assert m["bv_tv"] == pytest.approx(6 / 20)
    assert "tb_th_um" not in m
