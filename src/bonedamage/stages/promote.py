"""Promote a tissue's models (``promote``): each registered model's @champion alias moves onto
its @challenger when the challenger's test balanced accuracy and ROC-AUC do not drop below
the champion's by more than params ``registry.tolerance`` (and it clears
``registry.min_balanced_accuracy``); the segmentation model's by its damage Dice and object
F1 (``registry.segmentation``); the first validated challenger becomes champion.
Versions evaluated on different test data are refused (exit 2, or reported with ``--allow-
refusal``). Every decision is recorded as version tags. Tracked in MLflow (params mlflow;
MLFLOW_TRACKING_URI overrides)."""

from __future__ import annotations

from pathlib import Path

from bonedamage.config import require_tissue, stage_params

PARAMS = ("pipeline", "mlflow", "registry")


def run_promote(params: Path, tissue: str, *, allow_refusal: bool = False) -> int:
    """Move each registered model's champion alias onto its challenger when it is as good."""
    cfg = stage_params(params, PARAMS)
    require_tissue(tissue, cfg.pipeline)

    from mlflow.tracking import MlflowClient

    from bonedamage.lifecycle.registry import (
        CHALLENGER,
        PromotionError,
        has_alias,
        model_names,
        promote,
        seg_model_name,
    )
    from bonedamage.lifecycle.tracking import configure

    configure(cfg.mlflow.model_dump())
    client, registry = MlflowClient(), cfg.registry.model_dump()
    errors = []
    names = model_names(registry["prefix"], tissue)
    seg = seg_model_name(registry["prefix"], tissue)
    if has_alias(client, seg, CHALLENGER):  # a segmentation model once one was registered
        names.append(seg)
    else:
        print(f"{seg}: no {CHALLENGER} version (no segmentation model registered): skipped")
    for name in names:
        try:
            d = promote(client, name, registry)
        except PromotionError as exc:
            errors.append(str(exc))
            continue
        verdict = "promoted" if d.promote else "kept"
        deltas = " ".join(f"{k} {v:+.4f}" for k, v in d.deltas.items())
        print(
            f"{d.name}: challenger v{d.challenger} {verdict}; champion "
            f"v{d.champion_before} -> v{d.champion_after} ({d.reason}) {deltas}".rstrip()
        )
    if errors and not allow_refusal:
        raise PromotionError("; ".join(errors))
    for error in errors:
        print(f"refused (recorded as version tags; champion unchanged): {error}")
    return 0
