"""Validate the data (``validate``) with great-expectations: the manifest, the tile index and
the splits (schema, ranges, class balance, no specimen in two splits), with Data Docs and,
beside them, a self-contained summary of every expectation (``summary.md``, readable offline).
Exits 1 and lists the failed expectations when the data is invalid."""

from __future__ import annotations

import json
from pathlib import Path

from bonedamage.atomic import check_output_file, read_parquet, write_text_atomic
from bonedamage.config import stage_params
from bonedamage.data.expectations import validate_tables
from bonedamage.data.manifest import read_manifest
from bonedamage.data.tilestore import INDEX_NAME, require_tables

PARAMS = ("pipeline", "validate")


def run_validate(
    params: Path,
    data_root: Path | None = None,
    tiles: Path | None = None,
    splits: Path | None = None,
    docs: Path | None = None,
    out: Path | None = None,
    *,
    force: bool = False,
) -> int:
    """Validate manifest, tile index and splits; build Data Docs and the offline summary;
    1 when invalid."""
    cfg = stage_params(params, PARAMS)
    paths = cfg.pipeline.paths
    root, tiles, splits = (
        Path(data_root or paths.raw),
        Path(tiles or paths.tiles),
        Path(splits or paths.splits),
    )
    docs = Path(docs or Path(paths.reports) / "validation")
    out = Path(out or Path(paths.metrics) / "validation.json")
    require_tables(tiles, splits)  # before the manifest: a missing table is named first
    inputs = (root, tiles, splits, Path(params))
    check_output_file(out, inputs=(*inputs, docs))
    report = validate_tables(
        read_manifest(root),
        read_parquet(tiles / INDEX_NAME, "tile index"),
        read_parquet(splits, "splits table"),
        cfg.validate.model_dump(),
        docs_dir=docs,
        inputs=inputs,
        force=force,
    )
    write_text_atomic(
        out, json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str) + "\n"
    )
    print(report.summary())
    print(f"Summary (every expectation, readable offline): {report.summary_file}")
    print(f"Data Docs: {report.docs_index}")
    return 0 if report.success else 1
