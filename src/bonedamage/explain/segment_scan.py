"""Whole-scan damage maps with a registered segmentation model: every plane, every voxel.

``bonedamage predict`` runs this for a :class:`~bonedamage.lifecycle.seg_pyfunc.TileSegmenter`
(a classifier goes to :func:`bonedamage.explain.scan.predict_scan`). The scan is read as
the classifier reads it (voxel size from the tags or given, the same refusals, the scan's
own robust intensity range), then streamed plane by plane along the normal of the model's
plane (its tiling's first: axial for cortical bone, coronal for trabecular), *every*
plane, with the 2.5-D context planes the model was trained with. Each plane is resampled
in-plane to the working voxel, normalised, segmented by overlapping tiles blended with a
Gaussian window (:func:`bonedamage.learn.tiled_inference.segment_plane`, ``overlap``) and
its class probabilities are resampled back to the scan's own pixels.

The applicability domain is the classifier's (:class:`~bonedamage.explain.scan.
DomainLimits`): a scan coarser than the working voxel by more than ``max_voxel_ratio`` is
refused (``allow_resample``: mapped anyway, *uncertain*); the grid tiles of every
``slice_stride``-th plane (the tiles training cut, the same filters) get a domain distance
and an in-domain flag, and a scan with more than ``max_out_of_domain_share`` of them
outside gets the verdict *uncertain* (otherwise *mapped*), with the reasons.

Outputs (in ``out``, replaced atomically):

- ``damage_probability.tif``: P(any damage) = 1 - P(background) of every voxel, uint8 in
  percent (0-100: a quarter of float32's bytes, and 1 % steps are finer than the maps are
  certain);
- ``labels.tif``: uint8 label values of :mod:`bonedamage.data.labels` (0 none,
  1 microcrack, 2 fracture, 3 buckled), the most probable class of each voxel;
- both (z, y, x) ImageJ stacks in the scan's own grid, spacing and pixel size the scan's
  voxel in their tags;
- ``morphometry.json`` / ``morphometry.csv`` (one row): the microdamage report of the label
  stack (:func:`measure_damage`); ``profile.csv``: per axial slice, bone and damaged voxels
  and the damaged fraction of bone along the load axis;
- ``tiles.csv``: the domain tiles (position, largest damage probability, domain distance,
  in-domain flag); ``verdict.json``: kind, classes, verdict and domain summary, the
  report's headline numbers;
- ``orthoviews.png``: the label stack coloured by kind, translucent over the scan, in three
  orthogonal sections through the scan's centre (:func:`damage_orthoviews_figure`).

Memory stays bounded whatever the scan's size: planes are read one at a time, tiles go
through the model in batches, the two stacks are built in memory-mapped files on disk
and written out page by page, and the report streams the label stack slice by slice.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from bonedamage.atomic import atomic_dir
from bonedamage.data import labels as kinds
from bonedamage.data.damage import components
from bonedamage.data.morphometry import fov_slice
from bonedamage.data.tilestore import normalize
from bonedamage.data.tiling import (
    PLANE_AXIS,
    Normalization,
    TileSettings,
    TilingError,
    fit_normalization,
    plane_reader,
    plane_tiles,
    plane_with_context,
    scan_scale,
)
from bonedamage.data.volume import VolumeReader, open_volume, write_volume
from bonedamage.explain.scan import (
    DomainLimits,
    PredictError,
    finite_plane,
    scan_voxel_size,
    settings_of,
)
from bonedamage.learn.segmentation import BACKGROUND, LABEL_VALUE
from bonedamage.learn.tiled_inference import segment_plane
from bonedamage.learn.tiled_inference import window_origins as forward_origins

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from bonedamage.lifecycle.seg_pyfunc import TileSegmenter

PLANE_NORMAL = {"axial": 0, "coronal": 1, "sagittal": 2}  # axis of (z, y, x) along the normal
MIN_COMPONENT_VOXELS = 8  # damage_measures' default: smaller specks have no shape
BONE_SMOOTH_VOX = 1.0  # Gaussian sigma before Otsu, as morphometry.segment_bone
_BINS = np.linspace(-0.5, 1.5, 1001)  # normalised grey values of the bone histogram
OUTPUTS = ("damage_probability.tif", "labels.tif", "morphometry.json", "morphometry.csv",
           "profile.csv", "tiles.csv", "verdict.json", "orthoviews.png")  # fmt: skip


def label_values(classes: list[str]) -> np.ndarray:
    """Label value (:mod:`bonedamage.data.labels`) of each of the model's classes, uint8."""
    unknown = [c for c in classes if c != BACKGROUND and c not in LABEL_VALUE]
    if unknown or not classes or classes[0] != BACKGROUND:
        raise PredictError(
            f"model classes {classes}: expected background first, then damage kinds of "
            f"{[n for v, n in kinds.NAMES.items() if v]}"
        )
    return np.array([0 if c == BACKGROUND else LABEL_VALUE[c] for c in classes], np.uint8)


def segment_scan(
    model: TileSegmenter,
    scan: Path,
    out: Path,
    *,
    voxel_size_um: float | None = None,
    model_uri: str = "",
    allow_resample: bool = False,
    overlap: float = 0.5,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    force: bool = False,
    min_component_voxels: int = MIN_COMPONENT_VOXELS,
) -> dict[str, Any]:
    """Map damage through a whole scan into ``out`` (replaced atomically); return the verdict.

    ``overlap`` in [0, 1) is the share of a tile its neighbours share (0.5: about 4x the
    tiles of a mosaic); ``batch_size`` tiles go through the model at once; ``device``
    ``auto`` takes CUDA when there is one; the report counts components of at least
    ``min_component_voxels``. Refusals as :func:`~bonedamage.explain.scan.
    predict_scan`'s (PredictError naming the scan); nothing is left in ``out`` on error.
    """
    if batch_size < 1:
        raise PredictError(f"batch_size {batch_size}: must be a positive number of tiles")
    if min_component_voxels < 1:
        raise PredictError(f"min_component_voxels {min_component_voxels}: must be at least 1")
    if not (math.isfinite(overlap) and 0 <= overlap < 1):
        raise PredictError(f"overlap {overlap}: must be in [0, 1) (share of a tile shared)")
    settings = settings_of(model.tiling)
    lut = label_values(model.classes)
    plane, size = settings.planes[0], settings.tile_px
    with open_volume(scan) as vol:
        voxel = scan_voxel_size(vol, scan, voxel_size_um)
        limits = DomainLimits.of(model)
        resampled = limits.check_voxel(scan, voxel, settings.working_voxel_um, allow_resample)
        scale = scan_scale(voxel, settings.working_voxel_um)
        norm = fit_normalization(vol, settings.percentiles, scale, str(scan))
        count, read_plane = plane_reader(vol, plane)
        context = settings.context_planes(voxel)
        recent: dict[int, np.ndarray] = {}  # the planes a 2.5-D stack still needs

        def read_once(j: int) -> np.ndarray:
            if j not in recent:
                recent[j] = read_plane(j)
                for old in [k for k in recent if k < j - 2 * context]:
                    del recent[old]
            return recent[j]

        def read(i: int) -> np.ndarray:
            return finite_plane(plane_with_context(read_once, count, i, context), scan, plane, i)

        estimate = _estimate(vol, plane, scale, size, overlap, count)
        limits.check_size(scan, estimate, force)
        try:  # the domain's tiles are the training grid: a plane must hold one
            plane_tiles(read(0), norm, settings)
        except TilingError as exc:
            raise TilingError(
                f"{scan}: {exc} ({plane} plane at the model's working voxel size "
                f"{settings.working_voxel_um} um; tile {settings.tile_um} um)"
            ) from exc
        net = model.module
        dev = _device(device)
        if dev != "cpu":  # the domain's forward passes stay on the CPU module
            net = copy.deepcopy(model.module).to(dev)
        with (
            atomic_dir(out, owner="predict", inputs=(scan,), force=force) as staging,
            tempfile.TemporaryDirectory(dir=staging) as scratch,
        ):
            shape = vol.shape
            prob = np.lib.format.open_memmap(Path(scratch) / "p.npy", "w+", np.uint8, shape)
            labels = np.lib.format.open_memmap(Path(scratch) / "l.npy", "w+", np.uint8, shape)
            domain = _DomainTiles(model, norm, plane, batch_size)
            bar = tqdm(total=count, desc=f"segment {scan.name}", disable=not progress)
            for i in range(count):
                raw = read(i)
                image = normalize(_to_working(raw, scale), norm.lo, norm.hi)
                probs = segment_plane(net, image, size, overlap, batch_size=batch_size, device=dev)
                probs = _to_scan(probs, raw.shape[-2:])
                where = [slice(None)] * 3
                where[PLANE_NORMAL[plane]] = i  # type: ignore[call-overload]
                damage = np.rint(100.0 * (1.0 - probs[0]))
                prob[tuple(where)] = np.clip(damage, 0, 100).astype(np.uint8)
                labels[tuple(where)] = lut[probs.argmax(axis=0)]
                if i % settings.slice_stride == 0:
                    domain.add(i, plane_tiles(raw, norm, settings))
                bar.update(1)
            bar.close()
            tiles = domain.table()
            if tiles.empty:
                raise PredictError(
                    f"{scan}: no tile passed the field-of-view and bone filters of the model"
                )
            verdict = _verdict(model, scan, model_uri, plane, voxel, settings, overlap, count)
            verdict.update(limits.judge(tiles, resampled), estimate=estimate)
            sections = DamageSections.empty(shape, voxel)
            report = measure_damage(vol, labels, norm, voxel, model.classes, sections, progress,
                                    min_component_voxels)  # fmt: skip
            report = {"scan": str(scan), "model": model_uri, **report}
            verdict.update(_headline(report))
            for name, stack in (("damage_probability", prob), ("labels", labels)):
                write_volume(staging / f"{name}.tif", (stack[z] for z in range(shape[0])),
                             shape, np.uint8, voxel_size_um=voxel)  # fmt: skip
            _write_report(staging, report, tiles, verdict)
            fig = damage_orthoviews_figure(sections, verdict, report)
            fig.savefig(staging / "orthoviews.png", format="png", metadata={"Software": None})
    return verdict


def _device(name: str) -> str:
    """``auto``: CUDA when available, else the CPU; any other name as given."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _estimate(
    vol: VolumeReader, plane: str, scale: float, size: int, overlap: float, count: int
) -> dict[str, int]:
    """Tile forwards and bytes of the two uint8 stacks, from the scan's shape alone."""
    axes = {"axial": (1, 2), "coronal": (0, 2), "sagittal": (0, 1)}[plane]
    h, w = (max(1, round(vol.shape[a] * scale)) for a in axes)
    voxels = int(np.prod(vol.shape))
    return {
        "tiles": count * len(forward_origins((h, w), size, overlap)),
        "output_bytes": 2 * voxels,
        "scan_bytes": voxels * np.dtype(vol.dtype).itemsize,
    }


def _zoom(image: np.ndarray, factor: float | tuple[float, float]) -> np.ndarray:
    """Linear resampling with the tile stage's conventions (``tiling.plane_tiles``)."""
    return ndimage.zoom(image, factor, order=1, mode="nearest", grid_mode=True)


def _to_working(raw: np.ndarray, scale: float) -> np.ndarray:
    """A plane (h, w) or 2.5-D stack (3, h, w) as (C, h', w') float32 at the working voxel."""
    planes = raw[None] if raw.ndim == 2 else raw
    if scale == 1.0:
        return planes.astype(np.float32)
    return np.stack([_zoom(p.astype(np.float32), scale) for p in planes])


def _to_scan(probs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Class probabilities (K, h', w') back at the scan's pixels (K, h, w); linear, so
    they still sum to 1."""
    if probs.shape[1:] == tuple(shape):
        return probs
    factor = (shape[0] / probs.shape[1], shape[1] / probs.shape[2])
    return np.stack([_zoom(p, factor) for p in probs])


@dataclass
class _DomainTiles:
    """The domain check: the grid tiles of the sampled planes, assessed in batches."""

    model: TileSegmenter
    norm: Normalization
    plane: str
    batch_size: int
    pending: list[tuple[int, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, index: int, cut: Any) -> None:
        self.pending.append((index, cut))
        if sum(int(c.keep.sum()) for _, c in self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        kept = [c.tiles[c.keep] for _, c in self.pending]
        if sum(len(k) for k in kept):
            prob, dist, inside = self.model.assess(np.concatenate(kept), self.norm.lo, self.norm.hi)
            k = 0
            for index, cut in self.pending:
                for r, c in zip(cut.rows[cut.keep], cut.cols[cut.keep], strict=True):
                    row = self._where(index, int(r), int(c))
                    row["max_prob_damage"] = round(float(prob[k]), 6)
                    if dist is not None and inside is not None:
                        row.update(domain_distance=round(float(dist[k]), 3),
                                   in_domain=int(inside[k]))  # fmt: skip
                    self.rows.append(row)
                    k += 1
        self.pending = []

    def _where(self, index: int, r: int, c: int) -> dict[str, Any]:
        """A tile's plane, origin in the resampled plane and voxel in the scan."""
        r0, c0 = round(r / self.norm.scale), round(c / self.norm.scale)
        z, y, x = {"axial": (index, r0, c0), "coronal": (r0, index, c0),
                   "sagittal": (r0, c0, index)}[self.plane]  # fmt: skip
        return {"plane": self.plane, "index": index, "r": r, "c": c, "z": z, "y": y, "x": x}

    def table(self) -> pd.DataFrame:
        self.flush()
        columns = ["plane", "index", "r", "c", "z", "y", "x", "max_prob_damage",
                   "domain_distance", "in_domain"]  # fmt: skip
        return pd.DataFrame(self.rows, columns=columns)


def _verdict(
    model: TileSegmenter,
    scan: Path,
    uri: str,
    plane: str,
    voxel: float,
    settings: TileSettings,
    overlap: float,
    count: int,
) -> dict[str, Any]:
    classes = model.classes
    return {
        "scan": str(scan),
        "model": uri,
        "kind": "segmentation",
        "tissue": model.tiling.get("tissue"),
        "classes": classes,
        "label_values": {c: int(v) for c, v in zip(classes, label_values(classes), strict=True)},
        "verdict": "mapped",
        "rule": "labels: the most probable class of each voxel; the maps are uncertain when "
        "the scan lies outside the model's domain",
        "plane": plane,
        "stack_axis": PLANE_AXIS[plane],
        "n_planes": count,
        "voxel_size_um": voxel,
        "working_voxel_um": settings.working_voxel_um,
        "tile_um": settings.tile_um,
        "tile_px": settings.tile_px,
        "overlap": overlap,
        "slice_stride": settings.slice_stride,  # of the domain check's planes
    }


# -- the microdamage report ---------------------------------------------------------------
@dataclass
class _Components:
    """26-connected components of one damage kind, streamed slice by slice along z.

    Each slice's 8-connected components (:func:`bonedamage.data.damage.components`) are
    nodes with their coordinate moments. Two consecutive slices labelled together with
    26-connectivity say which nodes touch (a node takes the two-slice label of its
    voxels): nodes of one two-slice label are linked, and the connected nodes are the 3D
    components (scipy's ``connected_components``). Memory: two slices, and a few numbers
    per 2D component.
    """

    value: int
    n: int = 0  # 2D components so far; global ids run from 1
    prev: tuple[np.ndarray, ...] | None = None  # the last slice: mask, ys, xs, local ids
    moments: list[np.ndarray] = field(default_factory=list)  # (m, 7): z, n, y, x, yy, xx, yx
    links: list[np.ndarray] = field(default_factory=list)  # (k, 2) global ids
    traces: list[float] = field(default_factory=list)  # per slice with a field of view
    voxels: list[int] = field(default_factory=list)  # per slice

    def add(self, z: int, mask: np.ndarray, area_mm2: float) -> None:
        local, m = components(mask)
        self.voxels.append(int(mask.sum()))
        if area_mm2 > 0:
            self.traces.append(m / area_mm2)
        if not m:
            self.prev = None
            return
        ys, xs = np.nonzero(local)
        ids = local[ys, xs]
        y, x = ys.astype(np.float64), xs.astype(np.float64)

        def total(w: np.ndarray | None = None) -> np.ndarray:
            return np.bincount(ids, weights=w, minlength=m + 1)[1:]

        count = total()
        zs = np.full(m, float(z))
        self.moments.append(np.column_stack(
            [zs, count, total(y), total(x), total(y * y), total(x * x), total(y * x)]
        ))  # fmt: skip
        if self.prev is not None:
            p_mask, p_ys, p_xs, p_ids = self.prev
            p_m = int(p_ids.max())
            pair, _ = ndimage.label(np.stack([p_mask, mask]), structure=np.ones((3, 3, 3)))
            # a 2D component lies in one two-slice component: its voxels' mean label is it
            here = total(pair[1][ys, xs]) / count
            there = np.bincount(p_ids, weights=pair[0][p_ys, p_xs], minlength=p_m + 1)[1:]
            there /= np.bincount(p_ids, minlength=p_m + 1)[1:]
            gids = np.concatenate([self.n + 1 + np.arange(m), self.n - p_m + 1 + np.arange(p_m)])
            keys = np.rint(np.concatenate([here, there])).astype(np.int64)
            order = np.argsort(keys, kind="stable")
            same = keys[order][1:] == keys[order][:-1]
            self.links.append(np.stack([gids[order][1:][same], gids[order][:-1][same]], axis=1))
        self.prev = (mask, ys, xs, ids)
        self.n += m

    def shapes(self, voxel_um: float, min_voxels: int) -> dict[str, np.ndarray]:
        """Voxels, length, width (um) and long-axis angle to z (deg) of each 3D component
        of at least ``min_voxels``: :func:`bonedamage.data.damage.component_shapes`'s
        flat-disc reading of the coordinate covariance."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        names = ("voxels", "length_um", "width_um", "angle_deg")
        if not self.n:
            return {k: np.zeros(0) for k in names}
        z, n, sy, sx, syy, sxx, syx = np.concatenate(self.moments).T
        links = np.concatenate(self.links) - 1 if self.links else np.zeros((0, 2), np.int64)
        graph = coo_matrix(
            (np.ones(len(links)), (links[:, 0], links[:, 1])), shape=(self.n, self.n)
        )
        _, root = connected_components(graph, directed=False)
        parts = [n, z * n, sy, sx, z * z * n, syy, sxx, z * sy, z * sx, syx]
        c, mz, my, mx, zz, yy, xx, zy, zx, yx = (np.bincount(root, weights=p) for p in parts)
        keep = c >= max(min_voxels, 1)
        c, mz, my, mx, zz, yy, xx, zy, zx, yx = (
            a[keep] for a in (c, mz, my, mx, zz, yy, xx, zy, zx, yx)
        )
        mean = np.stack([mz, my, mx], axis=1) / c[:, None]
        second = np.stack([np.stack(r, axis=1) for r in ((zz, zy, zx), (zy, yy, yx),
                                                         (zx, yx, xx))], axis=1)  # fmt: skip
        cov = second / c[:, None, None] - mean[:, :, None] * mean[:, None, :]
        # a voxel is a unit cube, not a point: add its own variance 1/12 per axis
        eig, vec = np.linalg.eigh(cov + np.eye(3) / 12.0)
        eig = np.clip(eig, 0.0, None)
        long_axis = vec[:, :, 2]
        return {
            "voxels": c,
            "length_um": 4.0 * np.sqrt(eig[:, 2]) * voxel_um,
            "width_um": 4.0 * np.sqrt(eig[:, 1]) * voxel_um,
            "angle_deg": np.degrees(np.arccos(np.clip(np.abs(long_axis[:, 0]), 0.0, 1.0))),
        }


def _distribution(values: np.ndarray, digits: int = 3) -> dict[str, Any]:
    """n, median, 10th and 90th percentile (None when there are no values)."""
    if values.size == 0:
        return {"n": 0, "median": None, "p10": None, "p90": None}
    p10, median, p90 = (round(float(v), digits) for v in np.percentile(values, [10, 50, 90]))
    return {"n": int(values.size), "median": median, "p10": p10, "p90": p90}


def measure_damage(
    vol: VolumeReader,
    labels: np.ndarray,
    norm: Normalization,
    voxel_um: float,
    classes: list[str],
    sections: DamageSections | None = None,
    progress: bool = False,
    min_component_voxels: int = MIN_COMPONENT_VOXELS,
) -> dict[str, Any]:
    """The microdamage report of a label stack (z, y, x) over its scan, streamed along z.

    As :func:`bonedamage.data.damage.damage_measures` measures a label volume: inside each
    axial slice's field of view (:func:`bonedamage.data.morphometry.fov_slice`); bone by
    Otsu's threshold on the scan smoothed with sigma ``BONE_SMOOTH_VOX`` (here in-plane,
    slice by slice, on a histogram of the whole field: the one threshold of the scan);
    the reference bone is bone plus every damaged voxel (crack and fracture gaps are dark
    but were bone). Per damage kind of ``classes``: voxels and volume, 26-connected
    components of at least ``min_component_voxels`` (count, per mm^3 of bone, volumes,
    length, width and long-axis angle to the load axis z as distributions), and traces per
    mm^2 of axial section (8-connected, mean over the slices). The damaged fraction of bone
    overall and per slice (its profile along z). ``sections`` records what the orthoviews
    draw as the slices stream by.
    """
    nz = labels.shape[0]
    present = [LABEL_VALUE[c] for c in classes if c != BACKGROUND]
    streams = {v: _Components(v) for v in present}
    centres = (_BINS[:-1] + _BINS[1:]) / 2
    step = float(_BINS[1] - _BINS[0])
    hist_sound = np.zeros((nz, len(centres)), np.int64)  # field, not damaged
    hist_all = np.zeros(len(centres), np.int64)
    damaged_vox = np.zeros(nz, np.int64)
    fov_vox = np.zeros(nz, np.int64)
    area_um2 = voxel_um**2
    for z in tqdm(range(nz), desc="measure damage", disable=not progress):
        raw = vol.read(z)
        lab = np.asarray(labels[z])
        fov = fov_slice(raw)
        image = normalize(raw, norm.lo, norm.hi)
        if sections is not None:
            sections.record(z, np.clip(image, 0, 1), lab)
        if fov.any():
            image[~fov] = image[fov].mean()
        smooth = ndimage.gaussian_filter(image, BONE_SMOOTH_VOX)
        damaged = (lab > 0) & fov
        bins = np.clip(((smooth - _BINS[0]) / step).astype(np.int64), 0, len(centres) - 1)
        hist_sound[z] = np.bincount(bins[fov & ~damaged], minlength=len(centres))
        hist_all += hist_sound[z] + np.bincount(bins[damaged], minlength=len(centres))
        damaged_vox[z], fov_vox[z] = int(damaged.sum()), int(fov.sum())
        area_mm2 = fov_vox[z] * area_um2 * 1e-6
        for value, stream in streams.items():
            stream.add(z, (lab == value) & fov, area_mm2)
    threshold = _otsu(hist_all, centres)
    bone_vox = hist_sound[:, centres > threshold].sum(axis=1) + damaged_vox
    bone_mm3 = float(bone_vox.sum()) * voxel_um**3 * 1e-9
    voxel_mm3 = voxel_um**3 * 1e-9
    report: dict[str, Any] = {
        "voxel_size_um": voxel_um,
        "shape_zyx": [int(s) for s in labels.shape],
        "field_of_view_mm3": round(float(fov_vox.sum()) * voxel_mm3, 6),
        "bone_volume_mm3": round(bone_mm3, 6),
        "bone_threshold": round(threshold, 4),
        "damaged_volume_mm3": round(float(damaged_vox.sum()) * voxel_mm3, 6),
        "damaged_bone_fraction": round(float(damaged_vox.sum() / max(bone_vox.sum(), 1)), 6),
        "min_component_voxels": int(min_component_voxels),
        "kinds": {},
    }
    for value, stream in streams.items():
        shapes = stream.shapes(voxel_um, min_component_voxels)
        voxels = int(sum(stream.voxels))
        count = int(shapes["voxels"].size)
        report["kinds"][kinds.NAMES[value]] = {
            "label_value": value,
            "voxels": voxels,
            "volume_mm3": round(voxels * voxel_mm3, 6),
            "share_of_bone": round(voxels / max(int(bone_vox.sum()), 1), 6),
            "count": count,
            "per_mm3_bone": round(count / bone_mm3, 3) if bone_mm3 else 0.0,
            "traces_per_mm2": round(float(np.mean(stream.traces)), 3) if stream.traces else 0.0,
            "component_volume_mm3": _distribution(shapes["voxels"] * voxel_mm3, 9),
            "length_um": _distribution(shapes["length_um"]),
            "width_um": _distribution(shapes["width_um"]),
            "angle_to_load_axis_deg": _distribution(shapes["angle_deg"]),
        }
    fraction = damaged_vox / np.maximum(bone_vox, 1)
    report["profile"] = {
        "axis": "z",
        "z_um": [round(z * voxel_um, 3) for z in range(nz)],
        "bone_voxels": bone_vox.tolist(),
        "damaged_voxels": damaged_vox.tolist(),
        "damaged_fraction": [round(float(f), 6) for f in fraction],
        **{f"{kinds.NAMES[v]}_voxels": s.voxels for v, s in streams.items()},
    }
    return report


def _otsu(hist: np.ndarray, centres: np.ndarray) -> float:
    """Otsu's threshold of a histogram (scikit-image's); the middle bin when flat."""
    from skimage.filters import threshold_otsu

    if np.count_nonzero(hist) < 2:
        return float(centres[np.flatnonzero(hist)[0]] if hist.any() else 0.5)
    return float(threshold_otsu(hist=(hist, centres)))


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    """The report's numbers that the verdict repeats."""
    return {
        "damaged_bone_fraction": report["damaged_bone_fraction"],
        "bone_volume_mm3": report["bone_volume_mm3"],
        "counts": {name: k["count"] for name, k in report["kinds"].items()},
    }


def _flat(report: dict[str, Any]) -> dict[str, Any]:
    """The report as one CSV row: scalars, and ``<kind>_<measure>[_<statistic>]``."""
    row = {k: v for k, v in report.items() if not isinstance(v, dict | list)}
    for name, kind in report["kinds"].items():
        for key, value in kind.items():
            if isinstance(value, dict):
                row.update({f"{name}_{key}_{stat}": v for stat, v in value.items()})
            else:
                row[f"{name}_{key}"] = value
    return row


def _write_report(out: Path, report: dict, tiles: pd.DataFrame, verdict: dict) -> None:
    report = {**report, "verdict": verdict["verdict"], "domain_reasons": verdict["domain_reasons"]}
    (out / "morphometry.json").write_text(json.dumps(report, indent=2) + "\n")
    pd.DataFrame([_flat(report)]).to_csv(out / "morphometry.csv", index=False)
    profile = pd.DataFrame({k: v for k, v in report["profile"].items() if k != "axis"})
    profile.insert(0, "z", np.arange(len(profile)))
    profile.to_csv(out / "profile.csv", index=False)
    tiles.to_csv(out / "tiles.csv", index=False)
    (out / "verdict.json").write_text(json.dumps(verdict, indent=2, sort_keys=True) + "\n")


# -- the figure ---------------------------------------------------------------------------
LABEL_COLOURS = {kinds.MICROCRACK: "#ff2a2a", kinds.FRACTURE: "#ffb000",
                 kinds.BUCKLED: "#00d5ff"}  # fmt: skip
LABEL_ALPHA = 0.75
DISPLAY_PX = 480  # the longest side of a view on screen; larger scans are reduced


@dataclass
class DamageSections:
    """What :func:`damage_orthoviews_figure` draws: the scan (normalised, 0..1) and the
    labels in three orthogonal sections through the scan's centre: the axial slice at the
    middle z (y, x), the coronal section at the middle y (z, x) and the sagittal one at
    the middle x (z, y). ``record`` takes each axial slice as it streams by."""

    voxel_um: float
    centre: tuple[int, int, int]  # z, y, x of the cuts
    scan: list[np.ndarray]
    labels: list[np.ndarray]

    @classmethod
    def empty(cls, shape: tuple[int, ...], voxel_um: float) -> DamageSections:
        nz, ny, nx = shape
        sizes = ((ny, nx), (nz, nx), (nz, ny))
        return cls(voxel_um, (nz // 2, ny // 2, nx // 2),
                   [np.zeros(s, np.float32) for s in sizes],
                   [np.zeros(s, np.uint8) for s in sizes])  # fmt: skip

    def record(self, z: int, image: np.ndarray, labels: np.ndarray) -> None:
        """Keep axial slice ``z``'s share of the sections."""
        cz, cy, cx = self.centre
        self.scan[1][z], self.scan[2][z] = image[cy], image[:, cx]
        self.labels[1][z], self.labels[2][z] = labels[cy], labels[:, cx]
        if z == cz:
            self.scan[0][:], self.labels[0][:] = image, labels


def _reduce(image: np.ndarray, factor: int, how: str) -> np.ndarray:
    """``image`` in blocks of ``factor`` x ``factor`` pixels: their mean, or their maximum
    (labels: a thin crack stays visible on a reduced view)."""
    if factor == 1:
        return image
    h, w = image.shape
    ph, pw = -h % factor, -w % factor
    padded = np.pad(image, ((0, ph), (0, pw)), mode="edge")
    blocks = padded.reshape((h + ph) // factor, factor, (w + pw) // factor, factor)
    return blocks.max(axis=(1, 3)) if how == "max" else blocks.mean(axis=(1, 3))


def _number(value: float) -> str:
    """Three significant digits, without exponents for the large ones."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _title_lines(verdict: dict[str, Any], report: dict[str, Any]) -> list[str]:
    kinds_text = "; ".join(
        f"{name}: {k['count']} components ({_number(k['per_mm3_bone'])} per mm³ of bone, "
        f"{_number(k['traces_per_mm2'])} traces per mm²)"
        for name, k in report["kinds"].items()
    )
    lines = [
        f"{Path(str(verdict['scan'])).name}: damage map, verdict {verdict['verdict']}",
        f"damaged bone fraction {report['damaged_bone_fraction']:.2%} of "
        f"{report['bone_volume_mm3']:.3g} mm³ of bone; {kinds_text}",
    ]
    lines += [f"uncertain: {reason}" for reason in verdict.get("domain_reasons", [])]
    lines.append(
        f"model {verdict.get('model') or '(no URI given)'} "
        f"({verdict.get('tissue') or 'tissue not recorded'}): segmentation of every "
        f"{verdict['plane']} plane, tiles of {verdict['tile_um']:g} µm at "
        f"{verdict['working_voxel_um']:g} µm/px overlapping by {verdict['overlap']:.0%}, "
        f"scan at {verdict['voxel_size_um']:g} µm/voxel"
    )
    return lines


def damage_orthoviews_figure(
    sections: DamageSections, verdict: dict[str, Any], report: dict[str, Any]
) -> Figure:
    """Orthogonal views of a damage map (a matplotlib ``Figure`` on an Agg canvas).

    Three panels (axial at the middle z, coronal at the middle y, sagittal at the middle
    x), the scan in grey under the labels coloured by kind (``LABEL_COLOURS``,
    translucent), axes in um to physical aspect with z (the load axis) down the two
    sections, dashed lines where the other views cut. A scan larger than ``DISPLAY_PX``
    is shown in blocks (grey: their mean; labels: any damage in the block, so thin cracks
    stay visible). Titled with the scan, the verdict (and the reasons when uncertain), the
    headline numbers and the model; a legend names the kinds. No pyplot state.
    """
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap, to_rgba
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    s, p = sections, sections.voxel_um
    cz, cy, cx = s.centre
    factor = max(1, math.ceil(max(a.shape[i] for a in s.scan for i in (0, 1)) / DISPLAY_PX))
    views = [  # title, index, (x axis, y axis), cut lines (horizontal, vertical) in um
        (f"axial section at z = {cz * p:g} µm", 0, ("x", "y"), (cy * p, cx * p)),
        (f"coronal section at y = {cy * p:g} µm", 1, ("x", "z"), (cz * p, cx * p)),
        (f"sagittal section at x = {cx * p:g} µm", 2, ("y", "z"), (cz * p, cy * p)),
    ]
    colours = np.zeros((256, 4))
    for value, colour in LABEL_COLOURS.items():
        colours[value] = to_rgba(colour, LABEL_ALPHA)
    cmap = ListedColormap(colours)

    def extent(rows: int, cols: int) -> tuple[float, ...]:
        return (-p / 2, (cols - 0.5) * p, (rows - 0.5) * p, -p / 2)

    shapes = [s.scan[i].shape for _, i, _, _ in views]
    widths = [w * p for _, w in shapes]
    heights = [h * p for h, _ in shapes]
    panel_h = 3.2
    fig_w = max(sum(widths) * panel_h / max(heights) + 1.6, 9.0)
    head, *rest = _title_lines(verdict, report)
    lines = [part for line in rest for part in textwrap.wrap(line, int(fig_w * 15))]
    title_h, body_h = 0.45 + 0.16 * len(lines), panel_h + 1.3
    fig = Figure(figsize=(fig_w, title_h + body_h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, body = fig.subfigures(2, 1, height_ratios=[title_h, body_h])
    top.text(0.01, 1 - 0.1 / title_h, head, fontsize=12, fontweight="bold", va="top")
    top.text(0.01, 1 - 0.4 / title_h, "\n".join(lines), fontsize=8.5, va="top", linespacing=1.4)
    axes = body.subplots(1, 3, width_ratios=widths)
    for ax, (label, i, (x_name, y_name), (hline, vline)) in zip(axes, views, strict=True):
        h, w = s.scan[i].shape
        ext = extent(h, w)
        grey = _reduce(s.scan[i], factor, "mean")
        marks = _reduce(s.labels[i], factor, "max")
        shown = (-p / 2, ext[0] + grey.shape[1] * factor * p, ext[3] + grey.shape[0] * factor * p,
                 -p / 2)  # fmt: skip
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1, extent=shown, interpolation="nearest")
        ax.imshow(marks, cmap=cmap, vmin=0, vmax=255, extent=shown, interpolation="nearest")
        ax.set_xlim(ext[0], ext[1])
        ax.set_ylim(ext[2], ext[3])
        ax.axhline(hline, color="white", linestyle="--", linewidth=0.7, alpha=0.8)
        ax.axvline(vline, color="white", linestyle="--", linewidth=0.7, alpha=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(f"{x_name} (µm{', load axis' if x_name == 'z' else ''})", fontsize=8)
        ax.set_ylabel(f"{y_name} (µm{', load axis' if y_name == 'z' else ''})", fontsize=8)
        ax.tick_params(labelsize=7)
    handles = [
        Patch(facecolor=LABEL_COLOURS[LABEL_VALUE[c]], alpha=LABEL_ALPHA, edgecolor="0.4", label=c)
        for c in verdict["classes"]
        if c != BACKGROUND
    ]
    handles.append(Line2D([], [], color="0.3", linestyle="--", linewidth=0.8,
                          label="where the other two views cut"))  # fmt: skip
    note = (
        f"labels over the scan (grey); shown in blocks of {factor} x {factor} voxels, a "
        "block coloured where it holds any damage"
        if factor > 1
        else "labels over the scan (grey), one pixel per voxel"
    )
    body.legend(handles=handles, loc="outside lower center", fontsize=7.5,
                ncols=len(handles), frameon=False, title=note, title_fontsize=7.5)  # fmt: skip
    return fig
