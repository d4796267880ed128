"""Cortical microcracks (data/synth/cortical.py): sourced distributions, arrest and
deflection at cement lines, lacuna links, distinct cracks, nested damage, determinism."""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import numpy as np
import pytest
import yaml
from scipy import ndimage

from bonedamage.data.synth import cortical
from conftest import REPO

VOXEL = 1.6
SHAPE = (48, 64, 64)
WIDE = (48, 112, 112)  # room for several cracks


@pytest.fixture(scope="module")
def cfg() -> dict[str, Any]:
    with open(REPO / "params.yaml", encoding="utf-8") as fh:
        return yaml.safe_load(fh)["synth"]["cortical"]


def specimen(
    cfg: dict[str, Any], shape: tuple[int, int, int] = SHAPE, seed: int = 0, **structure: Any
) -> cortical.CorticalSpecimen:
    rng = np.random.default_rng(seed)
    params = cortical.draw_params(rng, {**cfg["structure"], **structure})
    return cortical.build(rng, params, shape, VOXEL)


def failure(
    cfg: dict[str, Any], spec: cortical.CorticalSpecimen, seed: int = 1, **overrides: Any
) -> dict[str, Any]:
    fcfg = {**cfg["failure"], **overrides}
    return cortical.draw_failure(
        np.random.default_rng(seed), fcfg, spec, spec.occupancy.shape, VOXEL
    )


@pytest.fixture(scope="module")
def many(cfg: dict[str, Any]) -> tuple[cortical.CorticalSpecimen, dict[str, Any]]:
    """A specimen with interstitial bone and a dense crack population, macro crack included."""
    spec = specimen(cfg, WIDE, seed=3, canal_density_per_mm2=[200, 200], osteon_radius_um=[55, 55])
    fail = failure(cfg, spec, crack_density_median_per_mm3=8000.0, macro_crack_probability=1.0)
    return spec, fail


def test_osteon_volume_holds_the_nearest_canal_within_the_osteon_radius(
    cfg: dict[str, Any], many: tuple
) -> None:
    spec, _ = many
    assert spec.osteon.shape == spec.occupancy.shape and spec.osteon.dtype == np.int16
    assert spec.osteon.min() == -1 and spec.osteon.max() >= 1  # interstitial bone and osteons
    # canals (pores away from lacunae) lie inside osteons, never in interstitial bone
    canal = ndimage.binary_erosion(spec.occupancy < 0.5, iterations=3)
    assert canal.any() and (spec.osteon[canal] >= 0).all()


def test_damage_labels_nest_across_severities(many: tuple) -> None:
    spec, fail = many
    severities = [0.0, 0.1, 0.3, 0.5, 0.8, 1.0]
    labels = [cortical.crack(spec.occupancy, fail, s, spec.osteon)[1] for s in severities]
    assert not labels[0].any()
    for low, high in itertools.pairwise(labels):
        assert low.dtype == np.uint8 and low.shape == spec.occupancy.shape
        assert not ((low > 0) & (high == 0)).any()
        assert (high > 0).sum() > (low > 0).sum()
    assert set(np.unique(labels[-1])) == {0, 1, 2}  # microcracks and the fracture
    assert 2 not in labels[-2]  # the macro crack opens at failure only


def test_number_of_damage_features_grows_with_severity(many: tuple) -> None:
    spec, fail = many
    n = len(fail["cracks"])
    counts = [cortical.crack(spec.occupancy, fail, s, spec.osteon)[2] for s in (0, 0.01, 0.5, 1)]
    assert counts == [0, 1, int(np.ceil(n / 2)), n + 1]


def test_labels_only_where_bone_was(many: tuple) -> None:
    spec, fail = many
    occ, labels, _ = cortical.crack(spec.occupancy, fail, 1.0, spec.osteon)
    assert labels.any()
    assert (spec.occupancy[labels > 0] >= 0.5).all()
    # microcrack voxels lost at least half of their bone; the fracture's gap opened
    assert (occ[labels == 1] <= 0.5 * spec.occupancy[labels == 1] + 1e-6).all()
    assert occ[labels == 2].min() < 0.5
    assert occ.dtype == np.float32 and (occ <= spec.occupancy + 1e-6).all()


def test_microcracks_stop_at_cement_lines(many: tuple) -> None:
    """Every crack opens only its home region (its osteon, or interstitial bone), and some
    cracks would have run on across a cement line without that arrest."""
    spec, fail = many
    ids = cortical.crack_footprints(fail, spec.occupancy.shape, 1.0, spec.osteon)
    arrested = 0
    for k, c in enumerate(fail["cracks"]):
        mine = ids == k + 1
        assert (spec.osteon[mine] == c["home"]).all()
        alone = {**fail, "cracks": [c]}
        free = cortical.crack_footprints(
            alone, spec.occupancy.shape, 1.0, np.full_like(spec.osteon, c["home"])
        )
        arrested += bool((spec.osteon[free > 0] != c["home"]).any())
    assert arrested >= 2


def test_deflected_cracks_run_along_the_cement_line_and_arrested_ones_stay_in_plane(
    many: tuple,
) -> None:
    spec, fail = many
    ids = cortical.crack_footprints(fail, spec.occupancy.shape, 1.0, spec.osteon)
    padded = np.pad(spec.osteon, 1, mode="edge")
    boundary = np.zeros(spec.osteon.shape, dtype=bool)  # a 6-neighbour in another region
    for axis in range(3):
        for shift in (-1, 1):
            moved = np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
            boundary |= moved != spec.osteon
    points = np.indices(spec.osteon.shape).reshape(3, -1).T.reshape(*spec.osteon.shape, 3)
    deflected = 0
    for k, c in enumerate(fail["cracks"]):
        mine = ids == k + 1
        normal = np.cross(c["d1"], c["d2"])
        off = np.abs((points[mine] - c["centre"]) @ normal)
        beyond = off > c["aperture"] / 2 + 2 * c["waviness"] + 1  # out of the crack's plane
        if c["deflection"] == 0:
            assert not beyond.any()
        elif beyond.any():
            assert boundary[mine][beyond].all()  # along the region's cement line only
            deflected += 1
    assert deflected >= 1


def test_most_cracks_nucleate_in_interstitial_bone_when_there_is_some(
    cfg: dict[str, Any], many: tuple
) -> None:
    spec, _ = many
    assert (spec.osteon == -1).mean() > 0.05
    only = failure(cfg, spec, seed=7, crack_density_median_per_mm3=4000.0, interstitial_share=1.0)
    never = failure(cfg, spec, seed=7, crack_density_median_per_mm3=4000.0, interstitial_share=0.0)
    # the first crack may settle for the field's core; the others keep to their region
    assert len(only["cracks"]) >= 3 and all(c["home"] == -1 for c in only["cracks"][1:])
    assert len(never["cracks"]) >= 3 and all(c["home"] >= 0 for c in never["cracks"][1:])


def test_cracks_nucleate_at_lacunae_and_link_a_second_one_in_the_allowed_direction(
    cfg: dict[str, Any], many: tuple
) -> None:
    spec, fail = many
    lacunae = spec.pore_sites[: spec.params["n_lacunae"]]
    lo, hi = cfg["failure"]["crack_angle_deg"]
    linked = 0
    for c in fail["cracks"]:
        assert np.array_equal(c["centre"], lacunae[c["site"]])
        assert lo - 1e-6 <= c["angle_deg"] <= hi + 1e-6
        if c["linked"]:
            # another lacuna lies on the long axis, within the crack, in the same region
            to = lacunae - c["centre"]
            along = to @ c["d1"]
            off_axis = np.linalg.norm(to - np.outer(along, c["d1"]), axis=1)
            vox = np.clip(np.rint(lacunae).astype(int), 0, np.array(spec.osteon.shape) - 1)
            same = spec.osteon[vox[:, 0], vox[:, 1], vox[:, 2]] == c["home"]
            hit = (off_axis < 1e-6) & (np.abs(along) > 0.5) & (np.abs(along) <= c["half_length"])
            assert (hit & same).any()
            linked += 1
    assert linked >= 1


def test_distinct_cracks_stay_distinct_components(many: tuple) -> None:
    spec, fail = many
    ids = cortical.crack_footprints(fail, spec.occupancy.shape, 1.0, spec.osteon)
    components, n_components = ndimage.label(ids > 0, np.ones((3, 3, 3), dtype=bool))
    opened = np.unique(ids[ids > 0])
    assert len(opened) >= 5  # the check below compares several cracks
    for i, found in enumerate(ndimage.find_objects(components), start=1):
        part = components[found] == i
        assert len(np.unique(ids[found][part])) == 1  # no component holds two cracks
    assert n_components >= len(opened)


def test_drawn_sizes_follow_the_configured_distributions(cfg: dict[str, Any]) -> None:
    fcfg = cfg["failure"]
    sizes = cortical.draw_crack_sizes(np.random.default_rng(0), fcfg, 20000)
    length = sizes["length_um"]
    assert np.median(length) == pytest.approx(fcfg["crack_length_median_um"], rel=0.1)
    assert np.log(length).std() == pytest.approx(fcfg["crack_length_log_sd"], rel=0.1)
    assert np.median(sizes["aspect"]) == pytest.approx(fcfg["crack_aspect_median"], rel=0.1)
    assert sizes["aspect"].min() >= 1.0
    assert np.allclose(sizes["width_um"], length / sizes["aspect"])
    lo, hi = fcfg["crack_aperture_um"]
    assert lo <= sizes["aperture_um"].min() and sizes["aperture_um"].max() <= hi
    lo, hi = fcfg["crack_angle_deg"]
    assert lo <= sizes["angle_deg"].min() and sizes["angle_deg"].max() <= hi
    assert np.median(sizes["angle_deg"]) == pytest.approx((lo + hi) / 2, abs=1.0)
    rng = np.random.default_rng(1)
    density = [cortical.draw_crack_density(rng, fcfg) for _ in range(4000)]
    assert np.median(density) == pytest.approx(fcfg["crack_density_median_per_mm3"], rel=0.1)


def test_crack_count_is_poisson_of_density_times_volume_and_at_least_one(
    cfg: dict[str, Any],
) -> None:
    spec = specimen(cfg)
    volume_mm3 = np.prod(SHAPE) * (VOXEL * 1e-3) ** 3
    sparse = failure(cfg, spec, crack_density_median_per_mm3=1e-6, crack_density_log_sd=0.0)
    assert len(sparse["cracks"]) == 1 and sparse["n_poisson"] == 0
    dense = [
        failure(cfg, spec, seed=s, crack_density_median_per_mm3=6000.0, crack_density_log_sd=0.0)
        for s in range(6)
    ]
    mean = np.mean([f["n_poisson"] for f in dense])
    assert mean == pytest.approx(6000.0 * volume_mm3, rel=0.35)


def test_first_crack_nucleates_in_the_core_of_the_field(cfg: dict[str, Any]) -> None:
    """The reference grid is a little larger than the scan: the one crack every failed
    specimen has starts well inside the scanned cylinder, so that the scan shows it."""
    spec = specimen(cfg)
    centre = (np.array(SHAPE) - 1) / 2
    for seed in range(8):
        c = failure(cfg, spec, seed=seed)["cracks"][0]["centre"]
        assert np.hypot(*(c[1:] - centre[1:])) < 0.5 * min(SHAPE[1:]) / 2
        assert abs(c[0] - centre[0]) < 0.3 * SHAPE[0]


def test_failure_meta_is_json_and_lists_every_crack(many: tuple) -> None:
    _, fail = many
    meta = json.loads(json.dumps(cortical.failure_meta(fail)))
    n = meta["n_cracks"]
    assert n == len(fail["cracks"]) and meta["macro_crack"] is True
    for key in ("crack_length_um", "crack_width_um", "crack_aperture_um", "crack_angle_deg"):
        assert len(meta[key]) == n
    assert meta["crack_length_um"][0] == round(fail["cracks"][0]["length_um"], 3)
    assert meta["density_per_mm3"] == pytest.approx(8000.0, rel=1.0)


def test_same_seed_gives_identical_bytes(cfg: dict[str, Any]) -> None:
    def run(seed: int) -> list[bytes]:
        spec = specimen(cfg, seed=seed)
        fail = failure(cfg, copy.deepcopy(spec), seed=seed, macro_crack_probability=1.0)
        occ, labels, n = cortical.crack(spec.occupancy, fail, 1.0, spec.osteon)
        return [spec.osteon.tobytes(), occ.tobytes(), labels.tobytes(), bytes([n])]

    assert run(4) == run(4)
    assert run(4) != run(5)
