"""Ingest: add real scans to the data root with a manifest row each.

A user's scan (a folder of one-slice TIFFs or a multi-page TIFF, ImageJ or OME, as
written or page by page, uncompressed or LZW/zstd/Deflate/PackBits-compressed; uint8,
uint16, int16 or float32: see ``volume.py``) is copied into
``<data_root>/<tissue>/<scan_id>.tif`` as an uncompressed ImageJ stack with the voxel size
in its tags, the form every later stage reads (memory-mapped, at scale in Fiji and
napari), and the manifest gains one row for it. Real scans have no ground-truth damage
mask, so ``mask_path`` stays empty.

An int16 scan is copied as uint16 holding ``value + 32768`` (lossless and
order-preserving, so the tiles' percentile normalisation is unchanged); its manifest row
says ``dtype`` uint16, the dtype of the copy.

The voxel size comes from ``voxel_size_um`` if given, else from the source's tags; either
must lie within 0.1 um-1 mm (``VOXEL_RANGE_UM``): a voxel size outside it is a unit gone
wrong (e.g. a resolution tag in inches that meant micrometres) and would make every later
stage resample the scan to nonsense.

Scans are streamed slice by slice, so a scan larger than RAM works. Ingestion is
all-or-nothing: every request is checked first (fields, ids, sources' headers), then each
scan is copied into a hidden staging folder inside the data root while every slice is
checked (shape, dtype, grayscale, finite values). Only when all copies succeeded are the
files moved into place and the manifest rewritten (atomically); on any error the staging
folder is removed and the data root is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from bonedamage.data.manifest import (
    COLUMNS,
    STATES,
    TISSUES,
    ManifestError,
    empty_manifest,
    format_shape,
    manifest_path,
    read_manifest,
    write_manifest,
)
from bonedamage.data.volume import (
    VOXEL_RANGE_TEXT,
    VolumeError,
    VolumeReader,
    voxel_size_in_range,
    write_volume,
)

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CSV_REQUIRED = ("specimen_id", "tissue", "state", "path", "voxel_size_um")
CSV_OPTIONAL = ("scan_id", "species", "load_step", "applied_strain")


class IngestError(ValueError):
    """A scan cannot be ingested; the message names the file (or CSV field) and the problem."""


@dataclass(frozen=True)
class IngestRequest:
    """One scan to add: its source (TIFF stack or slice folder) and its manifest fields.

    ``voxel_size_um`` overrides the voxel size in the source's tags; ``None`` reads it from
    the tags. ``scan_id`` defaults to ``"<specimen_id>-<state>"`` and ``load_step`` to 0
    for pristine scans (empty otherwise).
    """

    source: Path
    specimen_id: str
    tissue: str
    state: str
    voxel_size_um: float | None = None
    scan_id: str | None = None
    species: str = "unknown"
    load_step: int | None = None
    applied_strain: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", Path(self.source))

    @property
    def resolved_scan_id(self) -> str:
        """The scan id used in the manifest and as the file name."""
        return self.scan_id if self.scan_id is not None else f"{self.specimen_id}-{self.state}"

    @property
    def resolved_load_step(self) -> int | None:
        if self.load_step is not None:
            return self.load_step
        return 0 if self.state == "pristine" else None

    def relative_path(self) -> str:
        """Destination relative to the data root (posix)."""
        return f"{self.tissue}/{self.resolved_scan_id}.tif"


@dataclass(frozen=True)
class _Planned:
    request: IngestRequest
    scan_id: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size_um: float
    dest: Path


# -- field checks ----------------------------------------------------------------------------
def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _check_fields(req: IngestRequest, where: str) -> None:
    """Cheap checks of one request's fields; raise :class:`IngestError` prefixed by ``where``."""
    for field, value in (("specimen_id", req.specimen_id), ("scan_id", req.resolved_scan_id)):
        if not isinstance(value, str) or not _SAFE_ID.fullmatch(value):
            raise IngestError(
                f"{where}: {field} {value!r} is not a safe file name; use letters, digits, "
                "'.', '_' and '-' (starting with a letter or digit)"
            )
    if req.tissue not in TISSUES:
        raise IngestError(
            f"{where}: tissue {req.tissue!r} is unknown; allowed: {', '.join(TISSUES)}"
        )
    if req.state not in STATES:
        raise IngestError(f"{where}: state {req.state!r} is unknown; allowed: {', '.join(STATES)}")
    if req.voxel_size_um is not None and not (
        _is_number(req.voxel_size_um) and math.isfinite(req.voxel_size_um) and req.voxel_size_um > 0
    ):
        raise IngestError(
            f"{where}: voxel_size_um {req.voxel_size_um!r} is invalid; it must be a finite "
            "number > 0 (micrometres)"
        )
    if req.voxel_size_um is not None and not voxel_size_in_range(float(req.voxel_size_um)):
        raise IngestError(
            f"{where}: voxel_size_um {req.voxel_size_um:g} is outside {VOXEL_RANGE_TEXT}; give "
            "it in micrometres"
        )
    if not isinstance(req.species, str) or not req.species.strip() or "\n" in req.species:
        raise IngestError(f"{where}: species {req.species!r} must be a non-empty one-line name")
    if req.load_step is not None and not (
        isinstance(req.load_step, int | np.integer)
        and not isinstance(req.load_step, bool)
        and req.load_step >= 0
    ):
        raise IngestError(f"{where}: load_step {req.load_step!r} must be an integer >= 0")
    if req.applied_strain is not None and not (
        _is_number(req.applied_strain) and math.isfinite(req.applied_strain)
    ):
        raise IngestError(f"{where}: applied_strain {req.applied_strain!r} must be a finite number")


def _check_unique(ids: Sequence[tuple[str, str]], what: str) -> None:
    """``ids`` are (scan_id, where) pairs; raise on the first scan id seen twice.

    Ids differing only in letter case count as the same: their files would collide on
    case-insensitive file systems (macOS, Windows) where the data root may be checked out.
    """
    seen: dict[str, tuple[str, str]] = {}
    for scan_id, where in ids:
        key = scan_id.casefold()
        if key in seen:
            other, other_where = seen[key]
            same = "" if other == scan_id else f" (as {other!r}, differing only in letter case)"
            raise IngestError(
                f"{where}: scan_id {scan_id!r} appears twice in the {what}{same} (also at "
                f"{other_where}); give each scan its own scan_id"
            )
        seen[key] = (scan_id, where)


# -- batch CSV -------------------------------------------------------------------------------
def _confined_source(where: str, root: Path, rel: str) -> Path:
    """``root / rel``, refusing absolute paths and ``..`` escapes (checked lexically)."""
    if not rel:
        raise IngestError(f"{where}: path is empty")
    if os.path.isabs(rel) or Path(rel).is_absolute() or rel.startswith(("/", "\\")):
        raise IngestError(
            f"{where}: path {rel!r} is absolute; it must be relative to the source root {root}"
        )
    norm = os.path.normpath(rel)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise IngestError(f"{where}: path {rel!r} escapes the source root {root}")
    return root / norm


def _parse_float(where: str, field: str, text: str) -> float | None:
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise IngestError(f"{where}: {field} {text!r} is not a number") from None


def _parse_int(where: str, field: str, text: str) -> int | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise IngestError(f"{where}: {field} {text!r} is not an integer") from None


def read_batch_csv(csv_path: Path, source_root: Path | None = None) -> list[IngestRequest]:
    """Read a batch CSV of scans into requests.

    Required columns: specimen_id, tissue, state, path, voxel_size_um (an empty cell reads
    the voxel size from the scan's tags); optional: scan_id, species, load_step,
    applied_strain. ``path`` is relative to ``source_root`` (default: the CSV's folder)
    and must stay inside it. Errors name the CSV, the row and the field.
    """
    csv_path = Path(csv_path)
    root = Path(source_root) if source_root is not None else csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except FileNotFoundError:
        raise IngestError(f"{csv_path}: no such batch CSV") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IngestError(f"{csv_path}: unreadable batch CSV ({exc})") from exc
    if not header or header == [""]:
        raise IngestError(f"{csv_path}: empty batch CSV; expected a header row")
    missing = [c for c in CSV_REQUIRED if c not in header]
    if missing:
        raise IngestError(
            f"{csv_path}: missing column(s) {missing}; required: {list(CSV_REQUIRED)}"
        )
    unknown = [c for c in header if c not in CSV_REQUIRED + CSV_OPTIONAL]
    if unknown:
        raise IngestError(
            f"{csv_path}: unknown column(s) {unknown}; allowed: {list(CSV_REQUIRED + CSV_OPTIONAL)}"
        )
    dup_cols = sorted({c for c in header if header.count(c) > 1})
    if dup_cols:
        raise IngestError(f"{csv_path}: column(s) {dup_cols} appear more than once")
    if not rows:
        raise IngestError(f"{csv_path}: no scans listed")

    requests: list[IngestRequest] = []
    wheres: list[str] = []
    for number, (line, cells) in enumerate(rows, start=1):
        where = f"{csv_path}: row {number} (line {line})"
        if len(cells) != len(header):
            raise IngestError(f"{where}: {len(cells)} fields, but the header has {len(header)}")
        row = {name: cell.strip() for name, cell in zip(header, cells, strict=True)}
        source = _confined_source(where, root, row["path"])
        request = IngestRequest(
            source=source,
            specimen_id=row["specimen_id"],
            tissue=row["tissue"],
            state=row["state"],
            voxel_size_um=_parse_float(where, "voxel_size_um", row["voxel_size_um"]),
            scan_id=row.get("scan_id") or None,
            species=row.get("species") or "unknown",
            load_step=_parse_int(where, "load_step", row.get("load_step", "")),
            applied_strain=_parse_float(where, "applied_strain", row.get("applied_strain", "")),
        )
        _check_fields(request, where)
        if not source.exists():
            raise IngestError(f"{where}: path {row['path']!r}: {source} does not exist")
        requests.append(request)
        wheres.append(where)
    _check_unique(
        [(r.resolved_scan_id, w) for r, w in zip(requests, wheres, strict=True)], "batch CSV"
    )
    return requests


# -- ingestion -------------------------------------------------------------------------------
def _plan(request: IngestRequest, data_root: Path) -> _Planned:
    """Open the source's header (cheap) and settle shape, dtype and voxel size."""
    try:
        with VolumeReader(request.source) as reader:
            shape = tuple(int(s) for s in reader.shape)
            dtype = np.dtype(reader.dtype)  # uint16 for an int16 source (+ 32768)
            # asked only when not given: an implausible tag raises, a given size replaces it
            tag_voxel = reader.voxel_size_um if request.voxel_size_um is None else None
    except VolumeError as exc:
        raise IngestError(str(exc)) from exc
    if shape[0] < 2:
        raise IngestError(
            f"{request.source}: holds a single 2D slice; give the folder of slices or a "
            "multi-page TIFF of the whole scan"
        )
    voxel = request.voxel_size_um if request.voxel_size_um is not None else tag_voxel
    if voxel is None:
        raise IngestError(
            f"{request.source}: no voxel size in the TIFF tags (ImageJ, OME or resolution); "
            "give it explicitly (voxel_size_um, in micrometres)"
        )
    return _Planned(
        request=request,
        scan_id=request.resolved_scan_id,
        shape=shape,  # type: ignore[arg-type]
        dtype=dtype,
        voxel_size_um=float(voxel),
        dest=data_root / request.tissue / f"{request.resolved_scan_id}.tif",
    )


def _check_against_manifest(
    plans: Sequence[_Planned], existing: pd.DataFrame, data_root: Path
) -> None:
    """Refuse scan ids already in the manifest (ignoring case) and existing destinations."""
    taken_ids = {str(s).casefold(): str(s) for s in existing["scan_id"]}
    taken_paths = {str(p).casefold() for p in (*existing["path"], *existing["mask_path"])}
    for plan in plans:
        rel = plan.request.relative_path()
        if plan.scan_id.casefold() in taken_ids:
            raise IngestError(
                f"{plan.request.source}: scan_id {plan.scan_id!r} is already in "
                f"{manifest_path(data_root)} (as {taken_ids[plan.scan_id.casefold()]!r}); "
                "choose another scan_id"
            )
        if plan.dest.exists() or plan.dest.is_symlink() or rel.casefold() in taken_paths:
            raise IngestError(
                f"{plan.request.source}: destination {plan.dest} already exists (or is listed "
                f"in {manifest_path(data_root)}); refusing to overwrite it"
            )


def _read_existing(data_root: Path) -> pd.DataFrame:
    try:
        return read_manifest(data_root, missing_ok=True)
    except ManifestError as exc:
        raise IngestError(str(exc)) from exc


def _checked_slices(plan: _Planned, reader: VolumeReader, bar: tqdm) -> Iterator[np.ndarray]:
    """Yield the source's slices one at a time, checking each while streaming."""
    source = plan.request.source
    is_float = np.issubdtype(plan.dtype, np.floating)
    files: list[Path] = getattr(reader, "_files", [])  # the slice files of a folder
    for z in range(plan.shape[0]):
        try:
            arr = reader.slice(z)
        except VolumeError as exc:
            raise IngestError(f"{exc} (slice {z})") from exc
        label = f"slice {z} ({files[z].name})" if files else f"slice {z}"
        if arr.ndim != 2 or arr.shape != plan.shape[1:]:
            raise IngestError(
                f"{source}: {label} has shape {arr.shape}; the first slice is {plan.shape[1:]}"
            )
        if arr.dtype != plan.dtype:
            raise IngestError(
                f"{source}: {label} has dtype {arr.dtype}; the first slice is {plan.dtype}"
            )
        if is_float and not np.isfinite(arr).all():
            kind = "NaN" if np.isnan(arr).any() else "infinite"
            raise IngestError(
                f"{source}: {label} contains {kind} values; float scans must be finite"
            )
        bar.update(1)
        yield arr


def _stage(plan: _Planned, staging: Path, progress: bool) -> str:
    """Copy one scan into ``staging``; return the SHA-256 of the written file."""
    out = staging / f"{plan.scan_id}.tif"
    with (
        VolumeReader(plan.request.source) as reader,
        tqdm(
            total=plan.shape[0], desc=f"ingest {plan.scan_id}", unit="slice", disable=not progress
        ) as bar,
    ):
        if reader.shape != plan.shape or reader.dtype != plan.dtype:
            raise IngestError(f"{plan.request.source}: changed while being ingested")
        try:
            return write_volume(
                out,
                _checked_slices(plan, reader, bar),
                plan.shape,
                plan.dtype,
                plan.voxel_size_um,
            )
        except VolumeError as exc:
            raise IngestError(str(exc)) from exc


def _row(plan: _Planned, sha256: str) -> dict[str, object]:
    req = plan.request
    return {
        "scan_id": plan.scan_id,
        "specimen_id": req.specimen_id,
        "tissue": req.tissue,
        "species": req.species,
        "state": req.state,
        "load_step": req.resolved_load_step,
        "applied_strain": req.applied_strain,
        "voxel_size_um": plan.voxel_size_um,
        "path": req.relative_path(),
        "mask_path": "",
        "shape": format_shape(plan.shape),
        "dtype": str(plan.dtype),  # of the copy: uint16 for an int16 source (value + 32768)
        "sha256": sha256,
        "source": "ingest",
    }


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and missing parents; return the folders created, outermost first."""
    created: list[Path] = []
    for folder in [*reversed(path.parents), path]:
        if not folder.exists():
            try:
                folder.mkdir()
            except FileExistsError:
                continue  # made meanwhile by someone else: not ours to remove
            created.append(folder)
    return created


def _remove_dirs(created: Sequence[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):  # not empty: something else lives there
            folder.rmdir()


def ingest_scans(
    requests: Sequence[IngestRequest], data_root: Path, *, progress: bool = True
) -> pd.DataFrame:
    """Add scans to ``data_root`` all-or-nothing; return the manifest rows added.

    On any problem raises :class:`IngestError` (naming the file or field and the problem)
    and leaves ``data_root`` (files and manifest) as it was.
    """
    data_root = Path(data_root)
    if not requests:
        raise IngestError("no scans to ingest")
    if data_root.exists() and not data_root.is_dir():
        raise IngestError(f"{data_root}: data root is not a folder")
    for request in requests:
        _check_fields(request, str(request.source))
        if not request.source.exists():
            raise IngestError(f"{request.source}: no such file or folder")
    _check_unique([(r.resolved_scan_id, str(r.source)) for r in requests], "batch")
    existing = _read_existing(data_root)
    plans = [_plan(request, data_root) for request in requests]
    _check_against_manifest(plans, existing, data_root)

    created = _make_dirs(data_root)
    ok = False
    staging = Path(tempfile.mkdtemp(prefix=".ingest-", dir=data_root))
    try:
        rows = [_row(plan, _stage(plan, staging, progress)) for plan in plans]
        added = pd.DataFrame(rows, columns=list(COLUMNS)).astype(empty_manifest().dtypes.to_dict())
        _commit(plans, staging, added, data_root)
        ok = True
    except OSError as exc:  # disk full, permission denied, ...: report like the other errors
        where = exc.filename if exc.filename is not None else data_root
        raise IngestError(f"{where}: cannot write the scan ({exc.strerror or exc})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not ok:
            _remove_dirs(created)
    return added


def _commit(plans: Sequence[_Planned], staging: Path, added: pd.DataFrame, data_root: Path) -> None:
    """Move staged files into place and rewrite the manifest; undo the moves on failure."""
    moved: list[Path] = []
    created: list[Path] = []
    try:
        existing = _read_existing(data_root)  # re-read: it may have changed while copying
        _check_against_manifest(plans, existing, data_root)
        for plan in plans:
            created += _make_dirs(plan.dest.parent)
            if plan.dest.exists():
                raise IngestError(f"{plan.dest}: already exists; refusing to overwrite it")
            os.replace(staging / f"{plan.scan_id}.tif", plan.dest)
            moved.append(plan.dest)
        combined = added if existing.empty else pd.concat([existing, added], ignore_index=True)
        try:
            write_manifest(combined, data_root)
        except ManifestError as exc:
            raise IngestError(str(exc)) from exc
    except BaseException:
        for dest in moved:
            dest.unlink(missing_ok=True)
        _remove_dirs(created)
        raise
