"""Evaluation metrics on hand-made predictions: values, edge cases, bootstrap, JSON output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from bonedamage.data.tiling import LABELS
from bonedamage.learn import scoring as ev


def test_tile_metrics_perfect_predictions() -> None:
    y = np.array([0, 0, 0, 1, 1])
    m = ev.tile_metrics(y, np.array([0.0, 0.1, 0.2, 0.9, 1.0]))
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "f1", "precision", "recall"):
        assert m[key] == pytest.approx(1.0), key
    assert m["confusion_matrix"] == [[3, 0], [0, 2]]
    assert m["n"] == 5


def test_tile_metrics_known_confusion() -> None:
    # tn=3 fp=1 fn=2 tp=4
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.8, 0.4, 0.45, 0.6, 0.7, 0.9, 0.95])
    m = ev.tile_metrics(y, p)
    assert m["confusion_matrix"] == [[3, 1], [2, 4]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    # the threshold moves tiles between the classes: failed means prob > threshold
    assert ev.tile_metrics(y, p, threshold=0.35)["confusion_matrix"] == [[3, 1], [0, 6]]
    assert ev.tile_metrics(y, np.full(10, 0.5))["confusion_matrix"] == [[4, 0], [6, 0]]


def test_balanced_accuracy_differs_on_imbalanced_data() -> None:
    y = np.array([0] * 90 + [1] * 10)
    p = np.zeros(100)  # always "pristine"
    m = ev.tile_metrics(y, p)
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["f1"] == 0.0 and m["precision"] == 0.0 and m["recall"] == 0.0


def test_tile_metrics_one_class_does_not_crash() -> None:
    m = ev.tile_metrics(np.ones(6, dtype=int), np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.55]))
    assert m["roc_auc"] is None
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"] == [[0, 0], [1, 5]]


def test_ece_calibrated_vs_overconfident() -> None:
    y = np.array([0] * 50 + [1] * 50)
    confident_right = ev.tile_metrics(y, y.astype(float))["ece"]
    assert confident_right == pytest.approx(0.0, abs=1e-6)
    confident_wrong = ev.tile_metrics(y, np.where(y == 1, 0.01, 0.99))["ece"]
    assert confident_wrong > 0.9
    # 80 % confident and right 80 % of the time: calibrated
    y80 = np.array([1] * 8 + [0] * 2)
    assert ev.tile_metrics(y80, np.full(10, 0.8))["ece"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("y", "p"),
    [
        (np.array([0, 1, -1]), np.array([0.1, 0.9, 0.5])),  # unlabelled tile
        (np.array([0, 1]), np.array([0.1, 1.5])),  # a logit, not a probability
        (np.array([0, 1]), np.array([0.1, np.nan])),
        (np.array([0, 1]), np.array([0.1])),
        (np.array([], dtype=int), np.array([])),
    ],
)
def test_tile_metrics_rejects_bad_input(y: np.ndarray, p: np.ndarray) -> None:
    with pytest.raises(ValueError):
        ev.tile_metrics(y, p)


def _specimen_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """12 specimens x 30 tiles, both classes; the specimens differ in how well they go."""
    rng = np.random.default_rng(seed)
    y, p, g = [], [], []
    for s in range(12):
        label = s % 2
        hit = rng.uniform(0.5, 1.0)  # per-specimen accuracy: tiles of a specimen correlate
        correct = rng.random(30) < hit
        y.append(np.full(30, label))
        p.append(np.where(correct == (label == 1), 0.8, 0.2))
        g.append(np.full(30, f"S{s:02d}"))
    return np.concatenate(y), np.concatenate(p), np.concatenate(g)


def test_bootstrap_ci_deterministic_and_contains_estimate() -> None:
    y, p, g = _specimen_data()
    a = ev.bootstrap_ci(y, p, g, n_boot=300, seed=7)
    assert a == ev.bootstrap_ci(y, p, g, n_boot=300, seed=7)
    assert a != ev.bootstrap_ci(y, p, g, n_boot=300, seed=8)
    narrow = ev.bootstrap_ci(y, p, g, n_boot=300, seed=7, level=0.5)
    assert a[0] <= narrow[0] <= narrow[1] <= a[1]
    point = ev.tile_metrics(y, p)
    for metric in ("accuracy", "balanced_accuracy", "roc_auc", "f1", "precision", "recall"):
        lo, hi = ev.bootstrap_ci(y, p, g, metric, n_boot=100, seed=7)
        assert lo < point[metric] < hi, metric


def test_bootstrap_resamples_whole_specimens() -> None:
    y, p, g = _specimen_data()
    point = ev.tile_metrics(y, p)["accuracy"]
    # one group: every resample is the whole data set, the interval collapses
    lo, hi = ev.bootstrap_ci(y, p, np.zeros(len(y)), n_boot=200)
    assert lo == pytest.approx(point) and hi == pytest.approx(point)
    # one group per tile (tile resampling) ignores the specimen correlation: narrower
    spec = ev.bootstrap_ci(y, p, g, n_boot=500, seed=1)
    tile = ev.bootstrap_ci(y, p, np.arange(len(y)), n_boot=500, seed=1)
    assert spec[1] - spec[0] > 1.5 * (tile[1] - tile[0])


def test_bootstrap_one_wrong_specimen() -> None:
    # 10 specimens of 20 tiles, all right except specimen 0, all wrong
    y = np.repeat(np.arange(10) % 2, 20)
    g = np.repeat(np.arange(10), 20)
    p = np.where(y == 1, 0.9, 0.1)
    p[g == 0] = 1.0 - p[g == 0]
    lo, hi = ev.bootstrap_ci(y, p, g, n_boot=1000, seed=0)
    # resamples contain specimen 0 zero to several times: accuracy 1.0 down to ~0.7
    assert hi == pytest.approx(1.0)
    assert 0.6 <= lo <= 0.85
    assert lo <= 0.9 <= hi


def _sklearn_bootstrap(y, p, g, metric, n_boot, seed):
    """The resample-by-resample reference: scikit-learn on each resample's tiles."""
    score = {"accuracy": skm.accuracy_score, "balanced_accuracy": skm.balanced_accuracy_score}
    _, codes = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(codes == k) for k in range(codes.max() + 1)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(len(members), size=len(members))])
        if metric == "accuracy" or len(np.unique(y[idx])) == 2:
            values.append(score[metric](y[idx], (p[idx] > 0.5).astype(int)))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi), len(values)


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy"])
@pytest.mark.parametrize("n_specimens", [12, 3])
def test_bootstrap_from_counts_equals_sklearn_per_resample(metric: str, n_specimens: int) -> None:
    # summed confusion counts give scikit-learn's values exactly, one-class resamples
    # (frequent with 3 specimens) skipped alike
    y, p, g = _specimen_data(seed=4)
    keep = np.isin(g, np.unique(g)[:n_specimens])
    y, p, g = y[keep], p[keep], g[keep]
    lo, hi, defined = _sklearn_bootstrap(y, p, g, metric, 400, 9)
    assert ev.bootstrap_ci(y, p, g, metric, n_boot=400, seed=9) == (lo, hi)
    if (metric, n_specimens) == ("balanced_accuracy", 3):
        assert defined < 350  # a quarter of the resamples hold one class: skipped


def test_bootstrap_skips_undefined_resamples() -> None:
    # two specimens, one per class: a third of the resamples hold one class only
    y = np.array([0, 0, 1, 1])
    p = np.array([0.2, 0.7, 0.8, 0.9])
    g = np.array(["a", "a", "b", "b"])
    lo, hi = ev.bootstrap_ci(y, p, g, "balanced_accuracy", n_boot=200)
    assert (lo, hi) == (pytest.approx(0.75), pytest.approx(0.75))
    # one class everywhere: never defined
    lo, hi = ev.bootstrap_ci(np.ones(4, int), p, g, "roc_auc", n_boot=50)
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="bootstrap metric"):
        ev.bootstrap_ci(y, p, g, "mcc")


def test_scan_level_mean_rule() -> None:
    scans = np.array(["a", "a", "a", "b", "b", "c", "c", "d"])
    y = np.array([1, 1, 1, 0, 0, 1, 1, 0])
    # a: mean 0.6 -> failed (right, though 2 of 3 tiles say pristine: mean != majority)
    # b: mean 0.3 -> pristine (right); c: mean 0.45 -> pristine (wrong); d: 0.5 -> pristine
    p = np.array([1.0, 0.4, 0.4, 0.2, 0.4, 0.3, 0.6, 0.5])
    out = ev.scan_level(scans, y, p)
    assert out == {"scan_accuracy": pytest.approx(3 / 4), "n_scans": 4, "rule": "mean"}
    majority = ev.scan_level(scans, y, p, rule="majority")
    assert majority["scan_accuracy"] == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="rule"):
        ev.scan_level(scans, y, p, rule="max")


def test_scan_level_mixed_labels_rejected() -> None:
    with pytest.raises(ValueError, match="both labels"):
        ev.scan_level(np.array(["a", "a", "b"]), np.array([0, 1, 1]), np.array([0.1, 0.9, 0.9]))


def test_damage_breakdown() -> None:
    y = np.array([1, 1, 1, 1, 1, 0, 1])
    p = np.array([0.9, 0.8, 0.2, 0.3, 0.1, 0.9, 0.9])
    dmg = np.array([0.05, 0.02, 0.01, 0.0, np.nan, 0.5, 0.001])
    out = ev.damage_breakdown(y, p, dmg, visible=0.01)
    # visible: tiles 0, 1, 2 (2 of 3 right); not visible: 3, 6 (1 of 2); NaN and pristine out
    assert out == {
        "n_visible_damage": 3,
        "accuracy_visible_damage": pytest.approx(2 / 3),
        "n_no_visible_damage": 2,
        "accuracy_no_visible_damage": pytest.approx(1 / 2),
    }
    real = ev.damage_breakdown(y, p, np.full(7, np.nan), visible=0.01)
    assert real["n_visible_damage"] == real["n_no_visible_damage"] == 0
    assert real["accuracy_visible_damage"] is None
    assert real["accuracy_no_visible_damage"] is None
    high = ev.damage_breakdown(y, p, dmg, visible=0.9)
    assert high["accuracy_visible_damage"] is None and high["n_no_visible_damage"] == 5


def _frame(seed: int = 0) -> pd.DataFrame:
    """Synthetic predictions: 8 specimens x 2 scans x 25 tiles; scans are one class."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(8):
        for k in range(2):
            label = (s + k) % 2
            for t in range(25):
                rows.append(
                    {
                        "tile_id": f"S{s}_K{k}_{t}",
                        "specimen_id": f"S{s}",
                        "scan_id": f"S{s}_K{k}",
                        "label": label,
                        "prob": float(np.clip(label * 0.6 + rng.normal(0.2, 0.2), 0, 1)),
                        "damage_fraction": rng.uniform(0, 0.02) if label else 0.0,
                    }
                )
    frame = pd.DataFrame(rows)
    frame.loc[frame["specimen_id"] == "S0", "damage_fraction"] = np.nan  # a "real" specimen
    return frame


def test_evaluate_predictions_end_to_end(tmp_path) -> None:
    frame = _frame()
    out = ev.evaluate_predictions(frame, visible=0.01, n_boot=200, seed=3)
    expected = {
        *ev.tile_metrics(frame["label"], frame["prob"]),
        "accuracy_ci95",
        "balanced_accuracy_ci95",
        "n_specimens",
        "scan_accuracy",
        "n_scans",
        "scan_rule",
        "n_visible_damage",
        "n_no_visible_damage",
        "accuracy_visible_damage",
        "accuracy_no_visible_damage",
    }
    assert set(out) == expected
    assert out["n"] == 400 and out["n_scans"] == 16 and out["n_specimens"] == 8
    lo, hi = out["accuracy_ci95"]
    assert lo <= out["accuracy"] <= hi
    failed_known = (frame["label"] == 1) & frame["damage_fraction"].notna()
    assert out["n_visible_damage"] + out["n_no_visible_damage"] == failed_known.sum()
    assert out == ev.evaluate_predictions(frame, visible=0.01, n_boot=200, seed=3)

    path = tmp_path / "metrics" / "eval.json"
    ev.write_json(path, {"cnn": out})
    data = json.loads(path.read_text())["cnn"]
    assert data["confusion_matrix"] == out["confusion_matrix"]
    assert data["accuracy_ci95"] == [round(v, 6) for v in out["accuracy_ci95"]]
    with pytest.raises(ValueError, match="lacks columns"):
        ev.evaluate_predictions(frame.drop(columns="scan_id"), visible=0.01, n_boot=10, seed=0)


def test_roc_points() -> None:
    y = np.array([0, 0, 1, 1])
    roc = ev.roc_points(y, np.array([0.1, 0.4, 0.35, 0.8]))
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    assert roc.iloc[0].tolist() == [0.0, 0.0, 1.0]  # sklearn's +inf threshold, written as 1
    assert roc.iloc[-1][["fpr", "tpr"]].tolist() == [1.0, 1.0]
    assert np.isfinite(roc.to_numpy()).all()
    assert roc["fpr"].is_monotonic_increasing and roc["tpr"].is_monotonic_increasing


def test_the_class_names_are_the_labels_of_the_tiles() -> None:
    assert {name: label for label, name in enumerate(ev.CLASS_NAMES)} == {
        name: label for name, label in LABELS.items() if label >= 0
    }


def test_confusion_points_name_the_classes_the_confusion_matrix_counts() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.8, 0.4, 0.45, 0.6, 0.7, 0.9, 0.5])
    points = ev.confusion_points(y, p)
    assert list(points.columns) == ["actual", "predicted"]
    assert points.iloc[3].tolist() == ["pristine", "failed"]  # in the tiles' order
    assert points.iloc[-1].tolist() == ["failed", "pristine"]  # 0.5 is not above the threshold
    counts = pd.crosstab(points["actual"], points["predicted"])
    [[tn, fp], [fn, tp]] = ev.tile_metrics(y, p)["confusion_matrix"]
    assert counts.loc["pristine", "pristine"] == tn and counts.loc["pristine", "failed"] == fp
    assert counts.loc["failed", "pristine"] == fn and counts.loc["failed", "failed"] == tp
    assert ev.confusion_points(y, p, threshold=0.35)["predicted"].value_counts()["failed"] == 7
    with pytest.raises(ValueError):
        ev.confusion_points(np.array([0, -1]), np.array([0.1, 0.9]))  # an unlabelled tile


def test_history_points_put_the_epoch_first_and_round_the_metrics() -> None:
    history = [
        {"epoch": 0, "val_loss": 0.6931471805599453, "val_balanced_accuracy": 0.5},
        {"epoch": 1, "val_loss": 0.5, "val_balanced_accuracy": 0.7500000001},
    ]
    points = ev.history_points(history)
    assert list(points.columns) == ["epoch", "val_balanced_accuracy", "val_loss"]
    assert points.to_csv(index=False) == (
        "epoch,val_balanced_accuracy,val_loss\n0,0.5,0.693147\n1,0.75,0.5\n"
    )
    with pytest.raises(ValueError, match="no epochs"):
        ev.history_points([])
    with pytest.raises(ValueError, match="without epochs"):
        ev.history_points([{"val_loss": 0.5}])


def test_write_json_deterministic_atomic_nan_null(tmp_path) -> None:
    obj = {
        "b": float("nan"),
        "a": np.float32(0.1234567891),
        "c": [np.int64(3), float("inf"), (1.0, -1e-9)],
        "d": {"z": np.array([0.5, 0.25]), "y": None, "x": np.bool_(True)},
    }
    path = tmp_path / "out.json"
    ev.write_json(path, obj)
    first = path.read_bytes()
    ev.write_json(path, dict(reversed(list(obj.items()))))
    assert path.read_bytes() == first
    assert first.endswith(b"\n") and b"NaN" not in first and b"Infinity" not in first
    data = json.loads(first)
    assert data == {
        "a": 0.123457,
        "b": None,
        "c": [3, None, [1.0, 0.0]],
        "d": {"x": True, "y": None, "z": [0.5, 0.25]},
    }
    assert list(data) == ["a", "b", "c", "d"]
    assert first.startswith(b'{\n  "a"')  # indent 2, sorted
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind


def test_write_json_failure_keeps_old_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.json"
    ev.write_json(path, {"a": 1})
    before = path.read_bytes()
    real_write_text = Path.write_text

    def half_then_fail(self: Path, text: str, *args, **kwargs) -> int:
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ev.write_json(path, {"a": 2, "b": list(range(100))})
    assert path.read_bytes() == before  # the old file is untouched, no partial output
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # temporary removed
