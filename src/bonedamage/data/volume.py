"""Volume I/O: read scans slice by slice, write them as ImageJ TIFF stacks atomically.

A scan is a 3D stack ordered (z, y, x) with z the load (and rotation) axis. It may be a
multi-page TIFF (one series of pages, several one-page series of one shape as written
page by page with ``tifffile.imwrite(..., append=True)``, ImageJ or OME-TIFF) or a folder
of one-slice TIFFs. Reading never loads the whole scan: an uncompressed stack is
memory-mapped, anything else (LZW, zstd, Deflate, PackBits, ... through the imagecodecs
package) is decoded page by page, so scans larger than RAM work. A codec that is not
installed is reported as such, not as a corrupt file.

Pixel types: uint8, uint16 and float32 are read as they are. int16 (reconstructions in
signed units) is mapped losslessly to uint16 by adding 32768: the map is order-preserving,
so percentile normalisation gives the same tiles (its range is shifted by the same
32768), and the reader reports the stack as uint16. Copies made from it (``ingest``) are
therefore uint16 stacks holding ``value + 32768``.

Voxel sizes come from OME ``PhysicalSizeX`` (with its unit, default µm), ImageJ's
description unit (``um``, ``micron``, ``mm``, Fiji's escaped ``\\u00B5m``, ...) with
``XResolution``, or ``XResolution`` with ``ResolutionUnit`` inch or centimetre. Resolution
tags without a unit (ResolutionUnit NONE or no ResolutionUnit tag) and image editors'
screen resolutions (72, 96, 300 dpi) are not a voxel size. A voxel size outside 0.1 um-1
mm is refused when it is asked for, naming the tag and unit it came from (usually a
wrong unit: tifffile writes ``resolution=`` in inches unless told otherwise), so a voxel
size given explicitly can still replace it.

Writing streams slices into one uncompressed ImageJ stack (memory-mappable for the stages
that follow) whose tags carry the voxel size, so Fiji and napari open it at the right
scale. No timestamp is written: the same slices give the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import mmap
import os
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from bonedamage.atomic import atomic_path

SUPPORTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
# what the reader accepts: int16 comes back as uint16 (value + 32768, see the docstring)
READ_DTYPES = (*SUPPORTED_DTYPES, np.dtype(np.int16))
INT16_OFFSET = 32768
_READ_DTYPES_TEXT = "uint8, uint16, int16 (read as uint16 + 32768) and float32"
TIFF_SUFFIXES = (".tif", ".tiff")

# A voxel size outside this range is no micro-CT scan's: a unit went wrong somewhere.
VOXEL_RANGE_UM = (0.1, 1000.0)
VOXEL_RANGE_TEXT = "0.1 um-1 mm"

# Length units seen in ImageJ and OME metadata, in micrometres (keys lower-case).
_UNIT_UM = {
    "um": 1.0,
    "µm": 1.0,
    "μm": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "micrometers": 1.0,
    "micrometres": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "å": 1e-4,
    "angstrom": 1e-4,
    "mm": 1e3,
    "millimeter": 1e3,
    "millimetre": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "centimetre": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "metre": 1e6,
    "in": 25400.0,
    "inch": 25400.0,
}
# ImageJ's description escapes non-ASCII characters Java-style: Fiji writes "\u00B5m"
_JAVA_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")

_SCREEN_DPI = (72, 96, 300)

# Readable names of the compressions labs meet (the rest: tifffile's COMPRESSION names).
_CODEC_NAMES = {
    5: "LZW",
    7: "JPEG",
    8: "Deflate",
    32946: "Deflate",
    32773: "PackBits",
    34925: "LZMA",
    50000: "zstd",
    34926: "zstd",
    33003: "JPEG 2000",
    33004: "JPEG 2000",
    33005: "JPEG 2000",
    34712: "JPEG 2000",
    34933: "PNG",
    50001: "WebP",
    34927: "WebP",
    50002: "JPEG XL",
    52546: "JPEG XL",
}


class VolumeError(ValueError):
    """A scan cannot be read or written; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class VolumeInfo:
    """Shape, dtype and voxel size of a scan (voxel size ``None`` when no tag carries it)."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size_um: float | None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def voxel_size_in_range(size_um: float) -> bool:
    """Whether ``size_um`` is a plausible micro-CT voxel size (``VOXEL_RANGE_UM``)."""
    lo, hi = VOXEL_RANGE_UM
    return math.isfinite(size_um) and lo <= size_um <= hi


def _read_dtype(source: np.dtype) -> np.dtype:
    """The dtype the reader returns for a file's dtype: int16 becomes uint16."""
    source = np.dtype(source)
    return np.dtype(np.uint16) if _is_int16(source) else source.newbyteorder("=")


def _is_int16(dtype: np.dtype) -> bool:
    return dtype.kind == "i" and dtype.itemsize == 2  # either byte order


def _as_read_dtype(arr: np.ndarray) -> np.ndarray:
    """int16 -> uint16 by adding 32768 (lossless, order-preserving); others unchanged."""
    if _is_int16(arr.dtype):
        return (arr.astype(np.int32) + INT16_OFFSET).astype(np.uint16)
    return arr


def _check_slice_array(path: Path, arr: np.ndarray, where: str) -> None:
    if (arr.ndim == 3 and arr.shape[-1] in (3, 4)) or (arr.ndim == 3 and arr.shape[0] in (3, 4)):
        raise VolumeError(
            path, f"{where} is RGB/multi-channel {arr.shape}; a grayscale scan is needed"
        )
    if arr.ndim != 2:
        raise VolumeError(path, f"{where} has shape {arr.shape}; expected a 2D grayscale slice")
    if arr.dtype not in READ_DTYPES:
        raise VolumeError(path, f"{where} has dtype {arr.dtype}; supported are {_READ_DTYPES_TEXT}")


def _page_is_rgb(page: tifffile.TiffPage) -> bool:
    return page.samplesperpixel > 1 or page.photometric == tifffile.PHOTOMETRIC.RGB


# -- codecs ------------------------------------------------------------------------------------
def _codec_name(code: int) -> str:
    if code in _CODEC_NAMES:
        return _CODEC_NAMES[code]
    try:
        return tifffile.COMPRESSION(code).name
    except ValueError:
        return f"compression {code}"


_NEEDS_IMAGECODECS = "which needs the imagecodecs package (pip install imagecodecs)"


def _needs_imagecodecs(exc: BaseException) -> bool:
    """Whether decoding failed for want of imagecodecs: tifffile without it raises
    "<COMPRESSION.LZW: 5> requires the 'imagecodecs' package", and its stand-in for zstd
    (before Python 3.14) an ImportError of ``compression.zstd``."""
    return isinstance(exc, ImportError) or "imagecodecs" in str(exc)


def _decode(page: tifffile.TiffPage | tifffile.TiffFrame, path: Path, corrupt: str) -> np.ndarray:
    """The page's pixels; a :class:`VolumeError` naming a missing codec as such, else
    ``corrupt`` (the problem to report, e.g. "slice 3 is corrupt or unreadable")."""
    try:
        return page.asarray()
    except Exception as exc:  # tifffile raises many types on corrupt data
        if _needs_imagecodecs(exc):
            code = int(page.keyframe.compression)
            raise VolumeError(
                path, f"compressed with {_codec_name(code)}, {_NEEDS_IMAGECODECS}"
            ) from exc
        raise VolumeError(path, f"{corrupt} ({exc})") from exc


# -- voxel size ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _TagVoxel:
    """A voxel size found in the tags: in-plane, between slices (if given), and its source."""

    xy: float
    z: float | None
    tag: str  # e.g. "XResolution (unit inch)", for messages


def _unit_um(unit: object) -> tuple[float | None, str]:
    """(micrometres per unit or None if not a length unit, the unit as read)."""
    text = _JAVA_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), str(unit)).strip()
    return _UNIT_UM.get(text.lower()), text


def _resolution_voxel(page: tifffile.TiffPage, ij_unit: object) -> tuple[float, str] | None:
    """Pixel size from XResolution and its unit (ImageJ writes its unit in the description).

    Without a unit (ResolutionUnit NONE, or no ResolutionUnit tag) pixels per unit say
    nothing physical: ``None``, as for an image editor's screen resolution.
    """
    tag = page.tags.get("XResolution")
    if tag is None:
        return None
    num, den = tag.value
    if not num or not den:
        return None
    pixels_per_unit = num / den
    if ij_unit:
        scale, unit = _unit_um(ij_unit)
        if scale is None:
            return None  # e.g. ImageJ's "pixel"
        return scale / pixels_per_unit, f"XResolution (ImageJ unit {unit})"
    unit_tag = page.tags.get("ResolutionUnit")
    res_unit = int(unit_tag.value) if unit_tag is not None else None
    if res_unit == 2:
        if round(pixels_per_unit) in _SCREEN_DPI:
            return None  # an image editor's default screen resolution, not a voxel size
        return _UNIT_UM["inch"] / pixels_per_unit, "XResolution (unit inch)"
    if res_unit == 3:
        return _UNIT_UM["cm"] / pixels_per_unit, "XResolution (unit centimetre)"
    return None


def _ome_voxel(tif: tifffile.TiffFile) -> _TagVoxel | None:
    """In-plane and z physical sizes from OME-XML (units default to µm, as in OME)."""
    xml = tif.ome_metadata
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return None

    def size(axis: str) -> tuple[float, str] | None:
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            return None
        scale, unit = _unit_um(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        try:
            number = float(value)
        except ValueError:
            return None
        if scale is None:
            return None  # "pixel", "reference frame": not a length
        return number * scale, f"PhysicalSize{axis} (unit {unit})"

    xy = size("X")
    if xy is None:
        return None
    z = size("Z")
    return _TagVoxel(xy[0], z[0] if z is not None else None, xy[1])


def _tag_voxel(tif: tifffile.TiffFile) -> _TagVoxel | None:
    """The voxel size the tags give (OME first, then ImageJ/resolution), unchecked."""
    found = _ome_voxel(tif)
    if found is not None:
        return found
    ij = tif.imagej_metadata or {}
    xy = _resolution_voxel(tif.pages.first, ij.get("unit"))
    if xy is None:
        return None
    spacing = ij.get("spacing")
    z = None
    if spacing:
        scale, _ = _unit_um(ij.get("unit", ""))
        z = float(spacing) * (scale if scale is not None else 1.0)
    return _TagVoxel(xy[0], z, xy[1])


def _check_isotropic(found: _TagVoxel, path: Path) -> None:
    xy, z = found.xy, found.z
    if z is not None and not math.isclose(xy, z, rel_tol=0.01):
        raise VolumeError(
            path,
            f"anisotropic voxels ({xy:g} um in-plane, {z:g} um between slices) are not "
            "supported; resample the stack to isotropic voxels first",
        )


def _implausible(found: _TagVoxel, path: Path) -> VolumeError | None:
    if voxel_size_in_range(found.xy):
        return None
    return VolumeError(
        path,
        f"voxel size {found.xy:g} um from {found.tag} is outside {VOXEL_RANGE_TEXT}; the "
        "tag's unit is probably wrong: give the voxel size explicitly (voxel_size_um / "
        "--voxel-size-um, in micrometres)",
    )


class VolumeReader:
    """Random and sequential access to the slices of a scan without loading it whole.

    ``path`` is a multi-page TIFF or a folder of one-slice TIFFs (sorted by name with
    natural number order). Use as a context manager. ``dtype`` is the dtype slices come
    back in (uint16 for an int16 file, see the module docstring); ``voxel_size_um`` is
    the tags' voxel size, ``None`` if they carry none, and raises :class:`VolumeError`
    when it is implausible (so a caller that was given the voxel size never asks for it).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._tif: tifffile.TiffFile | None = None
        self._mmap: np.ndarray | None = None
        self._map: mmap.mmap | None = None
        self._data_offset = 0
        self._files: list[Path] = []
        self._voxel: float | None = None
        self._voxel_error: VolumeError | None = None
        if not self.path.exists():
            raise VolumeError(self.path, "no such file or folder")
        if self.path.is_dir():
            self._open_folder()
        else:
            self._open_stack()

    @property
    def voxel_size_um(self) -> float | None:
        """Voxel size from the tags in um (``None``: no tag gives one)."""
        if self._voxel_error is not None:
            raise self._voxel_error
        return self._voxel

    # -- opening -----------------------------------------------------------------------
    def _read_voxel(self, tif: tifffile.TiffFile, path: Path) -> None:
        """Anisotropic voxels are refused now; an implausible size when it is asked for."""
        found = _tag_voxel(tif)
        if found is None:
            return
        _check_isotropic(found, path)
        self._voxel_error = _implausible(found, path)
        self._voxel = float(found.xy)

    def _open_folder(self) -> None:
        entries = sorted(
            (p for p in self.path.iterdir() if not p.name.startswith(".")), key=_natural_key
        )
        if not entries:
            raise VolumeError(self.path, "the folder is empty; expected one TIFF per slice")
        others = [p.name for p in entries if p.suffix.lower() not in TIFF_SUFFIXES]
        if others:
            raise VolumeError(self.path, f"non-TIFF file(s) in the slice folder: {others[:3]}")
        self._files = entries
        first = self._read_tiff_file(entries[0])
        with _open_tiff(entries[0]) as tif:
            self._read_voxel(tif, entries[0])
        self._source_dtype = first.dtype
        self.dtype = _read_dtype(first.dtype)
        self.shape = (len(entries), *first.shape)

    def _open_stack(self) -> None:
        if self.path.suffix.lower() not in TIFF_SUFFIXES:
            raise VolumeError(self.path, "not a TIFF file (expected .tif or .tiff)")
        tif = _open_tiff(self.path)
        self._tif = tif
        try:
            pages = tif.pages
            _check_ifd_chain(tif, self.path)
            first = pages.first
            if _page_is_rgb(first):
                raise VolumeError(self.path, "RGB/multi-channel image; a grayscale scan is needed")
            series = tif.series[0]
            shape = tuple(int(s) for s in series.shape)
            one_page_series = len(shape) == 2 and len(tif.series) > 1
            if one_page_series:  # written page by page (append=True): one series per page
                shape = self._page_series_shape(tif, shape)
            elif len(shape) == 2:
                shape = (1, *shape)
            if len(shape) != 3:
                raise VolumeError(self.path, f"series of shape {shape}; expected a (z, y, x) stack")
            n_pages = len(series) if len(series) > 1 else len(pages)
            # a contiguous stack may hold one page for all slices (ImageJ files > 4 GiB):
            # the file-size check below covers it
            contiguous = series.dataoffset is not None and not one_page_series
            if not contiguous and n_pages != shape[0] and len(pages) != shape[0]:
                raise VolumeError(
                    self.path, f"stack declares {shape[0]} slices but holds {len(pages)} pages"
                )
            self.shape = shape
            self._source_dtype = np.dtype(series.dtype)
            if self._source_dtype not in READ_DTYPES:
                raise VolumeError(
                    self.path, f"dtype {self._source_dtype}; supported are {_READ_DTYPES_TEXT}"
                )
            self.dtype = _read_dtype(self._source_dtype)
            self._read_voxel(tif, self.path)
            if contiguous:
                expected = series.dataoffset + int(np.prod(shape)) * self._source_dtype.itemsize
                if os.path.getsize(self.path) < expected:
                    raise VolumeError(self.path, "truncated: the file ends before its last slice")
                self._map_stack(
                    series.dataoffset,
                    self._source_dtype.newbyteorder("<" if tif.byteorder == "<" else ">"),
                )
            else:
                self._check_pages_present()
                if first.compression != 1:  # a missing codec is reported now, not mid-stage
                    _decode(first, self.path, "slice 0 is corrupt or unreadable")
        except VolumeError:
            tif.close()
            raise
        except Exception as exc:  # tifffile raises many types on corrupt files
            tif.close()
            raise VolumeError(self.path, f"corrupt or unreadable TIFF ({exc})") from exc

    def _page_series_shape(
        self, tif: tifffile.TiffFile, shape: tuple[int, ...]
    ) -> tuple[int, int, int]:
        """(z, y, x) of a file of one-page 2D series that share shape and dtype (else raise)."""
        kinds = {(tuple(int(n) for n in s.shape), np.dtype(s.dtype)) for s in tif.series}
        if len(kinds) != 1 or any(len(s) != 1 for s in tif.series):
            described = ", ".join(f"{s.shape} {s.dtype}" for s in tif.series[:4])
            raise VolumeError(
                self.path,
                f"holds {len(tif.series)} images of different shapes or types ({described}"
                f"{', ...' if len(tif.series) > 4 else ''}); expected one (z, y, x) stack",
            )
        if len(tif.series) != len(tif.pages):
            raise VolumeError(
                self.path,
                f"holds {len(tif.series)} one-page images in {len(tif.pages)} pages; "
                "expected one page per slice",
            )
        return (len(tif.series), int(shape[0]), int(shape[1]))

    def _map_stack(self, offset: int, file_dtype: np.dtype) -> None:
        """Memory-map the contiguous pixel data (our own mmap, so pages can be released)."""
        with open(self.path, "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._data_offset = offset
        count = int(np.prod(self.shape))
        self._mmap = np.frombuffer(self._map, dtype=file_dtype, count=count, offset=offset).reshape(
            self.shape
        )

    def _check_pages_present(self) -> None:
        """Read every page's header; a truncated compressed stack fails here, not mid-stage."""
        assert self._tif is not None
        size = os.path.getsize(self.path)
        for index in range(self.shape[0]):
            page = self._tif.pages[index]
            if not isinstance(page, tifffile.TiffPage):
                continue
            ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)]
            if ends and max(ends) > size:
                raise VolumeError(self.path, f"truncated: slice {index} lies past the end of file")

    def _read_tiff_file(self, file: Path) -> np.ndarray:
        """The one slice in ``file``, in the file's dtype (int16 not yet mapped)."""
        try:
            with _open_tiff(file) as tif:
                if len(tif.pages) != 1:
                    raise VolumeError(file, f"holds {len(tif.pages)} pages; expected one slice")
                page = tif.pages.first
                if _page_is_rgb(page):
                    raise VolumeError(file, "RGB/multi-channel slice; a grayscale scan is needed")
                arr = _decode(page, file, "corrupt or unreadable TIFF")
        except VolumeError:
            raise
        except Exception as exc:
            raise VolumeError(file, f"corrupt or unreadable TIFF ({exc})") from exc
        _check_slice_array(file, arr, "slice")
        return arr

    # -- access ------------------------------------------------------------------------
    def info(self) -> VolumeInfo:
        return VolumeInfo(self.path, self.shape, self.dtype, self.voxel_size_um)

    def __len__(self) -> int:
        return self.shape[0]

    def slice(self, z: int) -> np.ndarray:
        """Slice ``z`` as an array (a read-only view into the memory map when possible)."""
        if not 0 <= z < self.shape[0]:
            raise IndexError(f"slice {z} out of range for {self.shape[0]} slices in {self.path}")
        if self._files:
            file = self._files[z]
            arr = self._read_tiff_file(file)
            if arr.shape != self.shape[1:] or arr.dtype != self._source_dtype:
                raise VolumeError(
                    file,
                    f"slice is {arr.shape} {arr.dtype} but the stack's first slice is "
                    f"{self.shape[1:]} {self._source_dtype}; all slices must match",
                )
            return _as_read_dtype(arr)
        if self._mmap is not None:
            arr = self._mmap[z]
            if _is_int16(arr.dtype):
                return _as_read_dtype(arr)
            # a big-endian file (ImageJ's default) maps as ">u2"/">f4": return native order
            return arr if arr.dtype == self.dtype else arr.astype(self.dtype)
        assert self._tif is not None
        try:
            page = self._tif.pages[z]
        except Exception as exc:
            raise VolumeError(self.path, f"slice {z} is corrupt or unreadable ({exc})") from exc
        arr = _decode(page, self.path, f"slice {z} is corrupt or unreadable")
        if arr.shape != self.shape[1:]:
            raise VolumeError(
                self.path, f"slice {z} has shape {arr.shape}, expected {self.shape[1:]}"
            )
        return _as_read_dtype(arr)

    @property
    def memmap(self) -> np.ndarray | None:
        """The whole stack as a read-only memory-mapped array, or ``None`` if not mappable
        (a folder of slices, a compressed or page-by-page stack, an int16 stack: its values
        are shifted on reading)."""
        return None if _is_int16(self._source_dtype) else self._mmap

    def read(self, z: int) -> np.ndarray:
        """Slice ``z`` as a private copy; a memory-mapped slice's pages are then released.

        Streaming a whole scan through ``read`` keeps the resident memory at about one
        slice, however large the scan (the pages stay in the OS file cache).
        """
        arr = np.array(self.slice(z), dtype=self.dtype, copy=True)
        if self._map is not None:
            nbytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
            start = self._data_offset + z * nbytes
            aligned = start - start % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, aligned, start + nbytes - aligned)
        return arr

    def iter_slices(
        self, start: int = 0, stop: int | None = None, step: int = 1
    ) -> Iterator[np.ndarray]:
        """Yield slices ``start:stop:step`` one at a time."""
        for z in range(*slice(start, stop, step).indices(self.shape[0])):
            yield self.slice(z)

    def close(self) -> None:
        self._mmap = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a slice view
                self._map.close()
            self._map = None
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __enter__(self) -> VolumeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_volume(path: str | os.PathLike[str]) -> VolumeReader:
    """Open a scan (multi-page TIFF or folder of slices) for slice-wise reading."""
    return VolumeReader(path)


# -- writing -------------------------------------------------------------------------------
_ZLIB_CODES = (8, 32946)  # ADOBE_DEFLATE ("zlib") and the old DEFLATE code


def _python_zlib_encode(data: bytes | np.ndarray, level: int | None = None, *, out=None) -> bytes:
    """zlib-compress as tifffile does without imagecodecs (Python's zlib, level 6)."""
    del out
    if isinstance(data, np.ndarray):
        data = data.tobytes()
    return zlib.compress(data, 6 if level is None else level)


class _PythonZlibCompressors(Mapping[int, Callable[..., object]]):
    """tifffile's compressors with zlib through Python's zlib module.

    With imagecodecs installed tifffile compresses zlib with libdeflate, whose bytes differ
    from Python's zlib: the zlib-compressed damage masks of the phantoms (pinned in
    data.dvc) would change. Writes stay as they were before imagecodecs (valid zlib for
    every reader); decoding and the other codecs are untouched.
    """

    def __init__(self, base: Mapping[int, Callable[..., object]]) -> None:
        self.base = base

    def __getitem__(self, key: int) -> Callable[..., object]:
        return _python_zlib_encode if key in _ZLIB_CODES else self.base[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


if not isinstance(tifffile.TIFF.COMPRESSORS, _PythonZlibCompressors):  # once per process
    tifffile.TIFF.COMPRESSORS = _PythonZlibCompressors(tifffile.TIFF.COMPRESSORS)


def write_volume(
    path: str | os.PathLike[str],
    slices: Iterable[np.ndarray],
    shape: tuple[int, int, int],
    dtype: np.dtype | type,
    voxel_size_um: float,
    compression: str | None = None,
    pixel_size_um: float | None = None,
) -> str:
    """Stream ``slices`` into an ImageJ TIFF stack at ``path`` atomically; return its SHA-256.

    The voxel size goes into the resolution tags and the ImageJ ``spacing``/``unit`` so
    the stack opens at scale; ``pixel_size_um`` sets an in-plane size other than the slice
    spacing. ``compression`` (e.g. ``"zlib"``) suits masks; leave image volumes
    uncompressed so they can be memory-mapped.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    pixel = voxel_size_um if pixel_size_um is None else pixel_size_um
    for size in (voxel_size_um, pixel):
        if not (math.isfinite(size) and size > 0):
            raise VolumeError(path, f"voxel size {size} um; it must be positive")
    if dtype not in SUPPORTED_DTYPES:
        raise VolumeError(path, f"dtype {dtype}; supported are uint8, uint16 and float32")
    expected = tuple(int(s) for s in shape[1:])
    count = 0

    def checked() -> Iterator[np.ndarray]:
        nonlocal count
        for arr in slices:
            if count >= shape[0]:
                raise VolumeError(path, f"got more than the {shape[0]} slices expected")
            if arr.shape != expected or arr.dtype != dtype:
                raise VolumeError(
                    path, f"slice {count} is {arr.shape} {arr.dtype}, expected {expected} {dtype}"
                )
            count += 1
            yield np.ascontiguousarray(arr)
        if count != shape[0]:  # raise here: tifffile would raise a bare ValueError
            raise VolumeError(path, f"got {count} slices, expected {shape[0]}")

    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, imagej=True) as writer:
            writer.write(
                checked(),
                shape=tuple(int(s) for s in shape),
                dtype=dtype,
                resolution=(1.0 / pixel, 1.0 / pixel),
                metadata={"spacing": voxel_size_um, "unit": "um", "axes": "ZYX"},
                compression=compression,
                software="bonedamage",
            )
        if count != shape[0]:
            raise VolumeError(path, f"got {count} slices, expected {shape[0]}")
        digest = sha256_file(tmp)
    return digest


def _check_ifd_chain(tif: tifffile.TiffFile, path: Path) -> None:
    """Raise unless the chain of page headers (IFDs) ends cleanly with a zero offset.

    tifffile stops quietly at a page header that lies past the end of a truncated file and
    may then fall back to a one-slice series (e.g. for ImageJ stacks): refuse that instead.
    """
    pages = tif.pages
    count = len(pages)  # indexes every page header
    last = pages[count - 1].offset
    fmt = tif.tiff
    fh = tif.filehandle
    try:
        fh.seek(last)
        (tagno,) = struct.unpack(fmt.tagnoformat, fh.read(fmt.tagnosize))
        fh.seek(last + fmt.tagnosize + tagno * fmt.tagsize)
        (next_offset,) = struct.unpack(fmt.offsetformat, fh.read(fmt.offsetsize))
    except struct.error:
        next_offset = -1
    if next_offset != 0:
        raise VolumeError(
            path,
            f"truncated or corrupt: the list of pages breaks off after {count} readable page(s)",
        )


def _open_tiff(path: Path) -> tifffile.TiffFile:
    try:
        return tifffile.TiffFile(path)
    except Exception as exc:
        raise VolumeError(path, f"not a readable TIFF ({exc})") from exc


def _natural_key(path: Path) -> list[object]:
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", path.name)]
