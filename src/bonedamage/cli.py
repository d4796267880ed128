"""The ``bonedamage`` command: one entry point for users, ``dvc.yaml`` and ``MLproject``.

Every subcommand reads its settings from ``params.yaml`` (``--params``); options given on
the command line override them. Known failures print ``error: <file or field>: <problem>``
and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bonedamage import __version__
from bonedamage.config import load_params, section

# Known failures: exit 2 with "error: <message>". Listed by module so that reporting one
# imports nothing: an exception can only have been raised if its module is loaded already
# (importing torch and MLflow to build this tuple took seconds on every failed `ingest`).
_USER_ERRORS = (
    ("bonedamage.config", "ConfigError"),
    ("bonedamage.lifecycle.gate", "GateError"),
    ("bonedamage.data.ingest", "IngestError"),
    ("bonedamage.atomic", "InputError"),
    ("bonedamage.data.manifest", "ManifestError"),
    ("bonedamage.atomic", "OutputError"),
    ("bonedamage.explain.predict", "PredictError"),
    ("bonedamage.lifecycle.registry", "PromotionError"),
    ("bonedamage.lifecycle.pyfunc", "RequestError"),
    ("bonedamage.data.splits", "SplitError"),
    ("bonedamage.data.synth.generate", "SynthError"),
    ("bonedamage.data.tiling", "TilingError"),
    ("bonedamage.lifecycle.tracking", "TrackingError"),
    ("bonedamage.data.volume", "VolumeError"),
    ("bonedamage.learn.models", "WeightsError"),
)


def _user_errors() -> tuple[type[Exception], ...]:
    """The user-error classes of the modules loaded so far (see ``_USER_ERRORS``)."""
    return tuple(
        getattr(sys.modules[module], name) for module, name in _USER_ERRORS if module in sys.modules
    )


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports the option and exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _data_root(args: argparse.Namespace, params: dict) -> Path:
    return Path(args.data_root or section(params, "data", args.params)["root"])


def _file_out(args: argparse.Namespace, out: str | Path, *inputs: Path | str | None) -> Path:
    """``out``, checked: not a folder, an input or inside an input folder (OutputError);
    the params file, tile store and splits table a command reads are always inputs."""
    from bonedamage.atomic import check_output_file

    tables = (getattr(args, "tiles", None), getattr(args, "splits", None))
    check_output_file(out, inputs=(args.params, *tables, *inputs))
    return Path(out)


def _need(args: argparse.Namespace, *files: Path, json: Sequence[Path] = ()) -> None:
    """The tile index, splits table, ``files`` and ``json`` files a command reads: there,
    not empty and of the right kind (InputError), before the slow imports and MLflow."""
    from bonedamage.atomic import require, require_json, require_parquet
    from bonedamage.data.tilestore import INDEX_NAME

    require_parquet(Path(args.tiles) / INDEX_NAME, "tile index")
    require_parquet(args.splits, "splits table")
    for path in files:
        require(path, "input")
    for path in json:
        require_json(path, "input")


def cmd_synth(args: argparse.Namespace) -> int:
    """Generate the phantom dataset into the data root."""
    from bonedamage.data.synth.generate import generate_dataset

    params = load_params(args.params)
    cfg = section(params, "synth", args.params)
    out = Path(args.out or section(params, "data", args.params)["root"])
    manifest = generate_dataset(
        cfg,
        out,
        workers=args.workers,
        progress=not args.no_progress,
        force=args.force,
        inputs=(Path(args.params),),
    )
    print(f"wrote {len(manifest)} scans of {manifest['specimen_id'].nunique()} specimens to {out}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Add real scans (TIFF stacks) to the data root with manifest rows."""
    from bonedamage.data.ingest import IngestError, IngestRequest, ingest_scans, read_batch_csv

    params = load_params(args.params)
    root = _data_root(args, params)
    if args.batch:
        if args.source:
            raise IngestError("give either a SOURCE scan or --batch CSV, not both")
        requests = read_batch_csv(
            Path(args.batch), Path(args.source_root) if args.source_root else None
        )
    else:
        missing = [
            flag
            for flag, value in (
                ("SOURCE", args.source),
                ("--specimen-id", args.specimen_id),
                ("--tissue", args.tissue),
                ("--state", args.state),
            )
            if not value
        ]
        if missing:
            raise IngestError(f"missing {', '.join(missing)} (or use --batch CSV)")
        requests = [
            IngestRequest(
                source=Path(args.source),
                specimen_id=args.specimen_id,
                tissue=args.tissue,
                state=args.state,
                voxel_size_um=args.voxel_size_um,
                scan_id=args.scan_id,
                species=args.species,
                load_step=args.load_step,
                applied_strain=args.applied_strain,
            )
        ]
    added = ingest_scans(requests, root, progress=not args.no_progress)
    for row in added.itertuples(index=False):
        print(f"added {row.scan_id}: {row.path} {row.shape} {row.dtype} {row.voxel_size_um:g} um")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    """Measure morphometry and damage coverage; write the data metrics JSON."""
    from bonedamage.data.describe import describe, write_metrics

    params = load_params(args.params)
    out = _file_out(args, args.out, _data_root(args, params))
    metrics = describe(
        _data_root(args, params),
        section(params, "describe", args.params),
        section(params, "tile", args.params)["tile_um"],
        progress=not args.no_progress,
    )
    write_metrics(metrics, out)
    print(f"wrote {args.out}")
    return 0


def cmd_tile(args: argparse.Namespace) -> int:
    """Cut every scan of the manifest into normalised 2D tiles (chunk files + index)."""
    from bonedamage.data.tiling import tile_dataset

    params = load_params(args.params)
    index = tile_dataset(
        _data_root(args, params),
        Path(args.out),
        section(params, "tile", args.params),
        progress=not args.no_progress,
        force=args.force,
        inputs=(Path(args.params),),
    )
    counts = index.groupby(["tissue", "state"]).size().to_dict()
    print(
        f"wrote {len(index)} tiles to {args.out}: "
        + ", ".join(f"{t}/{s} {n}" for (t, s), n in sorted(counts.items()))
    )
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    """Specimen-grouped train/val/test splits (and the leaky by-tile alternative)."""
    import json

    from bonedamage.atomic import atomic_path, read_parquet, write_text_atomic
    from bonedamage.data.splits import make_splits, summary
    from bonedamage.data.tilestore import INDEX_NAME

    params = load_params(args.params)
    out = _file_out(args, args.out, args.tiles)
    _file_out(args, args.metrics, args.tiles, out)
    index = read_parquet(Path(args.tiles) / INDEX_NAME, "tile index")
    splits = make_splits(index, section(params, "split", args.params))
    with atomic_path(out) as tmp:
        splits.to_parquet(tmp, index=False)
    write_text_atomic(
        Path(args.metrics), json.dumps(summary(splits), indent=2, sort_keys=True) + "\n"
    )
    print(f"wrote {out} ({len(splits)} rows) and {args.metrics}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate manifest, tile index and splits with great-expectations; build Data Docs."""
    import json

    from bonedamage.atomic import read_parquet, write_text_atomic
    from bonedamage.data.manifest import read_manifest
    from bonedamage.data.tilestore import INDEX_NAME
    from bonedamage.data.validate import validate_tables

    params = load_params(args.params)
    _need(args)  # before the manifest: a missing table is named whatever else is wrong
    inputs = (_data_root(args, params), Path(args.tiles), Path(args.splits), Path(args.params))
    out = _file_out(args, args.out, *inputs, args.docs)
    report = validate_tables(
        read_manifest(_data_root(args, params)),
        read_parquet(Path(args.tiles) / INDEX_NAME, "tile index"),
        read_parquet(args.splits, "splits table"),
        section(params, "validate", args.params),
        docs_dir=Path(args.docs),
        inputs=inputs,
        force=args.force,
    )
    write_text_atomic(
        out, json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str) + "\n"
    )
    print(report.summary())
    print(f"Data Docs: {report.docs_index}")
    return 0 if report.success else 1


def _tracked(args: argparse.Namespace) -> dict:
    """params.yaml, with MLflow pointed at its store (the learning stages are tracked)."""
    params = load_params(args.params)
    _store(args, params)
    from bonedamage.lifecycle.tracking import configure

    configure(section(params, "mlflow", args.params))
    return params


def _store(args: argparse.Namespace, params: dict) -> None:
    """The tracking store of params mlflow.db, when used, is an SQLite file (InputError)."""
    from bonedamage.atomic import require_sqlite

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        db = section(params, "mlflow", args.params).get("db")
        if db:
            require_sqlite(db, "the MLflow tracking store, params mlflow.db")


@contextmanager
def _training(args: argparse.Namespace, device_from: str = "train") -> Iterator[dict]:
    """params.yaml inside the process group of a ``torchrun`` launch (nothing to join
    without one); MLflow is configured on the rank that tracks (rank 0) only."""
    params = load_params(args.params)
    _store(args, params)
    from bonedamage.learn import distributed
    from bonedamage.lifecycle.tracking import configure

    cfg = {**section(params, "train", args.params), **params.get(device_from, {})}
    with distributed.session(str(cfg.get("device", "auto"))):
        if distributed.is_main():
            configure(section(params, "mlflow", args.params))
        yield params


def _report(line: str) -> None:
    """Print ``line`` once per launch (on rank 0 under ``torchrun``)."""
    from bonedamage.learn import distributed

    if distributed.is_main():
        print(line)


def cmd_search(args: argparse.Namespace) -> int:
    """Optuna search of the CNN architecture for one tissue (nested MLflow runs per trial)."""
    _need(args)
    out = _file_out(args, args.out or f"models/{args.tissue}/cnn_search.json", args.tiles)
    from bonedamage.lifecycle.runs import run_search

    params = _tracked(args)
    best = run_search(
        params,
        args.tissue,
        Path(args.tiles),
        Path(args.splits),
        out,
        Path(args.reports),
        worker=args.worker,
    )
    print(
        f"{args.tissue}: best trial {best['trial']} val balanced accuracy {best['value']:.4f}"
        f" ({best['summary']['states']})"
    )
    return 0


def cmd_train_cnn(args: argparse.Namespace) -> int:
    """Train the final CNN of a tissue with the best searched configuration: an ensemble of
    params.yaml cnn.ensemble networks (seeds train.seed, +1, ...) when above 1."""
    models = Path(args.models) / args.tissue
    _need(args, json=[models / "cnn_search.json"])
    from bonedamage.lifecycle.runs import run_train_cnn

    with _training(args) as params:
        scores = run_train_cnn(
            params,
            args.tissue,
            Path(args.tiles),
            Path(args.splits),
            models / "cnn_search.json",
            models,
        )
        _report(f"{args.tissue}: " + ", ".join(f"{k} val {v:.4f}" for k, v in scores.items()))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Self-supervised rotation pretraining of the ResNet backbone for a tissue."""
    _need(args)
    from bonedamage.lifecycle.runs import run_pretrain

    out = Path(args.models) / args.tissue / "pretext.pt"
    with _training(args, "resnet") as params:
        score = run_pretrain(params, args.tissue, Path(args.tiles), Path(args.splits), out)
        _report(f"{args.tissue}: rotation task val balanced accuracy {score:.4f}")
    return 0


def cmd_train_resnet(args: argparse.Namespace) -> int:
    """Fine-tune the ResNet of a tissue for every init in params resnet.inits."""
    models = Path(args.models) / args.tissue
    inits = section(load_params(args.params), "resnet", args.params).get("inits", [])
    _need(args, *([models / "pretext.pt"] if "pretext" in inits else []))
    from bonedamage.lifecycle.runs import run_train_resnet

    with _training(args, "resnet") as params:
        scores = run_train_resnet(
            params,
            args.tissue,
            Path(args.tiles),
            Path(args.splits),
            models / "pretext.pt",
            models / "resnet",
        )
        _report(f"{args.tissue}: " + ", ".join(f"{k} val {v:.4f}" for k, v in scores.items()))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Test-split metrics of every model of a tissue (metrics/<tissue>.json)."""
    models = Path(args.models) / args.tissue
    _need(args, models / "cnn.pt", models / "cnn_leaky.pt", json=[models / "cnn.json"])
    out = _file_out(args, args.out or f"metrics/{args.tissue}.json", args.tiles, models)
    from bonedamage.lifecycle.runs import run_evaluate

    params = _tracked(args)
    results = run_evaluate(
        params,
        args.tissue,
        Path(args.tiles),
        Path(args.splits),
        Path(args.models) / args.tissue,
        out,
        Path(args.plots) / args.tissue,
    )
    for name, m in results.items():
        print(
            f"{args.tissue} {name:18s} accuracy {m['accuracy']:.4f} "
            f"balanced {m['balanced_accuracy']:.4f} scan {m['scan_accuracy']:.3f}"
        )
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """Register a tissue's CNN, ResNet and tissue model in the MLflow registry (challenger)."""
    models = Path(args.models) / args.tissue
    metrics = Path(args.metrics or f"metrics/{args.tissue}.json")
    _need(args, models / "cnn.pt", json=[metrics, models / "cnn.json"])
    out = _file_out(args, args.out or f"registry/{args.tissue}.json", args.tiles, models, metrics)
    from bonedamage.lifecycle.registry import run_register

    params = _tracked(args)
    tables = Path(args.tiles), Path(args.splits)
    done = run_register(params, args.tissue, *tables, models, metrics, out)
    for row in done:
        state = "new version" if row["created"] else "already registered:"
        print(f"{row['name']}: {state} {row['version']} -> @challenger")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Move each registered model's champion alias onto its challenger when it is as good."""
    from bonedamage.lifecycle.registry import PromotionError, run_promote

    params = _tracked(args)
    decisions, errors = run_promote(params, args.tissue)
    for d in decisions:
        verdict = "promoted" if d.promote else "kept"
        deltas = " ".join(f"{k} {v:+.4f}" for k, v in d.deltas.items())
        print(
            f"{d.name}: challenger v{d.challenger} {verdict}; champion "
            f"v{d.champion_before} -> v{d.champion_after} ({d.reason}) {deltas}".rstrip()
        )
    if errors and args.allow_refusal:
        for error in errors:
            print(f"refused (recorded as version tags; champion unchanged): {error}")
    elif errors:
        raise PromotionError("; ".join(errors))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Grad-CAM maps of a tissue's CNN and ResNet: overlays, CAM TIFFs, localization metrics."""
    models = Path(args.models) / args.tissue
    metrics = Path(args.metrics or f"metrics/{args.tissue}.json")
    _need(args, models / "cnn.pt", json=[metrics, models / "cnn.json"])
    out = _file_out(args, args.out or f"metrics/{args.tissue}-gradcam.json", args.tiles, models)
    from bonedamage.explain.report import run_explain

    params = _tracked(args)
    results = run_explain(
        params,
        args.tissue,
        _data_root(args, params),
        Path(args.tiles),
        Path(args.splits),
        models,
        metrics,
        Path(args.reports),
        out,
        force=args.force,
    )
    nan = float("nan")
    for name, m in results.items():
        energy, centre = m.get("cam_energy_ratio", nan), m.get("centre_energy_ratio", nan)
        iou, road = m.get("cam_iou", nan), m.get("faithfulness_road", nan)
        print(
            f"{args.tissue} {name:16s} CAM energy ratio {energy:.2f} (uniform 1.00, centre "
            f"{centre:.2f}) IoU {iou:.3f} ROAD {road:+.3f} on {m.get('n_tiles', 0)} tiles"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict a whole scan with a registered model: tile table, verdict, 3D damage maps."""
    from bonedamage.atomic import require

    require(args.scan, "scan", folder=None)  # before MLflow and the model load
    from bonedamage.explain.predict import load_model, predict_scan
    from bonedamage.explain.report import layer_for

    # params.yaml only overrides (explain.layer) and names the tracking store; without
    # one, the registered model carries its settings and MLFLOW_TRACKING_URI the store
    default = args.params == "params.yaml" and not Path(args.params).is_file()
    params = {} if default else _tracked(args)
    model = load_model(args.model)
    layer = (
        args.cam_layer
        or layer_for(params.get("explain", {}), model.meta["kind"])
        or model.meta.get("cam_layer")
    )
    verdict = predict_scan(
        model,
        Path(args.scan),
        Path(args.out),
        voxel_size_um=args.voxel_size_um,
        model_uri=args.model,
        allow_resample=args.allow_resample,
        cam=not args.no_cam,
        cam_layer=layer,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        force=args.force,
    )
    print(
        f"{args.scan}: {verdict['verdict']} (mean tile probability "
        f"{verdict['mean_prob_failed']:.3f} over {verdict['n_tiles']} tiles; "
        f"{verdict['rule']}) -> {args.out}"
    )
    for reason in verdict["domain_reasons"]:  # why the verdict is uncertain
        print(f"  outside the model's domain: {reason}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    """Compare reproduced metrics with the committed ones; exit 1 on a regression."""
    from bonedamage.lifecycle.gate import run_gate, write_report

    cfg = section(load_params(args.params), "gate", args.params)
    metrics = Path(args.metrics) if args.metrics else Path(args.repo) / "metrics"
    report = run_gate(
        Path(args.repo),
        cfg,
        rev=args.rev,
        baseline_dir=Path(args.baseline) if args.baseline else None,
        metrics_dir=metrics,
    )
    inputs = (metrics, args.baseline, Path(args.repo) / "dvc.lock", args.params)
    paths = write_report(report, Path(args.out), inputs=inputs, force=args.force)
    print(report.to_markdown())
    print("report: " + ", ".join(map(str, paths)))
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


FORCE = "replace an output folder that holds files this command did not write"


def build_parser() -> argparse.ArgumentParser:
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

    p = sub.add_parser(
        "synth",
        parents=[common],
        help="generate the phantom dataset",
        description=cmd_synth.__doc__ + " Settings: params.yaml 'synth'. "
        "The output folder is replaced atomically.",
    )
    p.add_argument("--out", help="data root to write (default: params data.root)")
    p.add_argument(
        "--workers",
        type=int,
        help="processes (default: params synth.workers); the output does not depend on it",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an output folder holding what synth did not write (ingested scans)",
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "ingest",
        parents=[common],
        help="add real TIFF scans to the data root",
        description=cmd_ingest.__doc__ + " SOURCE is a multi-page TIFF or a folder of "
        "one-slice TIFFs (uint8, uint16, int16 or float32; uncompressed, LZW, zstd, deflate "
        "or PackBits). The voxel size is read from ImageJ/OME/resolution tags unless "
        "--voxel-size-um is given.",
    )
    p.add_argument("source", nargs="?", help="scan: multi-page TIFF or folder of slices")
    p.add_argument("--specimen-id", help="specimen the scan belongs to")
    p.add_argument("--tissue", choices=["cortical", "trabecular"], help="tissue type")
    p.add_argument(
        "--state",
        choices=["pristine", "intermediate", "failed"],
        help="mechanical state of the scan",
    )
    p.add_argument("--voxel-size-um", type=float, help="isotropic voxel size (overrides tags)")
    p.add_argument("--scan-id", help="scan id (default: SPECIMEN-STATE)")
    p.add_argument("--species", default="unknown", help="species (default: %(default)s)")
    p.add_argument("--load-step", type=int, help="load step index (default: 0 when pristine)")
    p.add_argument("--applied-strain", type=float, help="applied apparent strain")
    p.add_argument(
        "--batch",
        metavar="CSV",
        help="CSV of many scans: specimen_id, tissue, "
        "state, path, voxel_size_um (+ optional scan_id, species, load_step, "
        "applied_strain); paths relative to the CSV's folder",
    )
    p.add_argument(
        "--source-root", help="folder that batch paths must stay inside (default: the CSV's folder)"
    )
    p.add_argument("--data-root", help="data root (default: params data.root)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "describe",
        parents=[common],
        help="morphometry and damage coverage of the data root",
        description=cmd_describe.__doc__ + " Settings: params.yaml 'describe'.",
    )
    p.add_argument("--data-root", help="data root (default: params data.root)")
    p.add_argument("--out", default="metrics/data.json", help="metrics file (default: %(default)s)")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser(
        "tile",
        parents=[common],
        help="cut scans into normalised 2D (or 2.5-D) tiles",
        description=cmd_tile.__doc__ + " Settings: params.yaml 'tile' (context_um > 0: the "
        "planes that far before and after each tiled plane become channels 1 and 3). The "
        "output folder is replaced atomically.",
    )
    p.add_argument("--data-root", help="data root (default: params data.root)")
    p.add_argument("--out", default="data/tiles", help="tile store (default: %(default)s)")
    p.add_argument("--force", action="store_true", help=FORCE)
    p.set_defaults(func=cmd_tile)

    p = sub.add_parser(
        "split",
        parents=[common],
        help="specimen-grouped train/val/test splits",
        description=cmd_split.__doc__ + " Settings: params.yaml 'split'.",
    )
    p.add_argument("--tiles", default="data/tiles", help="tile store (default: %(default)s)")
    p.add_argument(
        "--out", default="data/splits.parquet", help="splits table (default: %(default)s)"
    )
    p.add_argument(
        "--metrics", default="metrics/splits.json", help="split counts (default: %(default)s)"
    )
    p.set_defaults(func=cmd_split)

    p = sub.add_parser(
        "validate",
        parents=[common],
        help="great-expectations data validation",
        description=cmd_validate.__doc__ + " Settings: params.yaml 'validate'. "
        "Exits 1 and lists the failed expectations when the data is invalid.",
    )
    p.add_argument("--data-root", help="data root (default: params data.root)")
    p.add_argument("--tiles", default="data/tiles", help="tile store (default: %(default)s)")
    p.add_argument(
        "--splits", default="data/splits.parquet", help="splits table (default: %(default)s)"
    )
    p.add_argument(
        "--docs", default="reports/validation", help="Data Docs folder (default: %(default)s)"
    )
    p.add_argument(
        "--out", default="metrics/validation.json", help="validation summary (default: %(default)s)"
    )
    p.add_argument("--force", action="store_true", help=FORCE)
    p.set_defaults(func=cmd_validate)

    learn = argparse.ArgumentParser(add_help=False)
    learn.add_argument("--tissue", required=True, choices=["cortical", "trabecular"])
    learn.add_argument("--tiles", default="data/tiles", help="tile store (default: %(default)s)")
    learn.add_argument(
        "--splits", default="data/splits.parquet", help="splits table (default: %(default)s)"
    )
    learn.add_argument("--models", default="models", help="models folder (default: %(default)s)")
    tracked = " Tracked in MLflow (params.yaml 'mlflow'; MLFLOW_TRACKING_URI overrides)."

    def ddp(command: str) -> str:
        return (
            " Data-parallel on several processes or GPUs (DDP; rank 0 alone tracks and writes"
            ", the batch size stays the global one): torchrun --standalone --nproc-per-node 2 "
            f"-m bonedamage {command} --tissue cortical (docs/scale-out.md)."
        )

    p = sub.add_parser(
        "search",
        parents=[common, learn],
        help="Optuna CNN architecture search",
        description=cmd_search.__doc__ + " Settings: params.yaml 'search', "
        "'train', 'augment'. Re-running continues the stored study." + tracked,
    )
    p.add_argument("--out", help="best configuration (default: models/TISSUE/cnn_search.json)")
    p.add_argument(
        "--reports", default="reports/search", help="study plots folder (default: %(default)s)"
    )
    p.add_argument(
        "--worker",
        type=int,
        default=0,
        help="worker number when several processes share the study (seeds differ)",
    )
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "train-cnn",
        parents=[common, learn],
        help="train the final CNN",
        description=cmd_train_cnn.__doc__ + " Also trains the same recipe on "
        "the leaky split, for the inflation metric." + tracked + ddp("train-cnn"),
    )
    p.set_defaults(func=cmd_train_cnn)

    p = sub.add_parser(
        "pretrain",
        parents=[common, learn],
        help="ResNet rotation pretraining",
        description=cmd_pretrain.__doc__
        + " Settings: params.yaml 'resnet'."
        + tracked
        + ddp("pretrain"),
    )
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "train-resnet",
        parents=[common, learn],
        help="ResNet transfer learning (imagenet | pretext | scratch)",
        description=cmd_train_resnet.__doc__ + " ImageNet weights come from "
        "resnet.weights_path or the torch cache, never from the network."
        + tracked
        + ddp("train-resnet"),
    )
    p.set_defaults(func=cmd_train_resnet)

    p = sub.add_parser(
        "evaluate",
        parents=[common, learn],
        help="test-split metrics",
        description=cmd_evaluate.__doc__ + " Settings: params.yaml 'evaluate'." + tracked,
    )
    p.add_argument("--out", help="metrics file (default: metrics/TISSUE.json)")
    p.add_argument("--plots", default="plots", help="ROC curves folder (default: %(default)s)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "register",
        parents=[common, learn],
        help="register the tissue's models in the MLflow registry",
        description=cmd_register.__doc__ + " Models <prefix>-<tissue>-cnn, "
        "<prefix>-<tissue>-resnet (the init with the best validation score) and <prefix>-<tissue> "
        "(the better of the two on validation) as pyfuncs that take raw tiles; versions carry "
        "the data hashes, git commit, params and test metrics as tags. Idempotent: weights "
        "already registered on the same test set are not registered again. Settings: "
        "params.yaml 'registry'." + tracked,
    )
    p.add_argument("--metrics", help="test metrics (default: metrics/TISSUE.json)")
    p.add_argument("--out", help="registration record (default: registry/TISSUE.json)")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser(
        "promote",
        parents=[common],
        help="champion/challenger promotion in the MLflow registry",
        description=cmd_promote.__doc__ + " The challenger becomes champion when its test "
        "balanced accuracy and ROC-AUC do not drop below the champion's by more than "
        "params.yaml registry.tolerance (and it clears registry.min_balanced_accuracy); the "
        "first validated challenger becomes champion. Versions evaluated on different test "
        "data are refused (exit 2). Every decision is recorded as version tags." + tracked,
    )
    p.add_argument("--tissue", required=True, choices=["cortical", "trabecular"])
    p.add_argument(
        "--allow-refusal",
        action="store_true",
        help="report a refusal (different test data) and exit 0: the pipeline goes on "
        "with the champion unchanged",
    )
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser(
        "explain",
        parents=[common, learn],
        help="Grad-CAM exports and localization metrics",
        description=cmd_explain.__doc__ + " For the CNN and the ResNet the registry holds: "
        "overlay grids of true/false positives/negatives, float32 CAM TIFFs and index.csv "
        "under REPORTS/TISSUE/MODEL/, and the CAM energy inside the ground-truth damage "
        "against its area share, a thresholded-CAM IoU and ROAD faithfulness, with uniform "
        "and centre-bias baselines. Settings: params.yaml 'explain'." + tracked,
    )
    p.add_argument(
        "--data-root", help="data root with the damage masks (default: params data.root)"
    )
    p.add_argument("--metrics", help="test metrics (default: metrics/TISSUE.json)")
    p.add_argument(
        "--reports", default="reports/gradcam", help="exports folder (default: %(default)s)"
    )
    p.add_argument("--out", help="localization metrics (default: metrics/TISSUE-gradcam.json)")
    p.add_argument("--force", action="store_true", help=FORCE)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "predict",
        parents=[common],
        help="whole-scan prediction and 3D damage maps",
        description=cmd_predict.__doc__ + " Tiles the scan exactly as the model was trained "
        "(its plane, tile size in um, working voxel size, slice stride, intensity percentiles, "
        "filters and 2.5-D context planes travel with the registered model), classifies "
        "every tile in batches and writes tiles.csv, slices.csv, verdict.json, probability.tif "
        "and cam.tif (ImageJ stacks carrying the voxel size) and orthoviews.png into OUT "
        "(replaced atomically). Streams the scan: memory stays bounded." + tracked,
    )
    p.add_argument("scan", metavar="SCAN", help="TIFF stack: multi-page file or folder of slices")
    p.add_argument(
        "--model",
        required=True,
        help="model URI, e.g. models:/bonedamage-trabecular@champion",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--force", action="store_true", help=FORCE + "; or outputs over the domain's size limit"
    )
    p.add_argument("--voxel-size-um", type=float, help="voxel size (default: from the TIFF tags)")
    p.add_argument("--no-cam", action="store_true", help="skip the Grad-CAM volume (faster)")
    p.add_argument(
        "--allow-resample",
        action="store_true",
        help="predict a scan coarser than the model's domain allows (verdict: uncertain)",
    )
    p.add_argument(
        "--cam-layer",
        help="Grad-CAM target layer, a module name (default: params.yaml explain.layer for "
        "the model's kind, cnn or resnet; the last conv block when that is null)",
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=256, help="tiles per batch (default: 256)"
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "gate",
        parents=[common],
        help="regression gate on the metrics",
        description=cmd_gate.__doc__ + " For every tissue x model x metric in params.yaml "
        "'gate', the new value (metrics/<tissue>.json) may not drop below the baseline by "
        "more than the metric's tolerance; when dvc.lock shows the same raw data, code and "
        "params as the baseline, every metric must match exactly. Writes gate.json and "
        "gate.md (for a pull-request comment). Exit 0 pass, 1 fail, 2 missing metric/baseline.",
    )
    p.add_argument("--rev", default="HEAD", help="git revision of the baseline (default: HEAD)")
    p.add_argument("--baseline", help="folder of baseline <tissue>.json files (instead of --rev)")
    p.add_argument("--metrics", help="folder of the new metrics (default: REPO/metrics)")
    p.add_argument("--repo", default=".", help="repository root (default: %(default)s)")
    p.add_argument("--out", default="reports/gate", help="report folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help=FORCE)
    p.set_defaults(func=cmd_gate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
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
