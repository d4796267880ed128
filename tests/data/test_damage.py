"""Per-component microdamage measures (data/damage.py) on drawn cracks of known shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bonedamage.data import damage
from bonedamage.data.coverage import damage_coverage
from bonedamage.data.volume import write_volume


def crack_disc(
    shape: tuple[int, int, int], semi: tuple[float, float, float], angle_deg: float
) -> np.ndarray:
    """A flat elliptical disc of even thickness (a rasterised crack a few voxels wide):
    semi-axes (long, wide, half thickness), its long axis ``angle_deg`` from z in the z-x
    plane, its wide axis along y."""
    c = (np.array(shape) - 1) / 2
    zz, yy, xx = (g - o for g, o in zip(np.indices(shape), c, strict=True))
    t = np.radians(angle_deg)
    along = zz * np.cos(t) + xx * np.sin(t)
    across = -zz * np.sin(t) + xx * np.cos(t)
    a, b, c_ = semi
    return ((along / a) ** 2 + (yy / b) ** 2 <= 1) & (np.abs(across) <= c_)


def test_a_drawn_crack_has_its_length_width_aperture_and_angle() -> None:
    voxel = 2.0
    crack = crack_disc((64, 48, 64), semi=(24, 10, 1.5), angle_deg=35)
    shapes = damage.component_shapes(crack, voxel)
    assert shapes["voxels"].size == 1
    assert shapes["length_um"][0] == pytest.approx(48 * voxel, rel=0.08)
    assert shapes["width_um"][0] == pytest.approx(20 * voxel, rel=0.1)
    assert shapes["aperture_um"][0] == pytest.approx(3 * voxel, rel=0.01)  # 3 voxels thick
    assert shapes["angle_deg"][0] == pytest.approx(35, abs=3)


def test_an_axial_crack_is_at_zero_degrees_and_a_transverse_one_at_ninety() -> None:
    axial = damage.component_shapes(crack_disc((48, 32, 48), (16, 6, 1), 0), 1.0)
    transverse = damage.component_shapes(crack_disc((48, 32, 48), (16, 6, 1), 90), 1.0)
    assert axial["angle_deg"][0] == pytest.approx(0, abs=2)
    assert transverse["angle_deg"][0] == pytest.approx(90, abs=2)


def test_components_below_the_minimum_size_are_left_out() -> None:
    mask = np.zeros((10, 10, 10), bool)
    mask[1, 1, 1] = True
    mask[5:8, 5:8, 5] = True  # 9 voxels
    assert damage.component_shapes(mask, 1.0, min_voxels=2)["voxels"].tolist() == [9.0]


def test_diagonal_neighbours_are_one_component() -> None:
    mask = np.zeros((6, 6, 6), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = mask[3, 3, 3] = True  # touching by corners only
    assert damage.component_shapes(mask, 1.0)["voxels"].tolist() == [3.0]


def test_a_crack_broken_by_a_one_voxel_gap_counts_once_when_gaps_are_joined() -> None:
    mask = np.zeros((5, 40, 40), dtype=bool)
    mask[2, 20, 2:18] = True
    mask[2, 20, 19:37] = True  # the same crack, its opening below a voxel at x = 18
    apart = damage.component_shapes(mask, 1.0, gap_vox=0)
    joined = damage.component_shapes(mask, 1.0, gap_vox=1)
    assert apart["voxels"].tolist() == [16, 18]
    assert joined["voxels"].tolist() == [34]
    assert joined["length_um"][0] > 35  # one 35-voxel crack
    # two cracks three voxels apart stay two
    mask[2, 20, 18:21] = False
    assert damage.component_shapes(mask, 1.0, gap_vox=1)["voxels"].size == 2


def test_damage_measures_per_label_kind() -> None:
    shape = (40, 60, 60)
    fov = np.ones(shape, bool)
    bone = np.zeros(shape, bool)
    bone[:, :, :30] = True  # half the volume is bone
    labels = np.zeros(shape, np.uint8)
    labels[5:10, 10:20, 5] = 1  # crack A: 50 voxels
    labels[20:30, 40:44, 10] = 1  # crack B: 40 voxels
    labels[30:32, :, 30:32] = 2  # a fracture gap (4 rows x 60): 240 voxels, in the marrow half
    labels[0:2, 0:2, 0:2] = 3  # buckled: 8 voxels
    m = damage.damage_measures(labels, bone, fov, voxel_um=10.0, min_voxels=8)
    reference = bone.sum() + 240  # the gap was bone before it opened: counted as bone
    assert m["damaged_share_of_bone"] == pytest.approx((50 + 40 + 240 + 8) / reference)
    assert (m["voxels_microcrack"], m["voxels_fracture"], m["voxels_buckled"]) == (90, 240, 8)
    assert m["crack_count"] == 2 and m["fracture_count"] == 1
    bone_mm3 = reference * 1e3 * 1e-9
    assert m["crack_per_mm3_bone"] == pytest.approx(2 / bone_mm3)
    assert m["largest_component_share"] == pytest.approx(240 / 338)
    # crack traces: 5 slices with one, 10 with another, out of 40; slice area 0.36 mm^2
    assert m["crack_traces_per_mm2"] == pytest.approx((15 / 40) / 0.36)
    assert m["crack_length_um_p10"] <= m["crack_length_um_median"] <= m["crack_length_um_p90"]


def test_damage_outside_the_field_of_view_is_not_counted() -> None:
    labels = np.zeros((4, 10, 10), np.uint8)
    labels[:, :, 0] = 1
    fov = np.ones(labels.shape, bool)
    fov[:, :, 0] = False
    m = damage.damage_measures(labels, np.ones(labels.shape, bool), fov, 1.0)
    assert m["voxels_microcrack"] == 0 and m["crack_count"] == 0


def test_coverage_counts_every_damage_label_as_damaged(tmp_path: Path) -> None:
    labels = np.zeros((4, 32, 32), np.uint8)
    labels[:, :, :16] = 3  # buckled bone: damaged, although its label is not 1
    path = tmp_path / "mask.tif"
    write_volume(path, iter(labels), labels.shape, np.uint8, 1.0)
    cov = damage_coverage(path, 1.0, tile_um=8, stride=1, min_fov=0.0, visible=0.5)
    assert cov["mean_damaged_fraction"] == pytest.approx(0.5, abs=0.05)
    assert cov["tiles_with_damage"] == pytest.approx(0.5, abs=0.1)
