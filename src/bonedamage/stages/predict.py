"""Predict a whole scan (``predict``) with a registered model: tiles it exactly as the model
was trained (its plane, tile size in um, working voxel size, slice stride, intensity
percentiles, filters and 2.5-D context planes travel with the registered model), classifies
every tile in batches and writes tiles.csv, slices.csv, verdict.json, probability.tif and
cam.tif (ImageJ stacks carrying the voxel size) and orthoviews.png into OUT (replaced
atomically). Streams the scan: memory stays bounded. Tiles outside the model's domain are
marked, and a scan with too many of them gets the verdict ``uncertain``."""

from __future__ import annotations

from pathlib import Path

from bonedamage.atomic import require
from bonedamage.config import DEFAULT_PARAMS, stage_params

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
    batch_size: int = 256,
    progress: bool = True,
) -> int:
    """Predict a whole scan with a registered model: tile table, verdict, 3D damage maps."""
    require(scan, "scan", folder=None)  # before MLflow and the model load
    # params.yaml only overrides explain.layer and names the tracking store; without one,
    # the registered model carries its settings and MLFLOW_TRACKING_URI names the store
    bare = Path(params) == DEFAULT_PARAMS and not Path(params).is_file()
    cfg = None if bare else stage_params(params, PARAMS)

    from bonedamage.explain.exports import layer_for
    from bonedamage.explain.scan import load_registered, predict_scan
    from bonedamage.lifecycle.tracking import configure

    if cfg is not None:
        configure(cfg.mlflow.model_dump())
    classifier = load_registered(model)
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
        batch_size=batch_size,
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
