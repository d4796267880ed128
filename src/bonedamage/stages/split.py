"""Split the tiles (``split``): train/val/test by specimen, so that no specimen has tiles in
two splits, and the leaky by-tile alternative that shows how much such a split inflates
accuracy; the counts as a DVC metrics file."""

from __future__ import annotations

import json
from pathlib import Path

from bonedamage.atomic import atomic_path, check_output_file, read_parquet, write_text_atomic
from bonedamage.config import stage_params
from bonedamage.data.splits import make_splits, split_counts
from bonedamage.data.tilestore import INDEX_NAME

PARAMS = ("pipeline", "split")


def run_split(
    params: Path, tiles: Path | None = None, out: Path | None = None, metrics: Path | None = None
) -> int:
    """Specimen-grouped train/val/test splits (and the leaky by-tile alternative)."""
    cfg = stage_params(params, PARAMS)
    paths = cfg.pipeline.paths
    tiles = Path(tiles or paths.tiles)
    out = Path(out or paths.splits)
    metrics = Path(metrics or Path(paths.metrics) / "splits.json")
    check_output_file(out, inputs=(params, tiles))
    check_output_file(metrics, inputs=(params, tiles, out))
    index = read_parquet(tiles / INDEX_NAME, "tile index")
    splits = make_splits(index, cfg.split.model_dump())
    with atomic_path(out) as tmp:
        splits.to_parquet(tmp, index=False)
    write_text_atomic(metrics, json.dumps(split_counts(splits), indent=2, sort_keys=True) + "\n")
    print(f"wrote {out} ({len(splits)} rows) and {metrics}")
    return 0
