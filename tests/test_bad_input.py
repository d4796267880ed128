"""No traceback reaches a user: every `bonedamage` subcommand on missing, empty and wrong input.

Each subcommand of ``build_parser()`` (a new one is covered without listing it here) runs
as a user runs it, ``python -m bonedamage ...`` in a fresh folder, once with its inputs
missing, once with every input an empty file (a model an empty folder) and once with
every input a file of another kind (CSV where Parquet is read, PNG bytes where a TIFF is,
a JSON list where an object is, text where weights are). Each run must print an
``error:`` line, exit non-zero, show no ``Traceback`` and leave its inputs as they were.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from bonedamage.cli import build_parser
from conftest import REPO

VARIANTS = ("missing", "empty", "wrong")
TISSUE = "cortical"

# the inputs the commands read at their default paths (relative to the working folder)
INPUTS = [
    "data/raw/manifest.csv",
    "data/tiles/index.parquet",
    "data/tiles/normalization.json",
    "data/splits.parquet",
    f"models/{TISSUE}/cnn_search.json",
    f"models/{TISSUE}/cnn.pt",
    f"models/{TISSUE}/cnn.json",
    f"models/{TISSUE}/cnn_leaky.pt",
    "data/corpus/tiles/index.parquet",
    "models/pretrained/procedural.pt",
    "models/pretrained/procedural.json",
    f"models/{TISSUE}/resnet/resnet_scratch.pt",
    f"models/{TISSUE}/resnet/resnet_scratch.json",
    f"metrics/{TISSUE}.json",
    "metrics/trabecular.json",
    f"baseline/{TISSUE}.json",
    "baseline/trabecular.json",
    "scan.tif",
    "batch.csv",
    "mlflow.db",
]
WRONG = {  # a file of another kind, by extension
    ".csv": b"not,a,manifest\n1,2,3\n",
    ".parquet": b"tile_id,split\nx,train\n",  # CSV, not Parquet
    ".json": b"[1, 2, 3]\n",  # JSON, but not an object
    ".tif": b"\x89PNG\r\n\x1a\n" + bytes(64),  # a PNG header
    ".pt": b"these are not weights\n",
    ".db": b"not an SQLite database\n" * 8,
}

# Values for the required arguments, by dest; a required option with choices gets its first.
VALUES = {"scan": "scan.tif", "model": "model", "out": "out", "tissue": TISSUE}
VALUES["method"] = "procedural"  # pretrain: a method of the committed params (pretrain.methods)
# More than one way to give a command its input (each one is run in every variant).
SCAN_FIELDS = ["--specimen-id", "S1", "--tissue", TISSUE, "--state", "pristine"]
ALTERNATIVES = {
    "ingest": [["scan.tif", *SCAN_FIELDS, "--voxel-size-um", "2"], ["--batch", "batch.csv"]],
    "gate": [[], ["--baseline", "baseline", "--metrics", "metrics"]],
}


# commands whose only input is the params file
PARAMS_ONLY = {"synth", "corpus"}

# import torch and MLflow before they fail, or create a tracking store (seconds each)
SLOW = {"promote", "predict"}


def subcommands() -> dict:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return dict(sub.choices)


def required_args(parser) -> list[str]:
    """Arguments a subcommand cannot run without, filled with VALUES (or a missing path)."""
    argv: list[str] = []
    for action in parser._actions:
        positional = not action.option_strings
        if not (positional and action.nargs is None) and not action.required:
            continue
        value = VALUES.get(action.dest) or (sorted(action.choices)[0] if action.choices else None)
        value = value or action.dest
        argv += [value] if positional else [action.option_strings[-1], value]
    return argv


def make_variant(root: Path, variant: str) -> None:
    """The working folder of one variant: every input missing, empty or of another kind;
    ``params.yaml`` (read by synth and corpus here) likewise: absent, empty, a folder."""
    root.mkdir(parents=True)
    if variant == "missing":
        return
    for rel in INPUTS:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"" if variant == "empty" else WRONG[path.suffix])
    if variant == "empty":
        (root / "model").mkdir()
        (root / "params.yaml").write_bytes(b"")
    else:
        (root / "model").write_text("a text file, not a model folder\n")
        (root / "params.yaml").mkdir()


def snapshot(root: Path) -> dict[str, bytes | None]:
    skip = ("mlflow.db", "mlartifacts")  # the tracking store may be created or migrated
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
        if not str(p.relative_to(root)).startswith(skip)
    }


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "bonedamage", *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Every command run in every variant (two at a time: the runs mostly import); the
    problems seen, by command."""
    tmp = tmp_path_factory.mktemp("bad-input")
    params_copy = tmp / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_copy)
    assert (
        yaml.safe_load(params_copy.read_text())["pipeline"]["paths"]["raw"] == "data/raw"
    )  # cwd-relative
    cases, before = [], {}
    for command, parser in subcommands().items():
        base = [command, *required_args(parser), "--no-progress"]
        # synth and corpus read nothing but their params: they get the variant's (bad)
        # params file
        params = "params.yaml" if command in PARAMS_ONLY else str(params_copy)
        for variant in VARIANTS:
            cwd = tmp / command / variant
            make_variant(cwd, variant)
            before[cwd] = snapshot(cwd)
            for extra in ALTERNATIVES.get(command, [[]]):
                cases.append((command, variant, cwd, [*base, *extra, "--params", params]))
    cases.sort(key=lambda case: case[0] not in SLOW)  # the longest first: both workers busy
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: run(case[3], case[2]), cases))
    problems: dict[str, list[str]] = {command: [] for command in subcommands()}
    for (command, variant, _, argv), proc in zip(cases, results, strict=True):
        tail = "\n".join(proc.stderr.strip().splitlines()[-4:])
        said = f"[{variant}] bonedamage {' '.join(argv)}: exit {proc.returncode}\n{tail}"
        if proc.returncode == 0 or "Traceback" in proc.stderr:
            problems[command].append(said)
        elif not re.search(r"^error: \S", proc.stderr, re.MULTILINE):
            problems[command].append("no 'error:' line: " + said)
    for cwd, files in before.items():
        if snapshot(cwd) != files:
            problems[cwd.parent.name].append(f"[{cwd.name}] changed its working folder")
    return problems


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_command_refuses_missing_empty_and_wrong_input_without_a_traceback(
    command: str, outcomes: dict[str, list[str]]
) -> None:
    assert not outcomes[command], "\n\n".join(outcomes[command])
