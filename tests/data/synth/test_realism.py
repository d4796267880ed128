"""The default phantoms against the bone literature: the realism report of ``describe``.

Each range is the sourced one of docs/phantoms.md; where the phantoms rest on a stated
assumption instead (the crack density of the failure zone, the collapse band's strain),
the bound is that assumption's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bonedamage.data.coverage import describe_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(default_dataset: Path, params: dict) -> dict[str, Any]:
    return describe_dataset(
        default_dataset, params["describe"], params["tile"]["tile_um"], progress=False
    )


def scans(report: dict[str, Any], tissue: str, state: str) -> list[dict[str, float]]:
    found = [
        values
        for scan_id, values in report["per_scan"].items()
        if scan_id.startswith(f"{tissue}-") and scan_id.endswith(f"-{state}")
    ]
    assert found  # every check below runs over at least one scan
    return found


def test_pristine_trabecular_morphometry_is_bovine(report: dict[str, Any]) -> None:
    for m in scans(report, "trabecular", "pristine"):
        assert 0.15 <= m["bv_tv"] <= 0.40  # Nazarian & Müller 2004; Perilli et al. 2007
        assert 100 <= m["tb_th_um"] <= 300
        assert 300 <= m["tb_sp_um"] <= 900
        assert 1.3 <= m["da"] <= 2.0  # Perilli et al. 2007; Nazarian et al. 2006
        assert m["anisotropy_z"] > 1.0  # marrow spaces elongated along the load axis z
        assert m["conn_d_per_mm3"] > 0


def test_pristine_cortical_morphometry_is_bovine(report: dict[str, Any]) -> None:
    for m in scans(report, "cortical", "pristine"):
        assert 0.01 <= m["porosity"] <= 0.15  # plexiform to Haversian bone
        assert 10 <= m["canal_diameter_um"] <= 100
        assert 10_000 <= m["lacuna_density_per_mm3"] <= 60_000  # Hannah 2010; Carter 2013


def test_trabecular_failure_compacts_bone_in_the_band(report: dict[str, Any], params: dict) -> None:
    ratios = [v["bvtv_band_ratio"] for v in report["per_specimen"].values()]
    assert len(ratios) == params["synth"]["specimens_per_tissue"]
    strain = params["synth"]["trabecular"]["failure"]["band_strain"][1]
    # bone is kept, not removed: at least the pristine BV/TV, at most all of it compacted
    assert all(1.0 <= r <= 1.0 / (1.0 - strain) for r in ratios)


def test_trabecular_damage_is_broken_and_buckled_bone(report: dict[str, Any]) -> None:
    for m in scans(report, "trabecular", "failed"):
        assert m["voxels_microcrack"] == 0
        assert m["voxels_fracture"] > 0 and m["voxels_buckled"] > 0
        assert 0.0 < m["damaged_share_of_bone"] < 0.5  # damaged struts, not the whole band
        # many broken struts, not one displaced block: buckled rods that share a node touch,
        # so clusters form, but no cluster holds nearly all of the damage
        assert m["fracture_count"] >= 10 and m["largest_component_share"] < 0.8


def test_cortical_cracks_are_thin_oblique_and_sparse(report: dict[str, Any]) -> None:
    failed = scans(report, "cortical", "failed")
    for m in failed:
        assert m["crack_count"] >= 1  # a failed scan shows damage
        assert m["crack_aperture_um_median"] <= 3.2  # one or two voxels at 1.6 um
    angles = [m["crack_angle_deg_median"] for m in failed if "crack_angle_deg_median" in m]
    assert 30 <= np.median(angles) <= 50  # long axis 30-45 deg to the load (Ebacher 2007)
    lengths = [m["crack_length_um_median"] for m in failed if "crack_length_um_median" in m]
    widths = [m["crack_width_um_median"] for m in failed if "crack_width_um_median" in m]
    assert np.median(lengths) >= 1.5 * np.median(widths)  # longer than wide
    assert 40 <= np.median(lengths) <= 500  # arrested at cement lines; at most the sheep's
    density = np.median([m["crack_per_mm3_bone"] for m in failed])
    # the failure-zone assumption: tens to a few hundred times the 3.1-9.4 per mm^3 of
    # diffuse damage (Larrue et al. 2011), not the thousands of times of a crack network
    assert 30 <= density <= 2000


def test_scans_of_failed_specimens_show_their_damage_in_tiles(report: dict[str, Any]) -> None:
    for tissue in ("cortical", "trabecular"):
        shares = [m["tiles_with_damage"] for m in scans(report, tissue, "failed")]
        assert min(shares) > 0
        print(f"{tissue}: share of failed-scan tiles with visible damage {np.round(shares, 2)}")
