"""The ``explain`` stage: Grad-CAM exports and localization metrics of a tissue's models.

For the CNN and the ResNet of a tissue (the same two the registry holds), on the test
split:

- overlay grids (PNG) of a fixed number of true/false positives/negatives each, the most
  confident first; their raw maps as float32 TIFFs of the tile's size; ``index.csv``
  linking tile ids, labels, probabilities, outcomes and files;
- localization on failed tiles with visible ground-truth damage (evenly spaced through
  the test split): the energy ratio and IoU of the maps against the damage masks, the
  same for a uniform and a centre-bias map, and ROAD faithfulness
  (:mod:`bonedamage.explain.gradcam`);
- the target layer: ``explain.layer``, or of ``explain.layer_choices`` the one that
  localizes best on the validation split's damaged tiles (per member of an ensemble),
  with every candidate's validation energy ratio in ``layers.json``.

Everything goes under ``reports/gradcam/<tissue>/<model>/`` and into
``metrics/<tissue>-gradcam.json``, and into the model's MLflow training run (artifacts
``gradcam/``, metrics ``gradcam_*``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from bonedamage.atomic import atomic_dir, check_output_dir, write_text_atomic
from bonedamage.data.tilestore import TileStore
from bonedamage.data.tiling import damage_masks
from bonedamage.explain import gradcam
from bonedamage.learn.data import split_rows
from bonedamage.learn.evaluate import THRESHOLD, write_json
from bonedamage.learn.models import build_module
from bonedamage.learn.train import seed_everything
from bonedamage.lifecycle.registry import Candidate, candidates
from bonedamage.lifecycle.tracking import version_tags


def evenly_spaced(n_items: int, n_pick: int) -> np.ndarray:
    """``n_pick`` indices spread evenly over ``range(n_items)`` (all of them if fewer)."""
    if n_items <= n_pick:
        return np.arange(n_items)
    return np.unique(np.linspace(0, n_items - 1, n_pick).round().astype(np.int64))


def cam_file_name(tile_id: str) -> str:
    return tile_id.replace("/", "__") + ".tif"


def export_outcomes(
    model: Any,
    store: TileStore,
    positions: np.ndarray,
    labels: np.ndarray,
    prob: np.ndarray,
    cfg: dict[str, Any],
    layer: str | None,
    out: Path,
) -> pd.DataFrame:
    """Overlay grids per outcome, CAM TIFFs and their index; return the index."""
    picks = gradcam.select_by_outcome(labels, prob, int(cfg["n_per_outcome"]), THRESHOLD)
    rows = []
    for outcome in gradcam.OUTCOMES:
        chosen = picks[outcome]
        if len(chosen) == 0:
            continue
        tiles = store.tiles(positions[chosen])
        cams = gradcam.compute_cams(model, tiles, cfg["method"], layer, int(cfg["batch_size"]))
        ids = store.index["tile_id"].to_numpy()[positions[chosen]]
        titles = [f"{outcome} p={prob[i]:.2f}" for i in chosen]
        gradcam.overlay_grid(tiles, cams, titles, out / f"{outcome}.png")
        for i, tile_id, cam in zip(chosen, ids, cams, strict=True):
            name = cam_file_name(str(tile_id))
            gradcam.write_cam_tiff(out / "cams" / name, cam)
            rows.append(
                {
                    "tile_id": tile_id,
                    "label": int(labels[i]),
                    "prob_failed": round(float(prob[i]), 6),
                    "outcome": outcome,
                    "cam_file": f"cams/{name}",
                    "overlay": f"{outcome}.png",
                }
            )
    index = pd.DataFrame(rows)
    write_text_atomic(out / "index.csv", index.to_csv(index=False))
    return index


def damaged_tiles(
    store: TileStore,
    data_root: Path,
    positions: np.ndarray,
    labels: np.ndarray,
    cfg: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray]:
    """Failed tiles with visible ground-truth damage, evenly spaced (at most
    ``localization_tiles``), and their damage masks; empty arrays when there are none."""
    frac = store.index["damage_fraction"].to_numpy()[positions]
    visible = positions[(labels == 1) & (frac >= float(cfg["visible_damage_fraction"]))]
    chosen = visible[evenly_spaced(len(visible), int(cfg["localization_tiles"]))]
    if len(chosen) == 0:
        return np.empty((0, 0, 0), np.float32), np.empty((0, 0, 0), bool)
    return store.tiles(chosen), damage_masks(data_root, store.index.iloc[chosen])


def choose_layer(
    model: Any, tiles: np.ndarray, masks: np.ndarray, cfg: dict[str, Any], architecture: str
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The Grad-CAM target layer(s) of ``model``: of ``explain.layer_choices``, the one
    that localizes best on the given (validation) tiles, per member of an ensemble;
    ``explain.layer`` when the architecture has no choices or no tile has a damage mask.

    Returns the layer for :func:`gradcam.compute_cams`, the metrics that record the
    choice, and each network's validation energy ratio per candidate.
    """
    names = (cfg.get("layer_choices") or {}).get(architecture)
    if not names or not masks.any():
        layer = layer_for(cfg, architecture)
        return layer, {"layer": layer or "last conv block"}, {}
    method, batch = cfg["method"], int(cfg["batch_size"])
    chosen, scores = gradcam.best_layers(model, tiles, masks, names, method, batch)
    nets = gradcam.networks(model)
    layers = [net.get_submodule(name) for net, name in zip(nets, chosen, strict=True)]
    cams = gradcam.compute_cams(model, tiles, method, layers, batch)
    val = gradcam.localization_summary(cams, masks)["cam_energy_ratio"]
    record = {"layer": ",".join(chosen), "val_cam_energy_ratio": val}
    return layers, record, {"chosen": chosen, "val_cam_energy_ratio": scores}


def localization(
    model: Any, tiles: np.ndarray, masks: np.ndarray, cfg: dict[str, Any], layer: Any
) -> dict[str, Any]:
    """Localization and faithfulness on failed test tiles with visible damage."""
    if len(tiles) == 0:
        return {"n_tiles": 0}
    cams = gradcam.compute_cams(model, tiles, cfg["method"], layer, int(cfg["batch_size"]))
    summary = gradcam.localization_summary(cams, masks)
    some = evenly_spaced(len(tiles), int(cfg["faithfulness_tiles"]))
    summary["faithfulness_road"] = gradcam.faithfulness(
        model, tiles[some], cams[some], seed=int(cfg["seed"])
    )
    summary["n_faithfulness_tiles"] = len(some)
    summary["mask_area_share"] = float(masks.mean())
    return summary


def _training_run(tissue: str, cand: Candidate) -> str | None:
    """The MLflow run that trained this candidate (latest match), if the store has it."""
    if cand.architecture == "cnn":
        where = "tags.stage = 'train_cnn' and tags.scheme = 'grouped'"
    elif cand.meta.get("init") in ("imagenet", "pretext", "scratch"):
        where = f"tags.stage = 'train_resnet' and tags.init = '{cand.meta['init']}'"
    else:
        return None
    where += " and attributes.status = 'FINISHED'"
    where += f" and tags.tissue = '{tissue}'"
    runs = mlflow.search_runs(
        filter_string=where, order_by=["attributes.start_time DESC"], max_results=1,
        output_format="list",
    )  # fmt: skip
    return runs[0].info.run_id if runs else None


def _log(tissue: str, cand: Candidate, out: Path, metrics: dict[str, Any]) -> None:
    numbers = {f"gradcam_{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    run_id = _training_run(tissue, cand)
    if run_id is None:
        with mlflow.start_run(
            run_name=f"explain-{tissue}-{cand.key}",
            tags={**version_tags(), "stage": "explain", "tissue": tissue},
        ) as run:
            run_id = run.info.run_id
    client = MlflowClient()
    for k, v in numbers.items():
        if np.isfinite(v):
            client.log_metric(run_id, k, v)
    client.log_artifacts(run_id, str(out), f"gradcam/{tissue}")


def run_explain(
    params: dict[str, Any],
    tissue: str,
    data_root: Path,
    tiles: Path,
    splits: Path,
    models: Path,
    metrics: Path,
    reports: Path,
    out: Path,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Grad-CAM exports and localization metrics for the tissue's CNN and ResNet.

    ``reports/<tissue>`` is replaced as a whole: it must be new, empty or earlier exports
    of explain (else ``force``), and never one of the inputs, inside or around one.
    """
    inputs = (data_root, tiles, splits, models, metrics)
    check_output_dir(reports / tissue, owner="explain", inputs=inputs, force=force)
    cfg = params["explain"]
    seed_everything(int(cfg["seed"]), int(params["train"]["threads"]))
    store, table = TileStore(tiles), pd.read_parquet(splits)
    positions, labels = split_rows(store, table, tissue, "grouped", "test")
    test = damaged_tiles(store, data_root, positions, labels, cfg)
    val = damaged_tiles(store, data_root, *split_rows(store, table, tissue, "grouped", "val"), cfg)
    cands = candidates(
        params["registry"]["prefix"], tissue, models, json.loads(metrics.read_text()),
        params["resnet"]["inits"],
    )[:2]  # fmt: skip
    results: dict[str, Any] = {}
    with atomic_dir(reports / tissue, owner="explain", inputs=inputs, force=force) as staging:
        for cand in cands:
            model = build_module(cand.meta, cand.weights)
            prob = gradcam.failed_probability(model, store.tiles(positions))
            layer, record, scores = choose_layer(model, *val, cfg, cand.architecture)
            export_outcomes(model, store, positions, labels, prob, cfg, layer, staging / cand.key)
            if scores:
                write_text_atomic(
                    staging / cand.key / "layers.json", json.dumps(scores, indent=2) + "\n"
                )
            results[cand.key] = {
                "method": cfg["method"],
                **record,
                **localization(model, *test, cfg, layer),
            }
    write_json(out, results)
    for cand in cands:
        _log(tissue, cand, reports / tissue / cand.key, results[cand.key])
    return results


def layer_for(cfg: dict[str, Any], architecture: str) -> str | None:
    """The target-layer override of an architecture (``explain.layer``), None for the default."""
    layer = cfg.get("layer")
    return layer.get(architecture) if isinstance(layer, dict) else layer
