"""Cut scans into tiles (``tile``): every scan of the manifest, resampled to the tissue's
working voxel size, normalised to its robust intensity range and cut into 2D tiles (2.5-D
with context planes: the planes ``context_um`` before and after become channels 1 and 3),
written as chunk files and an index. The output folder is replaced atomically."""

from __future__ import annotations

from pathlib import Path

from bonedamage.config import stage_params
from bonedamage.data.tiling import tile_dataset

PARAMS = ("pipeline", "tile")


def run_tile(
    params: Path,
    out: Path | None = None,
    data_root: Path | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> int:
    """Cut every scan of the manifest into normalised tiles (chunk files + index)."""
    cfg = stage_params(params, PARAMS)
    out = Path(out or cfg.pipeline.paths.tiles)
    index = tile_dataset(
        Path(data_root or cfg.pipeline.paths.raw),
        out,
        cfg.tile.model_dump(),
        progress=progress,
        force=force,
        inputs=(Path(params),),
    )
    counts = index.groupby(["tissue", "state"]).size().to_dict()
    shown = ", ".join(f"{t}/{s} {n}" for (t, s), n in sorted(counts.items()))
    print(f"wrote {len(index)} tiles to {out}: {shown}")
    return 0
