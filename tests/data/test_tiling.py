"""The tile stage (data/tiling.py) on small phantom scans and the real stack."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonedamage.atomic import MARKER, write_marker
from bonedamage.data.ingestion import IngestRequest, ingest_scans
from bonedamage.data.manifest import read_manifest, write_manifest
from bonedamage.data.tilestore import INDEX_NAME, TileStore
from bonedamage.data.tiling import (
    TilingError,
    damage_masks,
    fit_normalization,
    tile_dataset,
    tile_px,
)
from bonedamage.data.volume import open_volume
from conftest import REAL_STACK, with_raw


@pytest.fixture(scope="module")
def cfg(params: dict) -> dict:
    # axial planes for both tissues: the tests read the scan's z slices back
    tile_um = {"cortical": 25.6, "trabecular": 320.0}
    one_plane = {"cortical": 0.0, "trabecular": 0.0}
    return dict(
        params["tile"], tile_um=tile_um, planes=["axial"], chunk_tiles=50, context_um=one_plane
    )


@pytest.fixture(scope="module")
def tiles(small_dataset: Path, cfg: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiles") / "tiles"
    tile_dataset(small_dataset, out, cfg, progress=False)
    return out


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_index_has_one_row_per_stored_tile(tiles: Path, small_dataset: Path) -> None:
    store = TileStore(tiles)
    index = store.index
    expected = {
        "tile_id",
        "scan_id",
        "specimen_id",
        "tissue",
        "state",
        "label",
        "load_step",
        "plane",
        "z",
        "y",
        "x",
        "voxel_size_um",
        "bone_fraction",
        "mean",
        "std",
        "damage_fraction",
        "chunk",
        "row",
    }
    assert expected <= set(index.columns)
    assert index["tile_id"].is_unique
    assert set(index["scan_id"]) == set(read_manifest(small_dataset)["scan_id"])
    assert set(index["label"]) == {-1, 0, 1}
    assert (index["tile_px"] == 16).all()  # 25.6 um / 1.6 um and 320 um / 20 um
    chunks = sorted(set(index["chunk"]))
    assert len(chunks) > 2  # chunk_tiles=50 spreads the tiles over several files
    for chunk in chunks:
        assert len(np.load(tiles / chunk, mmap_mode="r")) == (index["chunk"] == chunk).sum()


def test_tiles_read_back_equal_the_scan_normalised(
    tiles: Path, small_dataset: Path, cfg: dict
) -> None:
    store = TileStore(tiles)
    manifest = read_manifest(small_dataset).set_index("scan_id")
    rng = np.random.default_rng(0)
    for pos in rng.choice(len(store), size=12, replace=False):
        row = store.index.iloc[pos]
        with open_volume(small_dataset / manifest.loc[row.scan_id, "path"]) as vol:
            norm = fit_normalization(vol, tuple(cfg["percentiles"]), 1.0, row.scan_id)
            raw = vol.read(int(row.z))[row.y : row.y + 16, row.x : row.x + 16]
        np.testing.assert_array_equal(store.raw(pos), raw)  # stored bit for bit
        assert (row.norm_lo, row.norm_hi) == (norm.lo, norm.hi)
        np.testing.assert_allclose(store.tile(pos), norm.apply(raw), rtol=1e-6)
        assert store.tile(pos).mean() == pytest.approx(row["mean"], abs=1e-5)
        assert store.tile(pos).std() == pytest.approx(row["std"], abs=1e-4)


@pytest.fixture(scope="module")
def tiles_25d(small_dataset: Path, cfg: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiles25d") / "tiles"
    # 2 planes at 1.6 um (cortical), 3 planes at 20 um (trabecular: 50 um rounds to 2.5 -> 2)
    tile_dataset(small_dataset, out, dict(cfg, context_um={"cortical": 3.2, "trabecular": 50.0}))
    return out


def test_25d_tiles_stack_the_neighbouring_planes(
    tiles_25d: Path, tiles: Path, small_dataset: Path
) -> None:
    store, flat = TileStore(tiles_25d), TileStore(tiles)
    # the filters and statistics look at the tiled plane: the same tiles, the same index
    same = [c for c in store.index.columns if c != "chunk"]
    pd.testing.assert_frame_equal(store.index[same], flat.index[same])
    assert store.channels("cortical") == store.channels("trabecular") == 3
    assert flat.channels("cortical") == 1
    manifest = read_manifest(small_dataset).set_index("scan_id")
    index = store.index
    picks = [*np.flatnonzero(index["z"].to_numpy() == 0)[:2], *range(0, len(index), 97)]
    for pos in picks:
        row = index.iloc[pos]
        d = 2  # 3.2 um / 1.6 um, and round(50 um / 20 um) = 2
        with open_volume(small_dataset / manifest.loc[row.scan_id, "path"]) as vol:
            nz = vol.shape[0]
            planes = [vol.read(min(max(z, 0), nz - 1)) for z in (row.z - d, row.z, row.z + d)]
        want = np.stack([p[row.y : row.y + 16, row.x : row.x + 16] for p in planes])
        np.testing.assert_array_equal(store.raw(pos), want)  # clamped at the scan's ends
        np.testing.assert_array_equal(store.tile(pos)[1], flat.tile(pos))
        assert store.tile(pos).shape == (3, 16, 16)
    assert (index["z"] == 0).any()  # the clamped case was checked


def test_context_um_must_be_a_number_at_least_zero(
    cfg: dict, small_dataset: Path, tmp_path: Path
) -> None:
    with pytest.raises(TilingError, match="context_um cortical"):
        tile_dataset(small_dataset, tmp_path / "t", dict(cfg, context_um={"cortical": -1.0}))
    assert not (tmp_path / "t").exists()


def test_damage_fraction_comes_from_the_mask(tiles: Path, small_dataset: Path) -> None:
    index = TileStore(tiles).index
    manifest = read_manifest(small_dataset).set_index("scan_id")
    assert (index.loc[index.state == "pristine", "damage_fraction"] == 0).all()
    failed = index[index.state == "failed"]
    assert failed["damage_fraction"].max() > 0
    row = failed.sort_values("damage_fraction").iloc[-1]
    with open_volume(small_dataset / manifest.loc[row.scan_id, "mask_path"]) as mask:
        window = mask.read(int(row.z))[row.y : row.y + 16, row.x : row.x + 16]
    assert window.mean() == pytest.approx(row.damage_fraction)


@pytest.mark.parametrize("planes", [["axial"], ["coronal", "sagittal"]])
def test_damage_masks_are_cut_exactly_like_their_tiles(
    small_dataset: Path, cfg: dict, tmp_path: Path, planes: list[str]
) -> None:
    index = tile_dataset(small_dataset, tmp_path / "t", dict(cfg, planes=planes), progress=False)
    rows = index.sample(frac=1.0, random_state=0)  # any order, several scans and planes
    masks = damage_masks(small_dataset, rows)
    assert masks.shape == (len(rows), 16, 16) and masks.dtype == bool
    np.testing.assert_allclose(masks.mean(axis=(1, 2)), rows["damage_fraction"], atol=1e-6)
    assert masks[rows["state"].to_numpy() == "failed"].any()
    assert not masks[rows["state"].to_numpy() == "pristine"].any()


def test_tiling_is_deterministic(small_dataset: Path, cfg: dict, tiles: Path, tmp_path) -> None:
    tile_dataset(small_dataset, tmp_path / "again", cfg, progress=False)
    assert digest(tmp_path / "again") == digest(tiles)


def test_other_planes_and_the_slice_stride(small_dataset: Path, cfg: dict, tmp_path) -> None:
    index = tile_dataset(
        small_dataset,
        tmp_path / "t",
        dict(cfg, planes=["axial", "sagittal"], slice_stride=3),
        progress=False,
    )
    assert set(index["plane"]) == {"axial", "sagittal"}
    axial = index[index.plane == "axial"]
    assert set(axial["z"] % 3) == {0} and axial["z"].nunique() > 1
    sagittal = index[index.plane == "sagittal"]
    assert set(sagittal["x"] % 3) == {0} and sagittal["z"].max() > 0


def test_planes_per_tissue(small_dataset: Path, cfg: dict, tmp_path) -> None:
    planes = {"cortical": ["axial"], "trabecular": ["coronal"]}
    index = tile_dataset(small_dataset, tmp_path / "t", dict(cfg, planes=planes), progress=False)
    assert index.groupby("tissue")["plane"].unique().map(list).to_dict() == planes
    coronal = index[index.plane == "coronal"]
    assert set(coronal["y"] % cfg["slice_stride"]) == {0}


def test_a_failing_scan_leaves_no_half_written_output(
    small_dataset: Path, cfg: dict, tiles: Path, tmp_path: Path
) -> None:
    root = tmp_path / "raw"
    shutil.copytree(small_dataset, root)
    manifest = read_manifest(root)
    victim = root / manifest.sort_values("scan_id").iloc[-1]["path"]
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    out = tmp_path / "tiles"
    shutil.copytree(tiles, out)
    before = digest(out)
    with pytest.raises(Exception, match="truncated"):
        tile_dataset(root, out, cfg, progress=False)
    assert digest(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tile_larger_than_the_scan_is_refused(small_dataset: Path, cfg: dict, tmp_path) -> None:
    with pytest.raises(TilingError, match="larger than"):
        tile_dataset(
            small_dataset,
            tmp_path / "t",
            dict(cfg, tile_um={"cortical": 999.0, "trabecular": 320.0}),
            progress=False,
        )
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("planes", ["oblique"], "tile.planes"),
        ("slice_stride", 0, "slice_stride"),
        ("percentiles", [99, 1], "percentiles"),
    ],
)
def test_bad_tile_settings_are_refused(
    small_dataset: Path, cfg: dict, tmp_path, key, value, message
) -> None:
    with pytest.raises(TilingError, match=message):
        tile_dataset(small_dataset, tmp_path / "t", dict(cfg, **{key: value}), progress=False)


def test_empty_manifest_is_refused(small_dataset: Path, cfg: dict, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    root.mkdir()
    write_manifest(read_manifest(small_dataset).iloc[:0], root)
    with pytest.raises(TilingError, match="no scans"):
        tile_dataset(root, tmp_path / "t", cfg, progress=False)


def test_tile_px_is_the_physical_size() -> None:
    assert tile_px(1280, 20.0) == 64
    assert tile_px(102.4, 1.6) == 64
    with pytest.raises(TilingError):
        tile_px(100, 0)


def _flat(value: float, dtype: str) -> np.ndarray:
    return np.full((6, 16, 16), value, dtype)


def _flat_inside_a_field_of_view(value: float, dtype: str) -> np.ndarray:
    vol = _flat(value, dtype)
    vol[:, :2], vol[:, -2:], vol[:, :, :2], vol[:, :, -2:] = 0, 0, 0, 0
    return vol


# id -> (the scan, its constant value)
CONSTANT_SCANS: dict[str, tuple[np.ndarray, float]] = {
    "float-zero": (_flat(0.0, "float32"), 0.0),
    "float": (_flat(0.375, "float32"), 0.375),
    "uint16": (_flat(1000, "uint16"), 1000),
    "constant-inside-a-zero-field-of-view": (_flat_inside_a_field_of_view(0.5, "float32"), 0.5),
}


@pytest.mark.parametrize(("scan", "value"), list(CONSTANT_SCANS.values()), ids=list(CONSTANT_SCANS))
def test_a_constant_scan_is_refused_as_constant(
    tmp_path: Path, scan: np.ndarray, value: float
) -> None:
    import tifffile

    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, scan, photometric="minisblack")
    with open_volume(path) as reader, pytest.raises(TilingError) as info:
        fit_normalization(reader, (1.0, 99.0), 1.0, str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: constant intensity ({value:g}"), message
    assert "nothing to" in message and "reconstructed" not in message


@pytest.mark.skipif(not REAL_STACK.is_dir(), reason="../shared/real is absent")
def test_real_stack_is_resampled_and_tiled(params: dict, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    ingest_scans(
        [IngestRequest(REAL_STACK, "lhdl-3155", "trabecular", "pristine", voxel_size_um=19.5)],
        root,
        progress=False,
    )
    cfg = dict(params["tile"], planes=["axial"])
    index = tile_dataset(root, tmp_path / "tiles", cfg, progress=False)
    assert (index["tile_px"] == 64).all() and (index["voxel_size_um"] == 20.0).all()
    assert index["damage_fraction"].isna().all()  # a real scan has no ground-truth mask
    assert (index["label"] == 0).all() and len(index) > 100
    assert index["bone_fraction"].between(0.02, 1).all()
    # 200 px at 19.5 um is 195 px at 20 um: a 3 x 3 grid of 64 px tiles per plane
    assert index.groupby("z").size().max() == 9
    assert pd.read_parquet(tmp_path / "tiles" / INDEX_NAME).equals(index)


# -- `bonedamage tile` on bad input: exit 2, the scan/setting and the problem, OUT untouched --
def _tiny_root(tmp_path: Path) -> Path:
    """A data root with one ingested 8 x 48 x 48 cortical scan (1.6 um voxels)."""
    import tifffile

    vol = np.random.default_rng(0).integers(1000, 50000, (8, 48, 48)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "scan.tif", vol, photometric="minisblack")
    root = tmp_path / "raw"
    request = IngestRequest(tmp_path / "scan.tif", "C1", "cortical", "pristine", voxel_size_um=1.6)
    ingest_scans([request], root, progress=False)
    return root


def _edit_manifest(root: Path, column: str, value: str) -> None:
    manifest = root / "manifest.csv"
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    table[column] = value
    table.to_csv(manifest, index=False)


def _bad_tile_input(case: str, root: Path, tile: dict) -> list[str]:
    """Break the data root or the settings; return what the error must say."""
    scan = root / "cortical" / "C1-pristine.tif"
    if case == "tile-larger-than-scan":
        tile["tile_um"] = {"cortical": 999.0, "trabecular": 320.0}
        return ["scan C1-pristine", str(scan), "624 px", "tile.tile_um cortical: 999 um",
                "larger than its 48x48 px axial planes"]  # fmt: skip
    if case == "empty-manifest":
        write_manifest(read_manifest(root).iloc[:0], root)
        return [str(root), "no scans to tile"]
    if case == "path-outside-data-root":
        _edit_manifest(root, "path", "../scan.tif")
        return ["manifest.csv", "scan C1-pristine: path", "'../scan.tif'", "escapes the data root"]
    if case == "unknown-tissue":
        _edit_manifest(root, "tissue", "femur")
        return ["manifest.csv", "unknown tissue", "femur"]
    if case == "truncated-scan":
        scan.write_bytes(scan.read_bytes()[:5000])
        return [str(scan), "truncated"]
    if case == "slice-stride-zero":
        tile["slice_stride"] = 0
        return ["params.yaml: tile.slice_stride: must be a positive integer, got 0"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "tile-larger-than-scan",
        "empty-manifest",
        "path-outside-data-root",
        "unknown-tissue",
        "truncated-scan",
        "slice-stride-zero",
    ],
)
def test_tile_command_refuses_bad_input_and_keeps_the_old_tiles(
    case: str, params: dict, tmp_path: Path, capsys
) -> None:
    import yaml

    from bonedamage.cli import main

    root = _tiny_root(tmp_path)
    tile = dict(params["tile"], tile_um={"cortical": 25.6, "trabecular": 320.0})
    fragments = _bad_tile_input(case, root, tile)
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(dict(params, pipeline=with_raw(params, root), tile=tile)))
    out = tmp_path / "tiles"
    out.mkdir()
    (out / INDEX_NAME).write_bytes(b"the tiles of the last good run")
    write_marker(out, "tile")  # written by tile: a later run may replace it
    before = digest(out)
    code = main(["tile", "--params", str(pfile), "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:"), err
    for fragment in fragments:
        assert fragment in err, err
    assert digest(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


# -- `bonedamage tile`: OUT is its own tile store, never the data root ----------------------
def _tile_params(params: dict, root: Path, tmp_path: Path) -> Path:
    import yaml

    tile = dict(params["tile"], tile_um={"cortical": 25.6, "trabecular": 320.0})
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(dict(params, pipeline=with_raw(params, root), tile=tile)))
    return pfile


@pytest.mark.parametrize("where", ["the-data-root", "inside-it", "around-it", "the-params"])
def test_tile_never_writes_over_or_around_the_data_root_even_with_force(
    where: str, params: dict, tmp_path: Path, capsys
) -> None:
    """Once: `tile --out DATA_ROOT` replaced the data root by the tiles, scans deleted."""
    from bonedamage.cli import main

    root = _tiny_root(tmp_path)
    pfile = _tile_params(params, root, tmp_path)
    out = {"the-data-root": root, "inside-it": root / "tiles", "around-it": tmp_path,
           "the-params": pfile}[where]  # fmt: skip
    before = digest(tmp_path)
    for force in ((), ("--force",)):
        code = main(["tile", "--params", str(pfile), "--no-progress", "--out", str(out), *force])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: {out}: output folder "), err
        assert "input" in err, err
        assert digest(tmp_path) == before
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".gitignore"]


def test_tile_replaces_only_its_own_tile_store(params: dict, tmp_path: Path, capsys) -> None:
    from bonedamage.cli import main

    root = _tiny_root(tmp_path)
    pfile = _tile_params(params, root, tmp_path)
    out = tmp_path / "tiles"
    out.mkdir()
    (out / "README.txt").write_text("my notes")
    args = ["tile", "--params", str(pfile), "--no-progress", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: exists and holds files that bonedamage did not write")
    assert sorted(p.name for p in out.iterdir()) == ["README.txt"]
    assert main([*args, "--force"]) == 0
    assert main(args) == 0  # its own store: replaced
    assert {MARKER, INDEX_NAME} <= {p.name for p in out.iterdir()}
    assert not (out / "README.txt").exists()
