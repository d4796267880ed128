"""Score every model of a tissue on the test split (``evaluate``): tile and scan accuracy,
balanced accuracy and ROC-AUC with bootstrap intervals, accuracy on visibly damaged tiles,
the leaky split's inflation and a baseline, as a DVC metrics file with the platform the
numbers were made on (the gate reproduces them exactly only on the same one), and the
tables of DVC plots (dvc.yaml ``plots``): each model's ROC curve and test predictions (a
confusion matrix), each trained network's training curves. Tracked in MLflow (params
mlflow; MLFLOW_TRACKING_URI overrides)."""

from __future__ import annotations

from pathlib import Path

from bonedamage.atomic import check_output_file, require, require_json
from bonedamage.config import require_tissue, stage_params
from bonedamage.data.tilestore import require_tables

PARAMS = ("pipeline", "mlflow", "evaluate", "resnet", "train")


def run_evaluate(
    params: Path,
    tissue: str,
    tiles: Path | None = None,
    splits: Path | None = None,
    models: Path | None = None,
    out: Path | None = None,
    plots: Path | None = None,
) -> int:
    """Test-split metrics of every model of a tissue (metrics/<tissue>.json)."""
    cfg = stage_params(params, PARAMS)
    require_tissue(tissue, cfg.pipeline)
    paths = cfg.pipeline.paths
    tiles, splits = Path(tiles or paths.tiles), Path(splits or paths.splits)
    models = Path(models or paths.models) / tissue
    out = Path(out or Path(paths.metrics) / f"{tissue}.json")
    plots = Path(plots or paths.plots) / tissue
    require_tables(tiles, splits)
    for name in ("cnn.pt", "cnn_leaky.pt"):
        require(models / name, "input")
    require_json(models / "cnn.json", "input")
    check_output_file(out, inputs=(params, tiles, splits, models))

    import mlflow
    import pandas as pd

    from bonedamage.data.tilestore import TileStore
    from bonedamage.learn.comparison import score_test_split, training_histories, write_plots
    from bonedamage.learn.scoring import write_json
    from bonedamage.learn.train import numerics_platform, resolve_device, seed_everything
    from bonedamage.lifecycle.tracking import configure, version_tags

    configure(cfg.mlflow.model_dump())
    evaluate, device = cfg.evaluate.model_dump(), resolve_device(cfg.train.device)
    seed_everything(int(evaluate["seed"]), int(cfg.train.threads))
    store, inits = TileStore(tiles), list(cfg.resnet.inits)
    histories = training_histories(models, inits)  # before the scoring: a missing one fails fast
    results, frames = score_test_split(
        store, pd.read_parquet(splits), tissue, models, inits, evaluate, device
    )
    platform = numerics_platform(device)
    write_json(out, {**results, "platform": platform})
    write_plots(plots, frames, histories)
    tags = {**version_tags(), **{f"platform.{k}": v for k, v in platform.items()}}
    with mlflow.start_run(
        run_name=f"evaluate-{tissue}", tags=tags | {"stage": "evaluate", "tissue": tissue}
    ):
        for name, metrics in results.items():
            numbers = {
                f"{name}.{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)
            }
            mlflow.log_metrics(numbers)
        mlflow.log_artifact(str(out))
    for name, m in results.items():
        print(
            f"{tissue} {name:18s} accuracy {m['accuracy']:.4f} "
            f"balanced {m['balanced_accuracy']:.4f} scan {m['scan_accuracy']:.3f}"
        )
    return 0
