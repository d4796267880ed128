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
- ``orthoviews.png``: the middle page and the two orthogonal sections through its centre,
  the scan in grey under the probability map, in um, titled with the scan and its verdict
  (:func:`orthoviews_figure`).

Memory stays bounded whatever the scan's size: planes are read one at a time, tiles are
classified in batches, and the stacks are built in memory-mapped files on disk.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    VolumeReader,
    open_volume,
    voxel_size_in_range,
    write_volume,
)
from bonedamage.explain import gradcam
from bonedamage.lifecycle.pyfunc import TileClassifier

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
        voxel = scan_voxel_size(vol, scan, voxel_size_um)
        limits = DomainLimits.of(model)
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
            first = plane_tiles(finite_plane(read(indices[0]), scan, plane, 0), norm, settings)
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
            spacing = settings.slice_stride * voxel  # between pages (see the stacks below)
            sections = Sections.empty(plane, shape, spacing, settings.working_voxel_um)
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
                    cut = plane_tiles(finite_plane(read(i), scan, plane, i), norm, settings)
                else:
                    cut = first
                if cut.image.shape != page_shape:
                    raise VolumeError(scan, f"{plane} plane {i} is {cut.image.shape}")
                sections.record(page_of[i], np.clip(normalize(cut.image, norm.lo, norm.hi), 0, 1))
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
            sections.probability(prob_vol)
            orthoviews(sections, verdict, staging / "orthoviews.png", settings)
    return verdict


def scan_voxel_size(vol: VolumeReader, scan: Path, voxel_size_um: float | None) -> float:
    """The scan's voxel size in um (``voxel_size_um``, else its tags); PredictError naming
    the scan when there is none, it is implausible, or the scan is a single slice."""
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
    return float(voxel)


@dataclass(frozen=True)
class DomainLimits:
    """The part of a model's applicability domain that ``predict`` applies to a scan."""

    has_domain: bool
    max_voxel_ratio: float
    max_out_of_domain_share: float
    max_output_ratio: float

    @classmethod
    def of(cls, model: TileClassifier) -> DomainLimits:
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


def finite_plane(raw: np.ndarray, scan: Path, plane: str, index: int) -> np.ndarray:
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


PAGE_AXES = {"axial": ("y", "x"), "coronal": ("z", "x"), "sagittal": ("z", "y")}  # rows, cols
PROB_CMAP = "viridis"  # p(failed) over the scan: perceptual, and unlike the faded untiled area
PROB_ALPHA = 0.5
UNTILED_FADE = 0.6  # the untiled area: the scan under white at this opacity


@dataclass
class Sections:
    """What :func:`orthoviews` draws: the middle page of the probability stack and the two
    sections through the page's centre (its middle row and middle column, across all
    pages), each with the scan under it (normalised as the tiles are, 0..1, at the same
    pixels). ``record`` takes each page's scan plane as it streams by; ``probability``
    takes the finished stack. Memory: one page and two sections."""

    plane: str
    page: int  # the page shown (the middle one)
    spacing_um: float  # between pages
    pixel_um: float  # in-plane
    scan: list[np.ndarray]  # page (h, w), rows section (n, w), columns section (n, h)
    prob: list[np.ndarray]

    @classmethod
    def empty(
        cls, plane: str, shape: tuple[int, int, int], spacing: float, pixel: float
    ) -> Sections:
        """Sections of a stack of ``shape`` (pages, h, w), all NaN until filled."""
        n, h, w = shape
        blank = [np.full(s, np.nan, np.float32) for s in ((h, w), (n, w), (n, h))]
        return cls(plane, n // 2, spacing, pixel, blank, [b.copy() for b in blank])

    def record(self, page: int, image: np.ndarray) -> None:
        """Keep what the figure needs of page ``page``'s scan plane (normalised)."""
        h, w = image.shape
        self.scan[1][page] = image[h // 2]
        self.scan[2][page] = image[:, w // 2]
        if page == self.page:
            self.scan[0][:] = image

    def probability(self, stack: np.ndarray) -> None:
        """Take the page and sections of the finished probability stack (n, h, w)."""
        _, h, w = stack.shape
        self.prob = [np.array(stack[self.page]), np.array(stack[:, h // 2]),
                     np.array(stack[:, :, w // 2])]  # fmt: skip


def _verdict_lines(verdict: dict[str, Any]) -> list[str]:
    """The figure's title: the scan and verdict, why, and the model that gave it."""
    call = (
        f"mean p(failed) {verdict['mean_prob_failed']:.2f} over {verdict['n_tiles']} tiles "
        f"({verdict['failed_tile_share']:.0%} of them called failed); {verdict['rule']}"
    )
    lines = [f"{Path(str(verdict['scan'])).name}: verdict {verdict['verdict']}"]
    if verdict["verdict"] == "uncertain":
        lines.append(f"the model's own call: {verdict['model_call']}, {call}")
        lines += [f"uncertain: {reason}" for reason in verdict.get("domain_reasons", [])]
    else:
        lines.append(call)
    lines.append(
        f"model {verdict.get('model') or '(no URI given)'} "
        f"({verdict.get('tissue') or 'tissue not recorded'}): {verdict['plane']} tiles of "
        f"{verdict['tile_um']:g} µm at {verdict['working_voxel_um']:g} µm/px, from one plane in "
        f"{verdict['slice_stride']} of a scan at {verdict['voxel_size_um']:g} µm/voxel"
    )
    return lines


def orthoviews_figure(
    sections: Sections, verdict: dict[str, Any], settings: TileSettings | None = None
) -> Figure:
    """Orthogonal views of a prediction (a matplotlib ``Figure`` on an Agg canvas).

    Three panels: the middle page and the sections through its centre, the scan in grey
    under p(failed) per tile (``PROB_CMAP``, translucent), axes named after the scan's
    axes with ticks in um (``sections``' voxel sizes, to physical aspect), dashed lines
    where the other views cut. Where no tile was classified the scan is faded. The title
    names the scan, the verdict (with the model's call and the reasons when it is
    uncertain) and the model; a colour bar and a legend explain the colours
    (``settings``: the filters that left areas untiled). No pyplot state.
    """
    import textwrap

    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    s = sections
    rows_axis, cols_axis = PAGE_AXES[s.plane]
    page_axis = PLANE_AXIS[s.plane]
    (h, w), n = s.scan[0].shape, len(s.scan[1])
    p, d = s.pixel_um, s.spacing_um

    def extent(rows: int, row_um: float, cols: int, col_um: float) -> tuple[float, ...]:
        return (-col_um / 2, (cols - 0.5) * col_um, (rows - 0.5) * row_um, -row_um / 2)

    def name(axis: str) -> str:
        return f"{axis} (µm{', load axis' if axis == 'z' else ''})"

    views = [  # title, scan, prob, extent, (x axis, y axis), cut lines (horizontal, vertical)
        (f"{s.plane} plane at {page_axis} = {s.page * d:g} µm", s.scan[0], s.prob[0],
         extent(h, p, w, p), (cols_axis, rows_axis), ((h // 2) * p, (w // 2) * p)),
        (f"section at {rows_axis} = {(h // 2) * p:g} µm", s.scan[1], s.prob[1],
         extent(n, d, w, p), (cols_axis, page_axis), (s.page * d, None)),
        (f"section at {cols_axis} = {(w // 2) * p:g} µm", s.scan[2], s.prob[2],
         extent(n, d, h, p), (rows_axis, page_axis), (s.page * d, None)),
    ]  # fmt: skip
    widths = [v[3][1] - v[3][0] for v in views]
    heights = [v[3][2] - v[3][3] for v in views]
    panel_h = 3.2  # inches: the tallest panel
    scale = panel_h / max(heights)
    fig_w = sum(widths) * scale + 2.4
    fig_w = max(fig_w, 9.0)
    head, *rest = _verdict_lines(verdict)
    lines = [part for line in rest for part in textwrap.wrap(line, int(fig_w * 15))]
    title_h, body_h = 0.45 + 0.16 * len(lines), panel_h + 1.7
    fig = Figure(figsize=(fig_w, title_h + body_h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, body = fig.subfigures(2, 1, height_ratios=[title_h, body_h])
    top.text(0.01, 1 - 0.1 / title_h, head, fontsize=12, fontweight="bold", va="top")
    top.text(0.01, 1 - 0.4 / title_h, "\n".join(lines), fontsize=8.5, va="top", linespacing=1.4)
    axes = body.subplots(1, 3, width_ratios=widths)
    prob_cmap = colormaps[PROB_CMAP]
    for ax, (label, scan, prob, ext, (x_name, y_name), (hline, vline)) in zip(
        axes, views, strict=True
    ):
        ax.imshow(np.clip(scan, 0, 1), cmap="gray", vmin=0, vmax=1, extent=ext,
                  interpolation="nearest")  # fmt: skip
        ax.imshow(prob, cmap=prob_cmap, vmin=0, vmax=1, alpha=PROB_ALPHA, extent=ext,
                  interpolation="nearest")  # fmt: skip
        fade = np.zeros((*prob.shape, 4), np.float32)
        fade[np.isnan(prob)] = (1.0, 1.0, 1.0, UNTILED_FADE)
        ax.imshow(fade, extent=ext, interpolation="nearest")
        ax.axhline(hline, color="cyan", linestyle="--", linewidth=0.8)
        if vline is not None:
            ax.axvline(vline, color="cyan", linestyle="--", linewidth=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(name(x_name), fontsize=8)
        ax.set_ylabel(name(y_name), fontsize=8)
        ax.tick_params(labelsize=7)
    bar = body.colorbar(ScalarMappable(Normalize(0, 1), prob_cmap), ax=axes, shrink=0.9,
                       ticks=[0, 0.25, 0.5, 0.75, 1])  # fmt: skip
    bar.set_label("p(failed) of the tile (translucent over the scan)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    filters = (
        f" (field of view < {settings.min_fov_fraction:.0%} of the tile, bone < "
        f"{settings.min_bone_fraction:.0%})"
        if settings is not None
        else ""
    )
    grey = 0.5 * (1 - UNTILED_FADE) + UNTILED_FADE
    handles = [
        Patch(facecolor=prob_cmap(0.85), alpha=PROB_ALPHA, edgecolor="0.4",
              label="colour over the grey scan: p(failed) of the tile there"),
        Patch(facecolor=(grey, grey, grey), edgecolor="0.4",
              label="faded scan, no colour: no tile; outside the field of view or too little "
              f"bone{filters}, or the margin the tile grid leaves"),
        Line2D([], [], color="cyan", linestyle="--", linewidth=0.8,
               label="where the other two views cut"),
    ]  # fmt: skip
    body.legend(handles=handles, loc="outside lower center", fontsize=7.5, ncols=1,
               frameon=False)  # fmt: skip
    return fig


def orthoviews(
    sections: Sections,
    verdict: dict[str, Any],
    path: Path,
    settings: TileSettings | None = None,
) -> None:
    """Write :func:`orthoviews_figure` as a PNG (no software/date metadata: the same
    prediction gives the same bytes)."""
    fig = orthoviews_figure(sections, verdict, settings)
    fig.savefig(path, format="png", metadata={"Software": None})
