"""The ``bonedamage`` command: one entry point for users, ``dvc.yaml`` and ``MLproject``.

It parses and dispatches only: ``bonedamage <command>`` runs ``run_<command>`` of
``bonedamage.stages.<command>``, whose docstring is the command's help. Settings come from
``params.yaml`` (``--params``); options given on the command line override them. Known
failures print ``error: <file or field>: <problem>`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bonedamage import __version__

# Known failures: exit 2 with "error: <message>". Listed by module so that reporting one
# imports nothing: an exception can only have been raised if its module is loaded already.
_USER_ERRORS = (
    ("bonedamage.config", "ConfigError"),
    ("bonedamage.lifecycle.metric_gate", "GateError"),
    ("bonedamage.data.ingestion", "IngestError"),
    ("bonedamage.atomic", "InputError"),
    ("bonedamage.data.manifest", "ManifestError"),
    ("bonedamage.atomic", "OutputError"),
    ("bonedamage.explain.scan", "PredictError"),
    ("bonedamage.lifecycle.registry", "PromotionError"),
    ("bonedamage.lifecycle.pyfunc", "RequestError"),
    ("bonedamage.data.splits", "SplitError"),
    ("bonedamage.data.synth.generate", "SynthError"),
    ("bonedamage.data.tiling", "TilingError"),
    ("bonedamage.lifecycle.tracking", "TrackingError"),
    ("bonedamage.data.volume", "VolumeError"),
    ("bonedamage.learn.models", "WeightsError"),
)

FORCE = "replace an output folder that holds files this command did not write"
TISSUE = {"required": True, "help": "tissue (one of params pipeline.tissues)"}
TABLES = {
    "--tiles": {"help": "tile store (default: params pipeline.paths.tiles)"},
    "--splits": {"help": "splits table (default: params pipeline.paths.splits)"},
}
LEARN = {"--tissue": TISSUE, **TABLES, "--models": {"help": "models folder (default: params)"}}
ROOT = {"--data-root": {"help": "data root (default: params pipeline.paths.raw)"}}
OUT = {"--out": {"help": "output (default: from params pipeline.paths)"}}


def _flag(help_text: str) -> dict:
    return {"action": "store_true", "help": help_text}


# command: (one-line help, its options); each option's keywords go to add_argument
COMMANDS: dict[str, tuple[str, dict[str, dict]]] = {
    "synth": ("generate the phantom dataset", {
        **OUT, "--workers": {"type": int, "help": "processes (default: params synth.workers)"},
        "--force": _flag("replace a data root holding what synth did not write"),
    }),
    "ingest": ("add real TIFF scans to the data root", {
        "source": {"nargs": "?", "help": "scan: multi-page TIFF or folder of slices"},
        "--specimen-id": {}, "--tissue": {"help": "tissue type"},
        "--state": {"choices": ["pristine", "intermediate", "failed"]},
        "--voxel-size-um": {"type": float, "help": "isotropic voxel size (overrides tags)"},
        "--scan-id": {"help": "scan id (default: SPECIMEN-STATE)"},
        "--species": {"default": "unknown"}, "--load-step": {"type": int},
        "--applied-strain": {"type": float}, "--batch": {"metavar": "CSV"},
        "--source-root": {"help": "folder that batch paths must stay inside"}, **ROOT,
    }),
    "describe": ("morphometry and damage coverage of the data root", {**ROOT, **OUT}),
    "tile": ("cut scans into normalised 2D (or 2.5-D) tiles", {
        **ROOT, **OUT, "--force": _flag(FORCE),
    }),
    "split": ("specimen-grouped train/val/test splits", {
        "--tiles": TABLES["--tiles"], **OUT, "--metrics": {"help": "split counts"},
    }),
    "validate": ("great-expectations data validation", {
        **ROOT, **TABLES, "--docs": {"help": "Data Docs folder"}, **OUT,
        "--force": _flag(FORCE),
    }),
    "search": ("Optuna CNN architecture search", {
        **LEARN, **OUT, "--reports": {"help": "study plots folder"},
        "--worker": {"type": int, "default": 0, "help": "worker number sharing the study"},
    }),
    "train-cnn": ("train the final CNN", LEARN),
    "pretrain": ("ResNet rotation pretraining", LEARN),
    "train-resnet": ("ResNet transfer learning (imagenet | pretext | scratch)", LEARN),
    "evaluate": ("test-split metrics", {
        **LEARN, **OUT, "--plots": {"help": "ROC curves folder"},
    }),
    "register": ("register the tissue's models in the MLflow registry", {
        **LEARN, "--metrics": {"help": "test metrics"}, **OUT,
    }),
    "promote": ("champion/challenger promotion in the MLflow registry", {
        "--tissue": TISSUE,
        "--allow-refusal": _flag("report a refusal (different test data) and exit 0"),
    }),
    "explain": ("Grad-CAM exports and localization metrics", {
        **LEARN, **ROOT, "--metrics": {"help": "test metrics"},
        "--reports": {"help": "exports folder"}, **OUT, "--force": _flag(FORCE),
    }),
    "predict": ("whole-scan prediction and 3D damage maps", {
        "scan": {"metavar": "SCAN", "help": "TIFF stack: multi-page file or folder of slices"},
        "--model": {"required": True, "help": "model URI (models:/NAME@champion)"},
        "--out": {"required": True, "help": "output folder"},
        "--force": _flag(FORCE + "; or outputs over the domain's size limit"),
        "--voxel-size-um": {"type": float, "help": "voxel size (default: from the TIFF tags)"},
        "--no-cam": _flag("skip the Grad-CAM volume (faster)"),
        "--allow-resample": _flag("predict a scan coarser than the model's domain allows"),
        "--cam-layer": {"help": "Grad-CAM target layer (default: params explain.layer)"},
        "--batch-size": {"type": lambda text: _positive_int(text), "default": 256},
    }),
    "gate": ("regression gate on the metrics", {
        "--rev": {"default": "HEAD", "help": "git revision of the baseline"},
        "--baseline": {"help": "folder of baseline <tissue>.json files (instead of --rev)"},
        "--metrics": {"help": "folder of the new metrics"},
        "--repo": {"default": ".", "help": "repository root"}, **OUT, "--force": _flag(FORCE),
    }),
}  # fmt: skip


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports the option and exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _module(command: str) -> str:
    return "bonedamage.stages." + command.replace("-", "_")


def _description(command: str) -> str | None:
    """The stage module's docstring, read without importing it (imports are slow)."""
    spec = importlib.util.find_spec(_module(command))
    if spec is None or spec.origin is None:
        return None
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command in :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="bonedamage",
        description="Failed-vs-pristine bone tissue from SR-microCT: data, models, explanations.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (summary, options) in COMMANDS.items():
        p = sub.add_parser(
            command, parents=[common], help=summary, description=_description(command)
        )
        for name, kwargs in options.items():
            p.add_argument(name, **kwargs)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    """Call the command's stage function with the options it takes."""
    run = getattr(
        importlib.import_module(_module(args.command)), "run_" + args.command.replace("-", "_")
    )
    given = {k: v for k, v in vars(args).items() if k not in ("command", "no_progress")}
    given["progress"] = not args.no_progress
    accepted = inspect.signature(run).parameters
    return int(run(**{k: v for k, v in given.items() if k in accepted}))


def _user_errors() -> tuple[type[Exception], ...]:
    """The user-error classes of the modules loaded so far (see ``_USER_ERRORS``)."""
    return tuple(
        getattr(sys.modules[module], name) for module, name in _USER_ERRORS if module in sys.modules
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder that is missing, unreadable, of another kind
        if exc.filename is None:
            raise
        print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
