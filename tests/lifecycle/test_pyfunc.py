"""The registered model (lifecycle/pyfunc.py) as MLflow serves it: requests, bad requests,
bad weights.

The model is saved as registration logs it (model from code, ``registry.signature``: the
params and the output, no input schema) and loaded with ``mlflow.pyfunc.load_model``, the
wrapper ``mlflow models serve`` calls: an error with ``INVALID_PARAMETER_VALUE`` is answered
as HTTP 400 with its message. Float tiles, the README's serve commands and the serving
benchmark are also run against a real ``mlflow models serve`` process on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode

from bonedamage.data.tilestore import normalize
from bonedamage.learn.models import WeightsError
from bonedamage.lifecycle.pyfunc import RequestError
from conftest import (
    REAL_STACK,
    REPO,
    RunsCode,
    free_port,
    mlflow_cli,
    post,
    running,
    save_tiny_pyfunc,
)

PX = 16
NORM = {"norm_lo": 0.0, "norm_hi": 60000.0}
UNITS = "so tiles and range are not in the same units"


@pytest.fixture(scope="module")
def model_folder(params: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pyfunc(tmp_path_factory.mktemp("pyfunc"), params)


@pytest.fixture(scope="module")
def served(model_folder: Path) -> Any:
    return mlflow.pyfunc.load_model(str(model_folder))


def tiles(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 60000, (n, PX, PX)).astype(np.uint16)


def test_served_model_answers_a_good_request(served) -> None:
    out = served.predict(tiles(), params=NORM)
    assert list(out.columns) == ["prob_failed", "label", "class"] and len(out) == 3
    assert out["prob_failed"].between(0, 1).all()


def test_signature_declares_the_params_and_output_but_no_input_dtype(served) -> None:
    """A declared tensor dtype would make MLflow cast JSON tiles to it (floats to 0 and 1)."""
    meta = served.metadata
    assert meta.get_input_schema() is None
    assert [p.name for p in meta.get_params_schema().params] == ["norm_lo", "norm_hi"]
    names = ["prob_failed", "label", "class", "domain_distance", "in_domain"]
    assert meta.get_output_schema().input_names() == names


def test_float_tiles_get_the_answer_of_their_raw_values(served) -> None:
    raw = tiles(8)
    want, want_norm = served.predict(raw), served.predict(raw, params=NORM)
    unit = raw / 60000.0  # float64, as JSON numbers arrive
    for data in (unit, unit.astype(np.float32), raw.astype(np.int64), raw * 2.5 - 1000.0):
        got = served.predict(data)  # normalised by the request's own percentiles
        np.testing.assert_allclose(got["prob_failed"], want["prob_failed"], rtol=0, atol=1e-6)
    got = served.predict(unit, params={"norm_lo": 0.0, "norm_hi": 1.0})  # range in its units
    np.testing.assert_allclose(got["prob_failed"], want_norm["prob_failed"], rtol=0, atol=1e-6)
    # what reading [0, 1] tiles with the raw range gives (refused below): another answer
    misread = served.unwrap_python_model().failed_probability(unit, **NORM)
    assert np.abs(misread - want_norm["prob_failed"].to_numpy()).max() > 1e-4


@pytest.mark.parametrize(("scale", "offset"), [(1 / 60000, 0.0), (2.5, -1000.0), (1e-3, 7.0)])
def test_fallback_range_follows_an_affine_rescaling_of_the_tiles(served, scale, offset) -> None:
    """Without norm_lo/norm_hi: percentiles move with the tiles, the normalised tiles don't."""
    model = served.unwrap_python_model()
    raw = model.check(tiles(8))
    scaled = model.check(raw.astype(np.float64) * scale + offset)
    lo, hi = model.intensity_range(raw)
    s_lo, s_hi = model.intensity_range(scaled)
    assert (s_lo, s_hi) == pytest.approx((lo * scale + offset, hi * scale + offset), rel=1e-5)
    np.testing.assert_allclose(
        normalize(scaled, s_lo, s_hi), normalize(raw, lo, hi), rtol=0, atol=1e-5
    )


@pytest.mark.skipif(not REAL_STACK.is_dir(), reason="no ../shared/real stack")
def test_real_tiles_pass_the_units_check_and_their_rescaled_copies_do_not(
    served, monkeypatch
) -> None:
    """Every 16 px tile of a real uint8 scan, alone in a request with the scan's range,
    passes the units check; the same tile rescaled to [0, 1] with that range is refused."""
    import tifffile

    files = sorted(REAL_STACK.glob("*.tif"))[::20]
    scan = np.stack([tifffile.imread(f) for f in files])  # (10, 200, 200) uint8
    lo, hi = (float(v) for v in np.percentile(scan, [0.5, 99.5]))
    cut = scan[:, : 200 // PX * PX, : 200 // PX * PX].reshape(len(files), 12, PX, 12, PX)
    real = cut.transpose(0, 1, 3, 2, 4).reshape(-1, PX, PX)  # 1440 tiles
    model = served.unwrap_python_model()
    monkeypatch.setattr(model, "failed_probability", lambda raw, lo, hi: np.zeros(len(raw)))
    for tile in real:
        model.classify(tile, lo, hi)  # no RequestError
        with pytest.raises(RequestError, match="less than 1% of that width"):
            model.classify(tile / 255.0, lo, hi)


BAD_REQUESTS = {
    "bool-tiles": (tiles() > 100, NORM, "tiles must be numbers (raw scan values"),
    "text-tiles": (tiles().astype(str), NORM, "tiles must be numbers (raw scan values, "),
    "wrong-tile-shape": (
        tiles()[:, :, :-1],
        NORM,
        "tiles must have shape (n, 16, 16), got (3, 16, 15)",
    ),
    "rgb-tiles": (
        np.repeat(tiles()[..., None], 3, axis=-1),
        NORM,
        "tiles must have shape (n, 16, 16), got (3, 16, 16, 3)",
    ),
    "no-tiles": (tiles(0), NORM, "tiles: the request holds no tiles"),
    "norm-not-a-number": (tiles(), {"norm_lo": "dark", "norm_hi": 1.0}, "'norm_lo'"),
    "norm-range-inverted": (
        tiles(),
        {"norm_lo": 5.0, "norm_hi": 1.0},
        "norm_lo=5.0, norm_hi=1.0: need finite values with hi > lo",
    ),
    "unit-tiles-with-raw-range": (
        tiles() / 60000.0,
        NORM,
        "but norm_lo .. norm_hi is 0 .. 60000 (width 60000): the tiles vary over less than "
        f"1% of that width (tiles rescaled, e.g. to [0, 1]?), {UNITS}",
    ),
    "raw-tiles-with-unit-range": (
        tiles(),
        {"norm_lo": 0.0, "norm_hi": 1.0},
        f"the tiles vary over more than 100 times that width (a range of rescaled tiles?), {UNITS}",
    ),
    "raw-tiles-with-a-far-range": (
        tiles(),
        {"norm_lo": 200000.0, "norm_hi": 260000.0},
        f"the tiles lie more than that width outside it (another scan's range?), {UNITS}",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_served_model_refuses_bad_requests_as_400(served, case: str) -> None:
    data, params, fragment = BAD_REQUESTS[case]
    with pytest.raises(MlflowException) as info:
        served.predict(data, params=params)
    assert fragment in info.value.message
    assert info.value.error_code == ErrorCode.Name(ErrorCode.INVALID_PARAMETER_VALUE)  # HTTP 400


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (np.full((1, PX, PX), "x"), "tiles must be numbers"),
        (np.ones((1, PX, PX), np.complex64), "tiles must be numbers"),
        (np.full((1, PX, PX), np.inf, np.float32), "NaN or infinite"),
        (np.ones((2, PX, PX, 3), np.uint8), "tiles must have shape (n, 16, 16)"),
    ],
    ids=["text", "complex", "inf", "rgb"],
)
def test_classifier_checks_requests_without_a_signature(served, data, fragment) -> None:
    """The model's own checks: the only ones (the signature declares no input schema), also
    for callers that bypass MLflow (predict_scan)."""
    model = served.unwrap_python_model()
    with pytest.raises(RequestError) as info:
        model.predict(None, data, {"norm_lo": 0.0, "norm_hi": 1.0})
    assert fragment in str(info.value)


def test_model_whose_weights_are_a_pickled_object_is_refused_unrun(
    params: dict, tmp_path: Path
) -> None:
    evil = tmp_path / "weights.pt"
    torch.save({"conv.weight": RunsCode(tmp_path / "pwned")}, evil)  # a non-tensor object
    folder = save_tiny_pyfunc(tmp_path / "m", params, weights=evil)
    with pytest.raises(WeightsError) as info:
        mlflow.pyfunc.load_model(str(folder))  # what `mlflow models serve` does first
    message = str(info.value)
    assert "weights.pt: not a loadable state-dict file" in message
    assert "weights_only=True" in message
    assert not (tmp_path / "pwned").exists()  # the pickled callable never ran


def test_25d_classifier_takes_three_plane_tiles(tmp_path: Path) -> None:
    from bonedamage.learn.checkpoint import save_checkpoint
    from bonedamage.learn.models import build_cnn
    from bonedamage.lifecycle.pyfunc import TileClassifier
    from conftest import TINY_ARCH

    torch.manual_seed(0)
    model = build_cnn(TINY_ARCH, 3)
    meta = {"kind": "cnn", "arch": TINY_ARCH, "tile_px": PX, "in_channels": 3}
    save_checkpoint(tmp_path / "cnn.pt", model, meta)
    clf = TileClassifier()
    tiling = {"tile_px": PX, "channels": 3, "percentiles": [0.5, 99.5]}
    clf.setup(meta, tiling, tmp_path / "cnn.pt")
    raw = np.random.default_rng(0).integers(0, 60000, (4, 3, PX, PX)).astype(np.uint16)
    prob = clf.failed_probability(raw, **NORM)
    with torch.no_grad():
        x = torch.from_numpy(raw.astype(np.float32) / np.float32(60000.0))
        want = torch.softmax(model.eval()(x), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(prob, want, rtol=1e-5)
    one = clf.failed_probability(raw[0], **NORM)  # a single (3, px, px) tile
    assert one.shape == (1,) and one[0] == pytest.approx(prob[0])
    with pytest.raises(RequestError, match=r"shape \(n, 3, 16, 16\), got \(4, 16, 16\)"):
        clf.failed_probability(raw[:, 0], **NORM)  # one-plane tiles for a 2.5-D model


# -- through a real `mlflow models serve` process -----------------------------------------
def serve_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_served_float_tiles_are_read_as_sent_or_refused_never_misread(
    served, model_folder: Path, tmp_path: Path
) -> None:
    port = free_port()
    cmd = [mlflow_cli(), "models", "serve", "-m", str(model_folder), "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    raw = tiles(4)
    unit = raw / 60000.0  # tiles rescaled to [0, 1]
    want, want_norm = served.predict(raw), served.predict(raw, params=NORM)
    url = f"http://127.0.0.1:{port}/invocations"
    with running(cmd, serve_env(), f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log"):
        for body, expected in [
            ({"inputs": raw.tolist(), "params": NORM}, want_norm),
            ({"inputs": unit.tolist()}, want),
            ({"inputs": unit.tolist(), "params": {"norm_lo": 0.0, "norm_hi": 1.0}}, want_norm),
        ]:
            status, answer = post(url, body)
            assert status == 200, answer
            got = [row["prob_failed"] for row in answer["predictions"]]
            np.testing.assert_allclose(got, expected["prob_failed"], rtol=0, atol=1e-6)
        for body, fragment in [
            ({"inputs": unit.tolist(), "params": NORM}, UNITS),
            ({"inputs": (raw > 100).tolist(), "params": NORM}, "tiles must be numbers"),
            ({"inputs": raw[:, :, :-1].tolist()}, "tiles must have shape (n, 16, 16), got"),
        ]:
            status, answer = post(url, body)
            assert status == 400 and fragment in answer["message"], (status, answer)


def readme_serve_lines() -> list[str]:
    """The README's shell lines up to its `mlflow models serve` command (continuations joined)."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    block = next((b for b in blocks if "mlflow models serve" in b), None)
    assert block is not None, "README.md has no shell block with `mlflow models serve`"
    lines = block.replace("\\\n", " ").splitlines()
    end = next(i for i, line in enumerate(lines) if "mlflow models serve" in line)
    return lines[: end + 1]


@pytest.mark.skipif(
    not (REPO / ".venv" / "bin" / "mlflow").is_file(),
    reason="the README's commands use the project's .venv (scripts/env.sh)",
)
def test_readme_serve_commands_work_in_a_fresh_shell(model_folder: Path, tmp_path: Path) -> None:
    """The README's lines, run as written in `env -i` bash from a copy of the repository root
    (its .venv linked, its mlflow.db a temporary store holding the README's model name)."""
    lines = readme_serve_lines()
    found = re.search(r"models:/([\w.-]+)@([\w-]+)", lines[-1])
    assert found, lines[-1]
    name, alias = found.groups()
    root = tmp_path / "repo"
    root.mkdir()
    (root / ".venv").symlink_to(REPO / ".venv")
    register = (
        "import sys, mlflow; from mlflow.tracking import MlflowClient; "
        "v = mlflow.register_model(sys.argv[1], sys.argv[2]); "
        "MlflowClient().set_registered_model_alias(sys.argv[2], sys.argv[3], v.version)"
    )
    env = {**serve_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    subprocess.run([sys.executable, "-c", register, str(model_folder), name, alias],
                   env=env, cwd=root, check=True, capture_output=True, timeout=120)  # fmt: skip
    port = free_port()
    serve, n = re.subn(r"(-p|--port)(\s+|=)\d+", rf"\g<1>\g<2>{port}", lines[-1])
    script = "\n".join(
        ["set -e", f"cd '{root}'", *lines[:-1], serve + ("" if n else f" -p {port}")]
    )
    cmd = ["/usr/bin/env", "-i", f"HOME={Path.home()}", "PATH=/usr/bin:/bin", "bash", "-c", script]
    base = f"http://127.0.0.1:{port}"
    with running(cmd, {}, f"{base}/ping", tmp_path / "serve.log"):
        status, answer = post(f"{base}/invocations", {"inputs": tiles(2).tolist(), "params": NORM})
        assert status == 200 and len(answer["predictions"]) == 2, answer


def test_bench_serve_reports_latency_and_throughput_per_request_size(tmp_path: Path) -> None:
    """bench/bench_serve.py, on a stand-in it registers in a temporary store, loopback only."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_serve.py"), "--stand-in",
           "--tissue", "trabecular", "--sizes", "1,4", "--requests", "3", "--warmup", "0",
           "--budget-s", "60", "--tiles", str(tmp_path / "none"),
           "--log", str(tmp_path / "log")]  # fmt: skip
    done = subprocess.run(cmd, env=serve_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = {}
    for line in done.stdout.splitlines():
        fields = line.split()
        if fields and fields[0].isdigit():
            rows[int(fields[0])] = fields
    assert sorted(rows) == [1, 4], done.stdout
    for fields in rows.values():
        requests, errors, p50, p90, p99, tiles_s = fields[2:8]
        assert (int(requests), int(errors)) == (3, 0), done.stdout
        assert 0 < float(p50) <= float(p90) <= float(p99), done.stdout
        assert float(tiles_s) > 0, done.stdout
    assert "Uvicorn running on http://127.0.0.1:" in (tmp_path / "log").read_text()
