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

- Osteons: each canal's lamellae out to the osteon radius; where two overlap, the
  cement line runs along their bisector. ``CorticalSpecimen.osteon`` holds the index of
  the nearest canal within the osteon radius, -1 in interstitial bone.

Failure under compression along z (parameters in params.yaml ``synth.cortical.failure``):

=============  ==========================================  ================================
quantity       distribution (default)                      source / assumption
=============  ==========================================  ================================
density        lognormal, median 300 /mm^3, log-sd 0.4;    ASSUMPTION: no source gives the
               count Poisson(density x reference volume),  density in a failure zone; ~50x
               at least 1 (a failed scan shows damage)     the diffuse 3.1-9.4 /mm^3 of
                                                           SR-microCT (Larrue et al., PLoS
                                                           ONE 6 (2011) e21297): tens, not
                                                           hundreds, of times more
length         lognormal, median 200 um, log-sd 0.45       Larrue 2011: 164-209 um (3D);
               (95 %: ~80-480 um)                          fatigued sheep radius (3D):
                                                           488 +- 151 um; 2D histology:
                                                           tens to ~100 um (Schaffler et
                                                           al., Bone 17 (1995) 521; O'Brien
                                                           et al., J Biomech 36 (2003) 973)
width          length / aspect, aspect lognormal median    Larrue 2011: 100-120 um wide
               2.5, log-sd 0.4, clipped at >= 1            (aspect ~1.7); sheep: 88 +- 21
                                                           um (aspect 5.5)
aperture       uniform 1.2-2.4 um (centre of the           ASSUMPTION: 1-2 voxels at 1.4-1.6
               elliptical opening profile)                 um, what SR-microCT resolves
orientation    long axis at uniform 30-45 deg to z, two    Ebacher et al., J Biomech 40
               mirrored families, azimuth near the band's  (2007) 3383
site           a lacuna; interstitial bone with            interstitial mostly: Schaffler
               probability 0.8 (else inside an osteon);    1995, O'Brien et al., J Orthop
               in an oblique shear band with probability   Res 23 (2005) 475; the shares
               0.5                                         and the band are ASSUMPTIONS
=============  ==========================================  ================================

Each microcrack is a penny crack on a slightly wavy plane through its nucleation lacuna.
When a second lacuna of the same region lies within 0.9 of its half-length at an angle
to z inside the allowed range, the long axis runs through it (cracks link lacunae). A
crack spreads from its lacuna only through its home region (its osteon, or interstitial
bone): cement lines arrest it or deflect it (O'Brien et al. 2005; Mohsin et al., J Anat
208 (2006) 81). A deflected crack (share ``deflection_share``, an ASSUMPTION) turns where
it meets its region's boundary and runs along the cement line, one voxel wide, up to
``deflection_um`` (uniform, an ASSUMPTION: tens of um) from where it met it. The first
crack starts in the central core of the field, so the scan shows at least one. A crack
whose opening would come within 2 voxels of an earlier one is redrawn (``max_redraws``
times, then dropped), so distinct cracks stay distinct connected components. Damage
grows with load: at severity s the first ceil(n s) cracks are open at sqrt(s) of their
extent about their lacuna; optionally one rough macro-crack (the fracture) along the band
opens at failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from bonedamage.data.synth.fields import local_box, smooth_field, soft_inside


@dataclass
class CorticalSpecimen:
    """Reference-frame structure of one cortical specimen, its pores and drawn parameters."""

    occupancy: np.ndarray
    mineral: np.ndarray
    pore_sites: np.ndarray  # (n, 3) reference-grid indices of lacunae, then canal walls
    params: dict[str, Any] = field(default_factory=dict)
    # index of the nearest canal within the osteon radius, -1 in interstitial bone
    osteon: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=np.int16))


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
    osteon_r = params["osteon_radius_um"] / voxel_um
    occupancy = np.empty(ref_shape, dtype=np.float32)
    centre_dist = np.empty(ref_shape, dtype=np.float32)
    osteon = np.empty(ref_shape, dtype=np.int16)
    cement_dist = np.empty(ref_shape, dtype=np.float32)
    for z in range(nz):
        cy = canals["y"] + canals["amp"] * np.sin(2 * np.pi * z / canals["wave"] + canals["phase"])
        cy = cy + canals["slope_y"] * z
        cx = canals["x"] + canals["amp"] * np.cos(2 * np.pi * z / canals["wave"] + canals["phase"])
        cx = cx + canals["slope_x"] * z
        best = np.full((ny, nx), np.inf, dtype=np.float32)
        second = np.full((ny, nx), np.inf, dtype=np.float32)
        nearest = np.zeros((ny, nx), dtype=np.int16)
        pore = np.zeros((ny, nx), dtype=np.float32)
        for i in range(len(cy)):
            d = np.hypot(yy - cy[i], xx - cx[i])
            pore = np.maximum(pore, soft_inside(canals["r"][i] - d))
            np.minimum(second, np.maximum(best, d), out=second)
            nearest[d < best] = i
            np.minimum(best, d, out=best)
        occupancy[z] = 1.0 - pore
        centre_dist[z] = best
        # osteons: the region of each canal's lamellae; where two overlap, the younger one's
        # cement line runs along their bisector (distance to it ~ half the difference)
        osteon[z] = np.where(best < osteon_r, nearest, -1)
        cement_dist[z] = np.minimum(
            np.abs(best - osteon_r), np.where(second < osteon_r, (second - best) / 2.0, np.inf)
        )

    n_volk = rng.poisson(params["volkmann_per_mm3"] * volume_mm3)
    _add_volkmann(rng, occupancy, canals, n_volk, voxel_um)

    lamella = params["lamella_period_um"] / voxel_um
    texture = np.where(
        centre_dist < osteon_r,
        0.02 * np.cos(2 * np.pi * centre_dist / lamella),
        0.03,
    ) + 0.05 * np.exp(-0.5 * (cement_dist / 1.0) ** 2)
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
        osteon,
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

_CUBE = np.ones((3, 3, 3), dtype=bool)  # 26-neighbourhood: one crack is one component
_FACES = ndimage.generate_binary_structure(3, 1)  # "within 1 voxel" of the macro-crack faces


def draw_crack_sizes(
    rng: np.random.Generator, cfg: dict[str, Any], n: int
) -> dict[str, np.ndarray]:
    """Sizes and orientations of ``n`` microcracks from the configured distributions.

    length (um) ~ lognormal(median, log-sd); aspect ~ lognormal(median, log-sd) clipped at
    >= 1; width (um) = length / aspect; aperture (um) ~ uniform; angle of the long axis to the
    load axis z (deg) ~ uniform. ``draw_failure`` draws every crack through this function.
    """
    length = cfg["crack_length_median_um"] * np.exp(
        cfg["crack_length_log_sd"] * rng.standard_normal(n)
    )
    aspect = np.maximum(
        cfg["crack_aspect_median"] * np.exp(cfg["crack_aspect_log_sd"] * rng.standard_normal(n)),
        1.0,
    )
    aperture = rng.uniform(*cfg["crack_aperture_um"], size=n)
    angle = rng.uniform(*cfg["crack_angle_deg"], size=n)
    return {
        "length_um": length,
        "aspect": aspect,
        "width_um": length / aspect,
        "aperture_um": aperture,
        "angle_deg": angle,
    }


def draw_crack_density(rng: np.random.Generator, cfg: dict[str, Any]) -> float:
    """Microcracks per mm^3 of this specimen's failure zone ~ lognormal(median, log-sd)."""
    return float(
        cfg["crack_density_median_per_mm3"]
        * np.exp(cfg["crack_density_log_sd"] * rng.standard_normal())
    )


def draw_failure(
    rng: np.random.Generator,
    cfg: dict[str, Any],
    specimen: CorticalSpecimen,
    ref_shape: tuple[int, int, int],
    voxel_um: float,
) -> dict[str, Any]:
    """Draw the cracks a specimen will have at failure (reference-grid voxels).

    The count is Poisson(density x reference volume), at least 1; each crack nucleates at a
    lacuna (interstitial with probability ``interstitial_share``, in the shear band with
    probability ``in_band_share``; the first one in the central core of the field, so that
    the scan shows it), links a second lacuna of its region when one lies in the allowed
    direction, and is redrawn (up to ``max_redraws`` times, then dropped) when its opening
    would touch an earlier crack's.
    """
    shape = np.asarray(ref_shape)
    centre = (shape.astype(np.float64) - 1.0) / 2.0
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
    band_point = centre + rng.uniform(-0.1, 0.1, 3) * shape
    half_width = cfg["shear_band_width_frac"] * min(ref_shape[1:]) / 2.0

    volume_mm3 = float(np.prod(shape)) * (voxel_um * 1e-3) ** 3
    density = draw_crack_density(rng, cfg)
    n_poisson = int(rng.poisson(density * volume_mm3))
    n_target = max(1, n_poisson)

    osteon = specimen.osteon
    n_lac = int(specimen.params.get("n_lacunae", len(specimen.pore_sites)))
    sites = specimen.pore_sites[:n_lac] if n_lac > 0 else specimen.pore_sites
    vox = np.clip(np.rint(sites).astype(int), 0, shape - 1)
    homes = osteon[vox[:, 0], vox[:, 1], vox[:, 2]].astype(int)
    pools = {
        "band": np.abs((sites - band_point) @ band_normal) < half_width,
        # the central core of the field, and a wider one: the first crack starts there
        "core": _core(sites, centre, shape, 0.3, 0.25),
        "near": _core(sites, centre, shape, 0.5, 0.3),
        "central": np.arange(len(sites)) == np.argmin(np.linalg.norm(sites - centre, axis=1)),
    }

    taken = np.zeros(ref_shape, dtype=bool)
    cracks: list[dict[str, Any]] = []
    redraws = 0
    for k in range(n_target):
        for _ in range(int(cfg["max_redraws"]) + 1):
            c = _draw_crack(rng, cfg, sites, homes, pools, k == 0, band_azimuth, voxel_um)
            cut = _crack_cut(ref_shape, c, 1.0, osteon)
            if cut is None:
                redraws += 1
                continue
            region, _, comp = cut
            # openings at least 2 voxels apart (26-neighbourhood): distinct components
            if not (taken[region] & comp).any():
                taken[region] |= _dilate(comp, 2)
                cracks.append(c)
                break
            redraws += 1
    return {
        "cracks": cracks,
        "macro": _draw_macro(rng, cfg, ref_shape, voxel_um, band_point, band_normal),
        "band_normal": band_normal,
        "band_point": band_point,
        "band_half_width": half_width,
        "density_per_mm3": density,
        "n_poisson": n_poisson,
        "n_dropped": n_target - len(cracks),
        "n_redraws": redraws,
        "osteon": osteon,  # the specimen's array (a reference, not a copy)
    }


def _core(
    sites: np.ndarray, centre: np.ndarray, shape: np.ndarray, radial: float, axial: float
) -> np.ndarray:
    """Sites within ``radial`` of the lateral half-width of the axis and ``axial`` of the
    height of the centre."""
    r = np.hypot(sites[:, 1] - centre[1], sites[:, 2] - centre[2])
    return (r < radial * min(shape[1:]) / 2) & (np.abs(sites[:, 0] - centre[0]) < axial * shape[0])


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` grown by ``steps`` voxels in the 26-neighbourhood (within its box)."""
    out = mask.copy()
    for _ in range(steps):
        for axis in range(out.ndim):
            grown = out.copy()
            lead = [slice(None)] * out.ndim
            trail = [slice(None)] * out.ndim
            lead[axis], trail[axis] = slice(1, None), slice(None, -1)
            grown[tuple(lead)] |= out[tuple(trail)]
            grown[tuple(trail)] |= out[tuple(lead)]
            out = grown
    return out


def _draw_crack(
    rng: np.random.Generator,
    cfg: dict[str, Any],
    sites: np.ndarray,
    homes: np.ndarray,
    pools: dict[str, np.ndarray],
    first: bool,
    band_azimuth: float,
    voxel_um: float,
) -> dict[str, Any]:
    size = {k: float(v[0]) for k, v in draw_crack_sizes(rng, cfg, 1).items()}
    interstitial = bool(rng.random() < cfg["interstitial_share"])
    in_band = bool(rng.random() < cfg["in_band_share"])
    sign = float(rng.choice([-1.0, 1.0]))
    psi = band_azimuth + rng.normal(0.0, 0.5)
    waviness = float(rng.uniform(0.0, 1.0))
    phase = float(rng.uniform(0, 2 * np.pi))
    deflects = bool(rng.random() < cfg["deflection_share"])
    deflection_um = float(rng.uniform(*cfg["deflection_um"])) if deflects else 0.0

    region = (homes < 0) if interstitial else (homes >= 0)
    core = pools["core"] if first else np.ones(len(sites), dtype=bool)
    band = pools["band"] if in_band else ~pools["band"]
    near = pools["near"] if first else core
    # relax the wishes in turn when no lacuna fulfils them
    for pool in (region & band & core, region & core, region & near, core, near):
        if pool.any():
            break
    else:  # no lacuna near the centre: the one nearest to it
        pool = pools["central"]
    i = int(rng.choice(np.flatnonzero(pool)))
    site, home = sites[i], int(homes[i])

    half_length = size["length_um"] / 2.0 / voxel_um
    theta = np.deg2rad(size["angle_deg"]) * sign
    d1 = np.array([np.cos(theta), np.sin(theta) * np.cos(psi), np.sin(theta) * np.sin(psi)])
    # link a second lacuna of the same region that the crack plane can reach in the allowed
    # direction: the long axis then runs through both
    delta = sites - site
    dist = np.linalg.norm(delta, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ang = np.degrees(np.arccos(np.clip(np.abs(delta[:, 0]) / dist, 0.0, 1.0)))
    lo, hi = cfg["crack_angle_deg"]
    ok = (homes == home) & (dist > 0.5) & (dist <= 0.9 * half_length) & (ang >= lo) & (ang <= hi)
    linked = bool(ok.any())
    if linked:
        j = int(np.flatnonzero(ok)[np.argmin(dist[ok])])
        d1 = delta[j] / dist[j]
        if d1[0] < 0:
            d1 = -d1
        psi = float(np.arctan2(d1[2], d1[1]))
    d2 = np.array([0.0, -np.sin(psi), np.cos(psi)])
    return {
        "centre": site,
        "site": i,
        "home": home,
        "linked": linked,
        "d1": d1,
        "d2": d2,
        "half_length": half_length,
        "half_width": size["width_um"] / 2.0 / voxel_um,
        "aperture": size["aperture_um"] / voxel_um,
        "waviness": waviness,
        "phase": phase,
        "deflection": deflection_um / voxel_um,
        "length_um": size["length_um"],
        "width_um": size["width_um"],
        "aperture_um": size["aperture_um"],
        "angle_deg": float(np.degrees(np.arccos(min(abs(d1[0]), 1.0)))),
    }


def _draw_macro(
    rng: np.random.Generator,
    cfg: dict[str, Any],
    ref_shape: tuple[int, int, int],
    voxel_um: float,
    band_point: np.ndarray,
    band_normal: np.ndarray,
) -> dict[str, Any] | None:
    if rng.random() >= cfg["macro_crack_probability"]:
        return None
    return {
        "point": band_point,
        "normal": band_normal,
        "aperture": rng.uniform(*cfg["macro_aperture_um"]) / voxel_um,
        "roughness": smooth_field(rng, ref_shape[1:], sigma=20.0 / voxel_um) * (4.0 / voxel_um),
    }


def crack(
    occupancy: np.ndarray,
    failure: dict[str, Any],
    severity: float,
    osteon: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Open the damage of ``severity`` in [0, 1]: the damaged occupancy, the damage labels
    (uint8, reference frame: 0 none, 1 microcrack, 2 fracture) and the number of features.

    The first ``ceil(n x severity)`` microcracks open (at least one once severity > 0),
    grown about their nucleation site to ``sqrt(severity)`` of their extent and confined to
    their home osteon region; the macro crack opens at severity 1 only. Label 1: voxels that
    were bone (occupancy >= 0.5) where a microcrack removes >= half of it; label 2: the macro
    crack's gap voxels and the bone voxels within one voxel of its faces. Labels grow with
    severity (those of a lower severity are a subset of the labelled voxels of a higher one).
    ``osteon``: the specimen's osteon volume (default: the one ``draw_failure`` kept).
    """
    osteon = failure["osteon"] if osteon is None else osteon
    out = occupancy.copy()
    ids = _open_cracks(out, failure, severity, osteon)
    bone = occupancy >= 0.5
    labels = ((ids > 0) & bone).astype(np.uint8)
    macro = failure["macro"] if severity >= 1.0 else None
    if macro is not None:
        gap = _carve_macro(out, macro)
        labels[ndimage.binary_dilation(gap, _FACES) & bone] = 2
    return out, labels, _n_open(len(failure["cracks"]), severity) + (macro is not None)


def crack_footprints(
    failure: dict[str, Any],
    shape: tuple[int, ...],
    severity: float,
    osteon: np.ndarray | None = None,
) -> np.ndarray:
    """Which microcrack opens each voxel by >= half (int16: crack index + 1, 0 none)."""
    osteon = failure["osteon"] if osteon is None else osteon
    return _open_cracks(np.ones(shape, dtype=np.float32), failure, severity, osteon)


def _n_open(n: int, severity: float) -> int:
    return min(n, int(np.ceil(n * severity - 1e-9))) if severity > 0 else 0


def _open_cracks(
    out: np.ndarray, failure: dict[str, Any], severity: float, osteon: np.ndarray
) -> np.ndarray:
    """Carve the open microcracks into ``out``; the crack id (index + 1) per voxel."""
    cracks = failure["cracks"]
    ids = np.zeros(out.shape, dtype=np.int16)
    growth = float(np.sqrt(max(severity, 0.0)))
    for k, c in enumerate(cracks[: _n_open(len(cracks), severity)]):
        found = _crack_cut(out.shape, c, growth, osteon)
        if found is None:
            continue
        region, cut, _ = found
        out[region] *= 1.0 - cut
        ids[region][cut >= 0.5] = k + 1
    return ids


def _crack_cut(
    shape: tuple[int, ...], c: dict[str, Any], growth: float, osteon: np.ndarray
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray] | None:
    """A microcrack grown to ``growth`` of its extent about its nucleation site: its box,
    the share of each voxel it opens, and its full-grown footprint (bool).

    A penny crack with an elliptical opening profile on a slightly wavy plane. It spreads
    from its site only through its home region (one osteon, or interstitial bone): the
    footprint is the connected part of the full-grown crack in that region that holds the
    site, so the crack stops at cement lines, and a smaller crack is part of a larger one.
    """
    a_full, b_full = c["half_length"], c["half_width"]
    d1, d2 = np.asarray(c["d1"]), np.asarray(c["d2"])
    normal = np.cross(d1, d2)
    thick = c["aperture"] / 2.0 + 2.0 * c["waviness"] + 1.0  # beyond: nothing opens
    # room for a deflection along a cement line beyond the crack's own extent
    reach = 3.0 + float(c.get("deflection", 0.0))
    half = np.sqrt((a_full * d1) ** 2 + (b_full * d2) ** 2 + (thick * normal) ** 2) + reach
    box = local_box(shape, c["centre"], half)
    if box is None:
        return None
    region, g = box
    size = tuple(s.stop - s.start for s in region)
    cut = np.zeros(size, dtype=np.float32)
    comp = np.zeros(size, dtype=bool)
    # work on the slab around the crack plane only
    pts = np.nonzero(np.abs(g[0] * normal[0] + g[1] * normal[1] + g[2] * normal[2]) <= thick)
    gz, gy, gx = g[0].ravel()[pts[0]], g[1].ravel()[pts[1]], g[2].ravel()[pts[2]]
    u = gz * d1[0] + gy * d1[1] + gx * d1[2]
    v = gz * d2[0] + gy * d2[1] + gx * d2[2]
    w = gz * normal[0] + gy * normal[1] + gx * normal[2]
    # a wavy plane through the site, fixed in space (the same at every growth)
    wave = np.sin(u / max(a_full, 1.0) * np.pi + c["phase"]) - np.sin(c["phase"])
    w = np.abs(w - c["waviness"] * wave)

    def opening(scale: float) -> np.ndarray:
        a, b = max(a_full * scale, 1e-3), max(b_full * scale, 1e-3)
        rho2 = (u / a) ** 2 + (v / b) ** 2
        gap = c["aperture"] * np.sqrt(np.clip(1.0 - rho2, 0.0, 1.0))
        return soft_inside(gap / 2.0 - w) * (rho2 < 1.0)

    full = opening(1.0)
    lo = np.array([s.start for s in region])
    home = osteon[tuple(p + o for p, o in zip(pts, lo, strict=True))] == c["home"]
    reach = (full > 0) & home
    if not reach.any():
        return region, cut, comp
    at = np.stack([p[reach] for p in pts], axis=1)
    a0, a1 = at.min(0), at.max(0) + 1
    sub = np.zeros(tuple(a1 - a0), dtype=bool)
    sub[tuple((at - a0).T)] = True
    parts, _ = ndimage.label(sub, _CUBE)
    nearest = at[np.argmin(((at + lo - np.asarray(c["centre"])) ** 2).sum(1))]
    comp[tuple(slice(x, y) for x, y in zip(a0, a1, strict=True))] = (
        parts == parts[tuple(nearest - a0)]
    )
    mine = comp[pts]
    value = full if growth >= 1.0 else opening(growth)
    cut[tuple(p[mine] for p in pts)] = value[mine]
    if c.get("deflection", 0.0) > 0:
        home_box = osteon[region] == c["home"]
        glide = _deflection(home_box, comp, pts, full > 0, c["deflection"])
        comp |= glide
        if growth < 1.0:  # only where the full-grown crack deflects too: nested
            grown = np.zeros(size, dtype=bool)
            grown[tuple(p[mine] for p in pts)] = value[mine] > 0
            glide &= _deflection(home_box, grown, pts, value > 0, c["deflection"] * growth)
        cut[glide] = np.maximum(cut[glide], min(1.0, c["aperture"]))
    return region, cut, comp


def _deflection(
    home: np.ndarray,
    crack: np.ndarray,
    pts: tuple[np.ndarray, ...],
    plane: np.ndarray,
    length: float,
) -> np.ndarray:
    """Where a crack deflected at its region's cement line runs along it (bool, box).

    ``crack``: its voxels in its home region (``home``); ``pts``/``plane``: the voxels of
    its full plane. Where that plane would cross out of the region next to the crack, the
    crack turns into the region's boundary shell (one voxel thick) and runs along it up to
    ``length`` voxels, on the side that stays connected to the crack.
    """
    across = np.zeros(home.shape, dtype=bool)
    across[tuple(p[plane] for p in pts)] = True
    contact = across & ~home & ndimage.binary_dilation(crack, _CUBE)
    if not contact.any() or length <= 0:
        return np.zeros(home.shape, dtype=bool)
    shell = home & ~ndimage.binary_erosion(home, _FACES, border_value=1)
    glide = shell & (ndimage.distance_transform_edt(~contact) <= length) & ~crack
    parts, _ = ndimage.label(glide | crack, _CUBE)
    touching = np.unique(parts[crack])
    return glide & np.isin(parts, touching[touching > 0])


def _carve_macro(occ: np.ndarray, macro: dict[str, Any]) -> np.ndarray:
    """Open the rough macro crack in ``occ``; its gap (voxels it opens by >= half)."""
    yy, xx = np.meshgrid(
        np.arange(occ.shape[1], dtype=np.float32),
        np.arange(occ.shape[2], dtype=np.float32),
        indexing="ij",
    )
    n, p = macro["normal"], macro["point"]
    gap = np.zeros(occ.shape, dtype=bool)
    for z in range(occ.shape[0]):
        w = (z - p[0]) * n[0] + (yy - p[1]) * n[1] + (xx - p[2]) * n[2] - macro["roughness"]
        cut = soft_inside(macro["aperture"] / 2.0 - np.abs(w))
        occ[z] *= 1.0 - cut
        gap[z] = cut >= 0.5
    return gap


def failure_meta(failure: dict[str, Any]) -> dict[str, Any]:
    """JSON-able summary of a drawn failure (for phantoms.json)."""
    cracks = failure["cracks"]

    def col(key: str) -> list[float]:
        return [round(float(c[key]), 3) for c in cracks]

    return {
        "n_cracks": len(cracks),
        "n_cracks_poisson": int(failure["n_poisson"]),
        "n_cracks_dropped": int(failure["n_dropped"]),
        "macro_crack": failure["macro"] is not None,
        "density_per_mm3": round(float(failure["density_per_mm3"]), 3),
        "crack_length_um": col("length_um"),
        "crack_width_um": col("width_um"),
        "crack_aperture_um": col("aperture_um"),
        "crack_angle_deg": col("angle_deg"),
        "crack_interstitial": [c["home"] < 0 for c in cracks],
        "crack_links_lacunae": [bool(c["linked"]) for c in cracks],
        "band_normal": [round(float(x), 6) for x in failure["band_normal"]],
        "band_half_width_vox": round(float(failure["band_half_width"]), 3),
    }
