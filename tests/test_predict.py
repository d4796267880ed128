"""Whole-scan prediction (explain/predict.py): same tiles as training, maps, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tifffile

from bonedamage.cli import main
from bonedamage.data.manifest import read_manifest
from bonedamage.data.tilestore import TileStore
from bonedamage.data.volume import write_volume
from bonedamage.explain import predict
from bonedamage.lifecycle.pyfunc import TileClassifier
from bonedamage.lifecycle.registry import tiling_info
from conftest import CHANNELS, RunsCode, write_tiny_models

TISSUE = "trabecular"


@pytest.fixture(scope="module")
def setup(learn_data, learn_params, tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("predict")
    store = TileStore(learn_data[0])
    tile_px = int(store.index["tile_px"].iloc[0])
    write_tiny_models(tmp / "models", TISSUE, seed=0, tile_px=tile_px)
    meta = json.loads((tmp / "models" / "cnn.json").read_text())
    model = TileClassifier()
    model.setup(
        meta,
        tiling_info(learn_params["tile"], TISSUE, tile_px, CHANNELS),
        tmp / "models" / "cnn.pt",
    )
    raw = learn_data[0].parent / "raw"
    manifest = read_manifest(raw)
    row = manifest[(manifest.tissue == TISSUE) & (manifest.state == "failed")].iloc[0]
    verdict = predict.predict_scan(model, raw / row.path, tmp / "out", progress=False)
    return {"tmp": tmp, "store": store, "model": model, "row": row, "scan": raw / row.path,
            "verdict": verdict}  # fmt: skip


def test_predict_classifies_exactly_the_training_tiles(setup) -> None:
    store, row, model = setup["store"], setup["row"], setup["model"]
    tiles = pd.read_csv(setup["tmp"] / "out" / "tiles.csv")
    ids = [
        f"{row.scan_id}/{p[0]}{i:04d}-{r:04d}-{c:04d}"
        for p, i, r, c in zip(tiles["plane"], tiles["index"], tiles["r"], tiles["c"], strict=True)
    ]
    index = store.index.reset_index(drop=True)
    scan_tiles = index[index.scan_id == row.scan_id]
    assert sorted(ids) == sorted(scan_tiles["tile_id"])  # the same grid and filters
    position = {t: i for i, t in enumerate(index["tile_id"])}
    raw = np.stack([store.raw(position[t]) for t in ids])
    lo, hi = scan_tiles[["norm_lo", "norm_hi"]].iloc[0]
    expected = model.failed_probability(raw, lo, hi)
    np.testing.assert_allclose(tiles["prob_failed"], expected, atol=2e-6)
    stored = index.loc[[position[t] for t in ids], ["z", "y", "x"]].to_numpy()
    np.testing.assert_array_equal(tiles[["z", "y", "x"]].to_numpy(), stored)


def test_verdict_follows_the_mean_rule_and_tables_agree(setup) -> None:
    out, verdict = setup["tmp"] / "out", setup["verdict"]
    tiles = pd.read_csv(out / "tiles.csv")
    assert verdict == json.loads((out / "verdict.json").read_text())
    assert verdict["mean_prob_failed"] == pytest.approx(tiles["prob_failed"].mean(), abs=1e-6)
    assert verdict["verdict"] == ("failed" if verdict["mean_prob_failed"] > 0.5 else "pristine")
    slices = pd.read_csv(out / "slices.csv")
    assert slices["n_tiles"].sum() == len(tiles) == verdict["n_tiles"]
    assert (out / "orthoviews.png").stat().st_size > 0


def test_probability_and_cam_stacks_carry_the_voxel_size(setup) -> None:
    out, verdict = setup["tmp"] / "out", setup["verdict"]
    tiles = pd.read_csv(out / "tiles.csv")
    for name in ("probability", "cam"):
        with tifffile.TiffFile(out / f"{name}.tif") as tif:
            ij = tif.imagej_metadata
            assert ij["unit"] == "um" and ij["images"] == verdict["n_pages"]
            assert ij["spacing"] == pytest.approx(4 * verdict["working_voxel_um"])
            x_res = tif.pages[0].tags["XResolution"].value
            assert x_res[1] / x_res[0] == pytest.approx(verdict["working_voxel_um"])
            assert tif.pages[0].dtype == np.float32
    prob = tifffile.imread(out / "probability.tif")
    first = tiles.iloc[0]
    page = first["index"] // verdict["slice_stride"]  # one page per sampled plane
    px = int(setup["store"].index["tile_px"].iloc[0])
    block = prob[page, first["r"] : first["r"] + px, first["c"] : first["c"] + px]
    np.testing.assert_allclose(block, first["prob_failed"], atol=2e-6)
    cam = tifffile.imread(out / "cam.tif")
    assert np.nanmin(cam) >= 0 and np.nanmax(cam) <= 1 and np.isfinite(cam).any()


def test_cam_layer_picks_the_grad_cam_target_and_a_wrong_name_is_refused(setup, tmp_path) -> None:
    from bonedamage.explain import gradcam

    model, scan = setup["model"], setup["scan"]
    out = tmp_path / "early"
    predict.predict_scan(model, scan, out, cam_layer="features.0", progress=False)
    tiles = pd.read_csv(out / "tiles.csv")
    cam = tifffile.imread(out / "cam.tif")
    first = tiles.iloc[0]
    page = first["index"] // setup["verdict"]["slice_stride"]
    px = model.tile_px
    got = cam[page, first["r"] : first["r"] + px, first["c"] : first["c"] + px]
    store, row = setup["store"], setup["row"]
    index = store.index.reset_index(drop=True)
    tile_id = (
        f"{row.scan_id}/{first['plane'][0]}{first['index']:04d}-{first['r']:04d}-{first['c']:04d}"
    )
    i = int(np.flatnonzero(index["tile_id"] == tile_id)[0])
    lo, hi = index.loc[i, ["norm_lo", "norm_hi"]]
    tile = ((store.raw(i).astype(np.float32) - np.float32(lo)) / np.float32(hi - lo))[None]
    early = gradcam.compute_cams(model.module, tile.astype(np.float32), layer="features.0")[0]
    last = gradcam.compute_cams(model.module, tile.astype(np.float32))[0]
    np.testing.assert_allclose(got, early, atol=1e-5)
    assert not np.allclose(early, last, atol=1e-3)  # the layer really changed the map
    with pytest.raises(predict.PredictError, match="has no layer 'nope'"):
        predict.predict_scan(model, scan, tmp_path / "bad", cam_layer="nope", progress=False)
    assert not (tmp_path / "bad").exists()


def test_bad_inputs_are_clear_errors_and_leave_nothing(
    setup, tmp_path: Path, capsys, cli_params: Path
) -> None:
    model, scan = setup["model"], setup["scan"]
    small = np.random.default_rng(0).integers(1000, 50000, (8, 8)).astype(np.uint16)
    tiny = tmp_path / "tiny.tif"
    write_volume(tiny, (small for _ in range(4)), (4, 8, 8), small.dtype, 20.0)
    with pytest.raises(Exception, match=r"tiny\.tif: tile of 16 px is larger"):
        predict.predict_scan(model, tiny, tmp_path / "o1", progress=False)
    assert not (tmp_path / "o1").exists()
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, np.zeros((4, 64, 64), np.uint16), photometric="minisblack")
    with pytest.raises(predict.PredictError, match="no voxel size"):
        predict.predict_scan(model, bare, tmp_path / "o2", progress=False)
    with pytest.raises(predict.PredictError, match="must be positive"):
        predict.predict_scan(model, scan, tmp_path / "o3", voxel_size_um=-1.0, progress=False)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(scan.read_bytes()[:5000])
    code = main(["predict", str(broken), "--model", "models:/x@champion", "--out",
                 str(tmp_path / "o4"), "--params", str(cli_params)])  # fmt: skip
    # (a scratch MLflow store: the repo's params.yaml would point MLflow, and through
    # MLFLOW_TRACKING_URI every later test of the session, at the repo's mlflow.db)
    assert code == 2 and not (tmp_path / "o4").exists()
    assert "models:/x@champion" in capsys.readouterr().err  # the model is loaded first
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir() if p.is_dir())


# -- `bonedamage predict` on bad input: exit 2, the file and the problem, OUT untouched ----
def _stack(path: Path, vol: np.ndarray, voxel_um: float | None = 20.0, **kw: Any) -> Path:
    meta = {} if voxel_um is None else {
        "imagej": True, "resolution": (1 / voxel_um, 1 / voxel_um),
        "metadata": {"spacing": voxel_um, "unit": "um"},
    }  # fmt: skip
    tifffile.imwrite(path, vol, **meta, **kw)
    return path


def _scan(dtype: str = "uint16") -> np.ndarray:
    return np.random.default_rng(0).integers(1000, 50000, (8, 64, 64)).astype(dtype)


def _missing(tmp: Path) -> tuple[Path, list[str]]:
    return tmp / "nope.tif", ["no such file or folder"]


def _rgb(tmp: Path) -> tuple[Path, list[str]]:
    rgb = np.repeat(_scan("uint8")[..., None], 3, axis=-1)
    return _stack(tmp / "rgb.tif", rgb, None, photometric="rgb"), ["RGB"]


def _single_slice(tmp: Path) -> tuple[Path, list[str]]:
    return _stack(tmp / "one.tif", _scan()[:1]), ["single 2D slice"]


def _truncated(tmp: Path) -> tuple[Path, list[str]]:
    path = _stack(tmp / "cut.tif", _scan())
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    return path, ["truncated"]


def _nan(tmp: Path) -> tuple[Path, list[str]]:
    vol = _scan("float32")
    vol[5, 30, 30] = np.nan
    return _stack(tmp / "nan.tif", vol), ["NaN values", "must be finite"]


def _zero_voxel(tmp: Path) -> tuple[Path, list[str]]:
    return _stack(tmp / "zero.tif", _scan()), ["voxel size 0.0 um", "must be positive"]


BAD_SCANS = {
    "missing-scan": _missing,
    "rgb-scan": _rgb,
    "single-slice": _single_slice,
    "truncated-scan": _truncated,
    "nan-scan": _nan,
    "zero-voxel-size": _zero_voxel,
}


@pytest.fixture(scope="module")
def local_model(params: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import save_tiny_pyfunc

    return save_tiny_pyfunc(tmp_path_factory.mktemp("local-model"), params)


def _run_predict(tmp_path: Path, scan: Path, model: Path, params: Path, *extra: str):
    out = tmp_path / "pred"
    out.mkdir(exist_ok=True)
    (out / "verdict.json").write_text('{"verdict": "from the last good run"}\n')
    argv = ["predict", str(scan), "--model", str(model), "--out", str(out), "--params",
            str(params), "--no-progress", "--no-cam", *extra]  # fmt: skip
    return main(argv), out


@pytest.mark.parametrize("case", list(BAD_SCANS))
def test_predict_command_refuses_bad_scans(case, local_model, cli_params, tmp_path, capsys):
    scan, fragments = BAD_SCANS[case](tmp_path)
    extra = ("--voxel-size-um", "0") if case == "zero-voxel-size" else ()
    code, out = _run_predict(tmp_path, scan, local_model, cli_params, *extra)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and str(scan) in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert sorted(p.name for p in out.iterdir()) == ["verdict.json"]  # the last run's output
    assert json.loads((out / "verdict.json").read_text()) == {"verdict": "from the last good run"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_predict_command_refuses_a_model_whose_weights_are_not_a_state_dict(
    params: dict, cli_params: Path, tmp_path: Path, capsys
) -> None:
    import torch

    from conftest import save_tiny_pyfunc

    evil = tmp_path / "evil.pt"
    torch.save({"w": RunsCode(tmp_path / "pwned")}, evil)
    model = save_tiny_pyfunc(tmp_path / "m", params, weights=evil)
    code, out = _run_predict(tmp_path, _stack(tmp_path / "scan.tif", _scan()), model, cli_params)
    err = capsys.readouterr().err
    assert code == 2 and "evil.pt: not a loadable state-dict file" in err, err
    assert "weights_only=True" in err
    assert not (tmp_path / "pwned").exists()
    assert sorted(p.name for p in out.iterdir()) == ["verdict.json"]
