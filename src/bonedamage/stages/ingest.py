"""Add real scans to the data root (``ingest``): a multi-page TIFF or a folder of one-slice
TIFFs (uint8, uint16, int16 or float32; uncompressed, LZW, zstd, deflate or PackBits) per
scan, with its manifest row. The voxel size is read from the ImageJ, OME or resolution tags
unless given. Many scans at once: a batch CSV (specimen_id, tissue, state, path,
voxel_size_um, and optionally scan_id, species, load_step, applied_strain; paths relative to
the CSV's folder). All or nothing: a bad scan adds none."""

from __future__ import annotations

from pathlib import Path

from bonedamage.config import stage_params
from bonedamage.data.ingestion import IngestError, IngestRequest, ingest_scans, read_batch_csv

PARAMS = ("pipeline",)


def run_ingest(
    params: Path,
    source: Path | None = None,
    *,
    specimen_id: str | None = None,
    tissue: str | None = None,
    state: str | None = None,
    voxel_size_um: float | None = None,
    scan_id: str | None = None,
    species: str = "unknown",
    load_step: int | None = None,
    applied_strain: float | None = None,
    batch: Path | None = None,
    source_root: Path | None = None,
    data_root: Path | None = None,
    progress: bool = True,
) -> int:
    """Add one scan (SOURCE and its fields) or a batch CSV of scans to the data root."""
    cfg = stage_params(params, PARAMS)
    root = Path(data_root or cfg.pipeline.paths.raw)
    if batch:
        if source:
            raise IngestError("give either a SOURCE scan or --batch CSV, not both")
        requests = read_batch_csv(Path(batch), Path(source_root) if source_root else None)
    else:
        given = {"SOURCE": source, "--specimen-id": specimen_id, "--tissue": tissue}
        missing = [flag for flag, value in {**given, "--state": state}.items() if not value]
        if missing:
            raise IngestError(f"missing {', '.join(missing)} (or use --batch CSV)")
        requests = [
            IngestRequest(
                source=Path(source),
                specimen_id=specimen_id,
                tissue=tissue,
                state=state,
                voxel_size_um=voxel_size_um,
                scan_id=scan_id,
                species=species,
                load_step=load_step,
                applied_strain=applied_strain,
            )
        ]
    added = ingest_scans(requests, root, progress=progress)
    for row in added.itertuples(index=False):
        print(f"added {row.scan_id}: {row.path} {row.shape} {row.dtype} {row.voxel_size_um:g} um")
    return 0
