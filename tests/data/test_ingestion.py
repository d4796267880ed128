"""Ingest on real TIFF files written here, and on the real ImageJ stack in ../shared."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from test_volume import simulate_missing_imagecodecs

from bonedamage.data.ingestion import IngestError, IngestRequest, ingest_scans, read_batch_csv
from bonedamage.data.manifest import COLUMNS, MANIFEST_NAME, read_manifest
from bonedamage.data.volume import open_volume, sha256_file
from conftest import REAL_STACK, REPO

PARAMS = REPO / "params.yaml"


# -- fixtures: small scans written with tifffile ----------------------------------------------
def volume(dtype: str = "uint8", shape: tuple[int, int, int] = (6, 16, 20)) -> np.ndarray:
    rng = np.random.default_rng(sum(shape))
    if dtype in ("float32", "float64"):
        return rng.normal(size=shape).astype(dtype)
    return rng.integers(0, min(np.iinfo(dtype).max, 60000), size=shape, dtype=dtype)


def write_stack(path: Path, vol: np.ndarray, voxel_um: float | None = None, **kwargs) -> Path:
    """Multi-page TIFF; with ``voxel_um`` as an ImageJ stack carrying that voxel size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if voxel_um is None:
        tifffile.imwrite(path, vol, photometric="minisblack", **kwargs)
    else:
        tifffile.imwrite(
            path,
            vol,
            imagej=True,
            resolution=(1 / voxel_um, 1 / voxel_um),
            metadata={"spacing": voxel_um, "unit": "um"},
            **kwargs,
        )
    return path


def write_folder(folder: Path, vol: np.ndarray, voxel_um: float | None = None) -> Path:
    """Folder of one-slice TIFFs named so that plain sorting would misorder them."""
    folder.mkdir(parents=True, exist_ok=True)
    for z, arr in enumerate(vol):
        name = folder / f"slice_{z}.tif"
        if voxel_um is None:
            tifffile.imwrite(name, arr)
        else:
            tifffile.imwrite(
                name,
                arr,
                imagej=True,
                resolution=(1 / voxel_um, 1 / voxel_um),
                metadata={"unit": "um"},
            )
    return folder


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (hidden ones too) with the files' SHA-256."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): sha256_file(p) if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A data root that already holds one ingested scan (so it has a manifest)."""
    root = tmp_path / "data" / "raw"
    src = write_stack(tmp_path / "existing.tif", volume("uint8", (3, 8, 8)), voxel_um=5.0)
    ingest_scans([IngestRequest(src, "EX", "cortical", "pristine")], root, progress=False)
    return root


# -- good inputs ---------------------------------------------------------------------------
def test_real_imagej_slice_folder(tmp_path: Path) -> None:
    if not REAL_STACK.is_dir():
        pytest.skip(f"real stack not available at {REAL_STACK}")
    root = tmp_path / "raw"
    # This ImageJ export carries no calibration tags (checked in the next line), so the
    # documented 19.5 um must be given explicitly.
    with open_volume(REAL_STACK) as reader:
        assert reader.voxel_size_um is None
    with pytest.raises(IngestError, match="no voxel size"):
        ingest_scans(
            [IngestRequest(REAL_STACK, "LHDL3155", "trabecular", "pristine")], root, progress=False
        )
    assert not root.exists()

    added = ingest_scans(
        [
            IngestRequest(
                REAL_STACK,
                "LHDL3155",
                "trabecular",
                "pristine",
                voxel_size_um=19.5,
                species="human",
            )
        ],
        root,
        progress=False,
    )
    out = root / "trabecular" / "LHDL3155-pristine.tif"
    row = added.iloc[0]
    assert row["scan_id"] == "LHDL3155-pristine"
    assert row["path"] == "trabecular/LHDL3155-pristine.tif"
    assert (row["shape"], row["dtype"], row["voxel_size_um"]) == ("200x200x200", "uint8", 19.5)
    assert (row["species"], row["state"], row["load_step"]) == ("human", "pristine", 0)
    assert row["mask_path"] == "" and row["source"] == "ingest"
    assert pd.isna(row["applied_strain"])
    assert row["sha256"] == sha256_file(out)

    manifest = read_manifest(root)
    assert len(manifest) == 1
    pd.testing.assert_frame_equal(manifest, added)

    files = sorted(REAL_STACK.glob("*.tif"))
    with open_volume(out) as reader:
        assert reader.shape == (200, 200, 200)
        assert reader.dtype == np.uint8
        assert reader.voxel_size_um == pytest.approx(19.5)
        assert reader._mmap is not None
        for z in (0, 1, 99, 199):
            np.testing.assert_array_equal(reader.slice(z), tifffile.imread(files[z]))
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST_NAME, "trabecular"]


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_multipage_stack_voxel_size_from_tags(tmp_path: Path, dtype: str) -> None:
    vol = volume(dtype)
    src = write_stack(tmp_path / "scan.tif", vol, voxel_um=6.5)
    root = tmp_path / "raw"
    added = ingest_scans(
        [
            IngestRequest(
                src, "B7", "cortical", "failed", load_step=4, applied_strain=0.021, species="bovine"
            )
        ],
        root,
        progress=False,
    )
    row = added.iloc[0]
    assert row["scan_id"] == "B7-failed"
    assert (row["load_step"], row["applied_strain"], row["species"]) == (4, 0.021, "bovine")
    assert (row["shape"], row["dtype"], row["voxel_size_um"]) == ("6x16x20", dtype, 6.5)
    out = root / "cortical" / "B7-failed.tif"
    assert row["sha256"] == sha256_file(out)
    with open_volume(out) as reader:
        assert reader.voxel_size_um == pytest.approx(6.5)
        np.testing.assert_array_equal(np.stack(list(reader.iter_slices())), vol)


def test_ome_stack_and_explicit_voxel_overrides_tags(tmp_path: Path) -> None:
    vol = volume("uint16")
    src = tmp_path / "ome.tif"
    tifffile.imwrite(
        src,
        vol,
        ome=True,
        photometric="minisblack",
        metadata={"axes": "ZYX", "PhysicalSizeX": 2.0, "PhysicalSizeY": 2.0},
    )
    root = tmp_path / "raw"
    added = ingest_scans(
        [
            IngestRequest(src, "O1", "trabecular", "intermediate", scan_id="O1-a"),
            IngestRequest(
                src, "O1", "trabecular", "intermediate", scan_id="O1-b", voxel_size_um=3.25
            ),
        ],
        root,
        progress=False,
    )
    assert added["voxel_size_um"].tolist() == [2.0, 3.25]
    assert added["load_step"].isna().all()  # not pristine, not given: unknown
    with open_volume(root / "trabecular" / "O1-b.tif") as reader:
        assert reader.voxel_size_um == pytest.approx(3.25)


def test_slice_folder_in_natural_order(tmp_path: Path) -> None:
    vol = volume("uint16", (12, 8, 8))
    src = write_folder(tmp_path / "slices", vol, voxel_um=1.5)
    root = tmp_path / "raw"
    added = ingest_scans([IngestRequest(src, "F1", "trabecular", "pristine")], root, progress=False)
    assert added.iloc[0]["voxel_size_um"] == 1.5
    with open_volume(root / "trabecular" / "F1-pristine.tif") as reader:
        np.testing.assert_array_equal(np.stack(list(reader.iter_slices())), vol)


def _page_by_page(path: Path, vol: np.ndarray, **kwargs) -> Path:
    """One series per slice, as ``tifffile.imwrite(..., append=True)`` in a loop writes it."""
    for plane in vol:
        tifffile.imwrite(path, plane, append=True, photometric="minisblack", **kwargs)
    return path


def _ome_stack(path: Path, vol: np.ndarray, **kwargs) -> Path:
    meta = {"axes": "ZYX", "PhysicalSizeX": 2.5, "PhysicalSizeXUnit": "µm"}
    meta |= {"PhysicalSizeY": 2.5, "PhysicalSizeYUnit": "µm", "PhysicalSizeZ": 2.5}
    tifffile.imwrite(path, vol, ome=True, photometric="minisblack", metadata=meta, **kwargs)
    return path


def _fiji_stack(path: Path, vol: np.ndarray, **kwargs) -> Path:
    """ImageJ stack as Fiji writes it: the unit escaped in the description."""
    meta = {"spacing": 2.5, "unit": "\\u00B5m"}
    tifffile.imwrite(path, vol, imagej=True, resolution=(0.4, 0.4), metadata=meta, **kwargs)
    return path


# id -> (writes the source, its dtype); every source carries a 2.5 um voxel size
LAB_TIFFS: dict[str, tuple[Callable[[Path, np.ndarray], Path], str]] = {
    "fiji-lzw-escaped-micro-unit": (lambda p, v: _fiji_stack(p, v, compression="lzw"), "uint16"),
    "zstd-ome": (lambda p, v: _ome_stack(p, v, compression="zstd"), "uint16"),
    "deflate-ome": (lambda p, v: _ome_stack(p, v, compression="deflate"), "float32"),
    "packbits-ome": (lambda p, v: _ome_stack(p, v, compression="packbits"), "uint8"),
    "page-by-page": (
        lambda p, v: _page_by_page(p, v, resolution=(4000, 4000), resolutionunit="CENTIMETER"),
        "uint16",
    ),
    "page-by-page-lzw": (
        lambda p, v: _page_by_page(
            p, v, compression="lzw", resolution=(4000, 4000), resolutionunit="CENTIMETER"
        ),
        "uint16",
    ),
    "int16-ome": (_ome_stack, "int16"),
    "int16-zstd-page-by-page": (
        lambda p, v: _page_by_page(
            p, v, compression="zstd", resolution=(4000, 4000), resolutionunit="CENTIMETER"
        ),
        "int16",
    ),
}


@pytest.mark.parametrize(("write", "dtype"), list(LAB_TIFFS.values()), ids=list(LAB_TIFFS))
def test_tiffs_as_labs_write_them_are_ingested(
    tmp_path: Path, write: Callable[[Path, np.ndarray], Path], dtype: str
) -> None:
    """Compressed, page-by-page, OME, Fiji and int16 stacks are copied pixel for pixel
    (int16 as uint16 + 32768) with the voxel size from their tags."""
    if dtype == "int16":
        vol = np.random.default_rng(2).integers(-32768, 32768, (6, 16, 20)).astype(np.int16)
        vol[0, 0, :2] = (-32768, 32767)
    else:
        vol = volume(dtype)
    src = write(tmp_path / "scan.tif", vol)
    root = tmp_path / "raw"
    added = ingest_scans([IngestRequest(src, "L1", "cortical", "pristine")], root, progress=False)
    row = added.iloc[0]
    stored = "uint16" if dtype == "int16" else dtype
    assert (row["shape"], row["dtype"], row["voxel_size_um"]) == ("6x16x20", stored, 2.5)
    expected = (vol.astype(np.int32) + 32768).astype(np.uint16) if dtype == "int16" else vol
    with open_volume(root / row["path"]) as reader:
        assert reader.memmap is not None  # the copy is an uncompressed stack again
        np.testing.assert_array_equal(np.stack(list(reader.iter_slices())), expected)
        assert reader.voxel_size_um == pytest.approx(2.5)


def test_an_explicit_voxel_size_replaces_an_implausible_tag(tmp_path: Path) -> None:
    """tifffile's ``resolution=`` defaults to inches: 1/20 px per inch reads as 508000 um."""
    src = tmp_path / "inch.tif"
    tifffile.imwrite(src, volume(), photometric="minisblack", resolution=(1 / 20, 1 / 20))
    root = tmp_path / "raw"
    with pytest.raises(IngestError, match="508000 um from XResolution"):
        ingest_scans([IngestRequest(src, "I1", "cortical", "pristine")], root, progress=False)
    request = IngestRequest(src, "I1", "cortical", "pristine", voxel_size_um=20.0)
    added = ingest_scans([request], root, progress=False)
    assert added.iloc[0]["voxel_size_um"] == 20.0


def test_appends_to_existing_manifest(data_root: Path, tmp_path: Path) -> None:
    before = snapshot(data_root)
    src = write_stack(tmp_path / "new.tif", volume("uint8"), voxel_um=5.0)
    ingest_scans([IngestRequest(src, "NEW", "trabecular", "failed")], data_root, progress=False)
    after = snapshot(data_root)
    assert after["cortical/EX-pristine.tif"] == before["cortical/EX-pristine.tif"]
    assert set(after) - set(before) == {"trabecular", "trabecular/NEW-failed.tif"}
    manifest = read_manifest(data_root)
    assert manifest["scan_id"].tolist() == ["EX-pristine", "NEW-failed"]
    assert not [p for p in data_root.iterdir() if p.name.startswith(".")]


def test_batch_csv_of_two_scans(tmp_path: Path) -> None:
    src_root = tmp_path / "scans"
    write_folder(src_root / "specimen1" / "pre", volume("uint8", (5, 10, 10)))
    write_stack(src_root / "specimen1" / "post.tif", volume("uint8", (7, 10, 10)), voxel_um=4.0)
    csv_path = src_root / "batch.csv"
    csv_path.write_text(
        "specimen_id,tissue,state,path,voxel_size_um,species,load_step,applied_strain\n"
        "S1,trabecular,pristine,specimen1/pre,4.0,bovine,,\n"
        "S1,trabecular,failed,specimen1/post.tif,,bovine,3,0.034\n"
    )
    requests = read_batch_csv(csv_path)
    assert [r.source for r in requests] == [
        src_root / "specimen1" / "pre",
        src_root / "specimen1" / "post.tif",
    ]
    assert requests[0].voxel_size_um == 4.0 and requests[1].voxel_size_um is None
    root = tmp_path / "raw"
    added = ingest_scans(requests, root, progress=False)
    assert added["scan_id"].tolist() == ["S1-pristine", "S1-failed"]
    assert added["load_step"].tolist() == [0, 3]
    assert added["applied_strain"].isna().tolist() == [True, False]
    assert added["shape"].tolist() == ["5x10x10", "7x10x10"]
    manifest = read_manifest(root)
    assert list(manifest.columns) == list(COLUMNS)
    assert sorted(manifest["scan_id"]) == ["S1-failed", "S1-pristine"]
    for row in manifest.itertuples():
        assert sha256_file(root / row.path) == row.sha256


def test_batch_csv_source_root_override(tmp_path: Path) -> None:
    write_stack(tmp_path / "elsewhere" / "a.tif", volume(), voxel_um=2.0)
    csv_path = tmp_path / "lists" / "batch.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(
        "specimen_id,tissue,state,path,voxel_size_um,scan_id\nA,cortical,pristine,a.tif,,A-scan0\n"
    )
    with pytest.raises(IngestError, match=r"row 1 \(line 2\).*a\.tif"):
        read_batch_csv(csv_path)
    (request,) = read_batch_csv(csv_path, source_root=tmp_path / "elsewhere")
    assert request.source == tmp_path / "elsewhere" / "a.tif"
    assert request.scan_id == "A-scan0"


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_stack(tmp_path / "s.tif", volume(), voxel_um=2.0)
    ingest_scans([IngestRequest(src, "P", "cortical", "pristine")], tmp_path / "a")
    assert "slice" in capsys.readouterr().err
    ingest_scans([IngestRequest(src, "P", "cortical", "pristine")], tmp_path / "b", progress=False)
    assert capsys.readouterr().err == ""


def test_streams_slice_by_slice(tmp_path: Path) -> None:
    """A 64 MiB scan is copied with a peak of traced allocations far below its size."""
    shape = (64, 1024, 1024)
    folder = tmp_path / "big"
    folder.mkdir()
    slice_ = np.arange(shape[1] * shape[2], dtype=np.uint32).reshape(shape[1:])
    for z in range(shape[0]):
        tifffile.imwrite(folder / f"{z:03d}.tif", ((slice_ + z) % 251).astype(np.uint8))
    scan_bytes = math.prod(shape)
    tracemalloc.start()
    try:
        ingest_scans(
            [IngestRequest(folder, "BIG", "trabecular", "pristine", voxel_size_um=1.0)],
            tmp_path / "raw",
            progress=False,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a few 1 MiB slices in flight plus the fixed 2 x 4 MiB of SHA-256 read buffers
    assert peak < scan_bytes / 4, f"peak {peak / 2**20:.1f} MiB for a {scan_bytes / 2**20} MiB scan"
    with open_volume(tmp_path / "raw" / "trabecular" / "BIG-pristine.tif") as reader:
        assert reader.shape == shape
        np.testing.assert_array_equal(reader.slice(63), ((slice_ + 63) % 251).astype(np.uint8))


# -- bad inputs: IngestError naming the file/field; data root unchanged byte for byte ---------
Case = Callable[[Path, Path], list[IngestRequest]]


def _req(source: Path, **kwargs) -> IngestRequest:
    fields = {"specimen_id": "X1", "tissue": "trabecular", "state": "failed"} | kwargs
    return IngestRequest(source, **fields)


def _good(tmp: Path, name: str = "good.tif") -> Path:
    return write_stack(tmp / name, volume("uint8"), voxel_um=2.0)


def case_missing_file(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(tmp / "nope.tif")]


def case_missing_folder(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(tmp / "no_such_folder")]


def case_empty_folder(tmp: Path, root: Path) -> list[IngestRequest]:
    (tmp / "empty").mkdir()
    return [_req(tmp / "empty", voxel_size_um=1.0)]


def case_non_tiff_in_folder(tmp: Path, root: Path) -> list[IngestRequest]:
    folder = write_folder(tmp / "slices", volume())
    (folder / "notes.txt").write_text("scanned on Tuesday")
    return [_req(folder, voxel_size_um=1.0)]


def case_non_tiff_file(tmp: Path, root: Path) -> list[IngestRequest]:
    raw = tmp / "scan.raw"
    raw.write_bytes(volume().tobytes())
    return [_req(raw, voxel_size_um=1.0)]


def case_truncated_stack(tmp: Path, root: Path) -> list[IngestRequest]:
    path = write_stack(tmp / "cut.tif", volume("uint16", (8, 64, 64)), voxel_um=2.0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return [_req(path)]


def case_truncated_compressed_stack(tmp: Path, root: Path) -> list[IngestRequest]:
    path = write_stack(tmp / "cutz.tif", volume("uint16", (8, 64, 64)), compression="zlib")
    data = path.read_bytes()
    path.write_bytes(data[:-2000])
    return [_req(path, voxel_size_um=1.0)]


def case_corrupt_tiff(tmp: Path, root: Path) -> list[IngestRequest]:
    path = tmp / "garbage.tif"
    path.write_bytes(np.random.default_rng(1).bytes(5000))
    return [_req(path, voxel_size_um=1.0)]


def case_slice_shapes_differ(tmp: Path, root: Path) -> list[IngestRequest]:
    folder = write_folder(tmp / "slices", volume())
    tifffile.imwrite(folder / "slice_3.tif", volume("uint8", (1, 16, 21))[0])
    return [_req(folder, voxel_size_um=1.0)]


def case_slice_dtypes_differ(tmp: Path, root: Path) -> list[IngestRequest]:
    folder = write_folder(tmp / "slices", volume())
    tifffile.imwrite(folder / "slice_4.tif", volume("uint16", (1, 16, 20))[0])
    return [_req(folder, voxel_size_um=1.0)]


def case_rgb_stack(tmp: Path, root: Path) -> list[IngestRequest]:
    path = tmp / "rgb.tif"
    tifffile.imwrite(path, volume("uint8", (4, 16, 60)).reshape(4, 16, 20, 3), photometric="rgb")
    return [_req(path, voxel_size_um=1.0)]


def case_rgb_slice_in_folder(tmp: Path, root: Path) -> list[IngestRequest]:
    folder = write_folder(tmp / "slices", volume())
    tifffile.imwrite(folder / "slice_2.tif", volume("uint8", (16, 20, 3)), photometric="rgb")
    return [_req(folder, voxel_size_um=1.0)]


def _float_with(tmp: Path, value: float) -> list[IngestRequest]:
    vol = volume("float32", (8, 16, 20))
    vol[5, 3, 4] = value
    return [_req(write_stack(tmp / "float.tif", vol, voxel_um=2.0))]


def case_nan(tmp: Path, root: Path) -> list[IngestRequest]:
    return _float_with(tmp, float("nan"))


def case_inf(tmp: Path, root: Path) -> list[IngestRequest]:
    return _float_with(tmp, float("-inf"))


def case_unknown_tissue(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(_good(tmp), tissue="bone")]


def case_unknown_state(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(_good(tmp), state="cracked")]


def case_duplicate_in_batch(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(_good(tmp, "a.tif"), scan_id="DUP"), _req(_good(tmp, "b.tif"), scan_id="DUP")]


def case_duplicate_in_manifest(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(_good(tmp), specimen_id="EX", tissue="trabecular", state="pristine")]


def case_destination_exists(tmp: Path, root: Path) -> list[IngestRequest]:
    (root / "trabecular").mkdir()
    (root / "trabecular" / "X1-failed.tif").write_bytes(b"somebody's file")
    return [_req(_good(tmp))]


def case_duplicate_ignoring_case(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(_good(tmp), scan_id="ex-PRISTINE")]


def case_single_slice(tmp: Path, root: Path) -> list[IngestRequest]:
    path = tmp / "one.tif"
    tifffile.imwrite(path, volume()[0])
    return [_req(path, voxel_size_um=1.0)]


def case_unsafe_scan_id(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(_good(tmp), scan_id="../../evil")]


def case_voxel_zero(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(_good(tmp), voxel_size_um=0.0)]


def case_voxel_negative(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(_good(tmp), voxel_size_um=-6.5)]


def case_voxel_nan(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(_good(tmp), voxel_size_um=float("nan"))]


def case_no_voxel_size(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(write_stack(tmp / "untagged.tif", volume()))]


def case_voxel_tag_in_inches(tmp: Path, root: Path) -> list[IngestRequest]:
    """Micrometres meant, but tifffile's ``resolution=`` is in inches unless told."""
    path = tmp / "inch.tif"
    tifffile.imwrite(path, volume(), photometric="minisblack", resolution=(1 / 20, 1 / 20))
    return [_req(path)]


def case_voxel_too_large(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(_good(tmp), voxel_size_um=5000.0)]


def case_voxel_too_small(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(_good(tmp), voxel_size_um=0.02)]


def case_images_of_different_shapes(tmp: Path, root: Path) -> list[IngestRequest]:
    path = tmp / "mixed.tif"
    for plane in (volume()[0], volume()[1], volume()[2, :, :-1]):
        tifffile.imwrite(path, plane, append=True, photometric="minisblack")
    return [_req(path, voxel_size_um=1.0)]


def case_int32(tmp: Path, root: Path) -> list[IngestRequest]:
    path = tmp / "int32.tif"
    tifffile.imwrite(path, volume("uint16").astype(np.int32), photometric="minisblack")
    return [_req(path, voxel_size_um=1.0)]


def case_float64_folder(tmp: Path, root: Path) -> list[IngestRequest]:
    return [_req(write_folder(tmp / "f64", volume("float64")), voxel_size_um=1.0)]


def case_second_scan_fails(tmp: Path, root: Path) -> list[IngestRequest]:
    """The first scan copies fine; the second fails mid-stream: neither may land."""
    return [_req(_good(tmp), scan_id="FIRST"), *_float_with(tmp, float("nan"))]


def _csv_case(rows: str) -> Case:
    def case(tmp: Path, root: Path) -> list[IngestRequest]:
        _good(tmp / "src")
        csv_path = tmp / "src" / "batch.csv"
        csv_path.write_text("specimen_id,tissue,state,path,voxel_size_um\n" + rows)
        return read_batch_csv(csv_path)

    return case


BAD_CASES: dict[str, tuple[Case, list[str]]] = {
    "missing-file": (case_missing_file, ["nope.tif", "no such file"]),
    "missing-folder": (case_missing_folder, ["no_such_folder", "no such file"]),
    "empty-folder": (case_empty_folder, ["empty", "folder is empty"]),
    "non-tiff-in-folder": (case_non_tiff_in_folder, ["slices", "non-TIFF", "notes.txt"]),
    "non-tiff-file": (case_non_tiff_file, ["scan.raw", "not a TIFF"]),
    "truncated-stack": (case_truncated_stack, ["cut.tif", "truncated"]),
    "truncated-zlib-stack": (case_truncated_compressed_stack, ["cutz.tif", "truncated"]),
    "corrupt-tiff": (case_corrupt_tiff, ["garbage.tif", "TIFF"]),
    "slice-shapes-differ": (case_slice_shapes_differ, ["slice_3.tif", "(16, 21)", "must match"]),
    "slice-dtypes-differ": (case_slice_dtypes_differ, ["slice_4.tif", "uint16", "must match"]),
    "rgb-stack": (case_rgb_stack, ["rgb.tif", "RGB"]),
    "rgb-slice": (case_rgb_slice_in_folder, ["slice_2.tif", "RGB"]),
    "nan": (case_nan, ["float.tif", "slice 5", "NaN"]),
    "inf": (case_inf, ["float.tif", "slice 5", "infinite"]),
    "unknown-tissue": (case_unknown_tissue, ["good.tif", "tissue", "'bone'"]),
    "unknown-state": (case_unknown_state, ["good.tif", "state", "'cracked'"]),
    "duplicate-in-batch": (case_duplicate_in_batch, ["b.tif", "'DUP'", "twice"]),
    "duplicate-in-manifest": (case_duplicate_in_manifest, ["'EX-pristine'", MANIFEST_NAME]),
    "destination-exists": (case_destination_exists, ["X1-failed.tif", "overwrite"]),
    "duplicate-ignoring-case": (case_duplicate_ignoring_case, ["'ex-PRISTINE'", "'EX-pristine'"]),
    "single-slice": (case_single_slice, ["one.tif", "single 2D slice"]),
    "unsafe-scan-id": (case_unsafe_scan_id, ["scan_id", "../../evil"]),
    "voxel-zero": (case_voxel_zero, ["good.tif", "voxel_size_um", "0.0"]),
    "voxel-negative": (case_voxel_negative, ["good.tif", "voxel_size_um", "-6.5"]),
    "voxel-nan": (case_voxel_nan, ["good.tif", "voxel_size_um", "nan"]),
    "no-voxel-size": (case_no_voxel_size, ["untagged.tif", "no voxel size"]),
    "voxel-tag-in-inches": (
        case_voxel_tag_in_inches,
        ["inch.tif", "voxel size 508000 um from XResolution (unit inch)", "outside 0.1 um-1 mm"],
    ),
    "voxel-too-large": (case_voxel_too_large, ["good.tif", "voxel_size_um 5000", "outside"]),
    "voxel-too-small": (case_voxel_too_small, ["good.tif", "voxel_size_um 0.02", "outside"]),
    "images-of-different-shapes": (
        case_images_of_different_shapes,
        ["mixed.tif", "holds 3 images of different shapes"],
    ),
    "int32": (case_int32, ["int32.tif", "int32"]),
    "float64": (case_float64_folder, ["f64", "float64"]),
    "second-scan-fails": (case_second_scan_fails, ["float.tif", "slice 5", "NaN"]),
    "csv-dotdot": (
        _csv_case("X,cortical,pristine,../good.tif,1\n"),
        ["batch.csv", "row 1", "path", "'../good.tif'", "escapes"],
    ),
    "csv-nested-dotdot": (
        _csv_case("X,cortical,pristine,good.tif,1\nY,cortical,pristine,sub/../../x.tif,1\n"),
        ["batch.csv", "row 2", "sub/../../x.tif", "escapes"],
    ),
    "csv-absolute": (
        _csv_case("X,cortical,pristine,/etc/hostname,1\n"),
        ["batch.csv", "row 1", "'/etc/hostname'", "absolute"],
    ),
    "csv-missing-source": (
        _csv_case("X,cortical,pristine,gone.tif,1\n"),
        ["batch.csv", "row 1", "gone.tif", "does not exist"],
    ),
    "csv-bad-voxel": (
        _csv_case("X,cortical,pristine,good.tif,-1\n"),
        ["batch.csv", "row 1", "voxel_size_um"],
    ),
    "csv-voxel-out-of-range": (
        _csv_case("X,cortical,pristine,good.tif,2000\n"),
        ["batch.csv", "row 1", "voxel_size_um 2000 is outside 0.1 um-1 mm"],
    ),
    "csv-voxel-not-number": (
        _csv_case("X,cortical,pristine,good.tif,6.5um\n"),
        ["batch.csv", "row 1", "voxel_size_um", "'6.5um'"],
    ),
    "csv-unknown-tissue": (
        _csv_case("X,femur,pristine,good.tif,1\n"),
        ["batch.csv", "row 1", "tissue", "'femur'"],
    ),
    "csv-duplicate": (
        _csv_case("X,cortical,pristine,good.tif,1\nX,cortical,pristine,good.tif,1\n"),
        ["batch.csv", "row 2", "'X-pristine'", "twice"],
    ),
    "csv-short-row": (
        _csv_case("X,cortical,pristine,good.tif\n"),
        ["batch.csv", "row 1", "4 fields"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_input_leaves_data_root_unchanged(name: str, data_root: Path, tmp_path: Path) -> None:
    make, fragments = BAD_CASES[name]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    before = snapshot(data_root)
    with pytest.raises(IngestError) as info:
        requests = make(inputs, data_root)  # the batch CSV cases fail here
        before = snapshot(data_root)  # a planted destination file must stay untouched too
        ingest_scans(requests, data_root, progress=False)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert snapshot(data_root) == before


def test_failure_in_new_data_root_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "fresh" / "raw"
    with pytest.raises(IngestError, match="NaN"):
        ingest_scans(case_second_scan_fails(tmp_path, root), root, progress=False)
    assert not (tmp_path / "fresh").exists()


def test_manifest_write_failure_rolls_back(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files already moved into place are taken back when the manifest cannot be written."""
    import bonedamage.data.ingestion as ingest_module

    def failing_write(df: pd.DataFrame, root: Path) -> Path:
        assert (root / "trabecular" / "X1-failed.tif").is_file()  # the move did happen
        raise OSError(28, "No space left on device", str(root / MANIFEST_NAME))

    monkeypatch.setattr(ingest_module, "write_manifest", failing_write)
    before = snapshot(data_root)
    with pytest.raises(IngestError, match=rf"{MANIFEST_NAME}: cannot write.*No space left"):
        ingest_scans([_req(_good(tmp_path))], data_root, progress=False)
    assert snapshot(data_root) == before


def test_interrupt_leaves_nothing(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while a scan streams removes the staging folder too."""
    import bonedamage.data.ingestion as ingest_module

    real = ingest_module._checked_slices

    def interrupted(*args, **kwargs):
        for z, arr in enumerate(real(*args, **kwargs)):
            if z == 3:
                raise KeyboardInterrupt
            yield arr

    monkeypatch.setattr(ingest_module, "_checked_slices", interrupted)
    before = snapshot(data_root)
    with pytest.raises(KeyboardInterrupt):
        ingest_scans([_req(_good(tmp_path))], data_root, progress=False)
    assert snapshot(data_root) == before


def test_corrupt_manifest_is_reported(data_root: Path, tmp_path: Path) -> None:
    manifest = data_root / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace("cortical", "femur"))
    before = snapshot(data_root)
    with pytest.raises(IngestError, match=rf"{MANIFEST_NAME}.*tissue.*femur"):
        ingest_scans([_req(_good(tmp_path))], data_root, progress=False)
    assert snapshot(data_root) == before


@pytest.mark.parametrize(
    ("header", "fragments"),
    [
        ("specimen_id,tissue,state,path\n", ["missing column", "voxel_size_um"]),
        ("specimen_id,tissue,state,path,voxel_size_um,colour\n", ["unknown column", "colour"]),
        ("", ["empty batch CSV"]),
        ("specimen_id,tissue,state,path,voxel_size_um\n", ["no scans"]),
    ],
)
def test_batch_csv_structure_errors(tmp_path: Path, header: str, fragments: list[str]) -> None:
    csv_path = tmp_path / "batch.csv"
    csv_path.write_text(header)
    with pytest.raises(IngestError) as info:
        read_batch_csv(csv_path)
    for fragment in [str(csv_path), *fragments]:
        assert fragment in str(info.value)


def test_missing_batch_csv(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="no such batch CSV"):
        read_batch_csv(tmp_path / "nope.csv")


def test_request_source_is_path() -> None:
    request = IngestRequest("scan.tif", "A", "cortical", "pristine")  # type: ignore[arg-type]
    assert request.source == Path("scan.tif")


# -- `bonedamage ingest`: one `error:` line naming the file, exit 2, nothing written ----------
def _compressed(codec: str) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    def write(src: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        tifffile.imwrite(src, volume("uint16"), photometric="minisblack", compression=codec)
        simulate_missing_imagecodecs(monkeypatch)
        name = {"lzw": "LZW", "zstd": "zstd"}[codec]
        return [f"compressed with {name}, which needs the imagecodecs package (pip install"]

    return write


def _inch_tag(src: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    tifffile.imwrite(src, volume("uint16"), photometric="minisblack", resolution=(0.05, 0.05))
    return ["voxel size 508000 um from XResolution (unit inch) is outside 0.1 um-1 mm"]


CLI_CASES: dict[str, Callable[[Path, pytest.MonkeyPatch], list[str]]] = {
    "lzw-without-imagecodecs": _compressed("lzw"),
    "zstd-without-imagecodecs": _compressed("zstd"),
    "voxel-tag-in-inches": _inch_tag,
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_ingest_command_refuses_unreadable_tiffs_in_one_error_line(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bonedamage.cli import main

    src = tmp_path / "scan.tif"
    fragments = CLI_CASES[case](src, monkeypatch)
    root = tmp_path / "raw"
    fields = ["--specimen-id", "S1", "--tissue", "cortical", "--state", "pristine"]
    args = ["ingest", str(src), *fields, "--data-root", str(root), "--params", str(PARAMS)]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not root.exists()
