"""Record in MLflow what the committed outputs of skipped stages hold (``track``). DVC skips
``search`` and ``evaluate`` when their committed outputs are current (as on a fresh clone),
so the tracking store would lack their runs. Run last, always: the tissue's search as a
parent run with one nested run per trial, replayed from the study it exported
(``reports/search/<tissue>/study.journal``) unless the store holds that study already; and,
on the source run of each registered version (the run that trained it), the test ROC curve
and confusion matrix drawn from evaluate's plot files (the versions of the weights the
registry record names). Runs again, it adds no run (the figures are logged anew). Tracked in MLflow
(params mlflow; MLFLOW_TRACKING_URI overrides)."""

from __future__ import annotations

import json
from pathlib import Path

from bonedamage.atomic import require, require_json
from bonedamage.config import require_tissue, stage_params

PARAMS = ("pipeline", "mlflow")


def run_track(
    params: Path,
    tissue: str,
    reports: Path | None = None,
    plots: Path | None = None,
) -> int:
    """Replay the tissue's search into MLflow if missing; log its models' test figures."""
    cfg = stage_params(params, PARAMS)
    require_tissue(tissue, cfg.pipeline)
    paths = cfg.pipeline.paths
    journal = Path(reports or Path(paths.reports) / "search") / tissue / "study.journal"
    plots = Path(plots or paths.plots) / tissue
    record = Path(paths.registry) / f"{tissue}.json"
    require(journal, "input")
    require_json(record, "input")

    import mlflow
    from mlflow.tracking import MlflowClient

    from bonedamage.lifecycle.registry import registered_runs
    from bonedamage.lifecycle.run_figures import log_test_figures
    from bonedamage.lifecycle.search_runs import record_search
    from bonedamage.lifecycle.tracking import configure

    configure(cfg.mlflow.model_dump())
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    run_id, created = record_search(client, experiment.experiment_id, tissue, journal)
    state = "replayed from " + journal.as_posix() if created else "already in the store"
    print(f"{tissue}: search run {run_id} ({state})")
    for run_id, key in registered_runs(client, json.loads(record.read_text())).items():
        logged = log_test_figures(client, run_id, plots, key, f"{tissue} {key}")
        print(f"{tissue} {key}: run {run_id} <- {', '.join(logged) or 'no test figures'}")
    return 0
