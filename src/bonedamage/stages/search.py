"""Search the CNN architecture of a tissue (``search``): an Optuna study (TPE sampler, median
pruner, seeded) over the space in params ``search.space``; every trial a nested MLflow run.
Re-running continues the stored study; several processes may share it (``--worker``). Writes
the best configuration, the study's plots and the study itself as a journal file
(``reports/search/<tissue>/study.journal``, committed with the plots: ``optuna-dashboard`` and
``optuna.load_study`` open it after a ``dvc repro`` that skipped the search). Tracked in MLflow
(params mlflow; MLFLOW_TRACKING_URI overrides)."""

from __future__ import annotations

import json
from pathlib import Path

from bonedamage.atomic import check_output_file, write_text_atomic
from bonedamage.config import require_tissue, stage_params
from bonedamage.data.tilestore import require_tables

PARAMS = ("pipeline", "mlflow", "search", "train", "augment")


def run_search(
    params: Path,
    tissue: str,
    tiles: Path | None = None,
    splits: Path | None = None,
    models: Path | None = None,
    out: Path | None = None,
    reports: Path | None = None,
    worker: int = 0,
) -> int:
    """Optuna search of the CNN architecture for one tissue (nested MLflow runs per trial)."""
    cfg = stage_params(params, PARAMS)
    require_tissue(tissue, cfg.pipeline)
    paths = cfg.pipeline.paths
    tiles, splits = Path(tiles or paths.tiles), Path(splits or paths.splits)
    out = Path(out or Path(models or paths.models) / tissue / "cnn_search.json")
    reports = Path(reports or Path(paths.reports) / "search")
    require_tables(tiles, splits)
    check_output_file(out, inputs=(params, tiles, splits))

    import mlflow
    import pandas as pd

    from bonedamage.data.tilestore import TileStore
    from bonedamage.learn import study as optuna_study
    from bonedamage.lifecycle.tracking import (
        STUDY_MD5_TAG,
        MlflowSearchHooks,
        configure,
        study_md5,
        version_tags,
    )

    configure(cfg.mlflow.model_dump())
    search, train = cfg.search.model_dump(), cfg.train.model_dump()
    tags = {**version_tags(), "stage": "search", "tissue": tissue}
    with mlflow.start_run(run_name=f"search-{tissue}", tags=tags):
        mlflow.log_params(
            {
                "n_trials": search["n_trials"],
                "epochs": search["epochs"],
                "lr_schedule": train["lr_schedule"],
                "channels_last": train["channels_last"],
                "storage": search["storage"],
                "pruner": json.dumps(search["pruner"]),
                "space": json.dumps(search["space"], sort_keys=True),
            }
        )
        study = optuna_study.optimize(
            TileStore(tiles),
            pd.read_parquet(splits),
            tissue,
            search,
            train,
            cfg.augment.model_dump(),
            hooks=MlflowSearchHooks(),
            worker=worker,
        )
        mlflow.set_tag("optuna.study", study.study_name)
        # the study's figures and file first: they show a search that chose nothing, too
        plots = optuna_study.save_plots(
            study,
            reports / tissue,
            seed=int(search["seed"]),
            min_trials_for_importance=int(search["min_trials_for_importance"]),
        )
        for plot in plots:
            mlflow.log_artifact(str(plot), "plots")
        journal = reports / tissue / optuna_study.JOURNAL_NAME
        mlflow.log_artifact(str(optuna_study.export_journal(study, journal)), "optuna")
        mlflow.set_tag(STUDY_MD5_TAG, study_md5(journal))  # `track` will not replay it
        best = {
            **optuna_study.best_config(study),
            "study": study.study_name,
            "summary": optuna_study.study_summary(study),
        }
        mlflow.log_metric(f"best_{optuna_study.OBJECTIVE}", best["value"])
    write_text_atomic(out, json.dumps(best, indent=2, sort_keys=True) + "\n")
    print(
        f"{tissue}: best trial {best['trial']} val balanced accuracy {best['value']:.4f}"
        f" ({best['summary']['states']}); all trials: optuna-dashboard {journal}"
    )
    return 0
