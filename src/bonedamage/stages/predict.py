"""Predict a whole scan (``predict``) with a registered model: tiles it exactly as the model
was trained (its plane, tile size in um, working voxel size, slice stride, intensity
percentiles, filters and 2.5-D context planes travel with the registered model). Streams
the scan: memory stays bounded. Tiles outside the model's domain are marked, and a scan
with too many of them gets the verdict ``uncertain``; OUT is replaced atomically.

A classifier classifies every tile in batches and writes tiles.csv, slices.csv,
verdict.json, probability.tif and cam.tif (ImageJ stacks carrying the voxel size) and
orthoviews.png. A segmentation model (models:/bonedamage-<tissue>-seg@champion) segments
every plane by overlapping tiles (--overlap) and writes, in the scan's own voxel grid,
damage_probability.tif (percent) and labels.tif (0 none, 1 microcrack, 2 fracture,
3 buckled), the microdamage report morphometry.json / morphometry.csv and profile.csv,
tiles.csv, verdict.json and orthoviews.png (labels over the scan)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bonedamage.atomic import require
from bonedamage.config import DEFAULT_PARAMS, stage_params

if TYPE_CHECKING:
    from bonedamage.lifecycle.seg_pyfunc import TileSegmenter

PARAMS = ("mlflow", "explain")


def run_predict(
    params: Path,
    scan: Path,
    model: str,
    out: Path,
    *,
    force: bool = False,
    voxel_size_um: float | None = None,
    no_cam: bool = False,
    allow_resample: bool = False,
    cam_layer: str | None = None,
    batch_size: int | None = None,
    overlap: float | None = None,
    min_component_voxels: int | None = None,
    progress: bool = True,
) -> int:
    """Predict a whole scan with a registered model: tile table, verdict, 3D damage maps.

    ``batch_size`` defaults to 256 tiles for a classifier, 64 for a segmentation model;
    ``overlap`` (segmentation models only) to 0.5, ``min_component_voxels`` (the report's
    smallest counted component, segmentation models only) to 8, as ``describe`` counts.
    """
    require(scan, "scan", folder=None)  # before MLflow and the model load
    # params.yaml only overrides explain.layer and names the tracking store; without one,
    # the registered model carries its settings and MLFLOW_TRACKING_URI names the store
    bare = Path(params) == DEFAULT_PARAMS and not Path(params).is_file()
    cfg = None if bare else stage_params(params, PARAMS)

    from bonedamage.explain.exports import layer_for
    from bonedamage.explain.scan import PredictError, load_registered, predict_scan
    from bonedamage.lifecycle.seg_pyfunc import TileSegmenter
    from bonedamage.lifecycle.tracking import configure

    if cfg is not None:
        configure(cfg.mlflow.model_dump())
    classifier = load_registered(model)
    if isinstance(classifier, TileSegmenter):
        if cam_layer is not None:
            raise PredictError(f"{model}: a segmentation model has no Grad-CAM; drop --cam-layer")
        options = {"voxel_size_um": voxel_size_um, "allow_resample": allow_resample,
                   "batch_size": batch_size or 64, "progress": progress, "force": force,
                   "overlap": 0.5 if overlap is None else overlap}  # fmt: skip
        if min_component_voxels is not None:
            options["min_component_voxels"] = min_component_voxels
        return _segment(classifier, Path(scan), model, Path(out), options)
    for name, value in (("--overlap", overlap), ("--min-component-voxels", min_component_voxels)):
        if value is not None:
            raise PredictError(f"{model}: {name} applies to segmentation models only")
    kind = classifier.meta["kind"]
    override = layer_for(cfg.explain.model_dump(), kind) if cfg is not None else None
    verdict = predict_scan(
        classifier,
        Path(scan),
        Path(out),
        voxel_size_um=voxel_size_um,
        model_uri=model,
        allow_resample=allow_resample,
        cam=not no_cam,
        cam_layer=cam_layer or override or classifier.meta.get("cam_layer"),
        batch_size=batch_size or 256,
        progress=progress,
        force=force,
    )
    print(
        f"{scan}: {verdict['verdict']} (mean tile probability "
        f"{verdict['mean_prob_failed']:.3f} over {verdict['n_tiles']} tiles; "
        f"{verdict['rule']}) -> {out}"
    )
    for reason in verdict["domain_reasons"]:  # why the verdict is uncertain
        print(f"  outside the model's domain: {reason}")
    return 0


def _segment(
    segmenter: TileSegmenter, scan: Path, model: str, out: Path, options: dict[str, Any]
) -> int:
    """Damage maps and the microdamage report of a scan, with a segmentation model."""
    from bonedamage.explain.segment_scan import segment_scan

    verdict = segment_scan(segmenter, scan, out, model_uri=model, **options)
    counts = ", ".join(f"{n} {kind}" for kind, n in verdict["counts"].items())
    print(
        f"{scan}: damage map {verdict['verdict']} (damaged bone fraction "
        f"{verdict['damaged_bone_fraction']:.2%}; components: {counts}) -> {out}"
    )
    for reason in verdict["domain_reasons"]:
        print(f"  outside the model's domain: {reason}")
    return 0
