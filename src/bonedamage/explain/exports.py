"""What the ``explain`` stage exports for one model: overlay grids of true/false
positives/negatives and their raw maps as float32 TIFFs with an index; localization of the
maps against the ground-truth damage masks (energy ratio, IoU, uniform and centre-bias
baselines, ROAD faithfulness: :mod:`bonedamage.explain.gradcam`); and the choice of the
target layer (``explain.layer``, or of ``explain.layer_choices`` the one that localizes best
on the validation split's damaged tiles).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonedamage.atomic import write_text_atomic
from bonedamage.data.tilestore import TileStore
from bonedamage.data.tiling import damage_masks
from bonedamage.explain import gradcam
from bonedamage.learn.models import build_module
from bonedamage.learn.scoring import THRESHOLD
from bonedamage.lifecycle.registry import Candidate


def evenly_spaced(n_items: int, n_pick: int) -> np.ndarray:
    """``n_pick`` indices spread evenly over ``range(n_items)`` (all of them if fewer)."""
    if n_items <= n_pick:
        return np.arange(n_items)
    return np.unique(np.linspace(0, n_items - 1, n_pick).round().astype(np.int64))


def cam_file_name(tile_id: str) -> str:
    return tile_id.replace("/", "__") + ".tif"


NONE_OF = {  # what an outcome without tiles means
    "tp": "no failed tile was called failed",
    "fp": "no pristine tile was called failed",
    "tn": "no pristine tile was called pristine",
    "fn": "no failed tile was called pristine",
}


def pixel_size_um(store: TileStore, positions: np.ndarray) -> float | None:
    """The tiles' pixel size in um (their working voxel size); None when the tiles do not
    share one (no scale bar is better than a wrong one)."""
    sizes = np.unique(store.index["voxel_size_um"].to_numpy(dtype=np.float64)[positions])
    return float(sizes[0]) if len(sizes) == 1 else None


def outcome_text(
    outcome: str, tissue: str, model_name: str, layer_name: str, method: str, tile_um: float | None
) -> dict[str, str]:
    """The words of one outcome's overlay grid: ``title`` (map, tissue, model, layer and
    the outcome), ``note`` (what grey, colour, p(failed) and every outcome mean) and
    ``empty`` (the placeholder of an outcome without tiles)."""
    cam = gradcam.CAM_NAMES.get(method, method)
    size = f"{tile_um:g} µm wide; " if tile_um else ""
    name, meaning = gradcam.OUTCOME_TEXT[outcome].split(": ", 1)
    legend = "; ".join(
        f"{key} = {text.split(': ', 1)[1]}" for key, text in gradcam.OUTCOME_TEXT.items()
    )
    return {
        "title": f"{cam} (failed class) · {tissue} · model {model_name} · target layer "
        f"{layer_name}\n{name.capitalize()} ({outcome}): {meaning} · test split, most "
        "confident first",
        "note": f"Grey: the tile ({size}of a 2.5-D tile, its middle plane); colour, "
        f"translucent over it: where {cam} finds evidence for the failed class, scaled 0-1 "
        "per tile. p(failed): the model's probability that the tile comes from a failed "
        f"specimen; the tile is called failed when p(failed) > {THRESHOLD:g}.\nOutcomes: "
        f"{legend}.",
        "empty": f"no {outcome} tiles in the test split\n({NONE_OF[outcome]})",
    }


def export_outcomes(
    model: Any,
    store: TileStore,
    positions: np.ndarray,
    labels: np.ndarray,
    prob: np.ndarray,
    cfg: dict[str, Any],
    layer: str | None,
    out: Path,
    *,
    model_name: str = "model",
    layer_name: str | None = None,
) -> pd.DataFrame:
    """Overlay grids per outcome (``<outcome>.png``, a placeholder figure for an outcome
    without tiles), CAM TIFFs and their index; return the index. ``model_name`` and
    ``layer_name`` (default: ``layer``, or the last conv block) head the figures."""
    picks = gradcam.select_by_outcome(labels, prob, int(cfg["n_per_outcome"]), THRESHOLD)
    tissue = ", ".join(sorted(set(store.index["tissue"].to_numpy()[positions].astype(str))))
    pixel = pixel_size_um(store, positions) if len(positions) else None
    tile_px = int(store.index["tile_px"].iloc[positions[0]]) if len(positions) else 0
    layer_name = layer_name or (layer if isinstance(layer, str) else "last conv block")
    layer_name = layer_name.replace(",", ", ")  # one per member of an ensemble
    rows = []
    for outcome in gradcam.OUTCOMES:
        chosen = picks[outcome]
        text = outcome_text(
            outcome, tissue, model_name, layer_name, cfg["method"], pixel and pixel * tile_px
        )
        if len(chosen) == 0:
            nothing = np.empty((0, tile_px, tile_px), np.float32)
            gradcam.overlay_grid(nothing, nothing, [], out / f"{outcome}.png", **text)
            continue
        tiles = store.tiles(positions[chosen])
        cams = gradcam.compute_cams(model, tiles, cfg["method"], layer, int(cfg["batch_size"]))
        ids = store.index["tile_id"].to_numpy()[positions[chosen]]
        titles = [f"p(failed) = {prob[i]:.2f}" for i in chosen]
        gradcam.overlay_grid(
            tiles,
            cams,
            titles,
            out / f"{outcome}.png",
            pixel_um=pixel,
            map_name=gradcam.CAM_NAMES.get(cfg["method"], cfg["method"]),
            **text,
        )
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


def explain_model(
    cand: Candidate,
    store: TileStore,
    test: tuple[np.ndarray, np.ndarray],
    damaged: dict[str, tuple[np.ndarray, np.ndarray]],
    cfg: dict[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    """Grad-CAM of one registered candidate's model on the test split's tiles
    (``test``: positions, labels) into ``out_dir``; its layer chosen on the ``damaged``
    validation tiles and localization measured on the test ones (tiles, masks); return the
    model's explanation metrics (params ``explain``: ``cfg``)."""
    positions, labels = test
    model = build_module(cand.meta, cand.weights)
    prob = gradcam.failed_probability(model, store.tiles(positions))
    layer, record, layers = choose_layer(model, *damaged["val"], cfg, cand.architecture)
    export_outcomes(
        model, store, positions, labels, prob, cfg, layer, out_dir,
        model_name=cand.key, layer_name=record["layer"],
    )  # fmt: skip
    if layers:
        write_text_atomic(out_dir / "layers.json", json.dumps(layers, indent=2) + "\n")
    return {"method": cfg["method"], **record, **localization(model, *damaged["test"], cfg, layer)}


def layer_for(cfg: dict[str, Any], architecture: str) -> str | None:
    """The target-layer override of an architecture (``explain.layer``), None for the default."""
    layer = cfg.get("layer")
    return layer.get(architecture) if isinstance(layer, dict) else layer
