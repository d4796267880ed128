"""Volume I/O: read scans slice by slice, write them as ImageJ TIFF stacks atomically.

A scan is a 3D stack ordered (z, y, x) with z the load (and rotation) axis. It may be a
multi-page TIFF or a folder of one-slice TIFFs. Reading never loads the whole scan: an
uncompressed stack is memory-mapped, anything else is read page by page, so scans larger
than RAM work. Writing streams slices into one uncompressed ImageJ stack (memory-mappable
for the stages that follow) whose tags carry the voxel size, so Fiji and napari open it
at the right scale. No timestamp is written: the same slices give the same bytes.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from bonedamage.atomic import atomic_path

SUPPORTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))
TIFF_SUFFIXES = (".tif", ".tiff")

# Length units seen in ImageJ and OME metadata, in micrometres.
_UNIT_UM = {
    "um": 1.0,
    "µm": 1.0,
    "μm": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "inch": 25400.0,
}


_SCREEN_DPI = (72, 96, 300)


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


def _check_slice_array(path: Path, arr: np.ndarray, where: str) -> None:
    if (arr.ndim == 3 and arr.shape[-1] in (3, 4)) or (arr.ndim == 3 and arr.shape[0] in (3, 4)):
        raise VolumeError(
            path, f"{where} is RGB/multi-channel {arr.shape}; a grayscale scan is needed"
        )
    if arr.ndim != 2:
        raise VolumeError(path, f"{where} has shape {arr.shape}; expected a 2D grayscale slice")
    if arr.dtype not in SUPPORTED_DTYPES:
        raise VolumeError(
            path, f"{where} has dtype {arr.dtype}; supported are uint8, uint16 and float32"
        )


def _page_is_rgb(page: tifffile.TiffPage) -> bool:
    return page.samplesperpixel > 1 or page.photometric == tifffile.PHOTOMETRIC.RGB


def _resolution_um(page: tifffile.TiffPage, ij_unit: str | None) -> float | None:
    """Pixel size from XResolution/ResolutionUnit (ImageJ writes its unit in the description)."""
    tag = page.tags.get("XResolution")
    if tag is None:
        return None
    num, den = tag.value
    if not num or not den:
        return None
    pixels_per_unit = num / den
    unit_tag = page.tags.get("ResolutionUnit")
    res_unit = int(unit_tag.value) if unit_tag is not None else 2
    if ij_unit:
        scale = _UNIT_UM.get(ij_unit.strip().lower())
        if scale is None:
            return None
    elif res_unit == 2:
        if round(pixels_per_unit) in _SCREEN_DPI:
            return None  # an image editor's default screen resolution, not a voxel size
        scale = _UNIT_UM["inch"]
    elif res_unit == 3:
        scale = _UNIT_UM["cm"]
    else:
        return None  # unitless resolution (e.g. 1 pixel per pixel) says nothing physical
    return scale / pixels_per_unit


def _ome_voxel_um(tif: tifffile.TiffFile) -> tuple[float | None, float | None]:
    """(xy, z) physical sizes from OME-XML, in micrometres."""
    xml = tif.ome_metadata
    if not xml:
        return None, None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return None, None

    def size(axis: str) -> float | None:
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            return None
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        return float(value) * _UNIT_UM.get(unit.lower(), float("nan"))

    return size("X"), size("Z")


def read_voxel_size_um(tif: tifffile.TiffFile, path: Path) -> float | None:
    """Isotropic voxel size in um from ImageJ, OME or resolution tags; ``None`` if absent.

    Raises when the tags describe anisotropic voxels: every later stage converts physical
    tile sizes with one voxel size.
    """
    xy, z = _ome_voxel_um(tif)
    if xy is None:
        ij = tif.imagej_metadata or {}
        xy = _resolution_um(tif.pages.first, ij.get("unit"))
        spacing = ij.get("spacing")
        z = (
            float(spacing) * (_UNIT_UM.get(str(ij.get("unit", "")).lower(), 1.0))
            if spacing
            else None
        )
    if xy is None:
        return None
    if not math.isfinite(xy) or xy <= 0:
        raise VolumeError(path, f"voxel size tag gives {xy} um; it must be positive")
    if z is not None and not math.isclose(xy, z, rel_tol=0.01):
        raise VolumeError(
            path,
            f"anisotropic voxels ({xy:g} um in-plane, {z:g} um between slices) are not "
            "supported; resample the stack to isotropic voxels first",
        )
    return float(xy)


class VolumeReader:
    """Random and sequential access to the slices of a scan without loading it whole.

    ``path`` is a multi-page TIFF or a folder of one-slice TIFFs (sorted by name with
    natural number order). Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._tif: tifffile.TiffFile | None = None
        self._mmap: np.ndarray | None = None
        self._map: mmap.mmap | None = None
        self._data_offset = 0
        self._files: list[Path] = []
        if not self.path.exists():
            raise VolumeError(self.path, "no such file or folder")
        if self.path.is_dir():
            self._open_folder()
        else:
            self._open_stack()

    # -- opening -----------------------------------------------------------------------
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
            self.voxel_size_um = read_voxel_size_um(tif, entries[0])
        self.dtype = first.dtype
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
            if len(shape) == 2:
                shape = (1, *shape)
            if len(shape) != 3:
                raise VolumeError(self.path, f"series of shape {shape}; expected a (z, y, x) stack")
            n_pages = len(series) if len(series) > 1 else len(pages)
            # a contiguous stack may hold one page for all slices (ImageJ files > 4 GiB):
            # the file-size check below covers it
            contiguous = series.dataoffset is not None
            if not contiguous and n_pages != shape[0] and len(pages) != shape[0]:
                raise VolumeError(
                    self.path, f"stack declares {shape[0]} slices but holds {len(pages)} pages"
                )
            self.shape = shape
            self.dtype = np.dtype(series.dtype)
            if self.dtype not in SUPPORTED_DTYPES:
                raise VolumeError(
                    self.path, f"dtype {self.dtype}; supported are uint8, uint16 and float32"
                )
            self.voxel_size_um = read_voxel_size_um(tif, self.path)
            if series.dataoffset is not None:
                expected = series.dataoffset + int(np.prod(shape)) * self.dtype.itemsize
                if os.path.getsize(self.path) < expected:
                    raise VolumeError(self.path, "truncated: the file ends before its last slice")
                self._map_stack(
                    series.dataoffset,
                    np.dtype(series.dtype).newbyteorder("<" if tif.byteorder == "<" else ">"),
                )
            else:
                self._check_pages_present()
        except VolumeError:
            tif.close()
            raise
        except Exception as exc:  # tifffile raises many types on corrupt files
            tif.close()
            raise VolumeError(self.path, f"corrupt or unreadable TIFF ({exc})") from exc

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
        try:
            with _open_tiff(file) as tif:
                if len(tif.pages) != 1:
                    raise VolumeError(file, f"holds {len(tif.pages)} pages; expected one slice")
                if _page_is_rgb(tif.pages.first):
                    raise VolumeError(file, "RGB/multi-channel slice; a grayscale scan is needed")
                arr = tif.pages.first.asarray()
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
            if arr.shape != self.shape[1:] or arr.dtype != self.dtype:
                raise VolumeError(
                    file,
                    f"slice is {arr.shape} {arr.dtype} but the stack's first slice is "
                    f"{self.shape[1:]} {self.dtype}; all slices must match",
                )
            return arr
        if self._mmap is not None:
            arr = self._mmap[z]
            # a big-endian file (ImageJ's default) maps as ">u2"/">f4": return native order
            return arr if arr.dtype == self.dtype else arr.astype(self.dtype)
        assert self._tif is not None
        try:
            arr = self._tif.pages[z].asarray()
        except Exception as exc:
            raise VolumeError(self.path, f"slice {z} is corrupt or unreadable ({exc})") from exc
        if arr.shape != self.shape[1:]:
            raise VolumeError(
                self.path, f"slice {z} has shape {arr.shape}, expected {self.shape[1:]}"
            )
        return arr

    @property
    def memmap(self) -> np.ndarray | None:
        """The whole stack as a read-only memory-mapped array, or ``None`` if not mappable
        (a folder of slices or a compressed stack)."""
        return self._mmap

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
