"""Gate on the metrics (``gate``): for every tissue x model x metric in params ``gate``, the
reproduced value (metrics/<tissue>.json) may not drop below the baseline (a git revision, or
a folder of baseline files) by more than the metric's tolerance; when dvc.lock shows the
same raw data, code and params as the baseline, every metric must match exactly. Writes
gate.json and gate.md (for a pull-request comment). Exit 0 pass, 1 fail, 2 missing metric or
baseline."""

from __future__ import annotations

import sys
from pathlib import Path

from bonedamage.config import stage_params
from bonedamage.lifecycle.metric_gate import gate_report, write_report

PARAMS = ("pipeline", "gate")


def run_gate(
    params: Path,
    rev: str = "HEAD",
    baseline: Path | None = None,
    metrics: Path | None = None,
    repo: Path = Path(),
    out: Path | None = None,
    *,
    force: bool = False,
) -> int:
    """Compare reproduced metrics with the committed ones; 1 on a regression."""
    cfg = stage_params(params, PARAMS)
    repo = Path(repo)
    metrics = Path(metrics or repo / cfg.pipeline.paths.metrics)
    out = Path(out or Path(cfg.pipeline.paths.reports) / "gate")
    report = gate_report(
        repo,
        cfg.gate.model_dump(),
        cfg.pipeline.tissues,
        rev=rev,
        baseline_dir=Path(baseline) if baseline else None,
        metrics_dir=metrics,
        metrics=cfg.pipeline.paths.metrics,
    )
    inputs = (metrics, baseline, repo / "dvc.lock", params)
    written = write_report(report, out, inputs=inputs, force=force)
    print(report.to_markdown())
    print("report: " + ", ".join(map(str, written)))
    if report.regressions:
        print(
            f"error: {len(report.regressions)} metric(s) dropped beyond tolerance", file=sys.stderr
        )
    if report.not_reproduced:
        print(
            f"error: {len(report.not_reproduced)} metric(s) not reproduced exactly from the "
            "baseline's data, code and params",
            file=sys.stderr,
        )
    return 0 if report.passed else 1
