"""Volume I/O on real TIFF files written here with tifffile."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bonedamage.data.volume import VolumeError, open_volume, sha256_file, write_volume


def _volume(dtype: str, shape: tuple[int, int, int] = (5, 12, 16)) -> np.ndarray:
    rng = np.random.default_rng(7)
    if dtype == "float32":
        return rng.normal(size=shape).astype(np.float32)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_write_read_round_trip(tmp_path: Path, dtype: str) -> None:
    vol = _volume(dtype)
    path = tmp_path / "scan.tif"
    digest = write_volume(path, iter(vol), vol.shape, vol.dtype, 2.5)
    assert digest == sha256_file(path)
    with open_volume(path) as reader:
        assert reader.shape == vol.shape
        assert reader.dtype == np.dtype(dtype)
        assert reader.voxel_size_um == pytest.approx(2.5)
        assert reader._mmap is not None  # uncompressed output is memory-mapped
        got = np.stack(list(reader.iter_slices()))
    np.testing.assert_array_equal(got, vol)
    assert tifffile.TiffFile(path).is_imagej


def test_write_is_deterministic(tmp_path: Path) -> None:
    vol = _volume("uint16")
    a = write_volume(tmp_path / "a.tif", iter(vol), vol.shape, vol.dtype, 3.0)
    b = write_volume(tmp_path / "b.tif", iter(vol), vol.shape, vol.dtype, 3.0)
    assert a == b
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()


def test_slice_folder_natural_order(tmp_path: Path) -> None:
    folder = tmp_path / "slices"
    folder.mkdir()
    for index in (10, 2, 1, 33):
        tifffile.imwrite(folder / f"slice_{index}.tif", np.full((4, 5), index, np.uint8))
    with open_volume(folder) as reader:
        assert reader.shape == (4, 4, 5)
        assert [int(s[0, 0]) for s in reader.iter_slices()] == [1, 2, 10, 33]


def _imagej(voxel: float, unit: str, spacing: float | None = None) -> dict:
    meta = {"unit": unit} if spacing is None else {"spacing": spacing, "unit": unit}
    return {"imagej": True, "resolution": (1 / voxel, 1 / voxel), "metadata": meta}


def _ome(size: float, unit: str | None = None) -> dict:
    meta: dict = {"axes": "ZYX", "PhysicalSizeX": size, "PhysicalSizeY": size}
    if unit is not None:
        meta |= {"PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}
    return {"ome": True, "photometric": "minisblack", "metadata": meta}


def _resolution(per_unit: float, unit: str | None) -> dict:
    kwargs = {"photometric": "minisblack", "resolution": (per_unit, per_unit)}
    return kwargs if unit is None else kwargs | {"resolutionunit": unit}


def _drop_resolution_unit(path: Path) -> None:
    """Rename the first page's ResolutionUnit tag to a private code: no unit tag at all."""
    with tifffile.TiffFile(path) as tif:
        entry = tif.pages.first.tags["ResolutionUnit"].offset
        order = tif.byteorder
    data = bytearray(path.read_bytes())
    data[entry : entry + 2] = struct.pack(f"{order}H", 65000)
    path.write_bytes(bytes(data))


# id -> (tifffile.imwrite keywords, the voxel size the reader must report)
TAG_CASES: dict[str, tuple[dict, float | None]] = {
    "imagej-um": (_imagej(6.5, "um", spacing=6.5), 6.5),
    "imagej-mm": (_imagej(0.004, "mm", spacing=0.004), 4.0),
    "imagej-micron": (_imagej(2.0, "micron"), 2.0),
    "imagej-fiji-escaped-micro-sign": (_imagej(2.5, "\\u00B5m", spacing=2.5), 2.5),
    "imagej-pixel-unit": (_imagej(1.0, "pixel"), None),
    "imagej-no-unit": ({"imagej": True, "resolution": (1 / 20, 1 / 20)}, None),
    "ome-default-unit-um": (_ome(1.625), 1.625),
    "ome-unit-micro-sign": (_ome(2.0, "µm"), 2.0),
    "ome-unit-nm": (_ome(650.0, "nm"), 0.65),
    "ome-unit-mm": (_ome(0.02, "mm"), 20.0),
    "ome-unit-pixel": (_ome(1.0, "pixel"), None),
    "resolution-cm": (_resolution(1e4 / 3.0, "CENTIMETER"), 3.0),
    "resolution-inch-microscope": (_resolution(25400.0 / 5.0, "INCH"), 5.0),
    "resolution-inch-screen-72dpi": (_resolution(72.0, "INCH"), None),
    "resolution-inch-screen-96dpi": (_resolution(96.0, "INCH"), None),
    "resolution-unit-none": (_resolution(1 / 20, "NONE"), None),
    "resolution-unit-tag-missing": (_resolution(1 / 20, "INCH") | {"drop_unit": True}, None),
    "no-tags": ({"photometric": "minisblack"}, None),
}


@pytest.mark.parametrize(("kwargs", "expected"), list(TAG_CASES.values()), ids=list(TAG_CASES))
def test_voxel_size_is_read_from_the_tags_in_micrometres(
    tmp_path: Path, kwargs: dict, expected: float | None
) -> None:
    """OME, ImageJ and resolution tags in their units; unitless or screen values: none."""
    path = tmp_path / "scan.tif"
    kwargs = dict(kwargs)
    drop_unit = kwargs.pop("drop_unit", False)
    tifffile.imwrite(path, _volume("uint8"), **kwargs)
    if drop_unit:
        _drop_resolution_unit(path)
    with open_volume(path) as reader:
        if expected is None:
            assert reader.voxel_size_um is None
        else:
            assert reader.voxel_size_um == pytest.approx(expected)


# id -> (imwrite keywords, what the message must say besides the file)
IMPLAUSIBLE_CASES: dict[str, tuple[dict, list[str]]] = {
    "tifffile-default-unit-inch": (
        {"photometric": "minisblack", "resolution": (1 / 20, 1 / 20)},
        ["voxel size 508000 um from XResolution (unit inch)", "outside 0.1 um-1 mm"],
    ),
    "centimetre-too-fine": (
        _resolution(1e9, "CENTIMETER"),
        ["voxel size 1e-05 um from XResolution (unit centimetre)", "outside 0.1 um-1 mm"],
    ),
    "imagej-unit-m": (
        _imagej(0.002, "m", spacing=0.002),
        ["voxel size 2000 um from XResolution (ImageJ unit m)", "outside"],
    ),
    "ome-unit-cm": (_ome(0.5, "cm"), ["voxel size 5000 um from PhysicalSizeX (unit cm)"]),
    "ome-zero": (_ome(0.0), ["voxel size 0 um from PhysicalSizeX (unit µm)", "outside"]),
}


@pytest.mark.parametrize(
    ("kwargs", "fragments"), list(IMPLAUSIBLE_CASES.values()), ids=list(IMPLAUSIBLE_CASES)
)
def test_implausible_voxel_size_in_the_tags_is_refused_naming_tag_and_unit(
    tmp_path: Path, kwargs: dict, fragments: list[str]
) -> None:
    """Refused when asked for, so that a voxel size given explicitly can replace it."""
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, _volume("uint8"), **kwargs)
    with open_volume(path) as reader:
        assert reader.shape == (5, 12, 16)  # the pixels are fine
        with pytest.raises(VolumeError) as info:
            _ = reader.voxel_size_um
    message = str(info.value)
    for fragment in [str(path), *fragments, "give the voxel size explicitly"]:
        assert fragment in message, message


def test_anisotropic_voxels_rejected(tmp_path: Path) -> None:
    path = tmp_path / "aniso.tif"
    tifffile.imwrite(
        path,
        _volume("uint8"),
        imagej=True,
        resolution=(1 / 2.0, 1 / 2.0),
        metadata={"spacing": 6.0, "unit": "um"},
    )
    with pytest.raises(VolumeError, match="anisotropic") as info:
        open_volume(path)
    assert "aniso.tif" in str(info.value)


def test_big_endian_stack_reads_native(tmp_path: Path) -> None:
    """ImageJ writes big-endian TIFFs; slices must come back in the reader's (native) dtype."""
    vol = _volume("uint16")
    path = tmp_path / "be.tif"
    tifffile.imwrite(path, vol, imagej=True, byteorder=">")
    with open_volume(path) as reader:
        got = reader.slice(2)
        assert got.dtype == reader.dtype == np.dtype(np.uint16)
        np.testing.assert_array_equal(got, vol[2])


@pytest.mark.parametrize(
    "kwargs",
    [{"imagej": True}, {"photometric": "minisblack"}, {"ome": True, "photometric": "minisblack"}],
    ids=["imagej", "plain-tiff", "ome"],
)
def test_truncated_stack_rejected(tmp_path: Path, kwargs: dict) -> None:
    """A stack cut short must not open as a shorter (e.g. one-slice) volume."""
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, _volume("uint16", (8, 64, 64)), **kwargs)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="truncated") as info:
        open_volume(path)
    assert "cut.tif" in str(info.value)


def _bad_shape_slices(vol: np.ndarray) -> Iterator[np.ndarray]:
    yield vol[0]
    yield vol[1, :, :-1]


SHAPE = (5, 12, 16)  # of _volume()
Slices = Callable[[np.ndarray], Iterator[np.ndarray]]

# id -> (the slices passed, made from the volume; the shape declared; the voxel size; where
# to write; what the error must say)
BAD_WRITES: dict[str, tuple[Slices, tuple[int, int, int], float, str, str]] = {
    "a-slice-of-another-shape-into-a-new-folder": (
        _bad_shape_slices,
        SHAPE,
        1.0,
        "out/scan.tif",
        "slice 1",
    ),
    "fewer-slices-than-the-shape-says": (
        lambda v: iter(v[:3]),
        SHAPE,
        1.0,
        "scan.tif",
        "expected 5",
    ),
    "more-slices-than-the-shape-says": (
        iter,
        (3, *SHAPE[1:]),
        1.0,
        "scan.tif",
        "more than the 3 slices",
    ),
    "voxel-size-zero": (iter, SHAPE, 0.0, "scan.tif", "voxel size"),
    "voxel-size-negative": (iter, SHAPE, -1.0, "scan.tif", "voxel size"),
    "voxel-size-nan": (iter, SHAPE, float("nan"), "scan.tif", "voxel size"),
}


@pytest.mark.parametrize(
    ("slices", "shape", "voxel", "target", "message"),
    list(BAD_WRITES.values()),
    ids=list(BAD_WRITES),
)
def test_write_refuses_bad_input_and_leaves_no_file(
    tmp_path: Path,
    slices: Slices,
    shape: tuple[int, int, int],
    voxel: float,
    target: str,
    message: str,
) -> None:
    vol = _volume("uint8")
    path = tmp_path / target
    with pytest.raises(VolumeError, match=message):
        write_volume(path, slices(vol), shape, vol.dtype, voxel)
    assert list(path.parent.iterdir()) == []  # neither the file nor a temporary


# -- the TIFFs labs have: compressions, page-by-page stacks, OME, int16 ------------------------
def _write_page_by_page(path: Path, vol: np.ndarray, **kwargs) -> None:
    """One series per slice, as ``imwrite(..., append=True)`` in a loop writes it."""
    for plane in vol:
        tifffile.imwrite(path, plane, append=True, photometric="minisblack", **kwargs)


@pytest.mark.parametrize("compression", ["lzw", "zstd", "deflate", "packbits"])
def test_compressed_stacks_are_decoded_page_by_page(tmp_path: Path, compression: str) -> None:
    vol = _volume("uint16")
    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, vol, photometric="minisblack", compression=compression)
    with open_volume(path) as reader:
        assert (reader.shape, reader.dtype) == (vol.shape, np.dtype(np.uint16))
        assert reader.memmap is None  # not mapped: decoded one page at a time
        got = np.stack([reader.read(z) for z in range(len(reader))])
    np.testing.assert_array_equal(got, vol)


# id -> (writes the 5-slice volume to the path, the voxel size the tags must give)
LAYOUTS: dict[str, tuple[Callable[[Path, np.ndarray], None], float | None]] = {
    "page-by-page": (_write_page_by_page, None),
    "page-by-page-lzw": (lambda p, v: _write_page_by_page(p, v, compression="lzw"), None),
    "page-by-page-with-resolution": (
        lambda p, v: _write_page_by_page(
            p, v, resolution=(1e4 / 2.0, 1e4 / 2.0), resolutionunit="CENTIMETER"
        ),
        2.0,
    ),
    "ome-zstd": (
        lambda p, v: tifffile.imwrite(
            p,
            v,
            compression="zstd",
            **_ome(0.0025, "mm"),  # Fiji's Bio-Formats export
        ),
        2.5,
    ),
}


@pytest.mark.parametrize(("write", "voxel"), list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_stack_layouts_labs_write_are_read_as_one_volume(
    tmp_path: Path, write: Callable[[Path, np.ndarray], None], voxel: float | None
) -> None:
    vol = _volume("uint16")
    path = tmp_path / "scan.tif"
    write(path, vol)
    with open_volume(path) as reader:
        assert reader.shape == vol.shape
        got = np.stack([reader.read(z) for z in range(len(reader))])
        assert reader.voxel_size_um == (voxel if voxel is None else pytest.approx(voxel))
    np.testing.assert_array_equal(got, vol)


def test_images_of_different_shapes_in_one_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mixed.tif"
    vol = _volume("uint16")
    _write_page_by_page(path, vol[:2])
    tifffile.imwrite(path, vol[2, :, :-1], append=True, photometric="minisblack")
    with pytest.raises(VolumeError, match="holds 3 images of different shapes") as info:
        open_volume(path)
    assert "mixed.tif" in str(info.value)


def _int16_stack(path: Path, vol: np.ndarray, **kwargs) -> Path:
    tifffile.imwrite(path, vol, **({"photometric": "minisblack"} | kwargs))
    return path


def _int16_folder(path: Path, vol: np.ndarray) -> Path:
    folder = path.with_suffix("")
    folder.mkdir()
    for z, plane in enumerate(vol):
        tifffile.imwrite(folder / f"{z}.tif", plane)
    return folder


INT16_LAYOUTS: dict[str, Callable[[Path, np.ndarray], Path]] = {
    "memory-mapped": _int16_stack,
    "big-endian-imagej": lambda p, v: _int16_stack(p, v, imagej=True, byteorder=">"),
    "zstd": lambda p, v: _int16_stack(p, v, compression="zstd"),
    "slice-folder": _int16_folder,
}


@pytest.mark.parametrize("write", list(INT16_LAYOUTS.values()), ids=list(INT16_LAYOUTS))
def test_int16_is_read_as_uint16_plus_32768(
    tmp_path: Path, write: Callable[[Path, np.ndarray], Path]
) -> None:
    """Lossless and order-preserving: -32768 -> 0, 0 -> 32768, 32767 -> 65535."""
    vol = np.random.default_rng(3).integers(-32768, 32768, (5, 12, 16)).astype(np.int16)
    vol[0, 0, :3] = (-32768, 0, 32767)
    source = write(tmp_path / "signed.tif", vol)
    with open_volume(source) as reader:
        assert reader.dtype == np.dtype(np.uint16)
        assert reader.memmap is None  # a raw map would hold the unshifted values
        got = np.stack([reader.read(z) for z in range(len(reader))])
    assert got.dtype == np.uint16
    assert got[0, 0, :3].tolist() == [0, 32768, 65535]
    np.testing.assert_array_equal(got.astype(np.int32) - 32768, vol)


def simulate_missing_imagecodecs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make tifffile decode as it does without the imagecodecs package: with its pure-Python
    stand-ins, which lack LZW (tifffile raises "<COMPRESSION.LZW: 5> requires the
    'imagecodecs' package", ``CompressionCodec.__getitem__``) and, before Python 3.14,
    zstd (an ImportError of ``compression.zstd``)."""
    import tifffile.tifffile as tifffile_module
    from tifffile import _imagecodecs

    monkeypatch.setattr(tifffile_module, "imagecodecs", _imagecodecs)
    monkeypatch.setattr(
        tifffile.TIFF, "DECOMPRESSORS", tifffile_module.CompressionCodec(encode=False)
    )


def _lzw_from_the_second_page(path: Path, vol: np.ndarray) -> Path:
    tifffile.imwrite(path, vol[0], photometric="minisblack")
    for plane in vol[1:]:
        tifffile.imwrite(path, plane, append=True, photometric="minisblack", compression="lzw")
    return path


def _lzw_folder(path: Path, vol: np.ndarray) -> Path:
    folder = path.with_suffix("")
    folder.mkdir()
    for z, plane in enumerate(vol):
        tifffile.imwrite(folder / f"{z}.tif", plane, compression="lzw")
    return folder


# id -> (writes the volume and returns the source, the codec the message must name)
MISSING_CODEC_CASES: dict[str, tuple[Callable[[Path, np.ndarray], Path], str]] = {
    "lzw-stack": (lambda p, v: _int16_stack(p, v, compression="lzw"), "LZW"),
    "zstd-stack": (lambda p, v: _int16_stack(p, v, compression="zstd"), "zstd"),
    "lzw-from-the-second-page": (_lzw_from_the_second_page, "LZW"),
    "lzw-slice-folder": (_lzw_folder, "LZW"),
}


@pytest.mark.parametrize(
    ("write", "codec"), list(MISSING_CODEC_CASES.values()), ids=list(MISSING_CODEC_CASES)
)
def test_a_missing_codec_is_reported_as_missing_not_as_a_corrupt_file(
    tmp_path: Path,
    write: Callable[[Path, np.ndarray], Path],
    codec: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = write(tmp_path / "scan.tif", _volume("uint16"))
    simulate_missing_imagecodecs(monkeypatch)  # after writing: the encoders need it
    with pytest.raises(VolumeError) as info, open_volume(source) as reader:
        for z in range(len(reader)):
            reader.read(z)
    message = str(info.value)
    assert str(source) in message
    assert (
        f"compressed with {codec}, which needs the imagecodecs package (pip install imagecodecs)"
        in message
    )
    assert "corrupt" not in message


def test_zlib_writes_are_python_zlib_bytes_with_imagecodecs_installed(tmp_path: Path) -> None:
    """The phantoms' damage masks (data.dvc) are zlib stacks written by ``write_volume``:
    tifffile would compress them with imagecodecs' libdeflate (other bytes) if let."""
    mask = (np.random.default_rng(5).random((4, 64, 64)) > 0.9).astype(np.uint8)
    path = tmp_path / "mask.tif"
    write_volume(path, iter(mask), mask.shape, np.uint8, 1.6, compression="zlib")
    with tifffile.TiffFile(path) as tif, open(path, "rb") as fh:
        strips = [
            (offset, count)
            for page in tif.pages
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True)
        ]
        assert tif.pages.first.compression == 8
        for offset, count in strips:
            fh.seek(offset)
            stored = fh.read(count)
            assert stored == zlib.compress(zlib.decompress(stored), 6)
    with open_volume(path) as reader:
        np.testing.assert_array_equal(np.stack(list(reader.iter_slices())), mask)
