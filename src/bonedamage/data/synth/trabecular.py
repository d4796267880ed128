"""Bovine trabecular bone phantom: a plate-and-rod Voronoi network and its collapse band.

Structure. Seeds on a jittered lattice, stretched along the load axis z, define Voronoi
cells (the marrow spaces). Bone sits on the cell boundaries: a share of the faces are
plates (preferentially those parallel to z, perforated by smooth random holes) and the
cell edges are rods, thicker when aligned with z. This reproduces the interconnected
plate-and-rod architecture and its anisotropy along the principal load direction. Cell
spacing, anisotropy, plate share and thicknesses are drawn per specimen so that the
morphometry spans the bovine range:

- BV/TV about 0.15-0.40, Tb.Th about 100-300 um, Tb.Sp about 300-900 um for bovine
  femoral/tibial trabecular bone: Keaveny et al., J Biomech 27 (1994) 1137 (bovine
  tibial BV/TV); Nazarian & Müller, J Biomech 37 (2004) 55 and Nazarian et al.,
  J Biomech 39 (2006) 1703 (bovine trabecular micro-CT morphometry, Tb.Th and Tb.Sp);
  Perilli et al., J Biomech 40 (2007) 3025 (Tb.Th/Tb.Sp ranges and DA in
  plate-and-rod bone).
- Rod/plate description: Stauber & Müller, Bone 38 (2006) 475; Liu et al., J Bone Miner
  Res 23 (2008) 223 (individual trabecula segmentation).

Failure (compression along z past the apparent yield strain). Trabecular bone fails
locally: a collapse band forms where thin trabeculae fracture and buckle and the band
compacts, while the rest carries small elastic strain (Nazarian & Müller 2004; Thurner
et al., Bone 39 (2006) 289; Palanca et al., J Mech Behav Biomed Mater 2017). The band is
modelled as a band of high compressive strain with lateral buckling displacements and
transverse fractures of thin struts inside it; outside, strain is elastic (~0.5 %).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from bonedamage.data.synth.fields import (
    AxialDeformation,
    hash_uniform,
    local_box,
    smooth_field,
    soft_inside,
)

_CHUNK_SLICES = 8


@dataclass
class TrabecularSpecimen:
    """Reference-frame structure of one trabecular specimen and its drawn parameters."""

    occupancy: np.ndarray  # bone volume fraction per voxel, float32 in [0, 1]
    mineral: np.ndarray  # relative tissue attenuation of bone (~1), float32
    params: dict[str, Any] = field(default_factory=dict)


def draw_params(rng: np.random.Generator, cfg: dict[str, Any]) -> dict[str, Any]:
    """Draw one specimen's architecture from the ranges in ``params.yaml``."""

    def u(key: str) -> float:
        lo, hi = cfg[key]
        return float(rng.uniform(lo, hi))

    return {
        "cell_spacing_um": u("cell_spacing_um"),
        "anisotropy": u("anisotropy"),
        "plate_fraction": u("plate_fraction"),
        "plate_thickness_um": sorted([u("plate_thickness_um"), u("plate_thickness_um")]),
        "rod_diameter_um": sorted([u("rod_diameter_um"), u("rod_diameter_um")]),
        "perforation": u("perforation"),
        "mineral_variation": float(cfg["mineral_variation"]),
    }


def build(
    rng: np.random.Generator,
    params: dict[str, Any],
    ref_shape: tuple[int, int, int],
    voxel_um: float,
) -> TrabecularSpecimen:
    """Build the pristine reference structure on a grid of ``ref_shape`` voxels."""
    spacing = params["cell_spacing_um"] / voxel_um
    aniso = params["anisotropy"]
    step = np.array(
        [spacing * aniso ** (2 / 3), spacing * aniso ** (-1 / 3), spacing * aniso ** (-1 / 3)]
    )
    seeds = _jittered_lattice(rng, ref_shape, step)
    tree = cKDTree(seeds)
    plate_t = np.array(params["plate_thickness_um"]) / voxel_um
    rod_r = np.array(params["rod_diameter_um"]) / voxel_um / 2.0
    holes = smooth_field(rng, ref_shape, sigma=max(spacing / 5.0, 2.0))
    hole_thr = float(np.quantile(holes[::4, ::4, ::4], 1.0 - params["perforation"]))
    occupancy = np.empty(ref_shape, dtype=np.float32)
    yy, xx = np.meshgrid(np.arange(ref_shape[1]), np.arange(ref_shape[2]), indexing="ij")
    for z0 in range(0, ref_shape[0], _CHUNK_SLICES):
        z1 = min(z0 + _CHUNK_SLICES, ref_shape[0])
        zz = np.arange(z0, z1, dtype=np.float64)[:, None, None]
        pts = np.stack(np.broadcast_arrays(zz, yy[None], xx[None]), axis=-1).reshape(-1, 3)
        occupancy[z0:z1] = _occupancy(
            tree, seeds, pts, params, plate_t, rod_r, holes[z0:z1].reshape(-1) > hole_thr
        ).reshape(z1 - z0, *ref_shape[1:])
    mineral = 1.0 + params["mineral_variation"] * smooth_field(rng, ref_shape, sigma=6.0)
    meta = dict(params, n_seeds=len(seeds), lattice_step_vox=[round(float(s), 4) for s in step])
    return TrabecularSpecimen(occupancy, mineral.astype(np.float32), meta)


def _jittered_lattice(
    rng: np.random.Generator, shape: tuple[int, int, int], step: np.ndarray
) -> np.ndarray:
    counts = [int(np.ceil(s / st)) + 3 for s, st in zip(shape, step, strict=True)]
    grid = np.stack(np.meshgrid(*[np.arange(c) for c in counts], indexing="ij"), axis=-1)
    grid = grid.reshape(-1, 3).astype(np.float64) - 1.0
    jitter = rng.uniform(-0.45, 0.45, size=grid.shape)
    return (grid + 0.5 + jitter) * step


def _occupancy(
    tree: cKDTree,
    seeds: np.ndarray,
    pts: np.ndarray,
    params: dict[str, Any],
    plate_t: np.ndarray,
    rod_r: np.ndarray,
    in_hole: np.ndarray,
) -> np.ndarray:
    dist, idx = tree.query(pts, k=3)
    i1, i2, i3 = idx[:, 0], idx[:, 1], idx[:, 2]
    s1, s2, s3 = seeds[i1], seeds[i2], seeds[i3]
    n12 = np.linalg.norm(s2 - s1, axis=1)
    n13 = np.linalg.norm(s3 - s1, axis=1)
    d_face = (dist[:, 1] ** 2 - dist[:, 0] ** 2) / (2.0 * n12)
    d_face13 = (dist[:, 2] ** 2 - dist[:, 0] ** 2) / (2.0 * n13)
    d_edge = np.hypot(d_face, d_face13)

    lo, hi = np.minimum(i1, i2), np.maximum(i1, i2)
    vertical_plate = 1.0 - np.abs((s2[:, 0] - s1[:, 0]) / n12)  # 1 when the face contains z
    p_plate = np.clip(params["plate_fraction"] * (0.4 + 1.2 * vertical_plate), 0.0, 1.0)
    is_plate = hash_uniform(lo, hi, salt=1) < p_plate
    t_plate = plate_t[0] + (plate_t[1] - plate_t[0]) * hash_uniform(lo, hi, salt=2)
    plate = soft_inside(t_plate / 2.0 - d_face) * (is_plate & ~in_hole)

    e = np.sort(idx, axis=1)
    edge_dir = np.cross(s2 - s1, s3 - s1)
    vertical_rod = np.abs(edge_dir[:, 0]) / np.maximum(np.linalg.norm(edge_dir, axis=1), 1e-9)
    r = rod_r[0] + (rod_r[1] - rod_r[0]) * hash_uniform(e[:, 0], e[:, 1], e[:, 2], salt=3)
    r = r * (0.75 + 0.5 * vertical_rod)
    rod = soft_inside(r - d_edge)
    return np.maximum(plate, rod)


def draw_failure(
    rng: np.random.Generator,
    cfg: dict[str, Any],
    scan_z: int,
    voxel_um: float,
    lateral_shape: tuple[int, int],
) -> dict[str, Any]:
    """Collapse-band geometry of a specimen at failure (centred scan coordinates, voxels)."""
    height_frac = float(rng.uniform(*cfg["band_height_frac"]))
    band_strain = float(rng.uniform(*cfg["band_strain"]))
    centre = float(rng.uniform(-cfg["band_centre_jitter_frac"], cfg["band_centre_jitter_frac"]))
    mid = centre * scan_z
    ref_half = height_frac * scan_z / 2.0 / (1.0 - band_strain)
    amp = float(rng.uniform(*cfg["buckle_amplitude_um"])) / voxel_um
    buckle = (
        np.stack(
            [
                smooth_field(rng, lateral_shape, sigma=cfg["buckle_length_um"] / voxel_um)
                for _ in range(2)
            ]
        )
        * amp
    )
    return {
        "band_height_frac": height_frac,
        "band_strain": band_strain,
        "b0": mid - ref_half,
        "b1": mid + ref_half,
        "buckle": buckle.astype(np.float32),
        "buckle_amplitude_vox": amp,
        "fracture_seed": int(rng.integers(2**31)),
    }


def deformation(failure: dict[str, Any], severity: float, elastic: float) -> AxialDeformation:
    """Backward map at a damage ``severity`` in [0, 1] (0: elastic only)."""
    if severity <= 0:
        return AxialDeformation(elastic=elastic)
    band = elastic + (failure["band_strain"] - elastic) * severity
    # the band's reference extent is fixed by the failure; its compaction grows with severity
    return AxialDeformation(
        elastic=elastic,
        band=band,
        b0=failure["b0"],
        b1=failure["b1"],
        buckle=failure["buckle"] * severity,
    )


def fracture(
    occupancy: np.ndarray,
    failure: dict[str, Any],
    cfg: dict[str, Any],
    severity: float,
    origin: np.ndarray,
    voxel_um: float,
) -> tuple[np.ndarray, int]:
    """Carve transverse fractures through thin struts inside the band (reference frame).

    Sites are drawn once per specimen and taken in the same order at every load step,
    so damage only accumulates. Returns the fractured occupancy and the fracture count.
    """
    n_total = int(cfg["fractures"])
    n = int(round(n_total * severity))
    if n == 0:
        return occupancy, 0
    rng = np.random.default_rng(failure["fracture_seed"])
    bone = occupancy >= 0.5
    edt = ndimage.distance_transform_edt(bone)
    local_thickness = ndimage.maximum_filter(edt, size=5)
    thin_r = cfg["thin_strut_um"] / voxel_um / 2.0
    gap = cfg["fracture_gap_um"] / voxel_um
    reach = thin_r + 2.0 + gap  # a fracture disc stays inside the band
    z_lo = max(int(np.ceil(failure["b0"] + origin[0] + reach)), 0)
    z_hi = min(int(np.floor(failure["b1"] + origin[0] - reach)), occupancy.shape[0])
    if z_hi <= z_lo:
        return occupancy, 0
    band_edt, band_thick = edt[z_lo:z_hi], local_thickness[z_lo:z_hi]
    candidates = np.flatnonzero(
        (band_edt >= 1.0) & (band_thick <= thin_r) & (band_edt >= band_thick - 0.5)
    )
    if candidates.size == 0:
        return occupancy, 0
    order = rng.permutation(candidates.size)[:n_total]
    picks = candidates[order[:n]]
    out = occupancy.copy()
    centres = np.column_stack(np.unravel_index(picks, band_edt.shape)).astype(np.float64)
    centres[:, 0] += z_lo
    tilts = rng.normal(0.0, 0.35, size=(n_total, 2))[:n]  # a prefix: the same at every step
    for centre, tilt in zip(centres, tilts, strict=True):
        radius = local_thickness[tuple(centre.astype(int))] + 2.0
        normal = np.array([1.0, tilt[0], tilt[1]])
        normal /= np.linalg.norm(normal)
        _carve_disc(out, centre, normal, radius, gap)
    return out, len(picks)


def _carve_disc(
    occ: np.ndarray, centre: np.ndarray, normal: np.ndarray, radius: float, gap: float
) -> None:
    """Remove a slab of thickness ``gap`` and radius ``radius`` (voxels) around ``centre``."""
    box = local_box(occ.shape, centre, radius + gap + 1.0)
    if box is None:
        return
    region, g = box
    along = g[0] * normal[0] + g[1] * normal[1] + g[2] * normal[2]
    radial = np.sqrt(np.maximum(g[0] ** 2 + g[1] ** 2 + g[2] ** 2 - along**2, 0.0))
    occ[region] *= 1.0 - soft_inside(gap / 2.0 - np.abs(along)) * soft_inside(radius - radial)
