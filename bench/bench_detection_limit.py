"""Benchmark how much damage the CNN needs to tell failed from pristine bone.

    python bench/bench_detection_limit.py [--tissues cortical,trabecular]
        [--levels-cortical 6,30,100,300,1000,15000]
        [--levels-trabecular 0.03,0.06,0.09,0.12,0.17,0.22]
        [--specimens 8] [--epochs 4] [--work DIR] [--out /tmp/detlim-out] [--seed N]

Sweeps the damage of the phantoms (``bonedamage synth``) one level at a time:
cortical, the crack density ``synth.cortical.failure.crack_density_median_per_mm3``
(per mm^3; every failed specimen gets at least one crack); trabecular, the compaction
strain of the collapse band ``synth.trabecular.failure.band_strain``, drawn from
[level - 0.01, level + 0.01], which sets how many struts buckle and break. For each level
it generates ``--specimens`` specimens of the swept tissue (only) into the work folder, runs the
``tile`` and ``split`` stages on a params file pointed into that folder, and trains one
CNN (not the ensemble) with the recipe of ``models/<tissue>/cnn_search.json`` (the
committed best trial; params ``search.space`` mid-points when it is missing) for
``--epochs`` epochs on the CPU (``train.threads`` threads), as the ``train_cnn`` stage
trains a member. On the specimen-grouped test split it scores tile balanced accuracy,
ROC-AUC and scan accuracy (``learn.scoring.scan_level``, rule ``mean``: a scan is failed
when its tiles' mean failed probability is > 0.5), and Grad-CAM localization on the failed
test tiles with visible damage (``explain.visible_damage_fraction``): the CAM energy ratio
against the damage labels (1 = no better than a uniform map), with the layer chosen on
the validation split's damaged tiles from ``explain.layer_choices`` as the ``explain``
stage does. Damage is measured physically on the failed scans: cracks per scan (cortical,
the specimen's ``failure.n_cracks``), broken and buckled struts per scan (trabecular), and
the damaged share of the scan's voxels (label volume > 0); the plot's x axis is the first
(cortical) or the last (trabecular). Writes detection_limit.csv and detection_limit.png
to ``--out`` and prints a table. Figures only, no pass/fail.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from bonedamage.config import load_params
from bonedamage.data.manifest import read_manifest
from bonedamage.data.synth.generate import PHANTOMS_NAME, generate_dataset
from bonedamage.data.tilestore import TileStore
from bonedamage.data.volume import open_volume
from bonedamage.explain import gradcam
from bonedamage.explain.exports import choose_layer, damaged_tiles
from bonedamage.learn.datasets import TileDataset, make_loader, split_rows
from bonedamage.learn.recipes import train_cnn
from bonedamage.learn.scoring import scan_level, tile_metrics
from bonedamage.learn.train import predict
from bonedamage.stages.split import run_split
from bonedamage.stages.tile import run_tile

TISSUES = ("cortical", "trabecular")
# tissue -> (failure key swept, default levels)
SWEEPS = {
    "cortical": ("crack_density_median_per_mm3", "6,30,100,300,1000,15000"),
    "trabecular": ("band_strain", "0.03,0.06,0.09,0.12,0.17,0.22"),
}
STRAIN_HALF_WIDTH = 0.01  # a trabecular level L draws the band strain from [L - w, L + w]
COLUMNS = [
    "tissue", "level", "n_cracks", "broken_struts", "buckled_struts", "damaged_voxel_share",
    "visible_tile_share", "n_test_tiles", "tile_bal_acc", "roc_auc", "acc_visible",
    "acc_no_visible", "n_test_scans", "scan_acc", "cam_energy_ratio", "centre_energy_ratio",
    "cam_iou", "n_cam_tiles", "cam_layer", "best_epoch", "val_bal_acc", "seconds",
]  # fmt: skip


def parse_levels(text: str) -> list[float]:
    """``"6,30,100"`` -> [6.0, 30.0, 100.0]; empty items are an error."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise SystemExit(f"levels {text!r}: comma-separated numbers expected") from exc


def synth_config(
    synth: dict[str, Any], tissue: str, level: float, specimens: int, seed: int | None
) -> dict[str, Any]:
    """params ``synth`` with ``tissue``'s damage set to ``level`` and ``specimens``
    specimens."""
    cfg = copy.deepcopy(synth)
    cfg["specimens_per_tissue"] = specimens
    if seed is not None:
        cfg["seed"] = seed
    key = SWEEPS[tissue][0]
    if tissue == "trabecular":
        lo = max(level - STRAIN_HALF_WIDTH, 0.0)
        cfg[tissue]["failure"][key] = [round(lo, 6), round(level + STRAIN_HALF_WIDTH, 6)]
    else:
        cfg[tissue]["failure"][key] = level
    return cfg


def write_params(params: dict[str, Any], synth: dict[str, Any], folder: Path) -> Path:
    """A params file (a temporary file in ``folder``) with ``synth`` and every pipeline
    path pointed into ``folder``: the stages read and write nothing else."""
    doc = copy.deepcopy(params)
    doc["synth"] = synth
    doc["pipeline"]["paths"] = {k: str(folder / k) for k in doc["pipeline"]["paths"]}
    fd, name = tempfile.mkstemp(prefix="params-", suffix=".yaml", dir=folder)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
    return Path(name)


def generate_tissue(synth: dict[str, Any], tissue: str, raw: Path) -> None:
    """Generate ``tissue``'s phantoms (only) into ``raw``."""
    generate_dataset(synth, raw, progress=False, force=True, tissues=(tissue,))


def damaged_share(path: Path) -> float:
    """Share of a label volume's voxels that are damaged (label > 0)."""
    damaged = total = 0
    with open_volume(path) as vol:
        for z in range(len(vol)):
            plane = vol.read(z)
            damaged += int(np.count_nonzero(plane))
            total += plane.size
    return damaged / max(total, 1)


def damage_measures(raw: Path, tissue: str) -> dict[str, float]:
    """Mean physical damage of the failed scans: cracks (cortical: the specimen's
    ``failure.n_cracks``), broken and buckled struts (trabecular: scan meta), and the
    damaged share of the scan's voxels (its label volume)."""
    manifest = read_manifest(raw)
    failed = manifest[(manifest["tissue"] == tissue) & (manifest["state"] == "failed")]
    phantoms = json.loads((raw / PHANTOMS_NAME).read_text())
    scans = {s["scan_id"]: s for p in phantoms.values() for s in p["scans"]}
    out = {"n_cracks": math.nan, "broken_struts": math.nan, "buckled_struts": math.nan}
    if tissue == "cortical":
        out["n_cracks"] = float(
            np.mean([phantoms[s]["failure"]["n_cracks"] for s in failed["specimen_id"]])
        )
    else:
        for key in ("broken_struts", "buckled_struts"):
            out[key] = float(np.mean([scans[s][key] for s in failed["scan_id"]]))
    shares = [damaged_share(raw / p) for p in failed["mask_path"]]
    out["damaged_voxel_share"] = float(np.mean(shares))
    return out


def _mid(values: list[Any], log: bool = False) -> Any:
    lo, hi = values[0], values[-1]
    return math.sqrt(lo * hi) if log else (lo + hi) / 2


def recipe(params: dict[str, Any], models: Path, tissue: str) -> tuple[dict[str, Any], str]:
    """The CNN recipe (arch, lr, weight decay, batch size, augmentation strength) of the
    committed best trial ``models/<tissue>/cnn_search.json``, as ``train_cnn`` reads it;
    without one, the mid-points of params ``search.space`` (the first of a choice)."""
    path = models / tissue / "cnn_search.json"
    if path.is_file():
        return json.loads(path.read_text()), str(path)
    space = params["search"]["space"]
    arch = {
        "n_blocks": round(_mid(space["n_blocks"])),
        "base_filters": space["base_filters"][len(space["base_filters"]) // 2],
        "filter_growth": _mid(space["filter_growth"]),
        "kernel_size": space["kernel_size"][0],
        "norm": space["norm"][0],
        "pool": space["pool"][0],
        "dropout": _mid(space["dropout"]) / 2,
        "dense_units": space["dense_units"][len(space["dense_units"]) // 2],
    }
    best = {
        "arch": arch,
        "lr": _mid(space["lr"], log=True),
        "weight_decay": _mid(space["weight_decay"], log=True),
        "batch_size": space["batch_size"][0],
        "augment_strength": _mid(space["augment_strength"]),
    }
    return best, "params search.space mid-points"


def test_scores(
    model: Any, store: TileStore, splits: pd.DataFrame, tissue: str, visible: float
) -> dict[str, Any]:
    """Tile and scan metrics of ``model`` on the grouped test split."""
    positions, labels = split_rows(store, splits, tissue, "grouped", "test")
    loader = make_loader(TileDataset(store, positions, labels), 256, shuffle=False)
    prob, _ = predict(model, loader, next(model.parameters()).device)
    p = prob[:, 1].astype(np.float64)
    tiles = tile_metrics(labels, p)
    scans = scan_level(store.index["scan_id"].to_numpy()[positions], labels, p, rule="mean")
    frac = store.index["damage_fraction"].to_numpy()[positions]
    failed, pred = labels == 1, p > 0.5
    seen = failed & (frac >= visible)
    unseen = failed & (frac < visible)
    return {
        "n_test_tiles": len(labels),
        "tile_bal_acc": tiles["balanced_accuracy"],
        "roc_auc": tiles["roc_auc"] if tiles["roc_auc"] is not None else math.nan,
        "visible_tile_share": float(seen.sum() / max(failed.sum(), 1)),
        "acc_visible": float(pred[seen].mean()) if seen.any() else math.nan,
        "acc_no_visible": float(pred[unseen].mean()) if unseen.any() else math.nan,
        "n_test_scans": scans["n_scans"],
        "scan_acc": scans["scan_accuracy"],
    }


def localization(
    model: Any, store: TileStore, splits: pd.DataFrame, tissue: str, raw: Path, cfg: dict
) -> dict[str, Any]:
    """Grad-CAM energy ratio on the failed test tiles with visible damage; the layer chosen
    on the validation split's damaged tiles (params ``explain``)."""
    val = damaged_tiles(store, raw, *split_rows(store, splits, tissue, "grouped", "val"), cfg)
    test = damaged_tiles(store, raw, *split_rows(store, splits, tissue, "grouped", "test"), cfg)
    if len(test[0]) == 0:
        nan = math.nan
        return {"cam_energy_ratio": nan, "centre_energy_ratio": nan, "cam_iou": nan,
                "n_cam_tiles": 0, "cam_layer": ""}  # fmt: skip
    layer, record, _ = choose_layer(model, *val, cfg, "cnn")
    cams = gradcam.compute_cams(model, test[0], cfg["method"], layer, int(cfg["batch_size"]))
    s = gradcam.localization_summary(cams, test[1])
    return {
        "cam_energy_ratio": s["cam_energy_ratio"],
        "centre_energy_ratio": s["centre_energy_ratio"],
        "cam_iou": s["cam_iou"],
        "n_cam_tiles": s["n_tiles"],
        "cam_layer": record["layer"],
    }


def run_level(
    params: dict[str, Any],
    tissue: str,
    level: float,
    best: dict[str, Any],
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    """Generate, tile, split, train and score one damage level of one tissue."""
    folder = work / f"{tissue}-{level:g}"
    folder.mkdir(parents=True, exist_ok=True)
    synth = synth_config(params["synth"], tissue, level, args.specimens, args.seed)
    path = write_params(params, synth, folder)
    raw, times = folder / "raw", {}
    t0 = time.perf_counter()
    generate_tissue(synth, tissue, raw)
    damage = damage_measures(raw, tissue)
    times["synth"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_tile(path, progress=False)
    run_split(path)
    times["tile+split"] = time.perf_counter() - t0
    store = TileStore(folder / "tiles")
    splits = pd.read_parquet(folder / "splits")
    train_cfg = {**params["train"], "device": "cpu", "epochs": args.epochs}
    train_cfg["patience"] = args.epochs
    if args.seed is not None:
        train_cfg["seed"] = args.seed
    t0 = time.perf_counter()
    model, fit = train_cnn(store, splits, tissue, best, train_cfg, params["augment"])
    times["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    explain = params["explain"]
    scores = test_scores(model, store, splits, tissue, float(explain["visible_damage_fraction"]))
    scores |= localization(model, store, splits, tissue, raw, explain)
    times["score"] = time.perf_counter() - t0
    row = {"tissue": tissue, "level": level, **damage, **scores}
    row |= {"best_epoch": fit.best_epoch, "val_bal_acc": fit.best_score}
    row["seconds"] = sum(times.values())
    shown = "  ".join(f"{k} {v:.0f} s" for k, v in times.items())
    print(f"  {tissue} {level:g}: {shown}  total {row['seconds']:.0f} s", flush=True)
    return row


def damage_axis(rows: pd.DataFrame) -> pd.Series:
    """The plot's damage measure: cracks per failed scan (cortical: it follows the crack
    density, while the damaged voxel share follows the few largest cracks), the damaged
    share of the failed scans' voxels in per cent (trabecular: broken struts are 0 at the
    lowest strains)."""
    cortical = rows["tissue"] == "cortical"
    return rows["n_cracks"].where(cortical, 100 * rows["damaged_voxel_share"])


def table(rows: pd.DataFrame) -> str:
    """The printed table: damage measures and scores per tissue and level."""
    shown = pd.DataFrame(
        {
            "tissue": rows["tissue"],
            "level": rows["level"].map("{:g}".format),
            "cracks": rows["n_cracks"].map("{:.1f}".format),
            "broken": rows["broken_struts"].map("{:.1f}".format),
            "buckled": rows["buckled_struts"].map("{:.1f}".format),
            "dmg vox %": (100 * rows["damaged_voxel_share"]).map("{:.3f}".format),
            "vis tiles %": (100 * rows["visible_tile_share"]).map("{:.0f}".format),
            "tile bal acc": rows["tile_bal_acc"].map("{:.3f}".format),
            "AUC": rows["roc_auc"].map("{:.3f}".format),
            "scan acc": [
                f"{a:.3f} ({n})"
                for a, n in zip(rows["scan_acc"], rows["n_test_scans"], strict=True)
            ],
            "CAM energy": rows["cam_energy_ratio"].map("{:.2f}".format),
            "centre": rows["centre_energy_ratio"].map("{:.2f}".format),
            "s": rows["seconds"].map("{:.0f}".format),
        }
    )
    return shown.to_string(index=False).replace(" nan", " -  ")


def plot(rows: pd.DataFrame, path: Path, settings: str) -> None:
    """Scores (top) and Grad-CAM energy ratio (bottom) against the damage measure, one
    column per tissue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    tissues = list(dict.fromkeys(rows["tissue"]))
    fig, axes = plt.subplots(2, len(tissues), figsize=(5.2 * len(tissues), 7), squeeze=False)
    for col, tissue in enumerate(tissues):
        sub = rows[rows["tissue"] == tissue].copy()
        sub["x"] = damage_axis(sub)
        sub = sub.sort_values("x")
        unit = "cracks/mm³" if tissue == "cortical" else "band strain"
        top, bottom = axes[0, col], axes[1, col]
        top.plot(sub["x"], sub["tile_bal_acc"], "o-", label="tile balanced accuracy")
        top.plot(sub["x"], sub["roc_auc"], "^:", label="tile ROC-AUC")
        top.plot(sub["x"], sub["scan_acc"], "s--", label="scan accuracy")
        top.axhline(0.5, color="grey", lw=0.8, ls=":")
        top.set_ylim(0.0, 1.03)
        top.set_ylabel("test score")
        top.set_title(tissue)
        bottom.plot(sub["x"], sub["cam_energy_ratio"], "o-", label="Grad-CAM")
        bottom.plot(sub["x"], sub["centre_energy_ratio"], "x:", label="centre-bias map")
        bottom.axhline(1.0, color="grey", lw=0.8, ls=":", label="uniform map")
        bottom.set_ylabel("CAM energy ratio on damage")
        for ax in (top, bottom):
            for _, r in sub.iterrows():
                ax.annotate(f"{r['level']:g}", (r["x"], ax.get_ylim()[0]), fontsize=7,
                            xytext=(0, 3), textcoords="offset points", ha="center")  # fmt: skip
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper left")
        measure = (
            "cracks per failed scan"
            if tissue == "cortical"
            else "damaged voxels of the failed scans, %"
        )
        bottom.set_xlabel(f"{measure} (labels: {unit})")
    fig.suptitle(f"Detection limit of the CNN ({settings})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tissues", default="cortical,trabecular")
    parser.add_argument("--levels-cortical", default=SWEEPS["cortical"][1],
                        help="crack densities, per mm^3")  # fmt: skip
    parser.add_argument("--levels-trabecular", default=SWEEPS["trabecular"][1],
                        help=f"band strains (each +-{STRAIN_HALF_WIDTH})")  # fmt: skip
    parser.add_argument("--specimens", type=int, default=8, help="per level (at least 3)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--models", default="models", help="holds <tissue>/cnn_search.json")
    parser.add_argument("--work", help="data of every level (default: a temporary folder)")
    parser.add_argument("--out", default="/tmp/detlim-out")
    parser.add_argument("--seed", type=int, help="synth, split and train seed (default: params)")
    args = parser.parse_args()
    if args.specimens < 3:
        parser.error("--specimens must be at least 3 for a train/val/test split")
    params = load_params(args.params)
    if args.seed is not None:
        params["split"]["seed"] = args.seed
    tissues = args.tissues.split(",")
    unknown = sorted(set(tissues) - set(TISSUES))
    if unknown:
        parser.error(f"unknown tissue(s) {unknown}")
    levels = {
        "cortical": parse_levels(args.levels_cortical),
        "trabecular": parse_levels(args.levels_trabecular),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = (
        f"{args.specimens} specimens per level, {args.epochs} epochs, one CNN, "
        f"CPU {params['train']['threads']} threads"
    )
    print(settings, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="detlim-work-") as tmp:
        work = Path(args.work or tmp)
        for tissue in tissues:
            best, source = recipe(params, Path(args.models), tissue)
            print(f"== {tissue}: sweep {SWEEPS[tissue][0]}; CNN recipe of {source}", flush=True)
            for level in levels[tissue]:
                rows.append(run_level(params, tissue, level, best, args, work))
                frame = pd.DataFrame(rows, columns=COLUMNS)
                frame.to_csv(out / "detection_limit.csv", index=False)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    plot(frame, out / "detection_limit.png", settings)
    print(table(frame))
    print(f"wrote {out / 'detection_limit.csv'} and {out / 'detection_limit.png'}")


if __name__ == "__main__":
    main()
