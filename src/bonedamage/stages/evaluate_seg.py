"""Score a tissue's segmentation model on the test split (``evaluate-seg``): voxel Dice and
IoU per class and their means, the 95th-percentile Hausdorff distance, object-level
detection of each damage kind (precision, recall, F1) and the error of the crack count and
length per tile; on the same tiles and metrics, the CNN's Grad-CAM thresholded as a weakly
supervised segmentation (threshold chosen on the validation split), and its maps scored
with Quantus' mask-based localisation metrics on the failed tiles. Writes
METRICS/TISSUE-seg.json with the platform the numbers were made on; logged to the
segmentation model's training run. Tracked in MLflow (params mlflow;
MLFLOW_TRACKING_URI overrides)."""

from __future__ import annotations

import json
from pathlib import Path

from bonedamage.atomic import check_output_file, require, require_json
from bonedamage.config import require_tissue, stage_params
from bonedamage.data.tilestore import require_tables

PARAMS = ("pipeline", "mlflow", "train", "segment", "explain")


def run_evaluate_seg(
    params: Path,
    tissue: str,
    data_root: Path | None = None,
    tiles: Path | None = None,
    splits: Path | None = None,
    models: Path | None = None,
    metrics: Path | None = None,
    out: Path | None = None,
) -> int:
    """Test-split scores of the segmentation model and of the CNN's Grad-CAM as one."""
    cfg = stage_params(params, PARAMS)
    require_tissue(tissue, cfg.pipeline)
    paths = cfg.pipeline.paths
    root, tiles = Path(data_root or paths.raw), Path(tiles or paths.tiles)
    splits, models = Path(splits or paths.splits), Path(models or paths.models) / tissue
    explained = Path(metrics or Path(paths.metrics) / f"{tissue}-gradcam.json")
    out = Path(out or Path(paths.metrics) / f"{tissue}-seg.json")
    check_output_file(out, inputs=(params, root, tiles, splits, models, explained))
    require_tables(tiles, splits)
    for name in ("seg", "cnn"):
        require(models / f"{name}.pt", "input")
        require_json(models / f"{name}.json", "input")
    record = json.loads(require_json(explained, "input").read_text()).get("cnn", {})

    import numpy as np
    import pandas as pd
    import torch

    from bonedamage.data.tilestore import TileStore
    from bonedamage.explain.localisation import localisation_scores
    from bonedamage.explain.weak_segmentation import (
        best_threshold,
        cam_masks,
        cams_and_probs,
        recorded_layers,
    )
    from bonedamage.learn.checkpoint import load_checkpoint
    from bonedamage.learn.scoring import write_json
    from bonedamage.learn.seg_scoring import segmentation_report
    from bonedamage.learn.segmentation import load_segmenter, predict_probs, seg_split
    from bonedamage.learn.train import numerics_platform, seed_everything
    from bonedamage.lifecycle.seg_runs import log_seg_scores
    from bonedamage.lifecycle.tracking import configure

    seg, explain = cfg.segment.model_dump(), cfg.explain.model_dump()
    seed_everything(int(seg["seed"]), int(cfg.train.threads))
    segmenter, meta = load_segmenter(models / "seg.pt")
    classes = list(meta["classes"])
    store, table = TileStore(tiles), pd.read_parquet(splits)
    test, val = (seg_split(store, table, root, tissue, s, classes) for s in ("test", "val"))
    pixel_um = float(store.index["voxel_size_um"].to_numpy()[test.positions[0]])
    objects = {"pixel_um": pixel_um, "min_object_px": int(seg["min_object_px"]),
               "object_iou": float(seg["object_iou"])}  # fmt: skip
    binary = ["background", "damage"]
    pred = predict_probs(segmenter, test.tiles).argmax(1).astype(np.uint8)
    truth = test.classes
    scores = {
        "seg": segmentation_report(pred, truth, classes, **objects),
        "seg_damage": segmentation_report(
            (pred > 0).astype(np.uint8), (truth > 0).astype(np.uint8), binary, **objects
        ),
    }
    cnn = load_checkpoint(models / "cnn.pt")
    layers = recorded_layers(cnn, record)
    cam_args = (layers, explain["method"], int(explain["batch_size"]))
    val_cams, val_prob = cams_and_probs(cnn, val.tiles, *cam_args)
    threshold, val_dice = best_threshold(val_cams, val_prob, val.classes > 0,
                                         seg["cam_thresholds"])  # fmt: skip
    cams, prob = cams_and_probs(cnn, test.tiles, *cam_args)
    weak = cam_masks(cams, prob, threshold).astype(np.uint8)
    gradcam = segmentation_report(weak, (truth > 0).astype(np.uint8), binary, **objects)
    gradcam |= {"cam_threshold": threshold, "val_dice_damage": val_dice, "layer": record.get(
        "layer", "last conv block")}  # fmt: skip
    failed = test.labels == 1
    gradcam |= {f"quantus_{k}": v for k, v in localisation_scores(
        cams[failed], truth[failed] > 0).items()}  # fmt: skip
    # today's localisation figures of the explain stage, next to Quantus' (its tile choice)
    for key in ("cam_energy_ratio", "cam_iou", "faithfulness_road"):
        if key in record:
            gradcam[f"explain_{key}"] = record[key]
    scores["gradcam_cnn"] = gradcam
    scores["platform"] = numerics_platform(torch.device("cpu"))
    write_json(out, scores)
    configure(cfg.mlflow.model_dump())
    log_seg_scores(tissue, models / "seg.pt", scores, out)
    s, g = scores["seg"], scores["gradcam_cnn"]
    print(
        f"{tissue}: segmentation mean IoU {s['mean_iou']:.3f} (damage kinds "
        f"{s['mean_iou_damage_kinds']:.3f}), damage Dice {s['dice_damage']:.3f}, object F1 "
        f"{s['object_f1']:.3f}; CNN Grad-CAM >= {threshold:.2f}: damage Dice "
        f"{g['dice_damage']:.3f}, object F1 {g['object_f1']:.3f} on {s['n_tiles']} tiles"
    )
    return 0
