"""Generate the pretraining corpus (``corpus``): phantoms of the synth physics for specimens
that are not the dataset's, tiled as the dataset is (``data/corpus/raw`` and
``data/corpus/tiles``). The ``pretrain`` stage learns from it. The output folder is
replaced atomically."""

from __future__ import annotations

from pathlib import Path

from bonedamage.atomic import atomic_dir
from bonedamage.config import stage_params
from bonedamage.data.corpus import RAW_DIR, TILES_DIR, corpus_synth_config, corpus_tile_config
from bonedamage.data.synth.generate import generate_dataset
from bonedamage.data.tiling import tile_dataset

PARAMS = ("pipeline", "synth", "tile", "pretrain")


def run_corpus(
    params: Path,
    out: Path | None = None,
    workers: int | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> int:
    """Generate and tile the corpus of params ``pretrain.corpus``."""
    cfg = stage_params(params, PARAMS)
    out = Path(out or cfg.pipeline.paths.corpus)
    corpus = cfg.pretrain.corpus.model_dump()
    synth = corpus_synth_config(cfg.synth.model_dump(), corpus)
    paths = cfg.pipeline.paths
    inputs = (Path(params), Path(paths.raw), Path(paths.tiles), Path(paths.splits))
    with atomic_dir(out, owner="corpus", inputs=inputs, force=force) as staging:
        manifest = generate_dataset(
            synth, staging / RAW_DIR, workers=workers, progress=progress,
            first_index=int(corpus["first_specimen"]),
        )  # fmt: skip
        index = tile_dataset(
            staging / RAW_DIR,
            staging / TILES_DIR,
            corpus_tile_config(cfg.tile.model_dump(), corpus),
            progress=progress,
        )
    counts = index.groupby("tissue").size().to_dict()
    shown = ", ".join(f"{t} {n}" for t, n in sorted(counts.items()))
    print(f"wrote {len(manifest)} scans and {len(index)} tiles ({shown}) to {out}")
    return 0
