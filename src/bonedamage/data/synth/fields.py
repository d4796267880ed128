"""Geometry shared by the phantoms: smooth random fields, id hashing, poses and mappings.

Every phantom is built once in a *reference* (unloaded, specimen) frame on a grid a
little larger than the scan, then sampled into each scan through a backward map
scan voxel -> specimen frame (rigid pose of the specimen in the scanner) -> reference
frame (the mechanical deformation of that load step). Both the damaged structure and
its undamaged comparison are sampled through maps built here, so the damage mask is the
exact difference of the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


def smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: float, coarse: int = 4
) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field of correlation length ``sigma`` voxels.

    Drawn on a grid ``coarse`` times sparser and interpolated up (cubic spline), which is
    far cheaper than filtering at full resolution and, being single-threaded scipy code,
    gives the same numbers on every machine.
    """
    coarse = max(1, min(coarse, int(sigma // 2) or 1))
    small = tuple(s // coarse + 4 for s in shape)
    noise = rng.standard_normal(small).astype(np.float64)
    noise = ndimage.gaussian_filter(noise, sigma / coarse, mode="wrap")
    noise -= noise.mean()
    noise /= noise.std() or 1.0
    if coarse == 1:
        field = noise[tuple(slice(0, s) for s in shape)]
    else:
        grids = np.meshgrid(
            *[np.arange(s) / coarse + 1.0 for s in shape], indexing="ij", sparse=True
        )
        coords = np.broadcast_arrays(*grids)
        field = ndimage.map_coordinates(noise, coords, order=3, mode="nearest")
    return np.ascontiguousarray(field, dtype=np.float32)


def hash_uniform(*ids: np.ndarray, salt: int = 0) -> np.ndarray:
    """Deterministic uniform [0, 1) value per tuple of integer ids (a splitmix64 mix).

    Gives every Voronoi face or edge its own random properties without storing a table.
    """
    h = np.full(np.broadcast(*ids).shape, np.uint64(salt * 0x9E3779B97F4A7C15 % 2**64))
    with np.errstate(over="ignore"):
        for arr in ids:
            h = h ^ (arr.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def soft_inside(signed_distance: np.ndarray) -> np.ndarray:
    """Partial-volume occupancy from a signed distance in voxels (positive inside)."""
    return np.clip(signed_distance + 0.5, 0.0, 1.0).astype(np.float32)


def local_box(
    shape: tuple[int, ...], centre: np.ndarray, half: np.ndarray | float
) -> tuple[tuple[slice, ...], list[np.ndarray]] | None:
    """The box ``centre +- half`` clipped to ``shape``: its slices and sparse grids of
    coordinates relative to ``centre`` (``None`` when the box misses the volume).

    Small features (lacunae, cracks, fractures) are drawn only inside such boxes.
    """
    centre = np.asarray(centre, dtype=np.float64)
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    grids = np.meshgrid(
        *[np.arange(a, b, dtype=np.float32) - c for a, b, c in zip(lo, hi, centre, strict=True)],
        indexing="ij",
        sparse=True,
    )
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), grids


def rotation_matrix(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """Rotation about (z, y, x) axes, in degrees, composed z then y then x; (z, y, x) order."""
    az, ay, ax = np.deg2rad(angles_deg)
    rz = np.array([[1, 0, 0], [0, np.cos(az), -np.sin(az)], [0, np.sin(az), np.cos(az)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rx = np.array([[np.cos(ax), -np.sin(ax), 0], [np.sin(ax), np.cos(ax), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Pose:
    """Rigid placement of the specimen in the scanner: rotation (deg) and shift (voxels)."""

    angles_deg: tuple[float, float, float]
    shift_vox: tuple[float, float, float]

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        max_shift_vox: float,
        max_tilt_deg: float,
        max_spin_deg: float,
    ) -> Pose:
        spin = rng.uniform(-max_spin_deg, max_spin_deg)
        tilt = rng.uniform(-max_tilt_deg, max_tilt_deg, size=2)
        shift = rng.uniform(-max_shift_vox, max_shift_vox, size=3)
        return cls(
            (float(spin), float(tilt[0]), float(tilt[1])),
            (float(shift[0]), float(shift[1]), float(shift[2])),
        )

    def as_dict(self) -> dict[str, list[float]]:
        return {
            "angles_deg": [round(a, 6) for a in self.angles_deg],
            "shift_vox": [round(s, 6) for s in self.shift_vox],
        }


def scan_to_specimen(shape: tuple[int, int, int], pose: Pose) -> np.ndarray:
    """Specimen-frame coordinates (3, z, y, x), centred, of every voxel of a scan.

    The scanner's rotation axis is the scan's z axis through the slice centre; spin is a
    rotation about it, tilt about the two in-plane axes.
    """
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    grids = np.meshgrid(
        *[np.arange(s, dtype=np.float64) - c for s, c in zip(shape, centre, strict=True)],
        indexing="ij",
        sparse=True,
    )
    rot = rotation_matrix(pose.angles_deg)
    shift = np.asarray(pose.shift_vox)
    # specimen = R^T (scan - shift)
    coords = np.empty((3, *shape), dtype=np.float32)
    for i in range(3):
        acc = np.zeros(shape, dtype=np.float64)
        for j in range(3):
            acc = acc + rot[j, i] * (grids[j] - shift[j])
        coords[i] = acc
    return coords


def sample(
    field: np.ndarray,
    coords_ref: np.ndarray,
    origin: np.ndarray,
    order: int = 1,
    cval: float | None = None,
) -> np.ndarray:
    """Sample a reference-grid ``field`` at centred reference coordinates (3, ...).

    ``origin`` is the reference-grid index of the centred coordinate (0, 0, 0).
    """
    idx = coords_ref + origin.reshape(3, *([1] * (coords_ref.ndim - 1))).astype(np.float32)
    mode = "nearest" if cval is None else "constant"
    out = ndimage.map_coordinates(
        field, idx, order=order, mode=mode, cval=cval or 0.0, prefilter=False
    )
    return out.astype(field.dtype, copy=False)


def specimen_to_scan(points: np.ndarray, shape: tuple[int, int, int], pose: Pose) -> np.ndarray:
    """Scan voxel indices ``(n, 3)`` of centred specimen points ``(n, 3)``: the inverse of
    :func:`scan_to_specimen`."""
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    rot = rotation_matrix(pose.angles_deg)
    return np.asarray(points, dtype=np.float64) @ rot.T + np.asarray(pose.shift_vox) + centre


@dataclass(frozen=True)
class AxialDeformation:
    """Backward map of uniaxial compression along z, optionally with a collapse band.

    The band spans ``[b0, b1]`` in the reference frame and is compacted by strain ``band``
    about its mid-plane (which stays put); outside it the strain is ``elastic``. All
    strains are compressive and positive. ``buckle`` adds a lateral displacement
    (2, y, x) voxels scaled by ``sin(pi*s)`` across the deformed band (s from 0 to 1): the
    band's smooth sideways flow (the struts' own buckling is drawn per strut).
    """

    elastic: float
    band: float = 0.0
    b0: float = 0.0
    b1: float = 0.0
    buckle: np.ndarray | None = None

    @property
    def band_deformed(self) -> tuple[float, float]:
        """Lower and upper edge of the band in the deformed frame."""
        mid, half = (self.b0 + self.b1) / 2.0, (self.b1 - self.b0) / 2.0
        return mid - half * (1.0 - self.band), mid + half * (1.0 - self.band)

    def _in_band_strain(self) -> float:
        return self.band

    def inverse_z(self, z: np.ndarray) -> np.ndarray:
        """Reference z for deformed z."""
        mid = (self.b0 + self.b1) / 2.0
        lo, hi = self.band_deformed
        below = self.b0 + (z - lo) / (1.0 - self.elastic)
        inside = mid + (z - mid) / (1.0 - self._in_band_strain())
        above = self.b1 + (z - hi) / (1.0 - self.elastic)
        return np.where(z < lo, below, np.where(z <= hi, inside, above))

    def forward_z(self, z: np.ndarray) -> np.ndarray:
        """Deformed z for reference z (the inverse of :meth:`inverse_z`)."""
        if self.band <= 0:
            return z * (1.0 - self.elastic)
        mid = (self.b0 + self.b1) / 2.0
        lo, hi = self.band_deformed
        below = lo + (z - self.b0) * (1.0 - self.elastic)
        inside = mid + (z - mid) * (1.0 - self._in_band_strain())
        above = hi + (z - self.b1) * (1.0 - self.elastic)
        return np.where(z < self.b0, below, np.where(z <= self.b1, inside, above))

    def forward(self, points: np.ndarray) -> np.ndarray:
        """Deformed specimen coordinates of reference points ``(n, 3)`` (centred).

        Inverts :meth:`apply`: z exactly, the lateral buckle by fixed-point iteration.
        """
        points = np.asarray(points, dtype=np.float64)
        out = points.copy()
        out[:, 0] = self.forward_z(points[:, 0])
        if self.buckle is None or self.band <= 0:
            return out
        for _ in range(3):
            back = self.apply(out.T.astype(np.float32)).T
            out[:, 1:] += points[:, 1:] - back[:, 1:]
        return out

    def without_damage(self) -> AxialDeformation:
        """Comparison map: identical outside the band, only elastic strain inside it."""
        return _UndamagedBand(self.elastic, self.band, self.b0, self.b1, None)

    def apply(self, coords: np.ndarray) -> np.ndarray:
        """Reference coordinates for deformed specimen coordinates (3, ...)."""
        out = np.empty_like(coords)
        out[0] = self.inverse_z(coords[0])
        out[1:] = coords[1:]
        if self.buckle is not None and self.band > 0:
            lo, hi = self.band_deformed
            s = np.clip((coords[0] - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
            weight = np.sin(np.pi * s).astype(np.float32)
            for axis in (1, 2):
                out[axis] -= weight * _lateral(self.buckle[axis - 1], coords[1], coords[2])
        return out


class _UndamagedBand(AxialDeformation):
    """Same as the damaged map outside the band; inside, elastic strain about the mid-plane."""

    def _in_band_strain(self) -> float:
        return self.elastic


def _lateral(field2d: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sample a centred 2D field (y, x) at centred coordinates (bilinear, edge-clamped)."""
    origin = (np.asarray(field2d.shape, dtype=np.float32) - 1.0) / 2.0
    idx = np.stack(np.broadcast_arrays(y + origin[0], x + origin[1]))
    return ndimage.map_coordinates(field2d, idx, order=1, mode="nearest").astype(np.float32)
