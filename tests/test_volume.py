"""Volume I/O on real TIFF files written here with tifffile."""

from __future__ import annotations

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


def test_voxel_size_from_imagej_tags(tmp_path: Path) -> None:
    path = tmp_path / "ij.tif"
    tifffile.imwrite(
        path,
        _volume("uint8"),
        imagej=True,
        resolution=(1 / 6.5, 1 / 6.5),
        metadata={"spacing": 6.5, "unit": "um"},
    )
    with open_volume(path) as reader:
        assert reader.voxel_size_um == pytest.approx(6.5)


def test_voxel_size_from_imagej_tags_in_mm(tmp_path: Path) -> None:
    path = tmp_path / "ij_mm.tif"
    tifffile.imwrite(
        path,
        _volume("uint8"),
        imagej=True,
        resolution=(1 / 0.004, 1 / 0.004),
        metadata={"spacing": 0.004, "unit": "mm"},
    )
    with open_volume(path) as reader:
        assert reader.voxel_size_um == pytest.approx(4.0)


def test_voxel_size_from_ome_metadata(tmp_path: Path) -> None:
    path = tmp_path / "ome.tif"
    tifffile.imwrite(
        path,
        _volume("uint16"),
        ome=True,
        photometric="minisblack",
        metadata={
            "axes": "ZYX",
            "PhysicalSizeX": 1.625,
            "PhysicalSizeY": 1.625,
            "PhysicalSizeZ": 1.625,
        },
    )
    with open_volume(path) as reader:
        assert reader.voxel_size_um == pytest.approx(1.625)


def test_voxel_size_from_resolution_tags_in_cm(tmp_path: Path) -> None:
    path = tmp_path / "res.tif"
    per_cm = 1e4 / 3.0  # 3 um pixels
    tifffile.imwrite(
        path,
        _volume("uint8"),
        photometric="minisblack",
        resolution=(per_cm, per_cm),
        resolutionunit="CENTIMETER",
    )
    with open_volume(path) as reader:
        assert reader.voxel_size_um == pytest.approx(3.0)


@pytest.mark.parametrize("dpi", [72.0, 96.0])
def test_screen_resolution_in_inches_is_not_a_voxel_size(tmp_path: Path, dpi: float) -> None:
    path = tmp_path / "screen.tif"
    tifffile.imwrite(
        path,
        _volume("uint8"),
        photometric="minisblack",
        resolution=(dpi, dpi),
        resolutionunit="INCH",
    )
    with open_volume(path) as reader:
        assert reader.voxel_size_um is None


def test_microscope_resolution_in_inches_is_read(tmp_path: Path) -> None:
    path = tmp_path / "inch.tif"
    per_inch = 25400.0 / 5.0  # 5 um pixels
    tifffile.imwrite(
        path,
        _volume("uint8"),
        photometric="minisblack",
        resolution=(per_inch, per_inch),
        resolutionunit="INCH",
    )
    with open_volume(path) as reader:
        assert reader.voxel_size_um == pytest.approx(5.0)


def test_no_voxel_tags_gives_none(tmp_path: Path) -> None:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, _volume("uint8"), photometric="minisblack")
    with open_volume(path) as reader:
        assert reader.voxel_size_um is None


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


def _bad_shape_slices(vol: np.ndarray):
    yield vol[0]
    yield vol[1, :, :-1]


def test_write_failure_leaves_no_file(tmp_path: Path) -> None:
    vol = _volume("uint8")
    path = tmp_path / "out" / "scan.tif"
    with pytest.raises(VolumeError, match="slice 1"):
        write_volume(path, _bad_shape_slices(vol), vol.shape, vol.dtype, 1.0)
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # no temporary left behind either


def test_write_too_few_slices_leaves_no_file(tmp_path: Path) -> None:
    vol = _volume("uint8")
    path = tmp_path / "scan.tif"
    with pytest.raises(VolumeError, match="expected 5"):
        write_volume(path, iter(vol[:3]), vol.shape, vol.dtype, 1.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("voxel", [0.0, -1.0, float("nan")])
def test_write_rejects_bad_voxel_size(tmp_path: Path, voxel: float) -> None:
    vol = _volume("uint8")
    with pytest.raises(VolumeError, match="voxel size"):
        write_volume(tmp_path / "scan.tif", iter(vol), vol.shape, vol.dtype, voxel)
    assert list(tmp_path.iterdir()) == []


def test_write_too_many_slices_leaves_no_file(tmp_path: Path) -> None:
    vol = _volume("uint8")
    path = tmp_path / "scan.tif"
    with pytest.raises(VolumeError, match="more than the 3 slices"):
        write_volume(path, iter(vol), (3, *vol.shape[1:]), vol.dtype, 1.0)
    assert list(tmp_path.iterdir()) == []
