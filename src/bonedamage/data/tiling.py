"""The ``tile`` stage: cut 2D tiles of a physical size from every scan in the manifest.

Scans are streamed plane by plane (memory-mapped; resident memory stays at about one
plane whatever the scan size), optionally resampled to a working voxel size, normalised
with robust per-scan percentiles, and cut on a regular grid of square tiles of
``tile_um`` micrometres. Planes are perpendicular to the load axis z by default
(``axial``); ``coronal`` (normal to y) and ``sagittal`` (normal to x) are options. A
slice stride skips near-identical neighbouring slices. Tiles mostly outside the
reconstructed field of view, or holding almost no bone, are skipped.

With ``context_um`` > 0 a tile is 2.5-D: the planes ``context_um`` before and after the
tiled one (along its normal, clamped at the scan's ends) are stacked around it as three
channels, (3, px, px). A crack a pixel wide, or a strut fracture, that one noisy section
barely shows is then seen three times a few micrometres apart. The filters, statistics
and damage fraction stay those of the tiled (middle) plane.

The normalisation of each scan (its percentiles and the bone threshold) is recorded in
``normalization.json`` so prediction applies exactly the same transform.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.filters import threshold_otsu
from tqdm import tqdm

from bonedamage.atomic import atomic_dir, atomic_path, write_text_atomic
from bonedamage.data.manifest import confined, read_manifest
from bonedamage.data.tilestore import (
    INDEX_NAME,
    NORMALIZATION_NAME,
    ChunkWriter,
    centre_plane,
)
from bonedamage.data.volume import VolumeReader, open_volume

PLANES = ("axial", "coronal", "sagittal")
CONTEXT_CHANNELS = 3  # planes of a 2.5-D tile: before, the tiled plane, after
LABELS = {"pristine": 0, "failed": 1, "intermediate": -1}
_SAMPLE_PLANES = 24  # planes sampled per scan to estimate its intensity range
_MAX_UNMAPPED_BYTES = 512 * 2**20  # compressed stacks (masks) cut across planes in memory
INDEX_COLUMNS = {  # the tile index: column -> dtype
    "tile_id": "string",
    "scan_id": "string",
    "specimen_id": "string",
    "tissue": "string",
    "state": "string",
    "label": "int8",
    "load_step": "int16",
    "plane": "string",
    "z": "int32",
    "y": "int32",
    "x": "int32",
    "voxel_size_um": "float64",
    "tile_px": "int16",
    "norm_lo": "float64",
    "norm_hi": "float64",
    "fov_fraction": "float32",
    "bone_fraction": "float32",
    "mean": "float32",
    "std": "float32",
    "damage_fraction": "float32",
    "chunk": "string",
    "row": "int32",
}


class TilingError(ValueError):
    """A tiling setting does not fit a scan; the message names the scan or setting."""


# -- geometry ---------------------------------------------------------------------------
def tile_px(tile_um: float, voxel_um: float) -> int:
    """Tile edge in pixels for a physical edge ``tile_um`` (rounded, at least 8 px)."""
    if not (voxel_um > 0 and tile_um > 0):
        raise TilingError(f"tile size {tile_um} um / voxel size {voxel_um} um must be positive")
    return max(8, int(round(tile_um / voxel_um)))


def tile_origins(shape_yx: tuple[int, int], tile: int) -> list[tuple[int, int]]:
    """Top-left corners of a non-overlapping grid of ``tile`` px tiles centred in the plane."""
    ny, nx = shape_yx
    if tile > min(ny, nx):
        raise TilingError(f"tile of {tile} px is larger than the {ny}x{nx} px plane")
    oy, ox = (ny % tile) // 2, (nx % tile) // 2
    return [(y, x) for y in range(oy, ny - tile + 1, tile) for x in range(ox, nx - tile + 1, tile)]


def fov_disc(shape_yx: tuple[int, int]) -> np.ndarray:
    """Boolean disc inscribed in the slice: the reconstructed field of view."""
    ny, nx = shape_yx
    yy, xx = np.meshgrid(
        np.arange(ny) - (ny - 1) / 2.0, np.arange(nx) - (nx - 1) / 2.0, indexing="ij"
    )
    return np.hypot(yy, xx) <= (min(ny, nx) - 1) / 2.0


def tiles_in_fov(
    shape_yx: tuple[int, int], tile: int, min_fraction: float
) -> list[tuple[int, int]]:
    """Grid tiles with at least ``min_fraction`` of their pixels inside the field of view."""
    disc = fov_disc(shape_yx)
    return [
        (y, x)
        for y, x in tile_origins(shape_yx, tile)
        if disc[y : y + tile, x : x + tile].mean() >= min_fraction
    ]


# -- per-scan intensity normalisation ----------------------------------------------------
@dataclass(frozen=True)
class Normalization:
    """How one scan's intensities map to tile values: ``(x - lo) / (hi - lo)``."""

    lo: float
    hi: float
    percentiles: tuple[float, float]
    bone_threshold: float  # on normalised values (Otsu)
    fill_value: float | None  # constant outside the reconstruction, if the scan has one
    scale: float  # resampling factor to the working voxel size (1: none)

    def apply(self, plane: np.ndarray) -> np.ndarray:
        return ((plane.astype(np.float32) - self.lo) / (self.hi - self.lo)).astype(np.float32)

    def reconstructed(self, plane: np.ndarray) -> np.ndarray:
        if self.fill_value is None:
            return np.ones(plane.shape, dtype=bool)
        return plane != self.fill_value


def fit_normalization(
    reader: VolumeReader, percentiles: tuple[float, float], scale: float, source: str
) -> Normalization:
    """Robust intensity range of a scan from a sample of its slices (bounded memory)."""
    nz = reader.shape[0]
    picks = np.unique(np.linspace(0, nz - 1, min(_SAMPLE_PLANES, nz)).round().astype(int))
    planes = [reader.read(int(z)) for z in picks]
    corners = np.array([p[[0, 0, -1, -1], [0, -1, 0, -1]] for p in planes]).ravel()
    fill = float(corners[0]) if np.all(corners == corners[0]) else None
    step = max(1, int(math.sqrt(planes[0].size / 65536)))
    values = np.concatenate(
        [
            p[::step, ::step][p[::step, ::step] != fill]
            if fill is not None
            else p[::step, ::step].ravel()
            for p in planes
        ]
    ).astype(np.float64)
    if values.size == 0:  # every sampled voxel equals the corners' value: a constant image
        raise TilingError(
            f"{source}: constant intensity ({fill:g} in every sampled slice): the image is "
            "constant; nothing to normalise or tile"
        )
    if not np.isfinite(values).all():
        kind = "NaN" if np.isnan(values).any() else "infinite"
        raise TilingError(f"{source}: contains {kind} values; scans must be finite")
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:
        raise TilingError(f"{source}: constant intensity ({lo}); nothing to tile")
    norm = (values - lo) / (hi - lo)
    return Normalization(
        float(lo),
        float(hi),
        (float(percentiles[0]), float(percentiles[1])),
        float(threshold_otsu(norm)),
        fill,
        float(scale),
    )


# -- planes -------------------------------------------------------------------------------
def plane_reader(reader: VolumeReader, plane: str) -> tuple[int, Callable[[int], np.ndarray]]:
    """(number of planes, index -> 2D plane) of a volume cut along ``plane``."""
    if plane == "axial":
        return reader.shape[0], reader.read
    volume = reader.memmap
    if volume is None:
        nbytes = int(np.prod(reader.shape)) * reader.dtype.itemsize
        if nbytes > _MAX_UNMAPPED_BYTES:
            raise TilingError(
                f"{reader.path}: {plane} planes of a compressed stack of "
                f"{nbytes / 2**20:.0f} MiB; store it uncompressed"
            )
        volume = np.stack([reader.read(z) for z in range(reader.shape[0])])  # small masks
    axis = 1 if plane == "coronal" else 2

    def read(i: int) -> np.ndarray:
        section = volume[:, i, :] if axis == 1 else volume[:, :, i]
        return np.array(section, dtype=reader.dtype)

    return reader.shape[axis], read


def plane_with_context(
    read: Callable[[int], np.ndarray], count: int, index: int, context: int
) -> np.ndarray:
    """Plane ``index``; with ``context`` d > 0 the (3, h, w) stack of the planes index - d,
    index, index + d (clamped to the ``count`` planes of the scan)."""
    if context <= 0:
        return read(index)
    around = (index - context, index, index + context)
    return np.stack([read(min(max(j, 0), count - 1)) for j in around])


def iter_planes(
    reader: VolumeReader, plane: str, stride: int, context: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """(index along the plane normal, 2D plane) every ``stride`` planes; z rows first.

    With ``context`` > 0 each plane comes with its neighbours (:func:`plane_with_context`).
    """
    count, read = plane_reader(reader, plane)
    for i in range(0, count, stride):
        yield i, plane_with_context(read, count, i, context)


def scan_scale(voxel_size_um: float, working_voxel_um: float) -> float:
    """Resampling factor of a scan to the working voxel size (1.0 within 1 %)."""
    scale = voxel_size_um / working_voxel_um
    return 1.0 if abs(scale - 1.0) < 0.01 else scale


def _resample(plane: np.ndarray, scale: float, order: int) -> np.ndarray:
    if scale == 1.0:
        return plane
    return ndimage.zoom(plane, scale, order=order, mode="nearest", grid_mode=True)


# -- the stage ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TileSettings:
    """The ``tile`` section of params.yaml for one tissue."""

    tile_um: float
    working_voxel_um: float
    planes: tuple[str, ...]
    slice_stride: int
    percentiles: tuple[float, float]
    min_fov_fraction: float
    min_bone_fraction: float
    context_um: float = 0.0  # 2.5-D: neighbouring planes this far away as channels (0: none)

    @property
    def tile_px(self) -> int:
        return tile_px(self.tile_um, self.working_voxel_um)

    @property
    def channels(self) -> int:
        """Channels of a tile: 1, or 3 for 2.5-D tiles."""
        return CONTEXT_CHANNELS if self.context_um > 0 else 1

    @property
    def tile_shape(self) -> tuple[int, ...]:
        """Shape of a stored tile: (px, px), or (3, px, px) for 2.5-D tiles."""
        px = self.tile_px
        return (px, px) if self.channels == 1 else (self.channels, px, px)

    def context_planes(self, voxel_um: float) -> int:
        """The neighbours' offset in a scan's own planes (voxel ``voxel_um``); 0: none."""
        if self.context_um <= 0:
            return 0
        return max(1, int(round(self.context_um / voxel_um)))

    @classmethod
    def from_params(cls, cfg: dict[str, Any], tissue: str) -> TileSettings:
        planes_cfg = cfg["planes"]
        planes = tuple(planes_cfg[tissue] if isinstance(planes_cfg, dict) else planes_cfg)
        unknown = sorted(set(planes) - set(PLANES))
        if unknown or not planes:
            raise TilingError(f"tile.planes={list(planes)}: choose from {list(PLANES)}")
        if int(cfg["slice_stride"]) < 1:
            raise TilingError(f"tile.slice_stride={cfg['slice_stride']}: must be >= 1")
        lo, hi = cfg["percentiles"]
        if not 0 <= lo < hi <= 100:
            raise TilingError(f"tile.percentiles={cfg['percentiles']}: need 0 <= lo < hi <= 100")
        context_cfg = cfg.get("context_um", 0.0)
        context = context_cfg.get(tissue, 0.0) if isinstance(context_cfg, dict) else context_cfg
        if not (isinstance(context, int | float) and math.isfinite(context) and context >= 0):
            raise TilingError(f"tile.context_um {tissue}: {context!r}; must be a number >= 0")
        return cls(
            float(cfg["tile_um"][tissue]),
            float(cfg["working_voxel_um"][tissue]),
            planes,
            int(cfg["slice_stride"]),
            (float(lo), float(hi)),
            float(cfg["min_fov_fraction"]),
            float(cfg["min_bone_fraction"]),
            float(context),
        )


def _check_tile_fits(
    shape_zyx: tuple[int, ...], scale: float, settings: TileSettings, row: Any, path: Path
) -> None:
    """Refuse a tile larger than the scan's planes, naming the scan and the tile setting."""
    size = settings.tile_px
    axes = {"axial": (1, 2), "coronal": (0, 2), "sagittal": (0, 1)}
    for plane in settings.planes:
        h, w = (int(round(shape_zyx[a] * scale)) for a in axes[plane])  # as ndimage.zoom
        if size > min(h, w):
            raise TilingError(
                f"scan {row.scan_id} ({path}): a tile of {size} px (tile.tile_um "
                f"{row.tissue}: {settings.tile_um:g} um at working_voxel_um "
                f"{settings.working_voxel_um:g} um) is larger than its {h}x{w} px {plane} "
                f"planes; lower tile.tile_um or check the scan's voxel_size_um "
                f"({row.voxel_size_um:g} um)"
            )


def tile_scan(
    row: Any, data_root: Path, settings: TileSettings, out_dir: Path, chunk_tiles: int
) -> tuple[pd.DataFrame, Normalization]:
    """Tile one manifest row's scan into its chunk files; return index rows and normalisation.

    Tiles are stored in the scan's own dtype (float32 when resampled); the index carries
    the scan's normalisation (``norm_lo``, ``norm_hi``) that turns them into [0, 1] values.
    """
    path = confined(data_root, row.path, what=f"scan {row.scan_id}: path")
    scale = scan_scale(row.voxel_size_um, settings.working_voxel_um)
    size = settings.tile_px
    parts: list[dict[str, np.ndarray]] = []
    with open_volume(path) as vol:
        _check_tile_fits(vol.shape, scale, settings, row, path)
        norm = fit_normalization(vol, settings.percentiles, scale, f"scan {row.scan_id}")
        dtype = vol.dtype if scale == 1.0 else np.dtype(np.float32)
        writer = ChunkWriter(
            out_dir, f"{row.tissue}/{row.scan_id}", settings.tile_shape, chunk_tiles, dtype
        )
        context = settings.context_planes(float(row.voxel_size_um))
        mask_vol = (
            open_volume(confined(data_root, row.mask_path, what="mask_path"))
            if row.mask_path
            else None
        )
        try:
            for plane in settings.planes:
                masks = iter_planes(mask_vol, plane, settings.slice_stride) if mask_vol else None
                for index, raw in iter_planes(vol, plane, settings.slice_stride, context):
                    damage = next(masks)[1] if masks else None
                    parts.append(_cut(plane, index, raw, damage, norm, settings, writer))
        finally:
            writer.flush()
            if mask_vol is not None:
                mask_vol.close()
    columns = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    n = len(columns["z"])
    if n == 0:
        raise TilingError(
            f"scan {row.scan_id}: no tile of {size} px passed the field-of-view "
            "and bone-fraction filters; check tile.tile_um and the scan"
        )
    where = [columns.pop(k).astype(str) for k in ("plane_code", "r", "c")]
    tile_id = np.char.add(
        np.char.add(np.char.add(f"{row.scan_id}/", where[0]), "-"),
        np.char.add(np.char.add(np.char.zfill(where[1], 4), "-"), np.char.zfill(where[2], 4)),
    )
    constants = {
        "scan_id": row.scan_id,
        "specimen_id": row.specimen_id,
        "tissue": row.tissue,
        "state": row.state,
        "label": LABELS[row.state],
        "load_step": int(row.load_step) if not pd.isna(row.load_step) else -1,
        "voxel_size_um": settings.working_voxel_um,
        "tile_px": size,
        "norm_lo": norm.lo,
        "norm_hi": norm.hi,
    }
    frame = pd.DataFrame(
        {
            "tile_id": tile_id,
            **{k: np.repeat(np.asarray([v]), n) for k, v in constants.items()},
            **columns,
        }
    )
    return frame.loc[:, list(INDEX_COLUMNS)].astype(INDEX_COLUMNS), norm


def _blocks(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All grid tiles of a plane as (n, size, size), with their row and column origins."""
    origins = tile_origins(image.shape, size)
    (oy, ox), (ly, lx) = origins[0], origins[-1]
    ty, tx = (ly - oy) // size + 1, (lx - ox) // size + 1
    block = image[oy : oy + ty * size, ox : ox + tx * size]
    tiles = block.reshape(ty, size, tx, size).swapaxes(1, 2).reshape(-1, size, size)
    rows = oy + size * np.repeat(np.arange(ty), tx)
    cols = ox + size * np.tile(np.arange(tx), ty)
    return tiles, rows, cols


@dataclass(frozen=True)
class PlaneTiles:
    """The grid of tiles of one plane (raw values, after resampling) and the filters."""

    image: np.ndarray  # the (middle) plane at the working voxel size
    tiles: np.ndarray  # (n, px, px), or (n, 3, px, px) for 2.5-D tiles
    rows: np.ndarray
    cols: np.ndarray
    fov: np.ndarray  # reconstructed share of each tile
    bone: np.ndarray  # bone share of each tile
    keep: np.ndarray  # passes min_fov_fraction and min_bone_fraction


def plane_tiles(raw: np.ndarray, norm: Normalization, settings: TileSettings) -> PlaneTiles:
    """Cut one plane into the tile grid and apply the field-of-view and bone filters.

    The one definition of "the tiles of a plane", shared by ``tile`` and ``predict``.
    ``raw`` is one plane (h, w) or a 2.5-D stack (3, h, w) whose middle plane is the tiled
    one: the filters look at the middle plane only.
    """
    size = settings.tile_px
    planes = [raw] if raw.ndim == 2 else list(raw)
    images = [
        p if norm.scale == 1.0 else _resample(p.astype(np.float32), norm.scale, 1) for p in planes
    ]
    middle = len(planes) // 2
    image = images[middle]
    tiles, rows, cols = _blocks(image, size)
    if norm.fill_value is None:
        fov = np.ones(len(tiles), dtype=np.float32)
    else:
        mid = planes[middle]
        recon = _resample((mid != norm.fill_value).astype(np.float32), norm.scale, 1) >= 0.5
        fov = _blocks(recon, size)[0].mean(axis=(1, 2), dtype=np.float32)
    pixels = size * size
    bone_raw = norm.lo + norm.bone_threshold * (norm.hi - norm.lo)
    bone = (tiles > bone_raw).reshape(len(tiles), pixels).sum(axis=1) / np.float32(pixels)
    keep = (fov >= settings.min_fov_fraction) & (bone >= settings.min_bone_fraction)
    if len(images) > 1:
        tiles = np.stack([_blocks(im, size)[0] for im in images], axis=1)
    return PlaneTiles(image, tiles, rows, cols, fov, bone, keep)


def _cut(
    plane: str,
    index: int,
    raw: np.ndarray,
    damage: np.ndarray | None,
    norm: Normalization,
    settings: TileSettings,
    writer: ChunkWriter,
) -> dict[str, np.ndarray]:
    """Cut one plane: keep the tiles that pass the filters, store them, return their columns.

    Works on raw values (no float conversion of the whole plane): the bone threshold and
    the statistics are mapped through the scan's linear normalisation instead.
    """
    size = settings.tile_px
    cut = plane_tiles(raw, norm, settings)
    tiles, rows, cols, fov, bone, keep = cut.tiles, cut.rows, cut.cols, cut.fov, cut.bone, cut.keep
    pixels = size * size
    kept = tiles[keep]
    chunks, chunk_rows = writer.add_many(kept)
    flat = centre_plane(kept).reshape(len(kept), pixels).astype(np.float32)
    mean_raw = flat.sum(axis=1, dtype=np.float64) / pixels
    var_raw = np.einsum("ij,ij->i", flat, flat, dtype=np.float64) / pixels - mean_raw**2
    span = norm.hi - norm.lo
    if damage is not None:
        dmg = _blocks(_resample(damage, norm.scale, 0) > 0, size)[0][keep]
        damage_fraction = dmg.reshape(len(kept), pixels).sum(axis=1) / np.float32(pixels)
    else:
        damage_fraction = np.full(len(kept), np.nan, dtype=np.float32)
    r, c = rows[keep], cols[keep]
    r0, c0 = np.rint(r / norm.scale).astype(np.int32), np.rint(c / norm.scale).astype(np.int32)
    at = np.full(len(kept), index, dtype=np.int32)
    z, y, x = {"axial": (at, r0, c0), "coronal": (r0, at, c0), "sagittal": (r0, c0, at)}[plane]
    return {
        "plane_code": np.full(len(kept), f"{plane[0]}{index:04d}"),
        "r": r,
        "c": c,
        "plane": np.full(len(kept), plane),
        "z": z,
        "y": y,
        "x": x,
        "fov_fraction": fov[keep],
        "bone_fraction": bone[keep],
        "mean": (mean_raw - norm.lo) / span,
        "std": np.sqrt(np.maximum(var_raw, 0.0)) / span,
        "damage_fraction": damage_fraction,
        "chunk": chunks,
        "row": chunk_rows,
    }


def tile_dataset(
    data_root: Path,
    out_dir: Path,
    cfg: dict[str, Any],
    *,
    progress: bool = True,
    force: bool = False,
    inputs: tuple[Path, ...] = (),
) -> pd.DataFrame:
    """Tile every scan of the manifest into ``out_dir`` (replaced atomically); return the index.

    ``out_dir`` must be new, empty or an earlier tile store (else ``force``), and never the
    data root or one of ``inputs``, nor inside or around one (:func:`atomic_dir`).
    """
    manifest = read_manifest(data_root)
    if manifest.empty:
        raise TilingError(f"{data_root}: the manifest has no scans to tile")
    tissues = sorted(manifest["tissue"].unique())
    settings = {t: TileSettings.from_params(cfg, t) for t in tissues}
    frames: list[pd.DataFrame] = []
    normalization: dict[str, Any] = {}
    with atomic_dir(out_dir, owner="tile", inputs=(data_root, *inputs), force=force) as staging:
        for tissue in tissues:
            scans = manifest[manifest["tissue"] == tissue]
            for row in tqdm(
                list(scans.itertuples(index=False)),
                desc=f"tile {tissue}",
                unit="scan",
                disable=not progress,
            ):
                scan_rows, norm = tile_scan(
                    row, data_root, settings[tissue], staging, int(cfg["chunk_tiles"])
                )
                frames.append(scan_rows)
                normalization[row.scan_id] = {
                    **asdict(norm),
                    "tissue": tissue,
                    **asdict(settings[tissue]),
                }
        index = pd.concat(frames, ignore_index=True)
        with atomic_path(staging / INDEX_NAME) as tmp:
            index.to_parquet(tmp, index=False)
        write_text_atomic(
            staging / NORMALIZATION_NAME, json.dumps(normalization, indent=1, sort_keys=True) + "\n"
        )
    return index


PLANE_AXIS = {"axial": "z", "coronal": "y", "sagittal": "x"}  # index column of each plane


def tile_origin(tile_id: str) -> tuple[int, int]:
    """(row, column) of a tile in its resampled plane, from its id ``scan/<plane>-rrrr-cccc``."""
    _, r, c = tile_id.rsplit("/", 1)[1].split("-")
    return int(r), int(c)


def damage_masks(data_root: Path, rows: pd.DataFrame) -> np.ndarray:
    """Ground-truth damage masks of tiles (bool, ``(n, px, px)``), in ``rows`` order: where
    :func:`damage_labels` holds any kind of damage. ``masks.mean((1, 2))`` equals the
    index's ``damage_fraction``; all False for scans without a mask."""
    return damage_labels(data_root, rows) > 0


def damage_labels(data_root: Path, rows: pd.DataFrame) -> np.ndarray:
    """Ground-truth damage labels of tiles (uint8, ``(n, px, px)``; the values of
    :mod:`bonedamage.data.labels`), in ``rows`` order.

    Cut from each scan's label volume exactly as ``tile_scan`` cut the tile (same plane,
    nearest-neighbour resampling and origin); all 0 for scans without one.
    """
    manifest = read_manifest(data_root).set_index("scan_id")
    size = int(rows["tile_px"].iloc[0]) if len(rows) else 0
    out = np.zeros((len(rows), size, size), dtype=np.uint8)
    at = pd.Series(np.arange(len(rows)), index=rows.index)
    for scan_id, scan_rows in rows.groupby("scan_id", sort=False):
        if scan_id not in manifest.index:
            raise TilingError(f"{data_root}: scan {scan_id} of the tiles is not in the manifest")
        entry = manifest.loc[scan_id]
        if not isinstance(entry.mask_path, str) or not entry.mask_path:
            continue
        scale = scan_scale(float(entry.voxel_size_um), float(scan_rows["voxel_size_um"].iloc[0]))
        mask_file = confined(data_root, entry.mask_path, what=f"scan {scan_id}: mask_path")
        with open_volume(mask_file) as vol:
            for plane, plane_rows in scan_rows.groupby("plane", sort=False):
                read = plane_reader(vol, str(plane))[1]
                for index, group in plane_rows.groupby(PLANE_AXIS[str(plane)], sort=False):
                    labels = _label_values(_resample(read(int(index)), scale, 0))
                    for key, tile_id in zip(group.index, group["tile_id"], strict=True):
                        r, c = tile_origin(str(tile_id))
                        out[at[key]] = labels[r : r + size, c : c + size]
    return out


def _label_values(plane: np.ndarray) -> np.ndarray:
    """A mask plane of any dtype as uint8 label values; every value above 0 stays damage."""
    plane = np.asarray(plane)
    if plane.dtype == np.uint8:
        return plane
    return np.where(plane > 0, np.clip(np.rint(plane), 1, 255), 0).astype(np.uint8)
