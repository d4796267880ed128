"""Trabecular collapse (data/synth/trabecular.py): Euler buckling, rigid fragments, bone kept."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest

from bonedamage.data.synth import generate, trabecular
from bonedamage.data.synth.fields import Pose, scan_to_specimen, specimen_to_scan
from conftest import small_synth


@pytest.fixture(scope="module")
def cfg(params: dict) -> dict:
    return small_synth(params, load_steps=[0.0, 0.9, 1.0])


@pytest.fixture(scope="module")
def phantom(cfg: dict) -> dict:
    return generate.build_specimen(cfg, "trabecular", 0)


def fake_specimen(axis: np.ndarray, length: np.ndarray, radius: np.ndarray) -> object:
    n = len(length)
    struts = {
        "centroid": np.zeros((n, 3)),
        "axis": axis,
        "length": length,
        "radius": radius,
        "lo": np.full((n, 3), 10),
        "hi": np.full((n, 3), 20),
    }
    return trabecular.TrabecularSpecimen(
        np.zeros((32, 32, 32), np.float32),
        np.ones((1, 1, 1), np.float32),
        np.zeros((1, 1, 1), np.int32),
        struts,
        np.zeros((1, 1, 1), np.int32),
        np.zeros((n, 3)),
    )


def test_euler_buckling_takes_slender_struts_aligned_with_the_load_first(cfg: dict) -> None:
    fcfg = cfg["trabecular"]["failure"]
    vertical, tilted = np.array([1.0, 0.0, 0.0]), np.array([0.3, 0.0, 0.954])
    spec = fake_specimen(
        np.stack([vertical, vertical, tilted]),
        length=np.array([40.0, 12.0, 40.0]),  # slender, stocky, slender but across the load
        radius=np.array([3.0, 3.0, 3.0]),
    )
    failure = {"b0": -100.0, "b1": 100.0, "band_strain": 0.15}
    mech = trabecular.strut_mechanics(spec, failure, fcfg, 1.0, np.zeros(3), 0.005)
    assert mech["buckled"].tolist() == [True, False, False]
    # outside the band nothing buckles
    away = {"b0": 50.0, "b1": 100.0, "band_strain": 0.15}
    assert not trabecular.strut_mechanics(spec, away, fcfg, 1.0, np.zeros(3), 0.005)[
        "buckled"
    ].any()


def test_buckled_and_broken_struts_only_accumulate_with_load(cfg: dict, phantom: dict) -> None:
    fcfg = cfg["trabecular"]["failure"]
    sets = [
        trabecular.strut_mechanics(
            phantom["spec"], phantom["failure"], fcfg, severity, phantom["origin"], 0.005
        )
        for severity in (0.0, 0.25, 0.5, 1.0)
    ]
    assert not sets[0]["buckled"].any()
    assert sets[-1]["broken"].any()
    for lower, higher in itertools.pairwise(sets):
        assert not (lower["buckled"] & ~higher["buckled"]).any()
        assert not (lower["broken"] & ~higher["broken"]).any()
    assert not (sets[-1]["broken"] & ~sets[-1]["buckled"]).any()


def test_buckled_struts_keep_their_bone(cfg: dict, phantom: dict) -> None:
    spec, origin, failure = phantom["spec"], phantom["origin"], phantom["failure"]
    fcfg = cfg["trabecular"]["failure"]
    mech = trabecular.strut_mechanics(spec, failure, fcfg, 1.0, origin, 0.005)
    deform = trabecular.deformation(failure, 1.0, 0.005)
    moves = trabecular.strut_moves(spec, failure, fcfg, mech, deform, origin)
    assert moves
    shape = spec.occupancy.shape  # a scan grid as large as the reference: every part seen
    pose = Pose((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    bone, labels = trabecular.render_moves(
        spec,
        moves,
        scan_to_specimen(shape, pose),
        lambda p: specimen_to_scan(p, shape, pose),
        origin,
        2.0,
    )
    for move in moves:
        k = move["strut"]
        before = spec.occupancy[spec.strut == k].sum()
        alone = trabecular.render_moves(
            spec,
            [move],
            scan_to_specimen(shape, pose),
            lambda p: specimen_to_scan(p, shape, pose),
            origin,
            2.0,
        )[0].sum()
        assert alone == pytest.approx(before, rel=0.1)
    assert set(np.unique(labels[bone >= 0.5])) <= {0, 2, 3}
    assert (labels == 2).any() == any(m["broken"] for m in moves)


def test_compaction_moves_pieces_rigidly_and_keeps_their_bone(cfg: dict, phantom: dict) -> None:
    spec, origin, failure = phantom["spec"], phantom["origin"], phantom["failure"]
    mech = trabecular.strut_mechanics(spec, failure, cfg["trabecular"]["failure"], 0.0, origin, 0.0)
    still = trabecular.collapse(spec, mech, trabecular.deformation(failure, 0.0, 0.0), origin)
    assert np.array_equal(still, np.where(spec.piece >= 0, spec.occupancy, 0.0))
    mech = trabecular.strut_mechanics(
        spec, failure, cfg["trabecular"]["failure"], 1.0, origin, 0.005
    )
    moving = np.isin(spec.piece, np.flatnonzero(mech["buckled"]))
    packed = trabecular.collapse(spec, mech, trabecular.deformation(failure, 1.0, 0.005), origin)
    kept = spec.occupancy[(spec.piece >= 0) & ~moving].sum()
    # pieces overlap where they pack, and some leave the grid: most bone stays
    assert 0.8 * kept <= packed.sum() <= kept + 1e-3


def test_bone_volume_fraction_in_the_band_rises_with_its_compaction(params: dict) -> None:
    cfg = small_synth(params, load_steps=[0.0, 0.9, 1.0])
    cfg = copy.deepcopy(cfg)
    cfg["trabecular"]["shape"] = [48, 72, 72]
    phantom = generate.build_specimen(cfg, "trabecular", 0)
    fractions = []
    for k in range(3):
        truth = generate.scan_truth(cfg, "trabecular", phantom, k)
        seen = truth["inside"] >= 0.5
        rows = truth["meta"]["band_z_scan"] or [0, seen.shape[0] - 1]
        band = np.zeros_like(seen)
        band[rows[0] : rows[1] + 1] = True
        fractions.append(float((truth["bone"][seen & band] >= 0.5).mean()))
    assert fractions[0] <= fractions[1] <= fractions[2]
    assert fractions[2] / fractions[0] >= 1.0
