"""Generate the embedded phantom dataset (``synth``): pristine and failed SR-microCT volumes of
cortical and trabecular bone with ground-truth damage masks, written as the data root that
``data.dvc`` versions. The output folder is replaced atomically."""

from __future__ import annotations

from pathlib import Path

from bonedamage.config import stage_params
from bonedamage.data.synth.generate import generate_dataset

PARAMS = ("pipeline", "synth")


def run_synth(
    params: Path,
    out: Path | None = None,
    workers: int | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> int:
    """Generate every phantom specimen of params ``synth`` into the data root."""
    cfg = stage_params(params, PARAMS)
    out = Path(out or cfg.pipeline.paths.raw)
    manifest = generate_dataset(
        cfg.synth.model_dump(),
        out,
        workers=workers,
        progress=progress,
        force=force,
        inputs=(Path(params),),
    )
    print(f"wrote {len(manifest)} scans of {manifest['specimen_id'].nunique()} specimens to {out}")
    return 0
