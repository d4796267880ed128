"""Bovine cortical bone phantom: canals, osteons, lacunae, and compressive microcracks.

Structure (reference frame, z = bone axis = load axis):

- Longitudinal vascular (Haversian / primary plexiform) canals, 10-100 um across, slightly
  wavy and inclined, spaced by a Poisson-disc draw; transverse Volkmann canals link
  neighbouring canals. Canal density and size set the vascular porosity, a few percent
  in bovine cortical bone (Cooper et al., Anat Rec 2003; Palanca et al. 2017 measured
  3-10 % at 1.6 um voxels).
- Concentric lamellae (period ~6 um) around each canal out to the osteon radius, a
  hypermineralised cement line at the boundary, and slightly more mineralised interstitial
  bone: attenuation texture, not porosity (Currey, Bones 2002).
- Osteocyte lacunae: ellipsoids about 3-5 x 5-8 x 12-18 um, long axis near the bone axis,
  flattened towards their canal, 20-35 thousand per mm^3 (Hannah et al., Bone 47 (2010)
  866; Carter et al., Bone 52 (2013) 126).

Failure under compression along z: microcracks a few um wide and tens to hundreds of um
long, elliptical (penny-shaped with an elliptical opening profile), their long axis at
30-45 degrees to the load axis in two cross-hatched families, nucleating at canals and
lacunae and concentrated in an oblique shear band, optionally one rough macro-crack along
the band (Ebacher et al., J Biomech 40 (2007) 3383; Zioupos & Currey, Bone 1994;
Palanca et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bonedamage.data.synth.fields import local_box, smooth_field, soft_inside


@dataclass
class CorticalSpecimen:
    """Reference-frame structure of one cortical specimen, its pores and drawn parameters."""

    occupancy: np.ndarray
    mineral: np.ndarray
    pore_sites: np.ndarray  # (n, 3) reference-grid indices on canal walls and lacunae
    params: dict[str, Any] = field(default_factory=dict)


def draw_params(rng: np.random.Generator, cfg: dict[str, Any]) -> dict[str, Any]:
    """Draw one specimen's microstructure from the ranges in ``params.yaml``."""

    def u(key: str) -> float:
        lo, hi = cfg[key]
        return float(rng.uniform(lo, hi))

    return {
        "canal_density_per_mm2": u("canal_density_per_mm2"),
        "canal_diameter_um": sorted([u("canal_diameter_um"), u("canal_diameter_um")]),
        "volkmann_per_mm3": u("volkmann_per_mm3"),
        "lacuna_density_per_mm3": u("lacuna_density_per_mm3"),
        "osteon_radius_um": u("osteon_radius_um"),
        "lamella_period_um": float(cfg["lamella_period_um"]),
        "lacuna_axes_um": [list(map(float, ax)) for ax in cfg["lacuna_axes_um"]],
        "mineral_variation": float(cfg["mineral_variation"]),
    }


def build(
    rng: np.random.Generator,
    params: dict[str, Any],
    ref_shape: tuple[int, int, int],
    voxel_um: float,
) -> CorticalSpecimen:
    """Build the pristine reference structure on a grid of ``ref_shape`` voxels."""
    nz, ny, nx = ref_shape
    area_mm2 = ny * nx * (voxel_um * 1e-3) ** 2
    volume_mm3 = area_mm2 * nz * voxel_um * 1e-3
    canals = _draw_canals(rng, params, ref_shape, voxel_um, area_mm2)

    yy, xx = np.meshgrid(
        np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32), indexing="ij"
    )
    occupancy = np.empty(ref_shape, dtype=np.float32)
    centre_dist = np.empty(ref_shape, dtype=np.float32)
    for z in range(nz):
        cy = canals["y"] + canals["amp"] * np.sin(2 * np.pi * z / canals["wave"] + canals["phase"])
        cy = cy + canals["slope_y"] * z
        cx = canals["x"] + canals["amp"] * np.cos(2 * np.pi * z / canals["wave"] + canals["phase"])
        cx = cx + canals["slope_x"] * z
        best = np.full((ny, nx), np.inf, dtype=np.float32)
        pore = np.zeros((ny, nx), dtype=np.float32)
        for i in range(len(cy)):
            d = np.hypot(yy - cy[i], xx - cx[i])
            pore = np.maximum(pore, soft_inside(canals["r"][i] - d))
            np.minimum(best, d, out=best)
        occupancy[z] = 1.0 - pore
        centre_dist[z] = best

    n_volk = rng.poisson(params["volkmann_per_mm3"] * volume_mm3)
    _add_volkmann(rng, occupancy, canals, n_volk, voxel_um)

    osteon_r = params["osteon_radius_um"] / voxel_um
    lamella = params["lamella_period_um"] / voxel_um
    texture = np.where(
        centre_dist < osteon_r,
        0.02 * np.cos(2 * np.pi * centre_dist / lamella),
        0.03,
    ) + 0.05 * np.exp(-0.5 * ((centre_dist - osteon_r) / 1.0) ** 2)
    mineral = 1.0 + texture + params["mineral_variation"] * smooth_field(rng, ref_shape, 8.0)

    n_lac = rng.poisson(params["lacuna_density_per_mm3"] * volume_mm3)
    lacunae = _add_lacunae(rng, occupancy, centre_dist, canals, n_lac, params, voxel_um)
    walls = _canal_wall_sites(rng, canals, nz, n=max(len(lacunae) // 4, 1))
    meta = dict(params, n_canals=len(canals["r"]), n_volkmann=int(n_volk), n_lacunae=len(lacunae))
    return CorticalSpecimen(
        occupancy,
        mineral.astype(np.float32),
        np.concatenate([lacunae, walls]) if len(lacunae) else walls,
        meta,
    )


def _draw_canals(
    rng: np.random.Generator,
    params: dict[str, Any],
    shape: tuple[int, int, int],
    voxel_um: float,
    area_mm2: float,
) -> dict[str, np.ndarray]:
    n_target = max(1, rng.poisson(params["canal_density_per_mm2"] * area_mm2))
    d_lo, d_hi = np.array(params["canal_diameter_um"]) / voxel_um
    min_gap = 2.0 * (d_hi / 2.0) + 30.0 / voxel_um
    pts: list[np.ndarray] = []
    for _ in range(n_target * 30):
        if len(pts) >= n_target:
            break
        p = rng.uniform([0, 0], [shape[1], shape[2]])
        if all(np.hypot(*(p - q)) >= min_gap for q in pts):
            pts.append(p)
    pts_arr = np.array(pts)
    n = len(pts_arr)
    return {
        "y": pts_arr[:, 0],
        "x": pts_arr[:, 1],
        "r": rng.uniform(d_lo, d_hi, n) / 2.0,
        "amp": rng.uniform(1.0, 3.0, n) * (2.0 / voxel_um),
        "wave": rng.uniform(150.0, 400.0, n) / voxel_um,
        "phase": rng.uniform(0, 2 * np.pi, n),
        "slope_y": rng.normal(0.0, 0.04, n),
        "slope_x": rng.normal(0.0, 0.04, n),
    }


def _canal_centre(canals: dict[str, np.ndarray], i: int, z: float) -> np.ndarray:
    ph = 2 * np.pi * z / canals["wave"][i] + canals["phase"][i]
    return np.array(
        [
            z,
            canals["y"][i] + canals["amp"][i] * np.sin(ph) + canals["slope_y"][i] * z,
            canals["x"][i] + canals["amp"][i] * np.cos(ph) + canals["slope_x"][i] * z,
        ]
    )


def _add_volkmann(
    rng: np.random.Generator,
    occ: np.ndarray,
    canals: dict[str, np.ndarray],
    n: int,
    voxel_um: float,
) -> None:
    """Transverse canals between neighbouring longitudinal canals."""
    if len(canals["r"]) < 2:
        return
    xy = np.column_stack([canals["y"], canals["x"]])
    for _ in range(n):
        i = int(rng.integers(len(xy)))
        d = np.hypot(*(xy - xy[i]).T)
        d[i] = np.inf
        j = int(np.argmin(d))
        za = rng.uniform(0, occ.shape[0])
        zb = za + rng.normal(0.0, 0.15) * d[j]
        a, b = _canal_centre(canals, i, za), _canal_centre(canals, j, zb)
        radius = rng.uniform(4.0, 9.0) / voxel_um
        _carve_segment(occ, a, b, radius)


def _carve_segment(occ: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float) -> None:
    centre = (a + b) / 2.0
    box = local_box(occ.shape, centre, np.abs(b - a) / 2.0 + radius + 1.0)
    if box is None:
        return
    region, g = box
    a, ab = a - centre, b - a
    t = ((g[0] - a[0]) * ab[0] + (g[1] - a[1]) * ab[1] + (g[2] - a[2]) * ab[2]) / max(ab @ ab, 1e-9)
    t = np.clip(t, 0.0, 1.0)
    dist = np.sqrt(
        (g[0] - a[0] - t * ab[0]) ** 2
        + (g[1] - a[1] - t * ab[1]) ** 2
        + (g[2] - a[2] - t * ab[2]) ** 2
    )
    occ[region] *= 1.0 - soft_inside(radius - dist)


def _add_lacunae(
    rng: np.random.Generator,
    occ: np.ndarray,
    centre_dist: np.ndarray,
    canals: dict[str, np.ndarray],
    n: int,
    params: dict[str, Any],
    voxel_um: float,
) -> np.ndarray:
    """Carve ellipsoidal lacunae into bone; return their centres (reference indices)."""
    (t_lo, t_hi), (w_lo, w_hi), (l_lo, l_hi) = params["lacuna_axes_um"]
    xy = np.column_stack([canals["y"], canals["x"]])
    centres = []
    for _ in range(n * 3):
        if len(centres) >= n:
            break
        c = rng.uniform([0, 0, 0], occ.shape)
        ci = tuple(np.minimum(c.astype(int), np.array(occ.shape) - 1))
        if occ[ci] < 1.0 or centre_dist[ci] < canals["r"].max() + 4.0 / voxel_um:
            continue
        semi = (
            np.array([rng.uniform(l_lo, l_hi), rng.uniform(w_lo, w_hi), rng.uniform(t_lo, t_hi)])
            / 2.0
            / voxel_um
        )
        # long axis near z; the thin axis points at the nearest canal (lacunae lie in lamellae)
        k = int(np.argmin(np.hypot(*(xy - c[1:]).T)))
        radial = c[1:] - xy[k]
        radial = radial / (np.linalg.norm(radial) or 1.0)
        tilt = rng.normal(0.0, 0.15, 2)
        axis_long = np.array([1.0, tilt[0], tilt[1]])
        axis_long /= np.linalg.norm(axis_long)
        axis_thin = np.array([0.0, radial[0], radial[1]])
        axis_thin -= axis_long * (axis_thin @ axis_long)
        axis_thin /= np.linalg.norm(axis_thin) or 1.0
        axis_wide = np.cross(axis_long, axis_thin)
        _carve_ellipsoid(occ, c, np.stack([axis_long, axis_wide, axis_thin]), semi)
        centres.append(c)
    return np.array(centres).reshape(-1, 3)


def _carve_ellipsoid(
    occ: np.ndarray, centre: np.ndarray, axes: np.ndarray, semi: np.ndarray
) -> None:
    box = local_box(occ.shape, centre, semi.max() + 2.0)
    if box is None:
        return
    region, g = box
    q = sum(
        ((g[0] * ax[0] + g[1] * ax[1] + g[2] * ax[2]) / s) ** 2
        for ax, s in zip(axes, semi, strict=True)
    )
    # signed distance approximated on the smallest semi-axis scale
    sd = (1.0 - np.sqrt(q)) * semi.min()
    occ[region] *= 1.0 - soft_inside(sd)


def _canal_wall_sites(
    rng: np.random.Generator, canals: dict[str, np.ndarray], nz: int, n: int
) -> np.ndarray:
    i = rng.integers(len(canals["r"]), size=n)
    z = rng.uniform(0, nz, size=n)
    ang = rng.uniform(0, 2 * np.pi, size=n)
    sites = np.array([_canal_centre(canals, int(k), float(zz)) for k, zz in zip(i, z, strict=True)])
    sites[:, 1] += canals["r"][i] * np.sin(ang)
    sites[:, 2] += canals["r"][i] * np.cos(ang)
    return sites


# -- failure ----------------------------------------------------------------------------


def draw_failure(
    rng: np.random.Generator,
    cfg: dict[str, Any],
    specimen: CorticalSpecimen,
    ref_shape: tuple[int, int, int],
    voxel_um: float,
) -> dict[str, Any]:
    """Draw the cracks a specimen will have at failure (reference-grid voxels)."""
    centre = (np.asarray(ref_shape, dtype=np.float64) - 1.0) / 2.0
    band_angle = np.deg2rad(rng.uniform(*cfg["crack_angle_deg"]))
    band_azimuth = rng.uniform(0, 2 * np.pi)
    along = np.array(
        [
            np.cos(band_angle),
            np.sin(band_angle) * np.cos(band_azimuth),
            np.sin(band_angle) * np.sin(band_azimuth),
        ]
    )
    side = np.array([0.0, -np.sin(band_azimuth), np.cos(band_azimuth)])
    band_normal = np.cross(along, side)
    band_normal /= np.linalg.norm(band_normal)
    band_point = centre + rng.uniform(-0.1, 0.1, 3) * np.asarray(ref_shape)
    half_width = cfg["shear_band_width_frac"] * min(ref_shape[1:]) / 2.0

    sites = specimen.pore_sites
    dist_band = np.abs((sites - band_point) @ band_normal)
    in_band = dist_band < half_width
    n_cracks = int(rng.integers(*cfg["crack_count"], endpoint=True))
    n_in = int(round(n_cracks * cfg["in_band_share"]))
    pick_in = (
        rng.choice(np.flatnonzero(in_band), size=min(n_in, int(in_band.sum())), replace=False)
        if in_band.any()
        else np.array([], dtype=int)
    )
    pick_out = (
        rng.choice(
            np.flatnonzero(~in_band),
            size=min(n_cracks - len(pick_in), int((~in_band).sum())),
            replace=False,
        )
        if (~in_band).any()
        else np.array([], dtype=int)
    )
    picks = rng.permutation(np.concatenate([pick_in, pick_out]).astype(int))
    log_lo, log_hi = np.log(np.array(cfg["crack_length_um"]) / voxel_um)
    cracks = []
    for k in picks:
        theta = np.deg2rad(rng.uniform(*cfg["crack_angle_deg"])) * rng.choice([-1.0, 1.0])
        psi = band_azimuth + rng.normal(0.0, 0.5)
        d1 = np.array([np.cos(theta), np.sin(theta) * np.cos(psi), np.sin(theta) * np.sin(psi)])
        d2 = np.array([0.0, -np.sin(psi), np.cos(psi)])
        length = np.exp(rng.uniform(log_lo, log_hi))
        offset = rng.uniform(-0.3, 0.3) * length / 2.0
        cracks.append(
            {
                "centre": sites[k] + d1 * offset,
                "d1": d1,
                "d2": d2,
                "half_length": length / 2.0,
                "half_width": length / 2.0 * rng.uniform(0.3, 0.6),
                "aperture": rng.uniform(*cfg["crack_aperture_um"]) / voxel_um,
                "waviness": rng.uniform(0.0, 1.0, 2),
                "phase": rng.uniform(0, 2 * np.pi),
            }
        )
    macro = None
    if rng.random() < cfg["macro_crack_probability"]:
        macro = {
            "point": band_point,
            "normal": band_normal,
            "aperture": rng.uniform(*cfg["macro_aperture_um"]) / voxel_um,
            "roughness": smooth_field(rng, ref_shape[1:], sigma=20.0 / voxel_um) * (4.0 / voxel_um),
        }
    return {
        "cracks": cracks,
        "macro": macro,
        "band_normal": band_normal,
        "band_point": band_point,
        "band_half_width": half_width,
    }


def crack(
    occupancy: np.ndarray, failure: dict[str, Any], severity: float
) -> tuple[np.ndarray, int]:
    """Open the first ``severity`` share of the cracks (grown to ``sqrt(severity)`` length)."""
    cracks = failure["cracks"]
    n = int(round(len(cracks) * severity))
    out = occupancy.copy()
    growth = float(np.sqrt(severity))
    for c in cracks[:n]:
        _carve_crack(out, c, growth)
    macro = failure["macro"] if severity >= 1.0 else None
    if macro is not None:
        _carve_macro(out, macro)
    return out, n + (macro is not None)


def _carve_crack(occ: np.ndarray, c: dict[str, Any], growth: float) -> None:
    a, b = c["half_length"] * growth, c["half_width"] * growth
    box = local_box(occ.shape, c["centre"], a + 3.0)
    if box is None:
        return
    region, g = box
    normal = np.cross(c["d1"], c["d2"])
    u = g[0] * c["d1"][0] + g[1] * c["d1"][1] + g[2] * c["d1"][2]
    v = g[0] * c["d2"][0] + g[1] * c["d2"][1] + g[2] * c["d2"][2]
    w = g[0] * normal[0] + g[1] * normal[1] + g[2] * normal[2]
    rho2 = (u / a) ** 2 + (v / b) ** 2
    # a slightly wavy crack plane, opening with the elliptical (penny crack) profile
    w = w - c["waviness"][0] * np.sin(u / max(a, 1.0) * np.pi + c["phase"])
    opening = c["aperture"] * np.sqrt(np.clip(1.0 - rho2, 0.0, 1.0))
    cut = soft_inside(opening / 2.0 - np.abs(w)) * (rho2 < 1.0)
    occ[region] *= 1.0 - cut


def _carve_macro(occ: np.ndarray, macro: dict[str, Any]) -> None:
    yy, xx = np.meshgrid(
        np.arange(occ.shape[1], dtype=np.float32),
        np.arange(occ.shape[2], dtype=np.float32),
        indexing="ij",
    )
    n, p = macro["normal"], macro["point"]
    for z in range(occ.shape[0]):
        w = (z - p[0]) * n[0] + (yy - p[1]) * n[1] + (xx - p[2]) * n[2] - macro["roughness"]
        occ[z] *= 1.0 - soft_inside(macro["aperture"] / 2.0 - np.abs(w))
