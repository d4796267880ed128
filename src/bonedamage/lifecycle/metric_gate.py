"""Regression gate: freshly reproduced metrics against the committed ones.

For every tissue x model x metric that ``params.yaml`` (``gate``) names, the new value
may not drop by more than the metric's tolerance below the baseline (the metrics files
at a git revision, ``HEAD`` by default, or a folder of baseline files). A second check
catches reproducibility bugs: when the pipeline ran from the baseline's inputs (the same
raw-data and code hashes and params in ``dvc.lock``) on the baseline's platform (the
``platform`` entry evaluate writes: torch, device and instruction set, CPU model), CPU
metrics must come back exactly, so any difference then fails the gate even inside the
tolerance. On another platform MKL and oneDNN take other floating-point paths and a
seeded training ends elsewhere, as with a new seed: the wider ``cross_platform``
tolerances apply there, and exactness is not required.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from bonedamage.atomic import atomic_dir, write_text_atomic

LOCK = "dvc.lock"


class GateError(Exception):
    """A baseline or metric the gate needs is missing or unreadable (not a pass)."""


@dataclass(frozen=True)
class Row:
    tissue: str
    model: str
    metric: str
    old: float
    new: float
    tolerance: float
    verdict: str  # exact | improved | within tolerance | REGRESSION

    @property
    def delta(self) -> float:
        return self.new - self.old


# -- baselines ------------------------------------------------------------------------------
def git_show(rev: str, path: str, repo: Path) -> str | None:
    """The text of ``path`` at git revision ``rev`` (None when the file is not there)."""
    done = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True, check=False
    )
    if done.returncode == 0:
        return done.stdout
    if "does not exist" in done.stderr or "exists on disk, but not in" in done.stderr:
        return None
    raise GateError(f"git show {rev}:{path}: {done.stderr.strip() or 'failed'}")


def load_metrics(text: str | None, where: str) -> dict[str, Any]:
    if text is None:
        raise GateError(f"{where}: no such metrics file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GateError(f"{where}: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise GateError(f"{where}: expected an object of model -> metrics")
    return data


def read_baseline(
    tissue: str, repo: Path, rev: str | None, folder: Path | None, metrics: str = "metrics"
) -> dict:
    """Baseline metrics of a tissue from ``folder/<tissue>.json``, or from a git revision's
    ``<metrics>/<tissue>.json`` (``metrics``: params ``pipeline.paths.metrics``); ``tissue``
    may name another file of the tissue (``cortical-seg``)."""
    if folder is not None:
        path = folder / f"{tissue}.json"
        return load_metrics(path.read_text() if path.is_file() else None, str(path))
    rel = f"{metrics}/{tissue}.json"
    return load_metrics(git_show(rev or "HEAD", rel, repo), f"{rev or 'HEAD'}:{rel}")


def pipeline_inputs(lock_text: str | None) -> dict[str, Any] | None:
    """What the whole pipeline was run from, per dvc.lock: every dependency that no stage
    produces (the raw data, the code) with its hash, and every stage's params.

    Intermediate outputs (tiles, models) are left out: they are what reproduction makes.
    """
    if not lock_text:
        return None
    stages = (yaml.safe_load(lock_text) or {}).get("stages") or {}
    made = {o["path"] for st in stages.values() for o in st.get("outs", [])}
    roots = {
        d["path"]: d.get("md5")
        for st in stages.values()
        for d in st.get("deps", [])
        if d["path"] not in made
    }
    params = {name: st.get("params", {}) for name, st in stages.items()}
    return {"deps": roots, "params": params, "stages": sorted(stages)}


# -- comparison ------------------------------------------------------------------------------
def _value(metrics: dict[str, Any], model: str, metric: str, where: str) -> float:
    try:
        value = metrics[model][metric]
    except (KeyError, TypeError):
        raise GateError(f"{where}: no {model}.{metric}") from None
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        raise GateError(f"{where}: {model}.{metric} is {value!r}, not a number")
    return float(value)


def compare(
    tissue: str,
    old: dict[str, Any],
    new: dict[str, Any],
    models: list[str],
    tolerances: dict[str, float],
    where: tuple[str, str] = ("baseline", "new"),
) -> list[Row]:
    """One row per model x metric; a metric missing on either side raises GateError."""
    rows = []
    for model in models:
        for metric, tol in tolerances.items():
            a = _value(old, model, metric, f"{where[0]} {tissue}")
            b = _value(new, model, metric, f"{where[1]} {tissue}")
            if b == a:
                verdict = "exact"
            elif b > a:
                verdict = "improved"
            elif a - b <= float(tol):
                verdict = "within tolerance"
            else:
                verdict = "REGRESSION"
            rows.append(Row(tissue, model, metric, a, b, float(tol), verdict))
    return rows


@dataclass
class GateReport:
    rows: list[Row]
    same_inputs: bool  # the pipeline ran from the baseline's data, code and params
    same_platform: bool = True  # ... and on the baseline's platform (exactness expected)
    platforms: tuple[Any, Any] = (None, None)  # baseline's, new

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "REGRESSION"]

    @property
    def not_reproduced(self) -> list[Row]:
        if not (self.same_inputs and self.same_platform):
            return []
        return [r for r in self.rows if r.verdict != "exact"]

    @property
    def passed(self) -> bool:
        return not self.regressions and not self.not_reproduced

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "passed": self.passed,
                    "same_inputs": self.same_inputs,
                    "same_platform": self.same_platform,
                    "platforms": {"baseline": self.platforms[0], "new": self.platforms[1]},
                    "regressions": len(self.regressions),
                    "not_reproduced": len(self.not_reproduced),
                    "rows": [asdict(r) | {"delta": r.delta} for r in self.rows],
                },
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )

    def to_markdown(self) -> str:
        head = "PASSED" if self.passed else "FAILED"
        lines = [
            f"### Regression gate: {head}",
            "",
            "| tissue | model | metric | old | new | delta | tolerance | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.tissue} | {r.model} | {r.metric} | {r.old:.4f} | {r.new:.4f} | "
                f"{r.delta:+.4f} | {r.tolerance:.4f} | {r.verdict} |"
            )
        lines.append("")
        if not self.same_platform:
            old, new = (_describe(p) for p in self.platforms)
            lines.append(
                f"Platform differs from the baseline's ({old} -> {new}): the same inputs take "
                "another floating-point path there, so the cross-platform tolerances apply."
            )
        if not self.same_inputs:
            lines.append("Inputs differ from the baseline's (data, code or params).")
        elif not self.same_platform:
            lines.append("Same data, code and params as the baseline.")
        elif self.not_reproduced:
            lines.append(
                f"NOT reproduced exactly: {len(self.not_reproduced)} metric(s) differ although "
                "data, code and params are the baseline's (a reproducibility bug, not noise)."
            )
        else:
            lines.append("Same data, code and params as the baseline: reproduced exactly.")
        return "\n".join(lines) + "\n"


def _describe(platform: Any) -> str:
    if not isinstance(platform, dict):
        return "not recorded"
    return ", ".join(f"{k} {v}" for k, v in sorted(platform.items()))


def _platform(metrics: dict[str, Any]) -> dict[str, Any] | None:
    value = metrics.get("platform")
    return value if isinstance(value, dict) else None


def gate_report(
    repo: Path,
    cfg: dict[str, Any],
    tissues: Sequence[str],
    *,
    rev: str | None = "HEAD",
    baseline_dir: Path | None = None,
    metrics_dir: Path | None = None,
    metrics: str = "metrics",
) -> GateReport:
    """Compare ``<metrics>/<tissue>.json`` (and ``<tissue>-seg.json`` with ``cfg``'s
    ``segmentation`` group) in the working tree (or ``metrics_dir``) with the baseline;
    ``metrics`` is params ``pipeline.paths.metrics``."""
    metrics_dir = metrics_dir or repo / metrics
    lock_now = (repo / LOCK).read_text() if (repo / LOCK).is_file() else None
    lock_then = git_show(rev, LOCK, repo) if baseline_dir is None and rev else None
    then, now = pipeline_inputs(lock_then), pipeline_inputs(lock_now)
    # one group per metrics file of a tissue: the classifiers', and the segmentation's
    # (<tissue>-seg.json) when params gate.segmentation names its models and metrics
    groups = [("", cfg)]
    if isinstance(cfg.get("segmentation"), dict):
        groups.append(("-seg", cfg["segmentation"]))
    pairs = []
    for suffix, group in groups:
        for tissue in tissues:
            new_path = metrics_dir / f"{tissue}{suffix}.json"
            text = new_path.read_text() if new_path.is_file() else None
            new = load_metrics(text, str(new_path))
            old = read_baseline(f"{tissue}{suffix}", repo, rev, baseline_dir, metrics)
            pairs.append((tissue, old, new, new_path, group))
    platforms = (_platform(pairs[0][1]), _platform(pairs[0][2])) if pairs else (None, None)
    # neither side recorded (older baselines): the old rule, exactness on the same inputs
    same_platform = all(_platform(old) == _platform(new) for _, old, new, _, _ in pairs)
    key = "metrics" if same_platform else "cross_platform"
    rows: list[Row] = []
    for tissue, old, new, new_path, group in pairs:
        if not isinstance(group.get(key), dict):
            where = "gate" if group is cfg else "gate.segmentation"
            raise GateError(
                f"params {where}.{key}: missing (metric -> largest drop tolerated)"
                + (
                    ""
                    if same_platform
                    else "; needed because the platform differs from the baseline's"
                )
            )
        tolerances = {str(k): float(v) for k, v in group[key].items()}
        rows += compare(
            tissue, old, new, list(group["models"]), tolerances, (f"baseline {rev}", str(new_path))
        )
    return GateReport(rows, then is not None and then == now, same_platform, platforms)


def write_report(
    report: GateReport, out_dir: Path, *, inputs: Sequence[Path] = (), force: bool = False
) -> tuple[Path, Path]:
    """``gate.json`` and ``gate.md`` (for a pull-request comment) in ``out_dir``, replaced
    as a whole: it must be new, empty or an earlier gate report (else ``force``), and never
    one of ``inputs`` (the metrics and baselines read), inside or around one."""
    with atomic_dir(out_dir, owner="gate", inputs=inputs, force=force) as staging:
        write_text_atomic(staging / "gate.json", report.to_json())
        write_text_atomic(staging / "gate.md", report.to_markdown())
    return out_dir / "gate.json", out_dir / "gate.md"
