"""Whole-scan prediction: tile a scan as training did, classify every tile, map the damage.

A registered model carries its tiling (plane, tile size in um and px, working voxel size,
slice stride, intensity percentiles, field-of-view and bone filters, 2.5-D context).
``predict_scan`` streams the scan plane by plane along that plane's normal (with the
neighbouring planes of a 2.5-D model), normalises it with the scan's
own robust range (as ``bonedamage tile`` does), cuts the same grid of tiles, and
classifies them in batches; optionally it computes each tile's Grad-CAM map.

The model answers only inside its applicability domain (``bonedamage.learn.domain``,
registered with it): a scan coarser than its working voxel by more than the domain's
``max_voxel_ratio`` is refused (``allow_resample`` predicts anyway, as *uncertain*); every
tile gets a domain distance and an in-domain flag; a scan with more out-of-domain tiles
than ``max_out_of_domain_share`` gets the verdict *uncertain*, with the reason, never
*failed* or *pristine*. Before any plane is read, the number of tiles and the size of
the outputs are estimated; outputs over ``max_output_ratio`` times the scan are refused
unless ``force``.

Outputs (in ``out``):

- ``tiles.csv``: one row per classified tile (plane index, origin, scan voxel position,
  failed probability, domain distance, in-domain flag); ``slices.csv``: per plane (tiles,
  mean and max probability, failed tiles);
- ``verdict.json``: the scan-level verdict with its rule (failed when the mean tile
  probability exceeds the model's threshold: the ``mean`` rule of ``evaluate``), the
  model's own call, the out-of-domain share and the reasons for an *uncertain* verdict;
- ``probability.tif`` and ``cam.tif``: float32 ImageJ stacks, one page per predicted
  plane (pages along the plane normal, ``slice_stride`` of the scan's planes apart, so
  the page spacing is ``slice_stride`` x the scan's voxel; in-plane pixels at the working
  voxel size; NaN where no tile was classified), with the spacing and pixel size in their
  tags so they open at scale in Fiji and napari;
- ``orthoviews.png``: the middle page and the two orthogonal sections of the probability
  stack.

Memory stays bounded whatever the scan's size: planes are read one at a time, tiles are
classified in batches, and the stacks are built in memory-mapped files on disk.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from bonedamage.atomic import atomic_dir
from bonedamage.data.tilestore import normalize
from bonedamage.data.tiling import (
    PLANE_AXIS,
    TileSettings,
    TilingError,
    fit_normalization,
    plane_reader,
    plane_tiles,
    plane_with_context,
    scan_scale,
)
from bonedamage.data.volume import (
    VOXEL_RANGE_TEXT,
    VolumeError,
    open_volume,
    voxel_size_in_range,
    write_volume,
)
from bonedamage.explain import gradcam
from bonedamage.lifecycle.pyfunc import TileClassifier


class PredictError(ValueError):
    """A scan or model ``predict`` cannot use (no voxel size, scan smaller than a tile...)."""


def settings_of(tiling: dict[str, Any]) -> TileSettings:
    """The model's tiling as :class:`TileSettings` (its first plane is the one predicted)."""
    return TileSettings(
        tile_um=float(tiling["tile_um"]),
        working_voxel_um=float(tiling["working_voxel_um"]),
        planes=tuple(tiling["planes"]),
        slice_stride=int(tiling["slice_stride"]),
        percentiles=tuple(tiling["percentiles"]),  # type: ignore[arg-type]
        min_fov_fraction=float(tiling.get("min_fov_fraction", 0.0)),
        min_bone_fraction=float(tiling.get("min_bone_fraction", 0.0)),
        context_um=float(tiling.get("context_um", 0.0)),
    )


@dataclass
class _Plane:
    index: int
    cut: Any  # PlaneTiles


@dataclass
class _Result:
    plane: _Plane
    prob: np.ndarray
    distance: np.ndarray | None  # domain distance per tile (None: the model has no domain)
    inside: np.ndarray | None
    maps: np.ndarray | None


def _flush(
    model: TileClassifier,
    pending: list[_Plane],
    lo: float,
    hi: float,
    cam: bool,
    batch_size: int,
    cam_layer: str | None,
) -> list[_Result]:
    """Classify, place in the domain (and explain) the kept tiles of the pending planes."""
    kept = [p.cut.tiles[p.cut.keep] for p in pending]
    counts = [len(k) for k in kept]
    raw = np.concatenate(kept) if sum(counts) else np.empty((0, 0, 0))  # (n, [3,] px, px)
    prob, distance, inside = model.assess(raw, lo, hi) if len(raw) else (np.empty(0), None, None)
    maps = None
    if cam and len(raw):
        maps = gradcam.compute_cams(
            model.module, normalize(raw, lo, hi), layer=cam_layer, batch_size=batch_size
        )
    out, start = [], 0
    for plane, n in zip(pending, counts, strict=True):
        part = slice(start, start + n)
        out.append(
            _Result(
                plane,
                prob[part],
                None if distance is None else distance[part],
                None if inside is None else inside[part],
                None if maps is None else maps[part],
            )
        )
        start += n
    return out


def load_registered(uri: str) -> TileClassifier:
    """A registered or logged bonedamage model; PredictError naming the URI otherwise."""
    from mlflow.exceptions import MlflowException

    from bonedamage.lifecycle.pyfunc import load_classifier

    try:
        model = load_classifier(uri)
    except (MlflowException, OSError, ValueError, KeyError) as exc:
        import mlflow

        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise PredictError(
            f"{uri}: cannot load the model ({first}; tracking store {mlflow.get_tracking_uri()},"
            " set MLFLOW_TRACKING_URI to the store that holds it)"
        ) from exc
    if not isinstance(model, TileClassifier):
        raise PredictError(f"{uri}: not a bonedamage tile classifier")
    return model


def predict_scan(
    model: TileClassifier,
    scan: Path,
    out: Path,
    *,
    voxel_size_um: float | None = None,
    model_uri: str = "",
    allow_resample: bool = False,
    cam: bool = True,
    cam_layer: str | None = None,
    batch_size: int = 256,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Predict a whole scan into ``out`` (replaced atomically); return the verdict.

    ``cam_layer`` names the Grad-CAM target layer (None: the last conv block). A scan
    coarser than the model's domain allows is refused unless ``allow_resample`` (its
    verdict is then *uncertain*); outputs larger than the domain's ``max_output_ratio``
    times the scan are refused unless ``force``.
    """
    if batch_size < 1:
        raise PredictError(f"batch_size {batch_size}: must be a positive number of tiles")
    settings = settings_of(model.tiling)
    if cam:
        try:
            gradcam.target_layers(model.module, cam_layer)
        except ValueError as exc:
            raise PredictError(f"{model_uri or 'model'}: CAM layer: {exc}") from exc
    plane = settings.planes[0]
    size = settings.tile_px
    with open_volume(scan) as vol:
        voxel = voxel_size_um if voxel_size_um is not None else vol.voxel_size_um
        if voxel is None:
            raise PredictError(
                f"{scan}: no voxel size in the TIFF tags (ImageJ, OME or resolution); "
                "give it with --voxel-size-um"
            )
        if not (np.isfinite(voxel) and voxel > 0):
            raise PredictError(f"{scan}: voxel size {voxel} um; it must be positive")
        if not voxel_size_in_range(voxel):
            raise PredictError(
                f"{scan}: voxel size {voxel:g} um is outside {VOXEL_RANGE_TEXT}; give it in um"
            )
        if vol.shape[0] < 2:
            raise PredictError(f"{scan}: a single 2D slice; predict needs the whole stack")
        voxel = float(voxel)
        limits = _Limits.of(model)
        resampled = limits.check_voxel(scan, voxel, settings.working_voxel_um, allow_resample)
        scale = scan_scale(voxel, settings.working_voxel_um)
        norm = fit_normalization(vol, settings.percentiles, scale, str(scan))
        count, read_plane = plane_reader(vol, plane)
        context = settings.context_planes(float(voxel))

        def read(i: int) -> np.ndarray:
            return plane_with_context(read_plane, count, i, context)

        indices = list(range(0, count, settings.slice_stride))
        page_of = {index: page for page, index in enumerate(indices)}
        estimate = _estimate(vol.shape, vol.dtype, plane, scale, len(indices), settings, cam)
        limits.check_size(scan, estimate, force)
        try:
            first = plane_tiles(_finite(read(indices[0]), scan, plane, 0), norm, settings)
        except TilingError as exc:
            raise TilingError(
                f"{scan}: {exc} ({plane} plane at the model's working voxel size "
                f"{settings.working_voxel_um} um; tile {settings.tile_um} um)"
            ) from exc
        page_shape = first.image.shape
        with (
            atomic_dir(out, owner="predict", inputs=(scan,), force=force) as staging,
            tempfile.TemporaryDirectory(dir=staging) as scratch,
        ):
            shape = (len(indices), *page_shape)
            prob_vol = np.lib.format.open_memmap(Path(scratch) / "p.npy", "w+", np.float32, shape)
            cam_vol = np.lib.format.open_memmap(Path(scratch) / "c.npy", "w+", np.float32, shape)
            prob_vol[:] = np.nan
            cam_vol[:] = np.nan
            rows: list[dict[str, Any]] = []
            pending: list[_Plane] = []
            bar = tqdm(total=len(indices), desc=f"predict {scan.name}", disable=not progress)

            def emit(results: list[_Result]) -> None:
                for res in results:
                    p = res.plane
                    page = page_of[p.index]
                    r_all, c_all = p.cut.rows[p.cut.keep], p.cut.cols[p.cut.keep]
                    for k, (r, c) in enumerate(zip(r_all, c_all, strict=True)):
                        prob_vol[page, r : r + size, c : c + size] = res.prob[k]
                        if res.maps is not None:
                            cam_vol[page, r : r + size, c : c + size] = res.maps[k]
                        row = _tile_row(plane, p.index, int(r), int(c), scale, res.prob[k])
                        if res.distance is not None and res.inside is not None:
                            row["domain_distance"] = round(float(res.distance[k]), 3)
                            row["in_domain"] = int(res.inside[k])
                        rows.append(row)
                    bar.update(1)

            for i in indices:
                if i != indices[0]:
                    cut = plane_tiles(_finite(read(i), scan, plane, i), norm, settings)
                else:
                    cut = first
                if cut.image.shape != page_shape:
                    raise VolumeError(scan, f"{plane} plane {i} is {cut.image.shape}")
                pending.append(_Plane(i, cut))
                if sum(int(p.cut.keep.sum()) for p in pending) >= batch_size:
                    emit(_flush(model, pending, norm.lo, norm.hi, cam, batch_size, cam_layer))
                    pending = []
            if pending:
                emit(_flush(model, pending, norm.lo, norm.hi, cam, batch_size, cam_layer))
            bar.close()
            tiles = pd.DataFrame(rows, columns=TILE_COLUMNS)
            if tiles.empty:
                raise PredictError(
                    f"{scan}: no tile passed the field-of-view and bone filters of the model"
                )
            tiles["label"] = (tiles["prob_failed"] > model.threshold).astype(int)
            verdict = _verdict(tiles, model, scan, model_uri, plane, voxel, settings)
            verdict.update(limits.judge(tiles, resampled), n_pages=len(indices), estimate=estimate)
            _write_tables(staging, tiles, plane, verdict)
            # pages are slice_stride of the scan's own planes apart; in-plane pixels are at
            # the working voxel size (the planes were resampled to it)
            spacing = settings.slice_stride * voxel
            for name, stack in (("probability", prob_vol), ("cam", cam_vol)):
                if name == "cam" and not cam:
                    continue
                write_volume(
                    staging / f"{name}.tif",
                    (stack[k] for k in range(len(stack))),
                    shape,
                    np.float32,
                    voxel_size_um=spacing,
                    pixel_size_um=settings.working_voxel_um,
                )
            orthoviews(prob_vol, staging / "orthoviews.png", spacing, settings.working_voxel_um)
    return verdict


@dataclass(frozen=True)
class _Limits:
    """The part of a model's applicability domain that ``predict`` applies to a scan."""

    has_domain: bool
    max_voxel_ratio: float
    max_out_of_domain_share: float
    max_output_ratio: float

    @classmethod
    def of(cls, model: TileClassifier) -> _Limits:
        dom = model.domain or {}
        return cls(
            model.domain is not None,
            float(dom.get("max_voxel_ratio", DEFAULT_MAX_VOXEL_RATIO)),
            float(dom.get("max_out_of_domain_share", 0.0)),
            float(dom.get("max_output_ratio", DEFAULT_MAX_OUTPUT_RATIO)),
        )

    def check_voxel(self, scan: Path, voxel: float, working: float, allow: bool) -> str | None:
        """PredictError for a scan too coarse for the model, unless ``allow``; then the
        reason the result is out of the domain (None: the voxel is in the domain)."""
        ratio = voxel / working
        if ratio <= self.max_voxel_ratio:
            return None
        reason = (
            f"the scan's voxel size {voxel:g} um is {ratio:.1f}x coarser than the model's "
            f"working voxel {working:g} um (at most {self.max_voxel_ratio:g}x): features of "
            "that size were not resolved in the training scans"
        )
        if not allow:
            raise PredictError(f"{scan}: {reason}; --allow-resample predicts anyway (uncertain)")
        return reason

    def check_size(self, scan: Path, estimate: dict[str, int], force: bool) -> None:
        """PredictError when the outputs would outweigh the scan absurdly (unless ``force``)."""
        limit = self.max_output_ratio * estimate["scan_bytes"]
        if estimate["output_bytes"] > limit and not force:
            raise PredictError(
                f"{scan}: about {estimate['tiles']} tiles and "
                f"{estimate['output_bytes'] / 2**20:.0f} MiB of maps, over "
                f"{self.max_output_ratio:g}x the scan's {estimate['scan_bytes'] / 2**20:.1f} MiB;"
                " --force predicts anyway"
            )

    def judge(self, tiles: pd.DataFrame, resampled: str | None) -> dict[str, Any]:
        """The domain part of the verdict; the verdict is *uncertain* when the scan is
        outside the domain (see the reason), never *failed* or *pristine*."""
        reasons = [resampled] if resampled else []
        share = None
        if not self.has_domain:
            reasons.append("the model carries no applicability domain: re-register it")
        else:
            share = round(1.0 - float(tiles["in_domain"].mean()), 6)
            if share > self.max_out_of_domain_share:
                reasons.append(
                    f"{share:.0%} of the tiles are outside the model's domain (more than "
                    f"{self.max_out_of_domain_share:.0%}): they do not look like its training tiles"
                )
        out = {"out_of_domain_share": share, "in_domain": not reasons, "domain_reasons": reasons}
        return {**out, "verdict": "uncertain"} if reasons else out


DEFAULT_MAX_VOXEL_RATIO = 1.5  # for a model registered without a domain
DEFAULT_MAX_OUTPUT_RATIO = 10.0


def _estimate(
    shape: tuple[int, ...],
    dtype: np.dtype,
    plane: str,
    scale: float,
    pages: int,
    settings: TileSettings,
    cam: bool,
) -> dict[str, int]:
    """Tiles and bytes of the outputs, from the scan's shape alone (before any plane is read)."""
    axes = {"axial": (1, 2), "coronal": (0, 2), "sagittal": (0, 1)}[plane]
    h, w = (max(1, round(shape[a] * scale)) for a in axes)
    per_page = (h // settings.tile_px) * (w // settings.tile_px)
    stacks = 2 if cam else 1
    return {
        "tiles": pages * per_page,
        "output_bytes": pages * h * w * 4 * stacks,
        "scan_bytes": int(np.prod(shape)) * np.dtype(dtype).itemsize,
    }


def _finite(raw: np.ndarray, scan: Path, plane: str, index: int) -> np.ndarray:
    """The plane, or PredictError when it holds NaN or inf (the range samples few planes)."""
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise PredictError(
            f"{scan}: {plane} plane {index} contains NaN or infinite values; scans must be finite"
        )
    return raw


TILE_COLUMNS = [
    "plane",
    "index",
    "r",
    "c",
    "z",
    "y",
    "x",
    "prob_failed",
    "domain_distance",
    "in_domain",
]


def _tile_row(plane: str, index: int, r: int, c: int, scale: float, prob: float) -> dict:
    r0, c0 = round(r / scale), round(c / scale)
    z, y, x = {"axial": (index, r0, c0), "coronal": (r0, index, c0), "sagittal": (r0, c0, index)}[
        plane
    ]
    return {"plane": plane, "index": index, "r": r, "c": c, "z": z, "y": y, "x": x,
            "prob_failed": round(float(prob), 6)}  # fmt: skip


def _verdict(
    tiles: pd.DataFrame,
    model: TileClassifier,
    scan: Path,
    uri: str,
    plane: str,
    voxel: float,
    settings: TileSettings,
) -> dict[str, Any]:
    mean = float(tiles["prob_failed"].mean())
    return {
        "scan": str(scan),
        "model": uri,
        "tissue": model.tiling.get("tissue"),
        "verdict": "failed" if mean > model.threshold else "pristine",
        "model_call": "failed" if mean > model.threshold else "pristine",
        "rule": f"failed when the mean tile probability > {model.threshold}",
        "mean_prob_failed": round(mean, 6),
        "failed_tile_share": round(float(tiles["label"].mean()), 6),
        "n_tiles": len(tiles),
        "n_planes_with_tiles": int(tiles["index"].nunique()),
        "plane": plane,
        "stack_axis": PLANE_AXIS[plane],
        "voxel_size_um": voxel,
        "working_voxel_um": settings.working_voxel_um,
        "tile_um": settings.tile_um,
        "slice_stride": settings.slice_stride,
    }


def _write_tables(out: Path, tiles: pd.DataFrame, plane: str, verdict: dict) -> None:
    tiles.to_csv(out / "tiles.csv", index=False)
    slices = (
        tiles.groupby("index")
        .agg(
            n_tiles=("prob_failed", "size"),
            mean_prob_failed=("prob_failed", "mean"),
            max_prob_failed=("prob_failed", "max"),
            n_failed=("label", "sum"),
        )
        .reset_index()
        .rename(columns={"index": PLANE_AXIS[plane]})
        .round(6)
    )
    slices.to_csv(out / "slices.csv", index=False)
    (out / "verdict.json").write_text(json.dumps(verdict, indent=2, sort_keys=True) + "\n")


def orthoviews(stack: np.ndarray, path: Path, spacing: float, pixel: float) -> None:
    """The middle page and the two orthogonal sections of a stack, with a colour bar.

    Sections are stretched along the page axis to their physical aspect (``spacing`` /
    ``pixel``); probabilities in magma from 0 to 1, NaN (no tile) in grey. Drawn with
    Pillow, not a matplotlib figure: it is a fixed cost of every prediction, and a figure
    costs more than the forward pass of a small scan.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    n, h, w = stack.shape
    stretch = max(1, round(spacing / pixel))
    views = [
        ("page (in-plane)", np.asarray(stack[n // 2])),
        ("rows x pages", np.repeat(stack[:, h // 2, :], stretch, axis=0)),
        ("columns x pages", np.repeat(stack[:, :, w // 2], stretch, axis=0)),
    ]
    zoom = max(1, ORTHO_PX // max(max(v.shape) for _, v in views))
    lut = (colormaps["magma"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)

    def colour(values: np.ndarray) -> np.ndarray:
        index = np.clip(np.nan_to_num(values, nan=0.0) * 255 + 0.5, 0, 255).astype(np.uint8)
        rgb = lut[index]
        rgb[np.isnan(values)] = 128
        return np.kron(rgb, np.ones((zoom, zoom, 1), dtype=np.uint8))

    panels = [(title, colour(v)) for title, v in views]
    bar = colour(np.linspace(1.0, 0.0, max(p.shape[0] for _, p in panels) // zoom)[:, None])
    bar = np.repeat(bar[:, :1], 16, axis=1)
    gap, top = 12, 18
    width = sum(p.shape[1] for _, p in panels) + bar.shape[1] + gap * (len(panels) + 2) + 24
    canvas = Image.new("RGB", (width, bar.shape[0] + top + gap), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for title, panel in [*panels, ("p(failed)", bar)]:
        canvas.paste(Image.fromarray(panel), (x, top))
        draw.text((x, 3), title, fill="black")
        x += panel.shape[1] + gap
    draw.text((x - gap + 4, top), "1", fill="black")
    draw.text((x - gap + 4, top + bar.shape[0] - 10), "0", fill="black")
    canvas.save(path, format="PNG")


ORTHO_PX = 320  # the longest panel side in the PNG, in pixels (integer zoom)
