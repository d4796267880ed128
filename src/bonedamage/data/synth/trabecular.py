"""Bovine trabecular bone phantom: a plate-and-rod Voronoi network and its collapse band.

Structure. Seeds on a jittered lattice define the cells (the marrow spaces) of an
isotropic Voronoi foam, which is then stretched along the load axis z by the specimen's
anisotropy (volume kept): the cells, their faces and edges are affine images of the foam's,
so the structure's degree of anisotropy follows the stretch (a Voronoi partition of
stretched seeds would not: it stays nearly isotropic). Bone sits on the cell boundaries,
at real-grid distances from the stretched faces and edges: a share of the faces are
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
- Degree of anisotropy (MIL) about 1.3-2.0 (Perilli et al. 2007; Nazarian et al. 2006):
  the stretch of the cells, ``anisotropy``, gives about as much (measured: docs/phantoms.md).
- Rod/plate description: Stauber & Müller, Bone 38 (2006) 475; Liu et al., J Bone Miner
  Res 23 (2008) 223 (individual trabecula segmentation).

Failure (compression along z past the apparent yield strain). Trabecular bone fails
locally: a collapse band forms where trabeculae buckle and fracture and the band
compacts, while the rest carries small elastic strain (Nazarian & Müller 2004; Thurner
et al., Bone 39 (2006) 289; Palanca et al., J Mech Behav Biomed Mater 2017). The band's
bone follows a compaction map (high strain inside, elastic ~0.5 % outside); its rods
(Voronoi edges, segmented one by one) respond to the strain along their axis:

- Euler buckling selects them: a rod of radius r and length L between its nodes buckles
  when its axial strain exceeds ``pi^2 r^2 / (4 (K L)^2)`` (effective-length factor K);
  slender rods aligned with the load buckle first (Gibson & Ashby, Cellular Solids, 1997,
  ch. 11; Bayraktar et al., J Biomech 37 (2004) 27 for tissue strains).
- A buckled rod keeps its bone: its two parts keep their lengths and turn rigidly about
  its nodes (which follow the compaction), bowing out at a hinge near mid-length.
- It breaks, once, at the hinge when its bending strain reaches the tissue's strain at
  fracture: the fragments stay rigid, the upper one slipped across the strut and pushed
  into the lower one, so they pack instead of vanishing.

- Every other piece of bone (each rod and each plate) keeps its shape and moves rigidly
  with the compaction at its centroid, so pieces come closer and pack.

Bone is conserved (but where pieces overlap), so BV/TV inside the band rises with its
compaction. Damage labels (:mod:`bonedamage.data.labels`): 2 at fracture surfaces, 3 on
buckled rods; plates and rods that only moved are not damage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from bonedamage.data.labels import BUCKLED as LABEL_BUCKLED
from bonedamage.data.labels import FRACTURE as LABEL_FRACTURE
from bonedamage.data.moments import label_moments
from bonedamage.data.synth.fields import (
    AxialDeformation,
    hash_uniform,
    smooth_field,
    soft_inside,
)

_CHUNK_SLICES = 8


@dataclass
class TrabecularSpecimen:
    """Reference-frame structure of one trabecular specimen and its drawn parameters."""

    occupancy: np.ndarray  # bone volume fraction per voxel, float32 in [0, 1]
    mineral: np.ndarray  # relative tissue attenuation of bone (~1), float32
    strut: np.ndarray  # rod (strut) id per voxel, -1 where no rod outweighs the plates
    struts: dict[str, np.ndarray]  # per strut: centroid, axis, length, radius, lo, hi
    piece: np.ndarray  # piece id per bone voxel (struts first, then plates), -1 elsewhere
    piece_centroid: np.ndarray  # (n_pieces, 3) reference-grid centroids
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
    stretch = np.array([aniso ** (2 / 3), aniso ** (-1 / 3), aniso ** (-1 / 3)])
    seeds = _jittered_lattice(rng, ref_shape / stretch, spacing)
    tree = cKDTree(seeds)
    plate_t = np.array(params["plate_thickness_um"]) / voxel_um
    rod_r = np.array(params["rod_diameter_um"]) / voxel_um / 2.0
    holes = smooth_field(rng, ref_shape, sigma=max(spacing / 5.0, 2.0))
    hole_thr = float(np.quantile(holes[::4, ::4, ::4], 1.0 - params["perforation"]))
    plate = np.empty(ref_shape, dtype=np.float32)
    rod = np.empty(ref_shape, dtype=np.float32)
    edge = np.empty(ref_shape, dtype=np.int64)
    face = np.empty(ref_shape, dtype=np.int64)
    yy, xx = np.meshgrid(np.arange(ref_shape[1]), np.arange(ref_shape[2]), indexing="ij")
    for z0 in range(0, ref_shape[0], _CHUNK_SLICES):
        z1 = min(z0 + _CHUNK_SLICES, ref_shape[0])
        zz = np.arange(z0, z1, dtype=np.float64)[:, None, None]
        pts = np.stack(np.broadcast_arrays(zz, yy[None], xx[None]), axis=-1).reshape(-1, 3)
        parts = _occupancy(
            tree,
            seeds,
            stretch,
            pts,
            params,
            plate_t,
            rod_r,
            holes[z0:z1].reshape(-1) > hole_thr,
        )
        for out, part in zip((plate, rod, edge, face), parts, strict=True):
            out[z0:z1] = part.reshape(z1 - z0, *ref_shape[1:])
    strut, struts = _segment_struts(plate, rod, edge)
    piece, piece_centroid = _pieces(plate, rod, strut, face)
    mineral = 1.0 + params["mineral_variation"] * smooth_field(rng, ref_shape, sigma=6.0)
    meta = dict(
        params,
        n_seeds=len(seeds),
        n_struts=len(struts["length"]),
        lattice_step_vox=[round(float(spacing * s), 4) for s in stretch],
    )
    return TrabecularSpecimen(
        np.maximum(plate, rod),
        mineral.astype(np.float32),
        strut,
        struts,
        piece,
        piece_centroid,
        meta,
    )


def _jittered_lattice(rng: np.random.Generator, shape: np.ndarray, step: float) -> np.ndarray:
    counts = [int(np.ceil(s / step)) + 3 for s in shape]
    grid = np.stack(np.meshgrid(*[np.arange(c) for c in counts], indexing="ij"), axis=-1)
    grid = grid.reshape(-1, 3).astype(np.float64) - 1.0
    jitter = rng.uniform(-0.45, 0.45, size=grid.shape)
    return (grid + 0.5 + jitter) * step


def _occupancy(
    tree: cKDTree,
    seeds: np.ndarray,
    stretch: np.ndarray,
    pts: np.ndarray,
    params: dict[str, Any],
    plate_t: np.ndarray,
    rod_r: np.ndarray,
    in_hole: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Plate and rod occupancy of ``pts`` and the Voronoi edge (rod) and face (plate) each
    point is nearest.

    The cells are those of an isotropic Voronoi foam (``seeds``, in a space shrunk by
    ``stretch``) stretched along z: distances to a face are taken back to the real grid.
    """
    pts = pts / stretch
    dist, idx = tree.query(pts, k=3)
    i1, i2, i3 = idx[:, 0], idx[:, 1], idx[:, 2]
    s1, s2, s3 = seeds[i1], seeds[i2], seeds[i3]
    # the bisector of s1 and s2 (normal s2 - s1 in the shrunk space) has normal
    # (s2 - s1) / stretch on the real grid, and this real distance from a point
    normal12 = (s2 - s1) / stretch
    g12 = np.linalg.norm(normal12, axis=1)
    g13 = np.linalg.norm((s3 - s1) / stretch, axis=1)
    d_face = (dist[:, 1] ** 2 - dist[:, 0] ** 2) / (2.0 * g12)
    d_face13 = (dist[:, 2] ** 2 - dist[:, 0] ** 2) / (2.0 * g13)
    d_edge = np.hypot(d_face, d_face13)

    lo, hi = np.minimum(i1, i2), np.maximum(i1, i2)
    vertical_plate = 1.0 - np.abs(normal12[:, 0] / g12)  # 1 when the face contains z
    p_plate = np.clip(params["plate_fraction"] * (0.4 + 1.2 * vertical_plate), 0.0, 1.0)
    is_plate = hash_uniform(lo, hi, salt=1) < p_plate
    t_plate = plate_t[0] + (plate_t[1] - plate_t[0]) * hash_uniform(lo, hi, salt=2)
    plate = soft_inside(t_plate / 2.0 - d_face) * (is_plate & ~in_hole)

    e = np.sort(idx, axis=1)
    edge_dir = np.cross(s2 - s1, s3 - s1) * stretch
    vertical_rod = np.abs(edge_dir[:, 0]) / np.maximum(np.linalg.norm(edge_dir, axis=1), 1e-9)
    r = rod_r[0] + (rod_r[1] - rod_r[0]) * hash_uniform(e[:, 0], e[:, 1], e[:, 2], salt=3)
    r = r * (0.75 + 0.5 * vertical_rod)
    rod = soft_inside(r - d_edge)
    n = np.int64(len(seeds))
    return plate, rod, (e[:, 0] * n + e[:, 1]) * n + e[:, 2], lo * n + hi


def _pieces(
    plate: np.ndarray, rod: np.ndarray, strut: np.ndarray, face: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Split the bone into pieces that move rigidly: each strut, and each plate (Voronoi
    face) outside the struts. Returns the piece id per voxel and the pieces' centroids."""
    n_struts = int(strut.max()) + 1
    piece = strut.copy()
    in_plate = (strut < 0) & (plate > 0)
    _, inverse = np.unique(face[in_plate], return_inverse=True)
    piece[in_plate] = n_struts + inverse.astype(np.int32)
    bone = piece >= 0
    ids = piece[bone]
    w = np.maximum(plate, rod)[bone].astype(np.float64)
    n = int(ids.max()) + 1 if ids.size else 0
    _, centroid, _ = label_moments(ids, np.nonzero(bone), w, n)
    return piece, centroid


def _segment_struts(
    plate: np.ndarray, rod: np.ndarray, edge: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Label each rod (a Voronoi edge) and measure it: centroid, axis, length, radius.

    A voxel belongs to a strut where the rod has bone and outweighs any plate there (its
    partial-volume rim included). The axis is the principal direction of the strut's
    voxels (pointing up the load axis), its length ``sqrt(12 var)`` along it (a uniform
    rod), its radius ``sqrt(V / (pi L))``.
    """
    own = (rod > 0) & (rod >= plate)
    keys, inverse = np.unique(edge[own], return_inverse=True)
    strut = np.full(rod.shape, -1, dtype=np.int32)
    strut[own] = inverse.astype(np.int32)
    n = len(keys)
    coords = [c.astype(np.float64) for c in np.nonzero(own)]
    volume, centroid, cov = label_moments(inverse, coords, rod[own].astype(np.float64), n)
    values, vectors = np.linalg.eigh(cov)
    axis = vectors[:, :, -1] * np.where(vectors[:, 0, -1] < 0, -1.0, 1.0)[:, None]
    length = np.sqrt(12.0 * np.maximum(values[:, -1], 0.0))
    radius = np.sqrt(volume / (np.pi * np.maximum(length, 1.0)))
    ids = np.arange(1, n + 1)
    lo = np.stack([ndimage.minimum(c, inverse + 1, ids) for c in coords], axis=1)
    hi = np.stack([ndimage.maximum(c, inverse + 1, ids) for c in coords], axis=1)
    return strut, {
        "centroid": centroid,
        "axis": axis,
        "length": length,
        "radius": radius,
        "lo": np.asarray(lo, dtype=np.int64),
        "hi": np.asarray(hi, dtype=np.int64),
    }


def draw_failure(
    rng: np.random.Generator,
    cfg: dict[str, Any],
    scan_z: int,
    voxel_um: float,
    lateral_shape: tuple[int, int],
) -> dict[str, Any]:
    """Collapse-band geometry of a specimen at failure (centred scan coordinates, voxels)."""
    height_frac = float(rng.uniform(*cfg["band_height_frac"]))
    band = float(rng.uniform(*cfg["band_strain"]))
    centre = float(rng.uniform(-cfg["band_centre_jitter_frac"], cfg["band_centre_jitter_frac"]))
    mid = centre * scan_z
    ref_half = height_frac * scan_z / 2.0 / (1.0 - band)
    amp = float(rng.uniform(*cfg["lateral_flow_um"])) / voxel_um
    buckle = (
        np.stack(
            [
                smooth_field(rng, lateral_shape, sigma=cfg["lateral_flow_length_um"] / voxel_um)
                for _ in range(2)
            ]
        )
        * amp
    )
    return {
        "band_height_frac": height_frac,
        "band_strain": band,
        "b0": mid - ref_half,
        "b1": mid + ref_half,
        "buckle": buckle.astype(np.float32),
        "buckle_amplitude_vox": amp,
        "fracture_seed": int(rng.integers(2**31)),
    }


def band_strain(failure: dict[str, Any], severity: float, elastic: float) -> float:
    """Compaction strain of the band at a damage ``severity``: the failure's at 1."""
    return elastic + (failure["band_strain"] - elastic) * severity


def deformation(failure: dict[str, Any], severity: float, elastic: float) -> AxialDeformation:
    """Backward map at a damage ``severity`` in [0, 1] (0: elastic only)."""
    if severity <= 0:
        return AxialDeformation(elastic=elastic)
    return AxialDeformation(
        elastic=elastic,
        band=band_strain(failure, severity, elastic),
        b0=failure["b0"],
        b1=failure["b1"],
        buckle=failure["buckle"] * severity,
    )


def strut_mechanics(
    spec: TrabecularSpecimen,
    failure: dict[str, Any],
    cfg: dict[str, Any],
    severity: float,
    origin: np.ndarray,
    elastic: float,
) -> dict[str, np.ndarray]:
    """Which struts of the band buckle or break at ``severity``.

    A strut takes the band's compaction projected on its axis, ``eps = eps_band cos^2
    theta``. It buckles when that exceeds the Euler critical strain of a round column,
    ``eps_cr = pi^2 r^2 / (4 (K L)^2)``: slender struts aligned with the load go first.
    Bowing by ``eps - eps_cr`` of its length bends it to a surface strain about
    ``(2 pi r / L) sqrt(eps - eps_cr)``; where that reaches the tissue's strain at fracture
    it breaks at its hinge. Every strain grows with severity, so a strut once buckled or
    broken stays so at every later load step.
    """
    s = spec.struts
    eps_band = band_strain(failure, severity, elastic) if severity > 0 else 0.0
    length = np.maximum(s["length"], 1e-6)
    z_ref = s["centroid"][:, 0] - origin[0]
    half = np.abs(s["axis"][:, 0]) * length / 2.0 + s["radius"]
    in_band = (z_ref - half >= failure["b0"]) & (z_ref + half <= failure["b1"])  # all of it
    eps = eps_band * s["axis"][:, 0] ** 2 * in_band
    eps_cr = (np.pi * s["radius"]) ** 2 / (4.0 * (cfg["effective_length_factor"] * length) ** 2)
    excess = np.maximum(eps - eps_cr, 0.0)
    # no column: stubs, slivers, and struts cut by the grid's edge (unknown length)
    inner = np.all((s["lo"] > 0) & (s["hi"] < np.asarray(spec.occupancy.shape) - 1), axis=1)
    column = (length >= 3.0 * s["radius"]) & (s["radius"] >= 1.0) & inner
    buckled = (excess > 0) & column
    bending = 2.0 * np.pi * s["radius"] / length * np.sqrt(excess)
    return {
        "strain": eps,
        "buckled": buckled,
        "broken": buckled & (bending >= cfg["bending_strain_at_fracture"]),
    }


def collapse(
    spec: TrabecularSpecimen,
    mech: dict[str, np.ndarray],
    deform: AxialDeformation,
    origin: np.ndarray,
) -> np.ndarray:
    """The band's bone, compacted: every piece moved rigidly (deformed specimen frame).

    Each strut and plate keeps its shape and follows the compaction map at its centroid
    (whole voxels), so pieces come closer and pack where the band compacts instead of
    being squeezed; bone is conserved but where pieces overlap. The buckled struts are
    left out (:func:`strut_moves` places them). Returned on the reference grid, indexed
    like it (``origin`` is the grid index of the centred coordinate 0).
    """
    centred = spec.piece_centroid - origin
    shift = np.rint(deform.forward(centred) - centred).astype(np.int64)
    shift[np.flatnonzero(mech["buckled"])] = np.iinfo(np.int32).max  # dropped below
    bone = spec.piece >= 0
    where = np.nonzero(bone)
    moved = np.stack(where, axis=1) + shift[spec.piece[bone]]
    keep = np.all((moved >= 0) & (moved < np.asarray(spec.occupancy.shape)), axis=1)
    out = np.zeros(spec.occupancy.shape, dtype=np.float32)
    target = tuple(moved[keep].T)
    np.maximum.at(out, target, spec.occupancy[bone][keep])
    return out


def strut_moves(
    spec: TrabecularSpecimen,
    failure: dict[str, Any],
    cfg: dict[str, Any],
    mech: dict[str, np.ndarray],
    deform: AxialDeformation,
    origin: np.ndarray,
) -> list[dict[str, Any]]:
    """Rigid placement of each part of every buckled strut in the deformed specimen.

    The strut's ends stay on its nodes, which follow the band's compaction. Its two parts
    (split at a hinge near mid-length) keep their lengths and turn rigidly about the nodes
    to meet at the hinge, which bows sideways; a broken strut's upper part ends slipped
    across the strut and pushed into the lower part (the fragments pack).
    """
    s = spec.struts
    rng = np.random.default_rng(failure["fracture_seed"])
    n = len(s["length"])
    hinge = 0.5 + rng.uniform(-1.0, 1.0, n) * cfg["hinge_jitter"]
    azimuth = rng.uniform(0.0, 2.0 * np.pi, (n, 2))
    slip = rng.uniform(*cfg["fracture_slip_frac"], n)
    pack = rng.uniform(*cfg["fracture_overlap_frac"], n)
    moves = []
    for k in np.flatnonzero(mech["buckled"]):
        a, length, radius = s["axis"][k], s["length"][k], s["radius"][k]
        p0 = s["centroid"][k] - origin - a * length / 2.0
        p1 = s["centroid"][k] - origin + a * length / 2.0
        q0, q1 = deform.forward(np.stack([p0, p1]))
        chord = np.linalg.norm(q1 - q0)
        if chord >= length * 0.999:
            continue
        axis = (q1 - q0) / chord
        side = _perpendicular(axis, azimuth[k, 0])
        lo_len, hi_len = hinge[k] * length, (1.0 - hinge[k]) * length
        along = (chord**2 + lo_len**2 - hi_len**2) / (2.0 * chord)
        h = q0 + along * axis + np.sqrt(max(lo_len**2 - along**2, 0.0)) * side
        end = h
        if mech["broken"][k]:
            u0 = (h - q0) / lo_len
            shift = slip[k] * 2.0 * radius * _perpendicular(u0, azimuth[k, 1])
            end = h + shift - pack[k] * 2.0 * radius * u0
        u1 = (end - q1) / max(np.linalg.norm(end - q1), 1e-9)
        moves.append(
            {
                "strut": int(k),
                "broken": bool(mech["broken"][k]),
                "hinge": float(hinge[k]),
                "radius": float(radius),
                "length": float(length),
                "ref_axis": a,
                "parts": [  # (t range, reference pivot, deformed pivot, rotation, far end)
                    ((0.0, hinge[k]), p0, q0, _rotation_between(a, (h - q0) / lo_len), h),
                    ((hinge[k], 1.0), p1, q1, _rotation_between(-a, u1), q1 + u1 * hi_len),
                ],
            }
        )
    return moves


def render_moves(
    spec: TrabecularSpecimen,
    moves: list[dict[str, Any]],
    spec_coords: np.ndarray,
    pose_to_scan: Callable[[np.ndarray], np.ndarray],
    origin: np.ndarray,
    surface_vox: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Bone and labels of the moved struts on the scan grid.

    ``spec_coords`` holds the deformed-specimen coordinates of every scan voxel and
    ``pose_to_scan`` maps specimen points to scan indices (to find each part's box). Bone
    within ``surface_vox`` of a fracture is labelled fracture (2), the rest of a buckled
    strut buckled bone (3).
    """
    shape = spec_coords.shape[1:]
    bone = np.zeros(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    for move in moves:
        k, radius = move["strut"], move["radius"]
        start = move["parts"][0][1]  # the lower part pivots about the rod's lower end
        lo = np.maximum(spec.struts["lo"][k] - 1, 0)
        hi = np.minimum(spec.struts["hi"][k] + 2, spec.occupancy.shape)
        crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        strut = np.where(spec.strut[crop] == k, spec.occupancy[crop], 0.0).astype(np.float32)
        for (t0, t1), pivot_ref, pivot_def, rot, far in move["parts"]:
            reach = far - pivot_def
            ends = np.stack([pivot_def - 0.25 * reach, far + 0.25 * reach])
            corners = np.concatenate([ends - 2.0 * radius - 3.0, ends + 2.0 * radius + 3.0])
            idx = pose_to_scan(corners)
            box_lo = np.maximum(np.floor(idx.min(axis=0)).astype(int), 0)
            box_hi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 1, shape)
            if np.any(box_hi <= box_lo):
                continue
            box = tuple(slice(a, b) for a, b in zip(box_lo, box_hi, strict=True))
            y = spec_coords[(slice(None), *box)].reshape(3, -1).astype(np.float64)
            x = pivot_ref[:, None] + rot.T @ (y - pivot_def[:, None])  # centred reference
            t = (move["ref_axis"] @ (x - start[:, None])) / move["length"]
            keep = t < t1 if t0 == 0.0 else t >= t0  # the rod's rim beyond its ends included
            grid = x + origin[:, None] - lo[:, None]
            part = ndimage.map_coordinates(strut, grid, order=1, cval=0.0, prefilter=False)
            part = np.where(keep, part, 0.0).reshape(tuple(box_hi - box_lo))
            near = (np.abs(t - move["hinge"]) * move["length"] <= surface_vox).reshape(part.shape)
            kind = np.where(near & move["broken"], LABEL_FRACTURE, LABEL_BUCKLED).astype(np.uint8)
            bone[box] = np.maximum(bone[box], part)
            labels[box] = np.where(part >= 0.5, np.maximum(labels[box], kind), labels[box])
    return bone, labels


def _perpendicular(axis: np.ndarray, azimuth: float) -> np.ndarray:
    """The unit vector perpendicular to ``axis`` at ``azimuth`` (radians) about it."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(axis, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    return np.cos(azimuth) * e1 + np.sin(azimuth) * e2


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The rotation matrix turning unit vector ``a`` onto unit vector ``b`` (Rodrigues)."""
    b = b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(a @ b)
    if c < -0.999999:  # half a turn about any axis perpendicular to a
        n = _perpendicular(a, 0.0)
        return 2.0 * np.outer(n, n) - np.eye(3)
    vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)
