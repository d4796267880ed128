"""Whole-scan damage maps with a segmentation model (explain/segment_scan.py): every plane
in the scan's grid, the microdamage report, the domain rules and bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from matplotlib.legend import Legend
from torch import nn

from bonedamage.atomic import OutputError
from bonedamage.cli import main
from bonedamage.data import damage
from bonedamage.data.morphometry import field_of_view, segment_bone
from bonedamage.data.tilestore import normalize
from bonedamage.data.tiling import TileSettings, fit_normalization, plane_reader, plane_tiles
from bonedamage.data.volume import open_volume, write_volume
from bonedamage.explain import segment_scan as seg
from bonedamage.explain.scan import PredictError
from bonedamage.learn.segmentation import build_segmenter
from bonedamage.learn.tiled_inference import segment_plane
from bonedamage.lifecycle.seg_pyfunc import TileSegmenter

ARCH = {"channels": [4, 8], "strides": [2], "num_res_units": 0, "dropout": 0.0}
CLASSES = ["background", "fracture", "buckled"]
VOXEL = 20.0
SHAPE = (24, 40, 36)  # z, y, x
FRACTURE, BUCKLED = 10000, 20000  # the grey values the oracle reads as damage


def _tiling(channels: int = 1, plane: str = "coronal") -> dict[str, Any]:
    return {"tissue": "trabecular", "tile_px": 16, "tile_um": 320.0, "working_voxel_um": VOXEL,
            "planes": [plane], "slice_stride": 4, "percentiles": [0.5, 99.5],
            "min_fov_fraction": 0.0, "min_bone_fraction": 0.0,
            "context_um": 40.0 if channels == 3 else 0.0, "channels": channels,
            "threshold": 0.5}  # fmt: skip


def _segmenter(
    tmp: Path,
    channels: int = 1,
    classes: list[str] = CLASSES,
    plane: str = "coronal",
    domain: tuple[dict, dict] | None = None,
) -> TileSegmenter:
    """A TileSegmenter with a tiny seeded U-Net, as the registry would load it."""
    torch.manual_seed(0)
    weights = tmp / f"unet-{channels}-{len(classes)}.pt"
    torch.save(build_segmenter(ARCH, channels, len(classes)).state_dict(), weights)
    meta = {"kind": "segmenter", "arch": ARCH, "tissue": "trabecular", "classes": classes,
            "tile_px": 16, "in_channels": channels}  # fmt: skip
    model = TileSegmenter()
    model.setup(meta, _tiling(channels, plane), weights, domain)
    return model


def _truth() -> tuple[np.ndarray, np.ndarray]:
    """(scan uint16, ground-truth labels) of a bone block in marrow inside a disc-shaped
    field of view (0 outside): a horizontal and a vertical fracture, a buckled region and
    a fracture speck too small to be a component; damage has its own grey values."""
    rng = np.random.default_rng(0)
    vol = 3000 + rng.normal(0, 300, SHAPE)
    vol[2:22, 8:32, 6:30] = 30000 + rng.normal(0, 300, (20, 24, 24))
    truth = np.zeros(SHAPE, np.uint8)
    truth[12, 10:30, 10:22] = 2  # horizontal: long axis along y, 90 deg to the load axis
    truth[4:20, 12:16, 25] = 2  # vertical: long axis along z
    truth[5, 28, 10:12] = 2  # a speck of 2 voxels
    truth[16:19, 20:26, 12:18] = 3
    vol[truth == 2], vol[truth == 3] = FRACTURE, BUCKLED
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    disc = np.hypot(yy - 19.5, xx - 17.5) <= 17.5
    vol[:, ~disc] = 0
    truth[:, ~disc] = 0
    return vol.astype(np.uint16), truth


class Oracle(nn.Module):
    """Reads the truth back from the grey values: one-hot logits per pixel (pointwise, so
    blending overlapping tiles changes nothing). A 1x1 conv gives the domain its features."""

    def __init__(self, lo: float, hi: float, channels: int = 1) -> None:
        super().__init__()
        self.in_channels = channels
        self.features = nn.Conv2d(channels, 2, 1)
        self.bands = [((v - 600 - lo) / (hi - lo), (v + 600 - lo) / (hi - lo))
                      for v in (FRACTURE, BUCKLED)]  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.features(x)
        v = x[:, x.shape[1] // 2]
        damage = [(v > a) & (v < b) for a, b in self.bands]
        one_hot = torch.stack([~(damage[0] | damage[1]), *damage], dim=1)
        return one_hot.float() * 20.0


def _write(path: Path, vol: np.ndarray, voxel: float = VOXEL) -> Path:
    write_volume(path, iter(vol), vol.shape, vol.dtype, voxel)
    return path


def _oracle(tmp: Path, vol: np.ndarray, channels: int = 1) -> TileSegmenter:
    model = _segmenter(tmp, channels)
    with open_volume(tmp / "scan.tif") as reader:
        norm = fit_normalization(reader, (0.5, 99.5), 1.0, "scan")
    model.module = Oracle(norm.lo, norm.hi, channels).eval()
    return model


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The oracle's damage maps of the truth scan, and what its figure was drawn from."""
    tmp = tmp_path_factory.mktemp("oracle")
    vol, truth = _truth()
    scan = _write(tmp / "scan.tif", vol)
    model = _oracle(tmp, vol)
    drawn = []
    figure = seg.damage_orthoviews_figure

    def keep(sections, verdict, report):
        drawn.append((sections, figure(sections, verdict, report)))
        return drawn[-1][1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(seg, "damage_orthoviews_figure", keep)
        verdict = seg.segment_scan(model, scan, tmp / "out", model_uri="models:/x-seg@champion",
                                   progress=False)  # fmt: skip
    return {"tmp": tmp, "vol": vol, "truth": truth, "scan": scan, "out": tmp / "out",
            "verdict": verdict, "drawn": drawn[0]}  # fmt: skip


# -- outputs: the scan's grid, every plane ------------------------------------------------
def test_maps_are_imagej_stacks_in_the_scans_grid_with_its_voxel_size(oracle_run) -> None:
    out = oracle_run["out"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        seg.OUTPUTS
    )
    for name in ("damage_probability", "labels"):
        with tifffile.TiffFile(out / f"{name}.tif") as tif:
            ij = tif.imagej_metadata
            assert ij["unit"] == "um" and ij["spacing"] == pytest.approx(VOXEL)
            assert ij["images"] == SHAPE[0]
            x_res = tif.pages[0].tags["XResolution"].value
            assert x_res[1] / x_res[0] == pytest.approx(VOXEL)
            stack = tif.asarray()
        assert stack.shape == SHAPE and stack.dtype == np.uint8
    with open_volume(out / "labels.tif") as back:  # the project's reader agrees
        assert back.shape == SHAPE and back.voxel_size_um == pytest.approx(VOXEL)


def test_the_oracle_gives_back_the_truth_on_every_plane(oracle_run) -> None:
    out, truth = oracle_run["out"], oracle_run["truth"]
    np.testing.assert_array_equal(tifffile.imread(out / "labels.tif"), truth)
    prob = tifffile.imread(out / "damage_probability.tif")
    assert prob.max() <= 100
    np.testing.assert_array_equal(prob >= 50, truth > 0)  # percent of P(any damage)


def test_every_plane_of_the_models_orientation_is_segmented_once(tmp_path, monkeypatch) -> None:
    vol, _ = _truth()
    scan = _write(tmp_path / "scan.tif", vol)
    model = _segmenter(tmp_path)
    seen: list[tuple[int, ...]] = []

    def counted(net, image, *args, **kwargs):
        seen.append(image.shape)
        return segment_plane(net, image, *args, **kwargs)

    monkeypatch.setattr(seg, "segment_plane", counted)
    seg.segment_scan(model, scan, tmp_path / "out", progress=False)
    assert seen == [(1, SHAPE[0], SHAPE[2])] * SHAPE[1]  # coronal planes (z, x), all 40


def test_each_page_holds_the_blended_tiles_of_its_plane(tmp_path) -> None:
    """Plane i of the stacks (along the model's plane normal) is segment_plane's answer on
    the scan's plane i, normalised with the scan's range; labels are the model's classes
    mapped to label values, the probability 1 - P(background) in percent."""
    vol, _ = _truth()
    scan = _write(tmp_path / "scan.tif", vol)
    model = _segmenter(tmp_path)
    seg.segment_scan(model, scan, tmp_path / "out", overlap=0.25, progress=False)
    labels = tifffile.imread(tmp_path / "out" / "labels.tif")
    prob = tifffile.imread(tmp_path / "out" / "damage_probability.tif")
    assert set(np.unique(labels)) <= {0, 2, 3}  # none, fracture, buckled: no microcrack class
    with open_volume(scan) as reader:
        norm = fit_normalization(reader, (0.5, 99.5), 1.0, "scan")
        _, read = plane_reader(reader, "coronal")
        for i in (0, 17, SHAPE[1] - 1):
            image = normalize(read(i), norm.lo, norm.hi)[None]
            probs = segment_plane(model.module, image, 16, 0.25, batch_size=64)
            np.testing.assert_array_equal(labels[:, i], np.array([0, 2, 3])[probs.argmax(0)])
            expected = np.rint(100 * (1 - probs[0]))
            assert np.abs(prob[:, i].astype(int) - expected).max() <= 1


def test_an_axial_model_segments_the_axial_planes(tmp_path, monkeypatch) -> None:
    vol, truth = _truth()
    scan = _write(tmp_path / "scan.tif", vol)
    model = _oracle(tmp_path, vol)
    model.tiling = _tiling(plane="axial")
    seen: list[tuple[int, ...]] = []

    def counted(net, image, *args, **kwargs):
        seen.append(image.shape)
        return segment_plane(net, image, *args, **kwargs)

    monkeypatch.setattr(seg, "segment_plane", counted)
    verdict = seg.segment_scan(model, scan, tmp_path / "out", progress=False)
    assert verdict["plane"] == "axial" and seen == [(1, SHAPE[1], SHAPE[2])] * SHAPE[0]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "labels.tif"), truth)


def test_a_2_5_d_model_sees_each_plane_between_its_context_planes(tmp_path, monkeypatch) -> None:
    vol, truth = _truth()
    scan = _write(tmp_path / "scan.tif", vol)
    model = _oracle(tmp_path, vol, channels=3)
    images: dict[int, np.ndarray] = {}

    def kept(net, image, *args, **kwargs):
        images[len(images)] = image
        return segment_plane(net, image, *args, **kwargs)

    monkeypatch.setattr(seg, "segment_plane", kept)
    seg.segment_scan(model, scan, tmp_path / "out", progress=False)
    with open_volume(scan) as reader:
        norm = fit_normalization(reader, (0.5, 99.5), 1.0, "scan")
    for i in (0, 10, SHAPE[1] - 1):  # context_um 40 at 20 um: 2 planes, clamped at the ends
        around = [vol[:, min(max(j, 0), SHAPE[1] - 1)] for j in (i - 2, i, i + 2)]
        np.testing.assert_array_equal(images[i], normalize(np.stack(around), norm.lo, norm.hi))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "labels.tif"), truth)


def test_a_finer_scan_is_segmented_at_the_working_voxel_and_mapped_back(
    tmp_path, monkeypatch
) -> None:
    """Declared at 10 um, the planes go to the model at the 20 um working voxel (half the
    pixels, as the tiles training cut) and the maps come back at the scan's 10 um grid."""
    vol, _ = _truth()
    fine = vol.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2)  # the scan at 10 um
    scan = _write(tmp_path / "scan.tif", fine, voxel=10.0)
    model = _segmenter(tmp_path)
    seen: list[np.ndarray] = []

    def kept(net, image, *args, **kwargs):
        seen.append(image)
        return segment_plane(net, image, *args, **kwargs)

    monkeypatch.setattr(seg, "segment_plane", kept)
    verdict = seg.segment_scan(model, scan, tmp_path / "out", progress=False)
    assert verdict["voxel_size_um"] == 10.0 and len(seen) == fine.shape[1]
    with open_volume(scan) as reader:
        norm = fit_normalization(reader, (0.5, 99.5), 0.5, "scan")
        _, read = plane_reader(reader, "coronal")
        settings = TileSettings(320.0, VOXEL, ("coronal",), 4, (0.5, 99.5), 0.0, 0.0)
        cut = plane_tiles(read(7), norm, settings)  # the tile stage's resampling
    assert seen[7].shape == (1, SHAPE[0], SHAPE[2])
    np.testing.assert_allclose(seen[7][0], normalize(cut.image, norm.lo, norm.hi), atol=1e-6)
    for name in ("damage_probability", "labels"):
        with tifffile.TiffFile(tmp_path / "out" / f"{name}.tif") as tif:
            assert tif.series[0].shape == fine.shape
            assert tif.imagej_metadata["spacing"] == pytest.approx(10.0)
    assert set(np.unique(tifffile.imread(tmp_path / "out" / "labels.tif"))) <= {0, 2, 3}


def test_model_classes_map_to_the_label_values_of_the_label_volumes() -> None:
    assert seg.label_values(["background", "microcrack", "fracture"]).tolist() == [0, 1, 2]
    assert seg.label_values(CLASSES).tolist() == [0, 2, 3]
    with pytest.raises(PredictError, match="background first"):
        seg.label_values(["background", "crack"])


# -- the microdamage report --------------------------------------------------------------
def _reference(vol: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    fov = field_of_view(vol)
    bone = segment_bone(vol, fov=fov)
    return damage.damage_measures(truth, bone, fov, VOXEL, min_voxels=8)


def test_report_counts_and_shapes_agree_with_damage_measures_on_the_truth(oracle_run) -> None:
    report = json.loads((oracle_run["out"] / "morphometry.json").read_text())
    expected = _reference(oracle_run["vol"], oracle_run["truth"])
    fracture = report["kinds"]["fracture"]
    assert fracture["count"] == expected["fracture_count"] == 2  # the speck is no component
    assert fracture["traces_per_mm2"] == pytest.approx(expected["fracture_traces_per_mm2"], 1e-3)
    for key in ("length_um", "width_um", "angle_deg"):
        name = "angle_to_load_axis_deg" if key == "angle_deg" else key
        for stat in ("p10", "median", "p90"):
            want = expected[f"fracture_{key}_{stat}"]
            assert fracture[name][stat] == pytest.approx(want, abs=2e-3), (key, stat)
    angles = fracture["angle_to_load_axis_deg"]
    assert angles["n"] == 2 and angles["p10"] < 10 and angles["p90"] > 80  # vertical, level
    assert fracture["voxels"] == int((oracle_run["truth"] == 2).sum())
    buckled = report["kinds"]["buckled"]
    shapes = damage.component_shapes(oracle_run["truth"] == 3, VOXEL, min_voxels=8)
    assert buckled["count"] == 1 and buckled["voxels"] == 3 * 6 * 6
    assert buckled["length_um"]["median"] == pytest.approx(shapes["length_um"][0], abs=2e-3)
    assert buckled["component_volume_mm3"]["median"] == pytest.approx(108 * VOXEL**3 * 1e-9)
    # bone: Otsu after smoothing as morphometry.segment_bone (in-plane here, in 3D there)
    share = expected["damaged_share_of_bone"]
    assert report["damaged_bone_fraction"] == pytest.approx(share, rel=0.05)
    bone_mm3 = fracture["count"] / expected["fracture_per_mm3_bone"]
    assert report["bone_volume_mm3"] == pytest.approx(bone_mm3, rel=0.05)
    assert fracture["per_mm3_bone"] == pytest.approx(expected["fracture_per_mm3_bone"], rel=0.05)


def test_the_damage_profile_runs_along_the_load_axis_slice_by_slice(oracle_run) -> None:
    out, truth = oracle_run["out"], oracle_run["truth"]
    profile = pd.read_csv(out / "profile.csv")
    assert profile["z"].tolist() == list(range(SHAPE[0]))
    assert profile["z_um"].tolist() == pytest.approx([z * VOXEL for z in range(SHAPE[0])])
    np.testing.assert_array_equal(profile["damaged_voxels"], (truth > 0).sum(axis=(1, 2)))
    np.testing.assert_array_equal(profile["fracture_voxels"], (truth == 2).sum(axis=(1, 2)))
    fraction = profile["damaged_voxels"] / profile["bone_voxels"].clip(lower=1)
    np.testing.assert_allclose(profile["damaged_fraction"], fraction, atol=1e-6)
    assert profile["damaged_fraction"].idxmax() == 12  # the horizontal fracture's slice
    report = json.loads((out / "morphometry.json").read_text())
    assert report["profile"]["damaged_fraction"] == pytest.approx(profile["damaged_fraction"])


def test_the_csv_report_is_the_json_report_flattened_to_one_row(oracle_run) -> None:
    out = oracle_run["out"]
    report = json.loads((out / "morphometry.json").read_text())
    (row,) = pd.read_csv(out / "morphometry.csv").to_dict("records")
    assert row["damaged_bone_fraction"] == pytest.approx(report["damaged_bone_fraction"])
    assert row["fracture_count"] == report["kinds"]["fracture"]["count"]
    assert row["buckled_length_um_median"] == pytest.approx(
        report["kinds"]["buckled"]["length_um"]["median"]
    )
    for kind in ("fracture", "buckled"):
        keys = ("count", "per_mm3_bone", "traces_per_mm2", "volume_mm3", "length_um_median",
                "width_um_p10", "angle_to_load_axis_deg_p90")  # fmt: skip
        assert all(f"{kind}_{key}" in row for key in keys)
    assert row["verdict"] == oracle_run["verdict"]["verdict"]


@pytest.mark.parametrize("density", [0.08, 0.25])
def test_streamed_components_are_the_26_connected_components_of_the_volume(density) -> None:
    """Diagonal neighbours across slices join, and so do pieces of one slice that meet
    only in another; a gap of one voxel separates."""
    rng = np.random.default_rng(3)
    mask = rng.random((12, 20, 20)) < density
    stream = seg._Components(1)
    for z, part in enumerate(mask):
        stream.add(z, part, 1.0)
    got = stream.shapes(2.0, 1)
    want = damage.component_shapes(mask, 2.0, min_voxels=1)
    order_got = np.lexsort([got["length_um"], got["voxels"]])
    order_want = np.lexsort([want["length_um"], want["voxels"]])
    for key in ("voxels", "length_um", "width_um", "angle_deg"):
        np.testing.assert_allclose(got[key][order_got], want[key][order_want], atol=1e-6)
    assert np.mean(stream.traces) == pytest.approx(
        damage.traces_per_mm2(mask, np.ones_like(mask), np.sqrt(1e6 / 400))
    )


# -- verdict and figure -------------------------------------------------------------------
def test_verdict_names_the_kind_classes_and_domain(oracle_run) -> None:
    verdict = oracle_run["verdict"]
    assert verdict == json.loads((oracle_run["out"] / "verdict.json").read_text())
    assert verdict["kind"] == "segmentation" and verdict["classes"] == CLASSES
    assert verdict["label_values"] == {"background": 0, "fracture": 2, "buckled": 3}
    assert verdict["n_planes"] == SHAPE[1] and verdict["plane"] == "coronal"
    # the oracle's model carries no domain: never a confident map
    assert verdict["verdict"] == "uncertain" and verdict["out_of_domain_share"] is None
    assert verdict["domain_reasons"] == [
        "the model carries no applicability domain: re-register it"
    ]
    assert verdict["counts"] == {"fracture": 2, "buckled": 1}
    tiles = pd.read_csv(oracle_run["out"] / "tiles.csv")
    assert sorted(tiles["index"].unique()) == list(range(0, SHAPE[1], 4))  # every 4th plane


def _texts(fig) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def test_orthoviews_show_the_labels_over_the_scan_in_three_sections(oracle_run) -> None:
    sections, fig = oracle_run["drawn"]
    truth, verdict = oracle_run["truth"], oracle_run["verdict"]
    cz, cy, cx = sections.centre
    assert (cz, cy, cx) == (12, 20, 18)
    np.testing.assert_array_equal(sections.labels[0], truth[cz])
    np.testing.assert_array_equal(sections.labels[1], truth[:, cy])
    np.testing.assert_array_equal(sections.labels[2], truth[:, :, cx])
    assert all((s >= 0).all() and (s <= 1).all() for s in sections.scan)
    texts = _texts(fig)
    assert "scan.tif: damage map, verdict uncertain" in texts
    words = " ".join(texts)
    assert "fracture: 2 components (" in words and "models:/x-seg@champion" in words
    axial, coronal, sagittal = (ax for ax in fig.axes if ax.images)
    assert (axial.get_xlabel(), axial.get_ylabel()) == ("x (µm)", "y (µm)")
    assert (coronal.get_xlabel(), coronal.get_ylabel()) == ("x (µm)", "z (µm, load axis)")
    assert (sagittal.get_xlabel(), sagittal.get_ylabel()) == ("y (µm)", "z (µm, load axis)")
    assert axial.get_title() == "axial section at z = 240 µm"
    assert axial.images[0].get_extent() == pytest.approx((-10, 710, 790, -10))  # um
    grey, marks = coronal.images
    assert grey.get_cmap().name == "gray"
    colours = marks.get_cmap()(np.array([0, 2, 3]) / 255)  # none: clear; kinds: translucent
    assert colours[0, 3] == 0 and (colours[1:, 3] > 0.3).all() and (colours[1:, 3] < 1).all()
    legend = " ".join(t.get_text() for lg in fig.findobj(Legend) for t in lg.get_texts())
    assert "fracture" in legend and "buckled" in legend and "microcrack" not in legend
    assert (oracle_run["out"] / "orthoviews.png").read_bytes()[:4] == b"\x89PNG"
    assert verdict["verdict"] == "uncertain"


def test_reduced_views_keep_thin_cracks_visible() -> None:
    labels = np.zeros((9, 9), np.uint8)
    labels[4, :] = 1  # a one-voxel crack
    assert (seg._reduce(labels, 3, "max")[1] == 1).all()
    assert seg._reduce(np.ones((9, 9)), 3, "mean").shape == (3, 3)


# -- the applicability domain --------------------------------------------------------------
def _domain(model: TileSegmenter, **changes: Any) -> tuple[dict, dict]:
    """A domain fitted on random tiles, accepting every tile unless ``changes`` say."""
    from bonedamage.learn import domain as appdomain

    tiles = np.random.default_rng(0).random((64, 16, 16), dtype=np.float32)
    features = appdomain.penultimate_features(model.module, tiles)
    intensity = appdomain.intensity_stats(tiles)
    summary, arrays = appdomain.calibrate(
        features, np.arange(64) % 2, intensity, features, intensity, 0.95
    )
    wide = {**summary["intensity"], "lo": [-1e9] * 2, "hi": [1e9] * 2}
    summary.update(threshold=1e12, intensity=wide, max_voxel_ratio=1.5,
                   max_out_of_domain_share=0.25)  # fmt: skip
    summary.update(changes)
    return summary, arrays


def test_a_scan_inside_the_domain_is_mapped_and_its_tiles_flagged(tmp_path) -> None:
    vol, _ = _truth()
    scan = _write(tmp_path / "scan.tif", vol)
    bare = _segmenter(tmp_path)
    model = _segmenter(tmp_path, domain=_domain(bare))
    verdict = seg.segment_scan(model, scan, tmp_path / "out", progress=False)
    assert verdict["verdict"] == "mapped" and verdict["in_domain"] is True
    assert verdict["out_of_domain_share"] == 0.0 and verdict["domain_reasons"] == []
    tiles = pd.read_csv(tmp_path / "out" / "tiles.csv")
    assert tiles["in_domain"].eq(1).all() and tiles["domain_distance"].notna().all()
    assert tiles["max_prob_damage"].between(0, 1).all()


def test_a_scan_mostly_outside_the_domain_is_uncertain(tmp_path) -> None:
    vol, _ = _truth()
    scan = _write(tmp_path / "scan.tif", vol)
    model = _segmenter(tmp_path, domain=_domain(_segmenter(tmp_path), threshold=-1.0))
    verdict = seg.segment_scan(model, scan, tmp_path / "out", progress=False)
    assert verdict["verdict"] == "uncertain" and verdict["out_of_domain_share"] == 1.0
    assert "100% of the tiles are outside the model's domain" in verdict["domain_reasons"][0]
    assert (tmp_path / "out" / "labels.tif").is_file()  # the maps are written all the same


def test_a_scan_coarser_than_the_domain_allows_is_refused_unless_resampling_is_allowed(
    tmp_path,
) -> None:
    vol, _ = _truth()
    scan = _write(tmp_path / "scan.tif", vol)
    model = _segmenter(tmp_path, domain=_domain(_segmenter(tmp_path)))
    with pytest.raises(PredictError) as err:
        seg.segment_scan(model, scan, tmp_path / "out", voxel_size_um=50.0, progress=False)
    message = str(err.value)
    assert str(scan) in message and "50 um is 2.5x coarser" in message
    assert "working voxel 20 um" in message and "--allow-resample" in message
    assert not (tmp_path / "out").exists()
    verdict = seg.segment_scan(model, scan, tmp_path / "out", voxel_size_um=50.0,
                               allow_resample=True, progress=False)  # fmt: skip
    assert verdict["verdict"] == "uncertain" and "2.5x coarser" in verdict["domain_reasons"][0]
    assert tifffile.imread(tmp_path / "out" / "labels.tif").shape == SHAPE


# -- bad input: clear errors, nothing half-written ---------------------------------------
def test_an_output_folder_holding_foreign_files_is_refused_without_force(tmp_path) -> None:
    vol, _ = _truth()
    scan = _write(tmp_path / "scan.tif", vol)
    model = _segmenter(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(OutputError, match="did not write"):
        seg.segment_scan(model, scan, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    seg.segment_scan(model, scan, out, progress=False, force=True)
    assert not (out / "notes.txt").exists() and (out / "labels.tif").is_file()
    seg.segment_scan(model, scan, out, progress=False)  # its own output: replaced


def test_a_failure_midway_leaves_the_last_output_and_no_temporary_files(
    tmp_path, monkeypatch
) -> None:
    vol, _ = _truth()
    scan = _write(tmp_path / "scan.tif", vol)
    model = _segmenter(tmp_path)
    out = tmp_path / "out"
    seg.segment_scan(model, scan, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("device lost")
        return segment_plane(*args, **kwargs)

    monkeypatch.setattr(seg, "segment_plane", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        seg.segment_scan(model, scan, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_scans_and_options_are_refused_naming_the_problem(tmp_path) -> None:
    vol, _ = _truth()
    model = _segmenter(tmp_path)
    scan = _write(tmp_path / "scan.tif", vol)
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, vol, photometric="minisblack")
    with pytest.raises(PredictError, match=r"bare\.tif: no voxel size"):
        seg.segment_scan(model, bare, tmp_path / "o", progress=False)
    one = _write(tmp_path / "one.tif", vol[:1])
    with pytest.raises(PredictError, match=r"one\.tif: a single 2D slice"):
        seg.segment_scan(model, one, tmp_path / "o", progress=False)
    nan = vol.astype(np.float32)
    nan[3, 20, 20] = np.nan
    with pytest.raises(ValueError, match=r"nan\.tif: contains NaN values"):
        seg.segment_scan(model, _write(tmp_path / "nan.tif", nan), tmp_path / "o", progress=False)
    small = _write(tmp_path / "small.tif", vol[:, :10, :10])
    with pytest.raises(ValueError, match=r"small\.tif: tile of 16 px is larger"):
        seg.segment_scan(model, small, tmp_path / "o", progress=False)
    with pytest.raises(PredictError, match=r"overlap 1\.0: must be in \[0, 1\)"):
        seg.segment_scan(model, scan, tmp_path / "o", overlap=1.0, progress=False)
    assert not (tmp_path / "o").exists()


# -- `bonedamage predict` with a logged segmentation model ---------------------------------
def _save_pyfunc(tmp: Path) -> Path:
    """A segmentation pyfunc saved as registration logs a model (model from code, weights
    and sidecars as artifacts), without a tracking store."""
    import mlflow

    from bonedamage.lifecycle.seg_pyfunc import MODEL_CODE

    tmp.mkdir()
    model = _segmenter(tmp)
    weights = next(tmp.glob("unet-*.pt"))
    (tmp / "meta.json").write_text(json.dumps(model.meta))
    (tmp / "tiling.json").write_text(json.dumps(model.tiling))
    artifacts = {"weights": str(weights), "meta": str(tmp / "meta.json"),
                 "tiling": str(tmp / "tiling.json")}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mlflow.pyfunc.save_model(str(tmp / "model"), python_model=str(MODEL_CODE),
                                 artifacts=artifacts, pip_requirements=[])  # fmt: skip
    return tmp / "model"


def test_predict_command_detects_a_segmentation_model_and_runs_from_any_folder(
    tmp_path, monkeypatch, capsys
) -> None:
    model = _save_pyfunc(tmp_path / "m")
    vol, _ = _truth()
    scan = _write(tmp_path / "scan.tif", vol)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no params.yaml here; relative paths
    argv = ["predict", "../scan.tif", "--model", str(model), "--out", "maps", "--no-progress",
            "--overlap", "0.25", "--batch-size", "7"]  # fmt: skip
    assert main(argv) == 0
    verdict = json.loads((elsewhere / "maps" / "verdict.json").read_text())
    assert verdict["kind"] == "segmentation" and verdict["overlap"] == 0.25
    assert verdict["model"] == str(model)
    said = capsys.readouterr().out
    assert "../scan.tif: damage map uncertain (damaged bone fraction" in said
    assert "outside the model's domain: the model carries no applicability domain" in said
    assert tifffile.imread(elsewhere / "maps" / "labels.tif").shape == SHAPE
    assert main(["predict", str(scan), "--model", str(model), "--out", "cam",
                 "--cam-layer", "model.0"]) == 2  # fmt: skip
    assert main(["predict", str(scan), "--model", str(model), "--out", "o2",
                 "--overlap", "1.5"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "has no Grad-CAM" in err and "overlap 1.5: must be in [0, 1)" in err
    assert not (elsewhere / "cam").exists() and not (elsewhere / "o2").exists()


def test_the_report_counts_only_components_of_the_smallest_size_asked_for(oracle_run) -> None:
    """--min-component-voxels: a larger minimum drops the 108-voxel buckled region from the
    counts, not from the voxels, and the report says which minimum it used."""
    tmp = oracle_run["tmp"]
    model = _oracle(tmp, oracle_run["vol"])
    seg.segment_scan(model, oracle_run["scan"], tmp / "big", progress=False,
                     min_component_voxels=109)  # fmt: skip
    report = json.loads((tmp / "big" / "morphometry.json").read_text())
    assert report["min_component_voxels"] == 109
    assert report["kinds"]["buckled"]["count"] == 0
    assert report["kinds"]["buckled"]["voxels"] == 3 * 6 * 6
    with pytest.raises(PredictError, match="min_component_voxels 0: must be at least 1"):
        seg.segment_scan(model, oracle_run["scan"], tmp / "none", progress=False,
                         min_component_voxels=0)  # fmt: skip
