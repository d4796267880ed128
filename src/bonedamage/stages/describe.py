"""Describe the data root (``describe``): a realism report of every scan (morphometry,
microdamage per component, damage coverage, collapse-band BV/TV ratio) per scan and per
tissue and state, as a DVC metrics file. Methods: docs/phantoms.md."""

from __future__ import annotations

from pathlib import Path

from bonedamage.atomic import check_output_file
from bonedamage.config import stage_params
from bonedamage.data.coverage import describe_dataset, write_metrics

PARAMS = ("pipeline", "describe", "tile")


def run_describe(
    params: Path, out: Path | None = None, data_root: Path | None = None, *, progress: bool = True
) -> int:
    """Measure every scan of the manifest; write the data metrics JSON."""
    cfg = stage_params(params, PARAMS)
    root = Path(data_root or cfg.pipeline.paths.raw)
    out = Path(out or Path(cfg.pipeline.paths.metrics) / "data.json")
    check_output_file(out, inputs=(params, root))
    metrics = describe_dataset(
        root, cfg.describe.model_dump(), cfg.tile.model_dump()["tile_um"], progress=progress
    )
    write_metrics(metrics, out)
    print(f"wrote {out}")
    return 0
