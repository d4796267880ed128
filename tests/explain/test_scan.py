"""Whole-scan prediction (explain/scan.py): same tiles as training, maps, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tifffile
from matplotlib.legend import Legend

from bonedamage.cli import main
from bonedamage.data.manifest import read_manifest
from bonedamage.data.tilestore import TileStore
from bonedamage.data.volume import write_volume
from bonedamage.explain import scan as predict
from bonedamage.lifecycle.pyfunc import TileClassifier
from bonedamage.lifecycle.registry import Candidate, fit_domain, tiling_info
from conftest import CHANNELS, RunsCode, write_tiny_models

TISSUE = "trabecular"


@pytest.fixture(scope="module")
def setup(learn_data, learn_params, tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("predict")
    store = TileStore(learn_data[0])
    tile_px = int(store.index["tile_px"].iloc[0])
    write_tiny_models(tmp / "models", TISSUE, seed=0, tile_px=tile_px)
    meta = json.loads((tmp / "models" / "cnn.json").read_text())
    tiling = tiling_info(learn_params["tile"], TISSUE, tile_px, CHANNELS)
    cand = Candidate("tiny", "cnn", "cnn", tmp / "models" / "cnn.pt", meta, {})
    table = pd.read_parquet(learn_data[1])
    domain = fit_domain(cand, store, table, tiling, learn_params["domain"])
    model = TileClassifier()
    model.setup(meta, tiling, tmp / "models" / "cnn.pt", domain)
    raw = learn_data[0].parent / "raw"
    manifest = read_manifest(raw)
    row = manifest[(manifest.tissue == TISSUE) & (manifest.state == "failed")].iloc[0]
    drawn = []  # what orthoviews.png was drawn from, and the figure

    def keep(sections, verdict, settings=None):
        drawn.append((sections, verdict, figure(sections, verdict, settings)))
        return drawn[-1][2]

    figure = predict.orthoviews_figure
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict, "orthoviews_figure", keep)
        verdict = predict.predict_scan(model, raw / row.path, tmp / "out", progress=False)
    return {"tmp": tmp, "store": store, "model": model, "row": row, "scan": raw / row.path,
            "verdict": verdict, "orthoviews": drawn[0]}  # fmt: skip


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


def _texts(fig) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def test_orthoviews_show_the_scan_under_the_probability_map_of_the_prediction(setup) -> None:
    """orthoviews.png is drawn from the probability stack written beside it, over the
    scan's own planes (normalised as the tiles), titled with the scan and the verdict."""
    sections, verdict, fig = setup["orthoviews"]
    out, store, row = setup["tmp"] / "out", setup["store"], setup["row"]
    assert verdict == json.loads((out / "verdict.json").read_text())
    prob = tifffile.imread(out / "probability.tif")
    n, h, w = prob.shape
    np.testing.assert_array_equal(sections.prob[0], prob[n // 2])
    np.testing.assert_array_equal(sections.prob[1], prob[:, h // 2])
    np.testing.assert_array_equal(sections.prob[2], prob[:, :, w // 2])
    # the scan under the middle page: the tiles of that plane, normalised and clipped
    tiles = pd.read_csv(out / "tiles.csv")
    stride, px = verdict["slice_stride"], int(store.index["tile_px"].iloc[0])
    first = tiles[tiles["index"] == (n // 2) * stride].iloc[0]
    index = store.index.reset_index(drop=True)
    tile_id = (
        f"{row.scan_id}/{first['plane'][0]}{first['index']:04d}-{first['r']:04d}-{first['c']:04d}"
    )
    i = int(np.flatnonzero(index["tile_id"] == tile_id)[0])
    lo, hi = index.loc[i, ["norm_lo", "norm_hi"]]
    raw = store.raw(i)
    middle = raw[raw.shape[0] // 2] if raw.ndim == 3 else raw  # 2.5-D: the tiled plane
    tile = np.clip((middle - np.float32(lo)) / np.float32(hi - lo), 0, 1)
    block = sections.scan[0][first["r"] : first["r"] + px, first["c"] : first["c"] + px]
    np.testing.assert_allclose(block, tile, atol=1e-5)
    texts = _texts(fig)
    assert f"{setup['scan'].name}: verdict {verdict['verdict']}" in texts
    assert any(f"mean p(failed) {verdict['mean_prob_failed']:.2f}" in t for t in texts)
    assert all(np.isfinite(s).all() for s in sections.scan)
    assert (out / "orthoviews.png").read_bytes()[:4] == b"\x89PNG"


def _sections(prob_value: float = 0.8) -> predict.Sections:
    """A coronal prediction of 6 pages of 40 x 50 px: a bright left half of the scan, tiles
    (p = ``prob_value``) on the top 20 rows only."""
    sections = predict.Sections.empty("coronal", (6, 40, 50), spacing=160.0, pixel=20.0)
    image = np.zeros((40, 50), np.float32)
    image[:, :25] = 1.0
    stack = np.full((6, 40, 50), np.nan, np.float32)
    stack[:, :20] = prob_value
    for page in range(6):
        sections.record(page, image)
    sections.probability(stack)
    return sections


VERDICT = {
    "scan": "/data/scans/specimen-7.tif", "model": "models:/bonedamage-trabecular@champion",
    "tissue": "trabecular", "verdict": "uncertain", "model_call": "failed",
    "rule": "failed when the mean tile probability > 0.5", "mean_prob_failed": 0.8,
    "failed_tile_share": 1.0, "n_tiles": 30, "plane": "coronal", "tile_um": 320.0,
    "working_voxel_um": 20.0, "slice_stride": 8, "voxel_size_um": 20.0,
    "domain_reasons": ["the scan's voxel size 40 um is 2.0x coarser than the model's"],
}  # fmt: skip


def test_orthoviews_name_the_scan_the_verdict_the_axes_and_the_colours() -> None:
    fig = predict.orthoviews_figure(_sections(), VERDICT)
    texts = _texts(fig)
    assert "specimen-7.tif: verdict uncertain" in texts
    words = " ".join(texts)
    assert "the model's own call: failed, mean p(failed) 0.80 over 30 tiles" in words
    assert "uncertain: the scan's voxel size 40 um is 2.0x coarser" in words
    assert "models:/bonedamage-trabecular@champion" in words
    page, rows, cols = (ax for ax in fig.axes if ax.images)
    # coronal pages lie along y; a page holds z (rows) and x (columns)
    assert (page.get_xlabel(), page.get_ylabel()) == ("x (µm)", "z (µm, load axis)")
    assert (rows.get_xlabel(), rows.get_ylabel()) == ("x (µm)", "y (µm)")
    assert (cols.get_xlabel(), cols.get_ylabel()) == ("z (µm, load axis)", "y (µm)")
    assert page.get_title() == "coronal plane at y = 480 µm"  # page 3 of 6, 160 um apart
    assert (
        rows.get_title() == "section at z = 400 µm" and cols.get_title() == "section at x = 500 µm"
    )
    # ticks in um: 50 px at 20 um across, 6 pages 160 um apart down the sections
    assert page.images[0].get_extent() == pytest.approx((-10, 990, 790, -10))
    assert rows.images[0].get_extent() == pytest.approx((-10, 990, 880, -80))
    assert cols.images[0].get_extent() == pytest.approx((-10, 790, 880, -80))
    (bar,) = [ax for ax in fig.axes if not ax.images]
    assert bar.get_ylabel().startswith("p(failed) of the tile")
    legend = " ".join(t.get_text() for lg in fig.findobj(Legend) for t in lg.get_texts())
    assert "no tile; outside the field of view" in legend and "p(failed)" in legend


def test_orthoviews_put_the_scan_under_a_translucent_map_and_fade_the_untiled_part() -> None:
    fig = predict.orthoviews_figure(_sections(), {**VERDICT, "verdict": "failed"})
    page = next(ax for ax in fig.axes if ax.images)
    scan, prob, fade = page.images
    assert scan.get_cmap().name == "gray" and 0.2 <= prob.get_alpha() <= 0.7
    alpha = np.asarray(fade.get_array())[..., 3]
    assert (alpha[:20] == 0).all() and (alpha[20:] > 0).all()  # untiled rows only
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float).mean(axis=2)
    x0, y0, x1, y1 = page.get_window_extent().extents.round().astype(int)
    h = rgb.shape[0]
    view = rgb[h - y1 + 2 : h - y0 - 2, x0 + 2 : x1 - 2]
    top = view[: view.shape[0] // 3]  # tiled: p(failed) over the scan
    left, right = top[:, : top.shape[1] // 3], top[:, -top.shape[1] // 3 :]
    assert left.mean() > right.mean() + 60  # the bright half shows through the map
    assert "specimen-7.tif: verdict failed" in _texts(fig)
    again = predict.orthoviews_figure(_sections(), {**VERDICT, "verdict": "failed"})
    again.canvas.draw()
    assert np.array_equal(np.asarray(again.canvas.buffer_rgba())[..., :3].mean(axis=2), rgb)


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
    with pytest.raises(predict.PredictError, match=r"508000 um is outside 0\.1 um-1 mm"):
        predict.predict_scan(model, scan, tmp_path / "o3", voxel_size_um=508000, progress=False)
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


# -- the applicability domain: never a confident answer outside it ------------------------
def _with_domain(model: TileClassifier, **changes: Any) -> TileClassifier:
    """A copy of ``model`` whose domain summary has ``changes``."""
    other = TileClassifier()
    other.meta, other.tiling, other.module = model.meta, model.tiling, model.module
    other.domain, other.domain_arrays = {**model.domain, **changes}, model.domain_arrays
    return other


def test_every_tile_gets_a_domain_distance_and_the_verdict_says_the_share_outside(setup) -> None:
    out, verdict, model = setup["tmp"] / "out", setup["verdict"], setup["model"]
    tiles = pd.read_csv(out / "tiles.csv")
    assert tiles["domain_distance"].notna().all() and set(tiles["in_domain"]) <= {0, 1}
    inside = tiles["domain_distance"] <= model.domain["threshold"]
    assert (tiles["in_domain"].astype(bool) <= inside).all()  # in domain: close enough, and
    assert tiles["in_domain"].mean() > 0.5  # (intensity inside the range) most phantom tiles
    assert verdict["out_of_domain_share"] == pytest.approx(1 - tiles["in_domain"].mean(), abs=1e-6)
    assert verdict["verdict"] in ("failed", "pristine") and verdict["in_domain"] is True
    assert verdict["domain_reasons"] == [] and verdict["model_call"] == verdict["verdict"]


def test_the_domain_threshold_accepts_the_calibrated_share_of_validation_tiles(
    setup, learn_data, learn_params
) -> None:
    from bonedamage.learn import domain
    from bonedamage.learn.datasets import split_rows

    model, store = setup["model"], setup["store"]
    summary = model.domain
    assert summary["method"] == domain.METHOD and summary["tissue"] == TISSUE
    assert summary["accept"] == learn_params["domain"]["accept"]
    val, _ = split_rows(store, pd.read_parquet(learn_data[1]), TISSUE, "grouped", "val")
    tiles = store.tiles(val)
    features = domain.penultimate_features(model.module, tiles)
    _, inside = domain.in_domain(
        summary, model.domain_arrays, features, domain.intensity_stats(tiles)
    )
    assert inside.mean() == pytest.approx(summary["val_accepted"], abs=1e-6)
    by_distance = domain.score(model.domain_arrays, features) <= summary["threshold"]
    assert by_distance.mean() >= summary["accept"]  # the feature threshold's calibration
    assert summary["accept"] - 0.1 <= inside.mean()  # about accept, intensity included
    flat = np.full_like(tiles[:4], 0.5)  # constant tiles: no training tile looks like that
    _, flat_inside = domain.in_domain(
        summary, model.domain_arrays, domain.penultimate_features(model.module, flat),
        domain.intensity_stats(flat),
    )  # fmt: skip
    assert not flat_inside.any()


def test_a_scan_mostly_outside_the_domain_is_uncertain_never_failed_or_pristine(
    setup, tmp_path
) -> None:
    strict = _with_domain(setup["model"], threshold=-1.0)  # no tile is close enough
    verdict = predict.predict_scan(strict, setup["scan"], tmp_path / "o", cam=False, progress=False)
    assert verdict["verdict"] == "uncertain" and verdict["out_of_domain_share"] == 1.0
    assert verdict["model_call"] in ("failed", "pristine")
    assert "100% of the tiles are outside the model's domain" in verdict["domain_reasons"][0]
    assert pd.read_csv(tmp_path / "o" / "tiles.csv")["in_domain"].eq(0).all()


def test_a_model_without_a_domain_never_gives_a_confident_verdict(setup, tmp_path) -> None:
    bare = _with_domain(setup["model"])
    bare.domain = bare.domain_arrays = None
    verdict = predict.predict_scan(bare, setup["scan"], tmp_path / "o", cam=False, progress=False)
    assert verdict["verdict"] == "uncertain"
    assert verdict["domain_reasons"] == [
        "the model carries no applicability domain: re-register it"
    ]
    assert pd.read_csv(tmp_path / "o" / "tiles.csv")["in_domain"].isna().all()


def test_a_scan_coarser_than_the_domain_allows_is_refused_naming_both_voxel_sizes(
    setup, tmp_path
) -> None:
    model, scan = setup["model"], setup["scan"]
    with pytest.raises(predict.PredictError) as err:
        predict.predict_scan(model, scan, tmp_path / "o", voxel_size_um=50.0, progress=False)
    message = str(err.value)
    assert str(scan) in message and "50 um is 2.5x coarser" in message
    assert "working voxel 20 um" in message and "--allow-resample" in message
    assert not (tmp_path / "o").exists()
    verdict = predict.predict_scan(model, scan, tmp_path / "o", voxel_size_um=50.0,
                                   allow_resample=True, cam=False, progress=False)  # fmt: skip
    assert verdict["verdict"] == "uncertain" and verdict["in_domain"] is False
    assert "2.5x coarser" in verdict["domain_reasons"][0]
    # within the ratio (1.5x): resampled as before, no refusal
    ok = predict.predict_scan(model, scan, tmp_path / "ok", voxel_size_um=28.0, cam=False,
                              progress=False)  # fmt: skip
    assert not any("coarser" in r for r in ok["domain_reasons"])


def test_stacks_of_a_scan_at_another_voxel_carry_the_real_page_spacing(setup, tmp_path) -> None:
    model, scan = setup["model"], setup["scan"]
    # the same scan declared at 10 um: resampled 2x down in-plane to the 20 um working voxel
    verdict = predict.predict_scan(model, scan, tmp_path / "o", voxel_size_um=10.0, progress=False)
    stride = verdict["slice_stride"]
    native = tifffile.imread(setup["tmp"] / "out" / "probability.tif").shape[1:]
    for name in ("probability", "cam"):
        with tifffile.TiffFile(tmp_path / "o" / f"{name}.tif") as tif:
            assert tif.imagej_metadata["spacing"] == pytest.approx(stride * 10.0)  # pages
            x_res = tif.pages[0].tags["XResolution"].value
            assert x_res[1] / x_res[0] == pytest.approx(20.0)  # map pixels: the working voxel
            assert tif.pages[0].shape == tuple(n // 2 for n in native)  # 2x fewer pixels


def test_outputs_far_larger_than_the_scan_are_refused_before_any_work(setup, tmp_path) -> None:
    model, scan = setup["model"], setup["scan"]
    est = setup["verdict"]["estimate"]
    with tifffile.TiffFile(scan) as tif:
        assert est["scan_bytes"] == tif.series[0].size * tif.series[0].dtype.itemsize
    n_pages = setup["verdict"]["n_pages"]
    assert est["output_bytes"] == 2 * n_pages * (
        tifffile.imread(setup["tmp"] / "out" / "probability.tif")[0].size * 4
    )
    assert est["tiles"] >= setup["verdict"]["n_tiles"]  # before the field-of-view filters
    with pytest.raises(predict.PredictError, match=r"MiB of maps, over 10x the scan's .* --force"):
        predict.predict_scan(model, scan, tmp_path / "o", voxel_size_um=400.0,
                             allow_resample=True, progress=False)  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_predict_runs_from_any_folder_with_only_the_model(
    params, tmp_path, monkeypatch, capsys
) -> None:
    from conftest import save_tiny_pyfunc

    model = save_tiny_pyfunc(tmp_path / "m", params, domain=True)
    vol = np.random.default_rng(1).integers(1000, 50000, (48, 48, 48)).astype(np.uint16)
    scan = _stack(tmp_path / "scan.tif", vol)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no params.yaml here
    assert (
        main(["predict", str(scan), "--model", str(model), "--out", "pred", "--no-progress"]) == 0
    )
    verdict = json.loads((elsewhere / "pred" / "verdict.json").read_text())
    assert verdict["verdict"] in ("failed", "pristine") and verdict["in_domain"] is True
    capsys.readouterr()
    argv = ["predict", str(scan), "--model", str(model), "--out", "coarse", "--no-progress",
            "--no-cam", "--voxel-size-um", "50", "--allow-resample"]  # fmt: skip
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert ": uncertain (" in said and "outside the model's domain: " in said
    assert "50 um is 2.5x coarser than the model's working voxel 20 um" in said
    assert main(["predict", str(scan), "--model", str(model), "--out", "p2", "--params",
                 "missing.yaml"]) == 2  # fmt: skip
