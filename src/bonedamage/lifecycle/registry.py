"""MLflow model registry: register each tissue's models, promote challengers to champion.

Names (``registry.prefix`` = ``bonedamage``):

- ``<prefix>-<tissue>-cnn``: the final searched CNN;
- ``<prefix>-<tissue>-resnet``: the ResNet of the init with the best *validation* score;
- ``<prefix>-<tissue>``: the one name to call per tissue: whichever of the two has the
  better validation score (the test split never chooses a model);
- ``<prefix>-<tissue>-seg``: the damage segmentation model (a U-Net; class maps per tile),
  promoted on its held-out damage Dice and object F1 instead of the classifiers' balanced
  accuracy and ROC-AUC.

Registering is idempotent: a version whose weights and test set are already registered
under a name is reused, so ``dvc repro`` can re-sync the registry of a fresh machine
without piling up copies. A new version gets the alias ``challenger``; ``promote`` moves
``champion`` onto it only when it is at least as good as the champion on the same test
set (see :func:`decide`), and records every decision as version tags. Aliases and tags
only: MLflow's stages are deprecated.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

from bonedamage.data.tilestore import TileStore
from bonedamage.data.tiling import TileSettings
from bonedamage.learn import domain
from bonedamage.learn.datasets import split_rows
from bonedamage.learn.models import build_module
from bonedamage.learn.scoring import THRESHOLD
from bonedamage.lifecycle import seg_pyfunc
from bonedamage.lifecycle.pyfunc import MODEL_CODE
from bonedamage.lifecycle.seg_runs import seg_training_run
from bonedamage.lifecycle.tracking import file_md5, process_tags, training_run, version_tags

CHAMPION, CHALLENGER = "champion", "challenger"
METRICS = ("balanced_accuracy", "roc_auc", "accuracy", "f1", "ece", "scan_accuracy")
SEGMENTER = "segmenter"  # the architecture of a segmentation candidate
SEG_SUFFIX = "-seg"
SEG_METRICS = (
    "dice_damage", "iou_damage", "mean_iou", "mean_iou_damage_kinds", "object_f1", "hd95_um",
)  # fmt: skip


class PromotionError(RuntimeError):
    """A challenger that cannot be compared with the champion (e.g. other test data)."""


@dataclass(frozen=True)
class Candidate:
    """One trained model of a tissue, ready to register under ``name``."""

    name: str
    architecture: str  # cnn | resnet
    key: str  # its entry in metrics/<tissue>.json
    weights: Path
    meta: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def val_key(self) -> str:
        """The validation score it was selected by: balanced accuracy, or a segmentation
        model's Dice of the damage classes."""
        return "val_dice_damage" if self.architecture == SEGMENTER else "val_balanced_accuracy"

    @property
    def val_score(self) -> float:
        return float(self.meta[self.val_key])

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The test metrics its versions carry (``metric.<name>`` tags)."""
        return SEG_METRICS if self.architecture == SEGMENTER else METRICS


# -- what to register -------------------------------------------------------------------
def _candidate(name: str, arch: str, key: str, weights: Path, metrics: dict) -> Candidate:
    if key not in metrics:
        raise PromotionError(f"{key!r} has no test metrics in the metrics file: evaluate first")
    meta = json.loads(weights.with_suffix(".json").read_text())
    return Candidate(name, arch, key, weights, meta, metrics[key])


def candidates(
    prefix: str, tissue: str, models: Path, metrics: dict[str, Any], inits: list[str]
) -> list[Candidate]:
    """CNN, best-validation ResNet, and the better of the two under the tissue's own name."""
    cnn = _candidate(f"{prefix}-{tissue}-cnn", "cnn", "cnn", models / "cnn.pt", metrics)
    resnets = [
        _candidate(
            f"{prefix}-{tissue}-resnet",
            "resnet",
            f"resnet_{init}",
            models / "resnet" / f"resnet_{init}.pt",
            metrics,
        )
        for init in inits
    ]
    resnet = max(resnets, key=lambda c: c.val_score)  # first init wins a tie
    best = cnn if cnn.val_score >= resnet.val_score else resnet
    return [cnn, resnet, replace(best, name=f"{prefix}-{tissue}")]


def seg_candidate(prefix: str, tissue: str, models: Path, metrics: dict[str, Any]) -> Candidate:
    """The tissue's segmentation model (``models/seg.pt``) with its test scores (the
    ``seg`` entry of ``evaluate_seg``'s metrics file)."""
    name = seg_model_name(prefix, tissue)
    return _candidate(name, SEGMENTER, "seg", models / "seg.pt", metrics)


def test_set_fingerprint(store: TileStore, splits: pd.DataFrame, tissue: str) -> str:
    """Hash of the test tiles (ids, labels, raw bytes and normalisation) of a tissue.

    Two versions are comparable only when their test metrics come from the same tiles.
    """
    positions, labels = split_rows(store, splits, tissue, "grouped", "test")
    index = store.index.iloc[positions]
    digest = hashlib.sha256()
    digest.update("\n".join(index["tile_id"].astype(str)).encode())
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    digest.update(index[["norm_lo", "norm_hi"]].to_numpy(dtype=np.float64).tobytes())
    for p in positions:
        digest.update(store.raw(int(p)).tobytes())
    return digest.hexdigest()[:16]


def tiling_info(
    tile_cfg: dict[str, Any], tissue: str, tile_px: int, channels: int = 1
) -> dict[str, Any]:
    """The tiling a model was trained with: how ``predict`` must cut and scale new scans."""
    s = TileSettings.from_params(tile_cfg, tissue)
    if (s.tile_px, s.channels) != (tile_px, channels):
        raise PromotionError(
            f"{tissue}: the model takes {channels}-channel {tile_px} px tiles but params tile "
            f"settings (tile_um, context_um) give {s.channels}-channel {s.tile_px} px: "
            "re-run the pipeline"
        )
    return {
        "tissue": tissue,
        "tile_px": tile_px,
        "tile_um": s.tile_um,
        "working_voxel_um": s.working_voxel_um,
        "planes": list(s.planes),
        "slice_stride": s.slice_stride,
        "percentiles": list(s.percentiles),
        "min_fov_fraction": s.min_fov_fraction,
        "min_bone_fraction": s.min_bone_fraction,
        "context_um": s.context_um,
        "channels": s.channels,
        "threshold": THRESHOLD,
    }


def fit_domain(
    cand: Candidate,
    store: TileStore,
    table: pd.DataFrame,
    tiling: dict[str, Any],
    cfg: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A candidate's applicability domain (see :mod:`bonedamage.learn.domain`): fitted on
    its training tiles, its threshold calibrated on the validation tiles, with the
    acquisition it may answer for (tissue, working voxel, coarsest voxel ratio) and the
    share of out-of-domain tiles above which a scan's verdict is *uncertain*."""
    tissue = tiling["tissue"]
    module = _module(cand)
    train_pos, train_labels = split_rows(store, table, tissue, "grouped", "train")
    val_pos, _ = split_rows(store, table, tissue, "grouped", "val")
    train, val = store.tiles(train_pos), store.tiles(val_pos)
    val_features, val_intensity = (
        domain.penultimate_features(module, val),
        domain.intensity_stats(val),
    )
    try:
        summary, arrays = domain.calibrate(
            domain.penultimate_features(module, train),
            train_labels,
            domain.intensity_stats(train),
            val_features,
            val_intensity,
            float(cfg["accept"]),
        )
    except ValueError as exc:
        raise PromotionError(f"{cand.name}: no applicability domain: {exc}") from exc
    _, inside = domain.in_domain(summary, arrays, val_features, val_intensity)
    outside = pd.Series(~inside).groupby(store.index["scan_id"].to_numpy()[val_pos]).mean()
    summary.update(
        tissue=tissue,
        working_voxel_um=tiling["working_voxel_um"],
        max_voxel_ratio=float(cfg["max_voxel_ratio"]),
        max_out_of_domain_share=float(cfg["max_out_of_domain_share"]),
        max_output_ratio=float(cfg["max_output_ratio"]),
        val_scan_out_of_domain_share_max=round(float(outside.max()), 6),
    )
    return summary, arrays


def _module(cand: Candidate) -> Any:
    """The candidate's network, weights loaded, in eval mode."""
    if cand.architecture == SEGMENTER:
        from bonedamage.learn.segmentation import load_segmenter

        return load_segmenter(cand.weights)[0]
    return build_module(cand.meta, cand.weights)


def domain_md5(summary: dict[str, Any]) -> str:
    """Fingerprint of a domain summary (versions with another domain are not reused)."""
    return hashlib.md5(json.dumps(summary, sort_keys=True).encode()).hexdigest()


def signature(tile_shape: tuple[int, ...], dtype: np.dtype) -> ModelSignature:
    """The served model's signature: params ``norm_lo`` / ``norm_hi`` and one row per tile
    out, and no input schema, whatever the training tiles' shape and dtype.

    MLflow casts a JSON request to a declared tensor dtype with ``np.array(data, dtype)``:
    a uint16 spec would truncate float tiles (e.g. rescaled to [0, 1]) to 0 and 1 without a
    word, and a float spec would refuse raw uint16 arrays (and input examples). Undeclared,
    a request reaches the model as sent (JSON numbers as int64 or float64), and
    ``TileClassifier.check`` checks the tile shape (``tile_shape``, also in the ``tiling``
    artifact and the input example) and converts any integer or float ``dtype`` to float32.
    """
    return ModelSignature(
        inputs=None,
        outputs=Schema(
            [
                ColSpec(DataType.double, "prob_failed"),
                ColSpec(DataType.long, "label"),
                ColSpec(DataType.string, "class"),
                ColSpec(DataType.double, "domain_distance", required=False),
                ColSpec(DataType.long, "in_domain", required=False),
            ]
        ),
        params=ParamSchema([ParamSpec(k, DataType.double, None) for k in ("norm_lo", "norm_hi")]),
    )


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _requirements(segmentation: bool = False) -> list[str]:
    """Pinned packages the pyfunc imports (the model code itself travels with the model)."""
    names = ("torch", "torchvision", "numpy", "pandas", "pyarrow", "mlflow")
    names += ("monai",) if segmentation else ()
    return [f"{n}=={importlib.metadata.version(n)}" for n in names]


def metrics_md5(cand: Candidate) -> str:
    """Fingerprint of a candidate's test metrics (those its versions carry as tags): the
    same weights scored anew (other evaluation settings) make a new version, not one whose
    tags say otherwise."""
    values = {k: cand.metrics.get(k) for k in cand.metric_names}
    return hashlib.md5(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _version_with(
    client: MlflowClient, name: str, md5: str, test_set: str, dom: str, scores: str
) -> Any:
    """An existing version of ``name`` with these weights, test set, domain and test
    metrics, else None."""
    found = client.search_model_versions(
        f"name = '{name}' and tags.`model.md5` = '{md5}' and tags.test_set = '{test_set}' "
        f"and tags.`domain.md5` = '{dom}' and tags.`metrics.md5` = '{scores}'"
    )
    return max(found, key=lambda v: int(v.version)) if found else None


def seg_signature() -> ModelSignature:
    """A segmentation model's signature: params ``norm_lo`` / ``norm_hi``, one class map
    per tile out (uint8, n x px x px), and no input schema (see :func:`signature`)."""
    return ModelSignature(
        inputs=None,
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "labels")]),
        params=ParamSchema([ParamSpec(k, DataType.double, None) for k in ("norm_lo", "norm_hi")]),
    )


def _log_model(
    cand: Candidate, tiling: dict[str, Any], example: tuple, tags: dict, extra: Registration
) -> str:
    """Log the pyfunc (code + weights + sidecars + domain) and the test metrics in the run
    that trained the weights (a ``register`` run of its own when the store does not have
    it), so that a registered version leads to its training run; return the model's URI."""
    with tempfile.TemporaryDirectory() as tmp:
        meta, tile = Path(tmp) / "meta.json", Path(tmp) / "tiling.json"
        dom, dom_arrays = Path(tmp) / "domain.json", Path(tmp) / "domain.npz"
        cam = {"cam_layer": extra.cam_layers.get(cand.architecture)}
        meta.write_text(json.dumps({**cand.meta, **cam}, indent=2, sort_keys=True))
        tile.write_text(json.dumps(tiling, indent=2, sort_keys=True))
        domain.save(*extra.domains[cand.name], dom, dom_arrays)
        files = {"meta": meta, "tiling": tile, "domain": dom, "domain_arrays": dom_arrays}
        tissue = str(cand.meta.get("tissue", ""))
        if cand.architecture == SEGMENTER:
            trained = seg_training_run(tissue, cand.weights)
        else:
            trained = training_run(tissue, cand)
        if trained is None:
            run_tags = {**tags, **process_tags(), "stage": "register"}
            with mlflow.start_run(run_name=f"register-{cand.name}", tags=run_tags):
                info = _log_pyfunc(cand, example, files)
        else:
            with _reopened(trained):
                info = _log_pyfunc(cand, example, files)
    return info.model_uri


def _settings(meta: dict[str, Any]) -> dict[str, Any]:
    """A model sidecar without its per-epoch histories (they are the training run's)."""
    return {k: v for k, v in meta.items() if k not in ("history", "member_histories")}


@contextlib.contextmanager
def _reopened(run_id: str) -> Iterator[None]:
    """Make a finished run active again to log into it; whatever happens, it ends FINISHED
    at its own end time (a failure here is the registration's, not the training's)."""
    client = MlflowClient()
    end_time = client.get_run(run_id).info.end_time
    try:
        with mlflow.start_run(run_id=run_id):
            yield
    finally:
        client.set_terminated(run_id, "FINISHED", end_time=end_time)


def _log_pyfunc(cand: Candidate, example: tuple, files: dict[str, Path]) -> Any:
    """Log the pyfunc and the test metrics to the active run; its ModelInfo."""
    seg = cand.architecture == SEGMENTER
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(seg_pyfunc.MODEL_CODE if seg else MODEL_CODE),
        artifacts={"weights": str(cand.weights), **{k: str(v) for k, v in files.items()}},
        code_paths=[str(Path(__file__).parents[1])],
        signature=seg_signature() if seg else signature(example[0].shape[1:], example[0].dtype),
        input_example=example,
        pip_requirements=_requirements(seg),
    )
    mlflow.log_metrics(
        {
            f"test_{k}": float(v)
            for k, v in cand.metrics.items()
            if k in cand.metric_names and _finite(v)
        }
    )
    return info


def version_tags_of(cand: Candidate, md5: str, test_set: str, repo: Path) -> dict[str, str]:
    """What a registered version carries: data/code version, params, test metrics."""
    tags = {
        **{k: v for k, v in version_tags(repo).items() if k not in process_tags()},
        "tissue": str(cand.meta.get("tissue", "")),
        "architecture": cand.architecture,
        "metrics_key": cand.key,
        "source_file": cand.weights.as_posix(),
        "model.md5": md5,
        "test_set": test_set,
        "params": json.dumps(_settings(cand.meta), sort_keys=True, default=str)[:4000],
        cand.val_key: f"{cand.val_score:.6f}",
    }
    for k in cand.metric_names:
        if _finite(cand.metrics.get(k)):
            tags[f"metric.{k}"] = f"{float(cand.metrics[k]):.6f}"
    return tags


@dataclass(frozen=True)
class Registration:
    """What a registered version carries beyond its weights: each candidate's domain
    (summary, arrays) by name, and the Grad-CAM layer of each architecture."""

    domains: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]
    cam_layers: dict[str, str | None]


def register_tissue(
    client: MlflowClient,
    cands: list[Candidate],
    tiling: dict[str, Any],
    test_set: str,
    example: tuple,
    extra: Registration,
    repo: Path = Path(),
) -> list[dict[str, Any]]:
    """Register (or find) every candidate and point its ``challenger`` alias at it."""
    logged: dict[str, str] = {}
    out = []
    for cand in cands:
        md5 = file_md5(cand.weights)
        # the domain and the Grad-CAM layer travel with a version: either changed, a new one
        cam = {} if cand.architecture == SEGMENTER else {"cam": extra.cam_layers}
        dom = domain_md5({**extra.domains[cand.name][0], **cam})
        _ensure_model(client, cand)
        scores = metrics_md5(cand)
        version = _version_with(client, cand.name, md5, test_set, dom, scores)
        created = version is None
        if created:
            tags = {**version_tags_of(cand, md5, test_set, repo), "domain.md5": dom}
            tags["metrics.md5"] = scores
            if md5 not in logged:
                logged[md5] = _log_model(cand, tiling, example, tags, extra)
            # register_model (not create_model_version): it links the logged model's id,
            # which a tracking server requires for a models:/m-<id> source
            version = mlflow.register_model(logged[md5], cand.name, tags=tags)
        client.set_registered_model_alias(cand.name, CHALLENGER, version.version)
        out.append({"name": cand.name, "version": int(version.version), "created": created})
    return out


_FAMILIES = {
    "cnn": "the CNN whose architecture an Optuna search chose, trained from scratch",
    "resnet": "the ResNet (transfer learning) of the initialisation with the best validation score",
    "tissue": "the better of the tissue's CNN and ResNet on the validation split: the one "
    "name to call for this tissue",
}
_SEG_DESCRIPTION = (
    "Damage segmentation of {tissue} bone tiles: a MONAI U-Net trained on the phantoms' "
    "ground-truth damage labels. A pyfunc: raw tiles in, a class map per tile out (0 "
    "background, then {kinds}), with how the tiles were cut and the applicability domain "
    "it refuses to answer outside; `bonedamage predict` blends overlapping tiles over a "
    "whole scan and writes the damage maps and a microdamage report. Promoted on the "
    "held-out damage Dice and object F1. "
)
_ALIASES = (
    "Aliases: @challenger is the version the latest pipeline run registered; @champion is "
    "the version to serve, moved onto the challenger by `bonedamage promote` only when it "
    "is at least as good on the same test set (the decision is in the version's promotion.* "
    "tags). Both on one version: it has no better rival yet."
)


def family(cand: Candidate) -> str:
    """``cnn``, ``resnet``, ``tissue`` (the name of the tissue's best classifier) or
    ``segmenter``."""
    tissue = str(cand.meta.get("tissue", ""))
    return "tissue" if cand.name.endswith(f"-{tissue}") else cand.architecture


def model_description(cand: Candidate) -> str:
    """What a registered model is, by family, and what its aliases mean."""
    tissue = cand.meta.get("tissue", "?")
    if cand.architecture == SEGMENTER:
        kinds = ", ".join(str(k) for k in cand.meta.get("classes", [])[1:])
        return _SEG_DESCRIPTION.format(tissue=tissue, kinds=kinds) + _ALIASES
    return (
        f"Failed-vs-pristine classifier of {tissue} bone tiles: {_FAMILIES[family(cand)]}. "
        "A pyfunc: raw tiles in, p(failed) out, with how the tiles were cut and the "
        f"applicability domain it refuses to answer outside. {_ALIASES}"
    )


def _ensure_model(client: MlflowClient, cand: Candidate) -> None:
    """Create the registered model if needed; keep its description and tags current."""
    description = model_description(cand)
    try:
        model = client.get_registered_model(cand.name)
    except MlflowException:
        model = client.create_registered_model(cand.name, description=description)
    if model.description != description:
        client.update_registered_model(cand.name, description=description)
    wanted = {"tissue": str(cand.meta.get("tissue", "")), "family": family(cand)}
    for key, value in wanted.items():
        if (model.tags or {}).get(key) != value:
            client.set_registered_model_tag(cand.name, key, value)


def registry_record(
    cands: list[Candidate],
    tiling: dict[str, Any],
    test_set: str,
    domains: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]],
) -> dict[str, Any]:
    """The deterministic part of a registration (what DVC versions; no version numbers)."""
    return {
        "test_set": test_set,
        "tiling": tiling,
        "models": {
            c.name: {
                "architecture": c.architecture,
                "metrics_key": c.key,
                "weights": c.weights.as_posix(),
                "weights_md5": file_md5(c.weights),
                c.val_key: round(c.val_score, 6),
                "test": {k: c.metrics.get(k) for k in c.metric_names},
                "domain": domains[c.name][0],
            }
            for c in cands
        },
    }


# -- promotion ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """The outcome of comparing a challenger with the champion of one registered model."""

    name: str
    challenger: int
    champion_before: int | None
    promote: bool
    reason: str
    deltas: dict[str, float]

    @property
    def champion_after(self) -> int | None:
        return self.challenger if self.promote else self.champion_before


def _metric(tags: dict[str, str], key: str, who: str) -> float:
    try:
        value = float(tags[f"metric.{key}"])
    except (KeyError, ValueError) as exc:
        raise PromotionError(f"{who} has no valid metric.{key} tag: not validated") from exc
    if not math.isfinite(value):
        raise PromotionError(f"{who} has a non-finite metric.{key} ({value})")
    return value


def promotion_rule(name: str, cfg: dict[str, Any]) -> tuple[str, float, dict[str, float]]:
    """(floor metric, floor, largest drop per metric) of a registered model, from params
    ``registry``: classifiers by balanced accuracy (floor) and ROC-AUC, a segmentation
    model (``<prefix>-<tissue>-seg``) by ``segmentation``'s damage Dice (floor) and object
    F1."""
    if name.endswith(SEG_SUFFIX):
        seg = cfg.get("segmentation")
        if not seg:
            raise PromotionError(f"{name}: params registry.segmentation is missing")
        return "dice_damage", float(seg["min_dice_damage"]), dict(seg["tolerance"])
    tolerance = {k: cfg["tolerance"][k] for k in ("balanced_accuracy", "roc_auc")}
    return "balanced_accuracy", float(cfg["min_balanced_accuracy"]), tolerance


def decide(
    name: str,
    challenger: tuple[int, dict[str, str]],
    champion: tuple[int, dict[str, str]] | None,
    cfg: dict[str, Any],
) -> Decision:
    """Whether ``challenger`` (version, tags) replaces ``champion``; PromotionError when the
    two cannot be compared (no metrics, or metrics from different test data).

    Promote when no metric of the model's :func:`promotion_rule` drops below the
    champion's by more than its tolerance (classifiers: balanced accuracy and ROC-AUC); a
    challenger below the floor (``min_balanced_accuracy``; a segmentation model's
    ``segmentation.min_dice_damage``) is never promoted.
    """
    ch_version, ch_tags = challenger
    who = f"{name} version {ch_version}"
    floor_metric, floor, tol = promotion_rule(name, cfg)
    values = {k: _metric(ch_tags, k, who) for k in dict.fromkeys([floor_metric, *tol])}
    first = values[floor_metric]
    label = floor_metric.replace("_", " ")
    before = champion[0] if champion else None
    if champion is None:
        ok = first >= floor
        reason = (
            "first validated challenger becomes champion"
            if ok
            else f"{label} {first:.4f} below the floor {floor}: no champion yet"
        )
        return Decision(name, ch_version, None, ok, reason, {})
    ch_version_champ, champ_tags = champion
    if ch_version_champ == ch_version:
        return Decision(name, ch_version, before, False, "already champion", {})
    if not ch_tags.get("test_set") or ch_tags.get("test_set") != champ_tags.get("test_set"):
        raise PromotionError(
            f"{who} was evaluated on test set {ch_tags.get('test_set')} but champion version "
            f"{before} on {champ_tags.get('test_set')}: different test data, not comparable. "
            "Re-run the pipeline on the champion's data, or move the alias by hand "
            f"(MlflowClient().set_registered_model_alias('{name}', 'champion', {ch_version}))"
        )
    who_champ = f"{name} champion version {before}"
    deltas = {k: values[k] - _metric(champ_tags, k, who_champ) for k in tol}
    if first < floor:
        return Decision(name, ch_version, before, False, f"below the floor {floor}", deltas)
    worse = [
        f"{k} {deltas[k]:+.4f} beyond -{float(tol[k])}" for k in tol if deltas[k] < -float(tol[k])
    ]
    if worse:
        return Decision(name, ch_version, before, False, "worse: " + ", ".join(worse), deltas)
    return Decision(name, ch_version, before, True, "at least as good as the champion", deltas)


def _not_found(exc: MlflowException) -> bool:
    """The store says the model or alias does not exist (not: the store failed)."""
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        exc.error_code == "INVALID_PARAMETER_VALUE" and "not found" in exc.message
    )


def _alias(client: MlflowClient, name: str, alias: str) -> tuple[int, dict[str, str]] | None:
    """(version, tags) behind ``alias``; None only when there is no such alias or model.

    Any other error (a tracking server down, a timeout) propagates: treating it as "no
    champion" would promote a challenger without comparing it.
    """
    try:
        v = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise
    return int(v.version), dict(v.tags)


def has_alias(client: MlflowClient, name: str, alias: str) -> bool:
    """Whether ``name`` has a version behind ``alias``; a store that fails to answer raises
    (never taken for "no such model")."""
    return _alias(client, name, alias) is not None


def _clear_promotion_tags(client: MlflowClient, name: str, version: str) -> None:
    """Drop an earlier decision's tags so the version shows one consistent record."""
    for key in client.get_model_version(name, version).tags:
        if key.startswith("promotion."):
            client.delete_model_version_tag(name, version, key)


def _sqlite_path(uri: str | None) -> Path | None:
    """The database file of a ``sqlite:///`` store URI (None for any other store)."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def _promotion_lock(client: MlflowClient) -> Iterator[None]:
    """Serialise promotions that share a local SQLite registry (``<db>.lock`` beside it).

    MLflow has no compare-and-set for aliases, and its SQLite store writes aliases and tags
    as read-then-insert: two promotions at once could each move ``champion`` from the same
    old version, the later one over a better version the earlier one had just promoted, and
    their tag writes collide (``UNIQUE constraint failed``). Processes on one machine take
    turns here; other stores get no lock (see :func:`_decide_fresh`).
    """
    db = _sqlite_path(getattr(client, "_registry_uri", None) or mlflow.get_registry_uri())
    try:
        import fcntl
    except ImportError:  # not POSIX
        db = None
    if db is None:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _decide_fresh(
    client: MlflowClient, name: str, challenger: tuple[int, dict[str, str]], cfg: dict[str, Any]
) -> Decision:
    """:func:`decide` against the champion, re-read just before the alias would move.

    A promotion elsewhere (a tracking server has no lock) may move the champion while this
    one decides; the challenger is then compared again with the new champion.
    """
    champion = _alias(client, name, CHAMPION)
    for _ in range(5):
        decision = decide(name, challenger, champion, cfg)
        if not decision.promote:
            return decision
        now = _alias(client, name, CHAMPION)
        if (now and now[0]) == (champion and champion[0]):
            return decision
        champion = now
    raise PromotionError(
        f"{name}: the champion kept moving while version {challenger[0]} was compared with "
        "it (other promotions running): try again"
    )


def promote(client: MlflowClient, name: str, cfg: dict[str, Any]) -> Decision:
    """Compare ``challenger`` with ``champion`` of ``name``; move ``champion`` if it wins.

    The decision (reason, deltas, time, champion before/after) is written as tags on the
    challenger version, refusals included. The alias is re-pointed in one call, so the
    model is never without a champion once it has had one; promotions sharing a SQLite
    store take turns (:func:`_promotion_lock`).
    """
    with _promotion_lock(client):
        return _promote(client, name, cfg)


def _promote(client: MlflowClient, name: str, cfg: dict[str, Any]) -> Decision:
    challenger = _alias(client, name, CHALLENGER)
    if challenger is None:
        raise PromotionError(f"{name} has no '{CHALLENGER}' version: run `bonedamage register`")
    version = str(challenger[0])
    stamp = {"promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        decision = _decide_fresh(client, name, challenger, cfg)
    except PromotionError as exc:
        _clear_promotion_tags(client, name, version)
        refused = {**stamp, "promotion.decision": "refused", "promotion.reason": str(exc)}
        for k, v in refused.items():
            client.set_model_version_tag(name, version, k, v[:4000])
        raise
    if decision.champion_before == decision.challenger:
        return decision  # nothing to decide: keep the record of the decision that made it
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    _clear_promotion_tags(client, name, version)
    tags = {
        **stamp,
        "promotion.decision": "promoted" if decision.promote else "kept",
        "promotion.reason": decision.reason,
        "promotion.champion_before": str(decision.champion_before or ""),
        "promotion.champion_after": str(decision.champion_after or ""),
        **{f"promotion.delta.{k}": f"{v:+.6f}" for k, v in decision.deltas.items()},
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    return decision


# -- what the register and promote stages use -------------------------------------------
def registered_runs(client: MlflowClient, record: dict[str, Any]) -> dict[str, str]:
    """Source run -> metrics key of the versions a registry record names (``register``'s
    output: the weights it registered under each name, now the @challenger): the runs that
    trained them, when the store had those at registration. Versions of other weights (an
    older champion) are left out: the current test files are not theirs."""
    runs: dict[str, str] = {}
    for name, entry in record.get("models", {}).items():
        found = _alias(client, name, CHALLENGER)
        if found is None or found[1].get("model.md5") != entry.get("weights_md5"):
            continue
        version = client.get_model_version(name, str(found[0]))
        if version.run_id:
            runs.setdefault(version.run_id, found[1].get("metrics_key", ""))
    return runs


def model_names(prefix: str, tissue: str) -> list[str]:
    """The registered classifiers of a tissue, in the order they are registered."""
    return [f"{prefix}-{tissue}-cnn", f"{prefix}-{tissue}-resnet", f"{prefix}-{tissue}"]


def seg_model_name(prefix: str, tissue: str) -> str:
    """The registered segmentation model of a tissue."""
    return f"{prefix}-{tissue}{SEG_SUFFIX}"


def fit_domains(
    cands: list[Candidate],
    store: TileStore,
    splits: pd.DataFrame,
    tiling: dict[str, Any],
    cfg: dict[str, Any],
) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """Each candidate's applicability domain (params ``domain``); the tissue model is one of
    the other two, so each weights file is fitted once."""
    fitted: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
    for cand in cands:
        same = next(
            (fitted[c.name] for c in cands if c.name in fitted and c.weights == cand.weights), None
        )
        fitted[cand.name] = same or fit_domain(cand, store, splits, tiling, cfg)
    return fitted


def test_example(
    store: TileStore, splits: pd.DataFrame, tissue: str
) -> tuple[np.ndarray, dict[str, float]]:
    """The first test tile, raw, with its normalisation range: the registered input example."""
    first = int(split_rows(store, splits, tissue, "grouped", "test")[0][0])
    lo, hi = store.index[["norm_lo", "norm_hi"]].iloc[first]
    return store.raw(first)[None], {"norm_lo": float(lo), "norm_hi": float(hi)}
