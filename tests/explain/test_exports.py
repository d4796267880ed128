"""The explain stage (stages/explain.py, explain/exports.py): CAM exports aligned with their
tiles, metrics."""

from __future__ import annotations

import copy
import json
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import tifffile
from matplotlib.text import Text

from bonedamage.data.tilestore import TileStore
from bonedamage.explain import exports as report
from bonedamage.explain import gradcam
from bonedamage.learn.models import build_module
from bonedamage.lifecycle import tracking
from bonedamage.stages.explain import run_explain
from conftest import tiny_metrics, write_params, write_tiny_models

TISSUE = "trabecular"


@pytest.fixture(scope="module")
def explained(learn_data, learn_params, tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("explain")
    store_cfg = {"db": str(tmp / "e.db"), "artifacts": str(tmp / "art"), "experiment": "explain"}
    tracking.configure(store_cfg)
    params = copy.deepcopy(learn_params)
    params["resnet"]["inits"] = ["scratch"]
    params["registry"]["prefix"] = "t"
    params["explain"].update(n_per_outcome=2, localization_tiles=6, faithfulness_tiles=2)
    path = write_params(tmp / "params.yaml", params, mlflow=store_cfg)
    store = TileStore(learn_data[0])
    tile_px = int(store.index["tile_px"].iloc[0])
    write_tiny_models(tmp / "models" / TISSUE, TISSUE, seed=0, tile_px=tile_px)
    (tmp / "metrics.json").write_text(json.dumps(tiny_metrics(0.8, 0.9)))

    def run(name: str) -> dict[str, Any]:
        assert run_explain(
            path, TISSUE, learn_data[0].parent / "raw", *learn_data, tmp / "models",
            tmp / "metrics.json", tmp / name, tmp / f"{name}.json",
        ) == 0  # fmt: skip
        return json.loads((tmp / f"{name}.json").read_text())

    return {"tmp": tmp, "store": store, "results": run("a"), "run": run, "params": path}


def test_every_model_gets_localization_metrics_with_baselines(explained) -> None:
    results = explained["results"]
    saved = json.loads((explained["tmp"] / "a.json").read_text())
    assert set(results) == set(saved) == {"cnn", "resnet_scratch"}
    for metrics in saved.values():
        for key in ("cam_energy_ratio", "cam_iou", "faithfulness_road", "centre_energy_ratio"):
            assert key in metrics
        assert metrics["uniform_energy_ratio"] == 1.0
        assert 0 < metrics["n_tiles"] <= 6 and metrics["n_faithfulness_tiles"] == 2
        assert 0 < metrics["mask_area_share"] < 1


def test_the_layer_is_chosen_on_validation_tiles(explained, learn_params) -> None:
    """Of explain.layer_choices, each model's layer is the one that localizes best on the
    validation split's damaged tiles (layers.json holds every candidate's ratio)."""
    results, tmp = explained["results"], explained["tmp"]
    choices = learn_params["explain"]["layer_choices"]
    saved = {}
    for key, arch in (("cnn", "cnn"), ("resnet_scratch", "resnet")):
        scores = saved[key] = json.loads((tmp / "a" / TISSUE / key / "layers.json").read_text())
        assert results[key]["layer"] == ",".join(scores["chosen"])
        for name, ratios in zip(scores["chosen"], scores["val_cam_energy_ratio"], strict=True):
            assert set(ratios) <= set(choices[arch]) and name in ratios
            assert ratios[name] == max(ratios.values())
        assert np.isfinite(results[key]["val_cam_energy_ratio"])
    # the tiny CNN has two blocks: the third candidate is skipped
    assert "features.2" not in saved["cnn"]["val_cam_energy_ratio"][0]


def test_cam_files_are_aligned_with_their_tiles(explained) -> None:
    store = explained["store"]
    ids = store.index["tile_id"].tolist()
    for model in ("cnn", "resnet_scratch"):
        folder = explained["tmp"] / "a" / TISSUE / model
        index = pd.read_csv(folder / "index.csv")
        assert len(index) > 0 and set(index["outcome"]) <= {"tp", "fp", "tn", "fn"}
        assert (index.groupby("outcome").size() <= 2).all()
        for row in index.itertuples():
            cam = tifffile.imread(folder / row.cam_file)
            tile = store.tile(ids.index(row.tile_id))
            assert cam.dtype == np.float32 and cam.shape == tile.shape[-2:]  # (c, h, w) tile
            assert cam.min() >= 0.0 and cam.max() <= 1.0
            assert (folder / row.overlay).is_file()
            assert row.label == int(store.index["label"].iloc[ids.index(row.tile_id)])
    # the file holds the map of its own tile: recompute one and compare
    folder = explained["tmp"] / "a" / TISSUE / "cnn"
    row = pd.read_csv(folder / "index.csv").iloc[-1]
    models = explained["tmp"] / "models" / TISSUE
    model = build_module(json.loads((models / "cnn.json").read_text()), models / "cnn.pt")
    tile = store.tile(ids.index(row.tile_id))[None]
    layer = explained["results"]["cnn"]["layer"]  # the one chosen on validation tiles
    expected = gradcam.compute_cams(model, tile, layer=layer)[0]
    np.testing.assert_allclose(tifffile.imread(folder / row.cam_file), expected, atol=1e-6)


def test_explain_is_deterministic_and_tracked(explained) -> None:
    explained["run"]("b")
    tmp = explained["tmp"]
    assert (tmp / "a.json").read_bytes() == (tmp / "b.json").read_bytes()
    for path in sorted((tmp / "a").rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (tmp / "b" / path.relative_to(tmp / "a")).read_bytes()
    runs = mlflow.search_runs(experiment_names=["explain"], output_format="list")
    assert {r.data.tags.get("stage") for r in runs} == {"explain"}
    client = mlflow.tracking.MlflowClient()
    logged = [a.path for r in runs for a in client.list_artifacts(r.info.run_id, "gradcam")]
    assert logged and all(p.startswith("gradcam/") for p in logged)
    assert any("gradcam_cam_energy_ratio" in r.data.metrics for r in runs)


def test_every_outcome_has_a_figure(explained) -> None:
    for model in ("cnn", "resnet_scratch"):
        folder = explained["tmp"] / "a" / TISSUE / model
        for outcome in gradcam.OUTCOMES:
            assert (folder / f"{outcome}.png").read_bytes()[:4] == b"\x89PNG"


def test_outcome_figures_name_what_they_show_and_an_empty_outcome_says_so(
    explained, tmp_path, monkeypatch
) -> None:
    """Called failed at p = 0.9 every one: no tn or fn tile, and their files say so."""
    store = explained["store"]
    models = explained["tmp"] / "models" / TISSUE
    model = build_module(json.loads((models / "cnn.json").read_text()), models / "cnn.pt")
    ours = store.index["tissue"].to_numpy() == TISSUE
    label = store.index["label"].to_numpy()
    positions = np.concatenate([np.flatnonzero(ours & (label == k))[:3] for k in (0, 1)])
    labels = label[positions].astype(int)
    figures = []  # drawn in the order of gradcam.OUTCOMES
    figure = gradcam.overlay_figure

    def keep(tiles, cams, labels=None, **kw):
        figures.append(figure(tiles, cams, labels, **kw))
        return figures[-1]

    monkeypatch.setattr(gradcam, "overlay_figure", keep)
    cfg = {"n_per_outcome": 4, "method": "gradcam", "batch_size": 8}
    prob = np.full(len(positions), 0.9)
    index = report.export_outcomes(
        model, store, positions, labels, prob, cfg, "features.0", tmp_path,
        model_name="cnn", layer_name="features.0",
    )  # fmt: skip
    assert {p.stem for p in tmp_path.glob("*.png")} == set(gradcam.OUTCOMES)
    assert set(index["outcome"]) == {"tp", "fp"}
    pixel = float(store.index["voxel_size_um"].iloc[positions[0]])
    px = int(store.index["tile_px"].iloc[positions[0]])
    for outcome, fig in zip(gradcam.OUTCOMES, figures, strict=True):
        texts = [t.get_text() for t in fig.findobj(Text)]
        heading, kind = (t.get_text() for t in fig.texts[:2])  # the title's two lines
        assert (
            heading == f"Grad-CAM (failed class) · {TISSUE} · model cnn · target layer features.0"
        )
        assert kind.startswith(f"{gradcam.OUTCOME_TEXT[outcome].split(':')[0].capitalize()} ")
        assert f"({outcome})" in kind and gradcam.OUTCOME_TEXT[outcome].split(": ")[1] in kind
        words = " ".join(texts)
        assert "tp = failed tiles called failed" in words and "p(failed) > 0.5" in words
        if outcome in ("tn", "fn"):
            assert any(t.startswith(f"no {outcome} tiles in the test split") for t in texts)
            continue
        panels = [ax for ax in fig.axes if len(ax.images) == 2]
        assert [ax.get_title() for ax in panels] == ["p(failed) = 0.90"] * len(panels)
        (bar,) = [p for p in panels[0].patches if p.get_gid() == "scale-bar"]
        assert bar.get_width() == pytest.approx(gradcam.scale_bar_um(px * pixel) / pixel)
        assert any(t.startswith("Grad-CAM, 0-1") for t in texts)


def test_evenly_spaced_picks() -> None:
    assert report.evenly_spaced(3, 5).tolist() == [0, 1, 2]
    assert report.evenly_spaced(10, 3).tolist() == [0, 4, 9]
    assert report.cam_file_name("scan-1/a0004-0016-0032") == "scan-1__a0004-0016-0032.tif"


# -- reports/<tissue>: explain's own folder, never one of its inputs ------------------------
def _explain_paths(tmp) -> dict[str, Any]:
    names = ("raw", "tiles", "splits.parquet", "models", "metrics.json")
    return {name: tmp / name for name in names}


def test_explain_refuses_a_reports_folder_it_did_not_write(tmp_path, explained) -> None:
    from bonedamage.atomic import OutputError

    paths = _explain_paths(tmp_path)
    mine = tmp_path / "reports" / TISSUE / "figure-3.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the figure of the paper")
    with pytest.raises(OutputError, match=r"did not write; .*--force") as exc:
        run_explain(explained["params"], TISSUE, *paths.values(), tmp_path / "reports",
                    tmp_path / "o.json")  # fmt: skip
    assert str(exc.value).startswith(f"{mine.parent}: exists and holds files")
    assert mine.read_bytes() == b"the figure of the paper"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["figure-3.png", "reports", TISSUE]


@pytest.mark.parametrize("into", ["models", "tiles", "raw"])
def test_explain_never_writes_over_its_inputs_even_with_force(into, tmp_path, explained) -> None:
    from bonedamage.atomic import OutputError

    paths = _explain_paths(tmp_path)
    (paths[into] / TISSUE).mkdir(parents=True)
    (paths[into] / TISSUE / "kept").write_text("an input")
    # --reports INTO: reports/<tissue> is (inside) an input folder
    for force in (False, True):
        with pytest.raises(OutputError, match=r"output folder (lies inside|is) the input"):
            run_explain(explained["params"], TISSUE, *paths.values(), paths[into],
                        tmp_path / "o.json", force=force)  # fmt: skip
    assert (paths[into] / TISSUE / "kept").read_text() == "an input"
