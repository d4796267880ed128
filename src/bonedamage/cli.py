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
    ("bonedamage.learn.study", "SearchError"),
    ("bonedamage.data.splits", "SplitError"),
    ("bonedamage.data.synth.generate", "SynthError"),
    ("bonedamage.data.tiling", "TilingError"),
    ("bonedamage.lifecycle.tracking", "TrackingError"),
    ("bonedamage.data.volume", "VolumeError"),
    ("bonedamage.learn.models", "WeightsError"),
)

FORCE = "replace an output folder that holds files this command did not write"


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports the option and exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _out(default: str) -> dict:
    return {"--out": {"help": f"output (default: {default}, from params pipeline.paths)"}}


def _flag(help_text: str) -> dict:
    return {"action": "store_true", "help": help_text}


TISSUE = {"required": True, "help": "tissue, one of params pipeline.tissues"}
TABLES = {
    "--tiles": {"help": "tile store (default: params pipeline.paths.tiles)"},
    "--splits": {"help": "splits table (default: params pipeline.paths.splits)"},
}
LEARN = {
    "--tissue": TISSUE,
    **TABLES,
    "--models": {"help": "models folder, holding TISSUE/ (default: params pipeline.paths.models)"},
}
ROOT = {"--data-root": {"help": "data root (default: params pipeline.paths.raw)"}}
METRICS = {"--metrics": {"help": "test metrics (default: METRICS/TISSUE.json)"}}

# command: (one-line help, its options); each option's keywords go to add_argument, and
# each option is a parameter of the command's run_<command> (tests/test_layout.py)
COMMANDS: dict[str, tuple[str, dict[str, dict]]] = {
    "synth": ("generate the phantom dataset", {
        **_out("RAW"), "--workers": {"type": _positive_int, "help": "processes (default: "
        "params synth.workers); the output does not depend on it"},
        "--force": _flag("replace a data root holding what synth did not write (real scans)"),
    }),
    "ingest": ("add real TIFF scans to the data root", {
        "source": {"nargs": "?", "help": "scan: multi-page TIFF or folder of one-slice TIFFs"},
        "--specimen-id": {"help": "specimen the scan belongs to"},
        "--tissue": {"help": "tissue type: cortical or trabecular"},
        "--state": {"choices": ["pristine", "intermediate", "failed"],
                    "help": "mechanical state of the scan"},
        "--voxel-size-um": {"type": float, "help": "isotropic voxel size (overrides the tags)"},
        "--scan-id": {"help": "scan id (default: SPECIMEN-STATE)"},
        "--species": {"help": "species (default: unknown)"},
        "--load-step": {"type": int, "help": "load step index (default: 0 when pristine)"},
        "--applied-strain": {"type": float, "help": "applied apparent strain"},
        "--batch": {"metavar": "CSV", "help": "CSV of many scans: specimen_id, tissue, state, "
                    "path, voxel_size_um (+ optional scan_id, species, load_step, "
                    "applied_strain); paths relative to the CSV's folder"},
        "--source-root": {"help": "folder batch paths must stay inside (default: the CSV's)"},
        **ROOT,
    }),
    "describe": ("morphometry and damage coverage of the data root", {
        **ROOT, **_out("METRICS/data.json"),
    }),
    "tile": ("cut scans into normalised 2D (or 2.5-D) tiles", {
        **ROOT, **_out("TILES"), "--force": _flag(FORCE),
    }),
    "split": ("specimen-grouped train/val/test splits", {
        "--tiles": TABLES["--tiles"], **_out("SPLITS"),
        "--metrics": {"help": "split counts (default: METRICS/splits.json)"},
    }),
    "validate": ("great-expectations data validation", {
        **ROOT, **TABLES, "--docs": {"help": "Data Docs folder (default: REPORTS/validation)"},
        **_out("METRICS/validation.json"), "--force": _flag(FORCE),
    }),
    "search": ("Optuna CNN architecture search", {
        **LEARN, **_out("MODELS/TISSUE/cnn_search.json"),
        "--reports": {"help": "study plots folder (default: REPORTS/search)"},
        "--worker": {"type": int, "help": "worker number when processes share the study"},
    }),
    "train-cnn": ("train the final CNN", LEARN),
    "corpus": ("generate and tile the pretraining corpus (phantoms of other specimens)", {
        **_out("CORPUS"), "--workers": {"type": _positive_int, "help": "processes (default: "
        "params synth.workers); the output does not depend on it"},
        "--force": _flag(FORCE),
    }),
    "pretrain": ("pretrain the ResNet backbone (procedural | simsiam | rotation)", {
        "--method": {"required": True, "help": "one of params pretrain.methods"},
        **TABLES,
        "--corpus": {"help": "pretraining corpus (default: params pipeline.paths.corpus)"},
        **_out("MODELS/pretrained/METHOD.pt"),
    }),
    "train-resnet": ("ResNet transfer learning (imagenet | procedural | simsiam | rotation "
                     "| scratch)", {
        **LEARN, "--pretrained": {"help": "pretrained backbones folder (default: "
                                  "MODELS/pretrained)"},
    }),
    "evaluate": ("test-split metrics", {
        **LEARN, **_out("METRICS/TISSUE.json"),
        "--plots": {"help": "ROC curves folder, holding TISSUE/ (default: PLOTS)"},
    }),
    "train-seg": ("train the damage segmentation model (MONAI U-Net)", {**LEARN, **ROOT}),
    "evaluate-seg": ("test-split scores of the segmentation and of Grad-CAM as one", {
        **LEARN, **ROOT,
        "--metrics": {"help": "explain's Grad-CAM metrics (default: METRICS/TISSUE-gradcam.json)"},
        **_out("METRICS/TISSUE-seg.json"),
    }),
    "register": ("register the tissue's models in the MLflow registry", {
        **LEARN, **METRICS, **_out("REGISTRY/TISSUE.json"),
        "--seg-metrics": {"help": "segmentation scores (default: METRICS/TISSUE-seg.json)"},
    }),
    "promote": ("champion/challenger promotion in the MLflow registry", {
        "--tissue": TISSUE,
        "--allow-refusal": _flag("report a refusal (different test data) and exit 0"),
    }),
    "explain": ("Grad-CAM exports and localization metrics", {
        **LEARN, **ROOT, **METRICS,
        "--reports": {"help": "exports folder, holding TISSUE/ (default: REPORTS/gradcam)"},
        **_out("METRICS/TISSUE-gradcam.json"), "--force": _flag(FORCE),
    }),
    "track": ("record in MLflow the runs of stages DVC skipped", {
        "--tissue": TISSUE,
        "--reports": {"help": "search reports folder, holding TISSUE/study.journal "
                      "(default: REPORTS/search)"},
        "--plots": {"help": "evaluate's plot tables folder, holding TISSUE/ (default: PLOTS)"},
    }),
    "predict": ("whole-scan prediction, 3D damage maps (classifier or segmentation model)", {
        "scan": {"metavar": "SCAN", "help": "TIFF stack: multi-page file or folder of slices"},
        "--model": {"required": True, "help": "model URI (models:/NAME@champion)"},
        "--out": {"required": True, "help": "output folder"},
        "--force": _flag(FORCE + "; or outputs over the domain's size limit"),
        "--voxel-size-um": {"type": float, "help": "voxel size (default: from the TIFF tags)"},
        "--no-cam": _flag("skip the Grad-CAM volume (faster)"),
        "--allow-resample": _flag("predict a scan coarser than the model's domain allows"),
        "--cam-layer": {"help": "Grad-CAM target layer (default: params explain.layer)"},
        "--batch-size": {"type": _positive_int, "help": "tiles per batch (default: 256; "
                         "segmentation models: 64)"},
        "--overlap": {"type": float, "help": "segmentation models: share of a tile its "
                      "neighbours overlap, in [0, 1) (default: 0.5)"},
        "--min-component-voxels": {"type": _positive_int, "help": "segmentation models: "
                                   "smallest damage component the report counts (default: 8)"},
    }),
    "gate": ("regression gate on the metrics", {
        "--rev": {"help": "git revision of the baseline (default: HEAD)"},
        "--baseline": {"help": "folder of baseline <tissue>.json files (instead of --rev)"},
        "--metrics": {"help": "folder of the new metrics (default: REPO/METRICS)"},
        "--repo": {"help": "repository root (default: the working directory)"},
        **_out("REPORTS/gate"), "--force": _flag(FORCE),
    }),
}  # fmt: skip


def _module(command: str) -> str:
    return "bonedamage.stages." + command.replace("-", "_")


def _description(command: str) -> str | None:
    """The stage module's docstring, read without importing it (imports are slow), in
    plain text (reST literals lose their backquotes)."""
    spec = importlib.util.find_spec(_module(command))
    if spec is None or spec.origin is None:
        return None
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))
    return doc.replace("``", "") if doc else None


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
    """Call the command's stage function with the options given (left out: its defaults)."""
    command = args.command.replace("-", "_")
    run = getattr(importlib.import_module(_module(args.command)), f"run_{command}")
    given = {k: v for k, v in vars(args).items() if k not in ("command", "no_progress")}
    if "progress" in inspect.signature(run).parameters:
        given["progress"] = not args.no_progress
    return int(run(**{k: v for k, v in given.items() if v is not None}))


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
