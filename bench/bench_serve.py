"""Load benchmark: a model behind ``mlflow models serve``, requests of 1, 64 and 512 tiles.

    python bench/bench_serve.py [--tissue cortical] [--sizes 1,64,512] [--requests 40]
        [--budget-s 60] [--concurrency 1] [--workers 1] [--model-uri URI | --stand-in]

The model: ``--model-uri``, else ``models:/bonedamage-<tissue>@champion`` in the
repository's MLflow store (MLFLOW_TRACKING_URI, else params ``mlflow.db``) when that store
holds it. Otherwise, or with ``--stand-in``, a stand-in registered in a temporary store
(removed afterwards): the tissue's searched CNN (``models/<tissue>/cnn_search.json``, an
ensemble of ``train_cnn.ensemble`` members as ``train_cnn`` builds it, seeded random weights),
logged as ``register`` logs a model (model code, signature, tiling, input example). It
costs what the champion costs per tile; its answers mean nothing.

The requests: raw tiles of one scan each with that scan's ``norm_lo`` / ``norm_hi``, from
the grouped test split of ``data/tiles`` when it exists (a scan's tiles repeated to fill a
request larger than its test split), else seeded random uint16 tiles of the tissue's tile
shape (values below 60000: as long in JSON as a scan's raw values, or longer).

The method: the server binds 127.0.0.1 on a free port (``--env-manager local``, with the
interpreter's ``bin`` on PATH, where ``mlflow models serve`` finds ``uvicorn``). A separate
client process (urllib, ``--concurrency`` threads) sends, per size, ``--warmup`` untimed
requests, then up to ``--requests`` timed ones, and stops a size early once ``--budget-s``
seconds of it have passed; every answer is checked (HTTP 200, one prediction per tile,
``prob_failed`` in [0, 1]). Printed per size: requests, errors, latency p50/p90/p99
(nearest rank), tiles/s and requests/s, and, measured in this process on the same tiles
(best of 2 after a warm-up call), the server's decoding of one body (``json.loads`` and
MLflow's ``infer_and_parse_data``) and the model's own time (``classify``); then the
server's start time and the machine. Exits 1 on any error. The server's whole process group is
stopped on the way out, errors and Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAND_IN_HIGH = 60000  # synthetic raw tiles: uint16 values in [0, 60000)


# -- the model -----------------------------------------------------------------------------
def champion_in_store(uri: str, name: str) -> bool:
    """Whether the store at ``uri`` has ``name@champion`` (False for a missing SQLite file:
    asking MLflow would create an empty store there)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return False
    try:
        MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
            name, "champion"
        )
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False
        raise
    return True


def register_stand_in(tissue: str, params: dict[str, Any], store: Path) -> tuple[str, str]:
    """Register the stand-in (see the module docstring) in a SQLite store under ``store``;
    return its tracking URI and model URI."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    from bonedamage.data.tiling import TileSettings
    from bonedamage.learn.checkpoint import save_checkpoint
    from bonedamage.learn.models import build_module
    from bonedamage.lifecycle.pyfunc import MODEL_CODE
    from bonedamage.lifecycle.registry import signature, tiling_info

    search = ROOT / "models" / tissue / "cnn_search.json"
    if not search.is_file():
        raise SystemExit(f"{search}: no searched architecture (run `dvc repro search@{tissue}`)")
    s = TileSettings.from_params(params["tile"], tissue)
    meta = {
        "kind": "cnn",
        "arch": json.loads(search.read_text())["arch"],
        "members": int(params["train_cnn"]["ensemble"]),
        "in_channels": s.channels,
        "tile_px": s.tile_px,
        "tissue": tissue,
    }
    torch.manual_seed(0)
    save_checkpoint(store / "cnn.pt", build_module(meta), meta)
    (store / "tiling.json").write_text(
        json.dumps(tiling_info(params["tile"], tissue, s.tile_px, s.channels), indent=2)
    )
    px = s.tile_px
    example = stand_in_tiles(1, (px, px) if s.channels == 1 else (s.channels, px, px), seed=1)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    name = f"bench-serve-{tissue}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("bench-serve", (store / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment, run_name=f"register-{name}"):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={
                "weights": str(store / "cnn.pt"),
                "meta": str(store / "cnn.json"),
                "tiling": str(store / "tiling.json"),
            },
            code_paths=[str(ROOT / "src" / "bonedamage")],
            signature=signature(example.shape[1:], np.dtype(example.dtype)),
            input_example=(example, {"norm_lo": 0.0, "norm_hi": float(STAND_IN_HIGH)}),
            pip_requirements=[],
        )
    version = mlflow.register_model(info.model_uri, name)
    MlflowClient().set_registered_model_alias(name, "champion", version.version)
    return uri, f"models:/{name}@champion"


# -- requests ------------------------------------------------------------------------------
def stand_in_tiles(n: int, shape: tuple[int, ...], seed: int) -> Any:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, STAND_IN_HIGH, (n, *shape)).astype(np.uint16)


def request_tiles(
    tissue: str, tiles: Path, splits: Path, shape: tuple[int, ...], size: int, distinct: int
) -> tuple[list[tuple[Any, float, float]], str]:
    """``distinct`` requests of ``size`` raw tiles, each of one scan with its range; and
    where the tiles come from."""
    import numpy as np

    if not (tiles.is_dir() and splits.is_file()):
        requests = [stand_in_tiles(size, shape, seed=size * 100 + i) for i in range(distinct)]
        return [(raw, 0.0, float(STAND_IN_HIGH)) for raw in requests], "random uint16 tiles"
    import pandas as pd

    from bonedamage.data.tilestore import TileStore
    from bonedamage.learn.datasets import split_rows

    store = TileStore(tiles)
    positions, _ = split_rows(store, pd.read_parquet(splits), tissue, "grouped", "test")
    if len(positions) == 0:
        raise SystemExit(f"no {tissue} tiles in the grouped test split of {splits}")
    index = store.index.iloc[positions].assign(position=positions)
    scans = [scan for _, scan in index.groupby("scan_id", sort=False)]
    out = []
    for i in range(distinct):
        scan = scans[i % len(scans)]
        rows = np.resize(scan["position"].to_numpy(), size)  # repeated when too few
        raw = np.stack([store.raw(int(p)) for p in rows])
        if raw.shape[1:] != shape:
            raise SystemExit(f"{tiles}: tiles of shape {raw.shape[1:]}, the model takes {shape}")
        out.append((raw, float(scan["norm_lo"].iloc[0]), float(scan["norm_hi"].iloc[0])))
    return out, f"test tiles of {tiles}"


def body(raw: Any, lo: float, hi: float) -> bytes:
    return json.dumps({"inputs": raw.tolist(), "params": {"norm_lo": lo, "norm_hi": hi}}).encode()


def check_answer(status: int, payload: bytes, n: int) -> str | None:
    """None for a good answer, else what is wrong with it."""
    if status != 200:
        return f"HTTP {status}: {payload[:200]!r}"
    try:
        predictions = json.loads(payload)["predictions"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"not a JSON answer with predictions ({exc}): {payload[:200]!r}"
    if not isinstance(predictions, list) or len(predictions) != n:
        got = len(predictions) if isinstance(predictions, list) else type(predictions).__name__
        return f"{got} predictions for {n} tiles"
    for row in predictions:
        prob = row.get("prob_failed") if isinstance(row, dict) else None
        if not isinstance(prob, int | float) or not 0.0 <= prob <= 1.0:
            return f"prob_failed {prob!r} is not a number in [0, 1]"
    return None


def post(url: str, data: bytes, n: int, timeout: float) -> tuple[float, str | None]:
    """Seconds one request took, and its error (None when the answer is good)."""
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    except OSError as exc:  # refused, reset, timed out
        return time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
    return time.perf_counter() - t0, check_answer(status, payload, n)


def client(
    url: str,
    bodies: list[bytes],
    n: int,
    requests: int,
    concurrency: int,
    timeout: float,
    budget_s: float,
) -> dict[str, Any]:
    """The load of one size (run in the client process): up to ``requests`` posts from
    ``concurrency`` threads; no new request starts once ``budget_s`` seconds have passed."""
    lock, issued, results = threading.Lock(), [0], []
    t0 = time.perf_counter()

    def worker() -> None:
        while True:
            with lock:
                i = issued[0]
                if i >= requests or time.perf_counter() - t0 >= budget_s:
                    return
                issued[0] += 1
            outcome = post(url, bodies[i % len(bodies)], n, timeout)
            with lock:
                results.append(outcome)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return {
        "wall_s": time.perf_counter() - t0,
        "latency_s": [seconds for seconds, _ in results],
        "errors": [error for _, error in results if error is not None],
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def best_seconds(call: Any, repeat: int = 2) -> float:
    """Best of ``repeat`` timed calls after an untimed one (PyTorch's first call on a new
    batch shape prepares its kernels)."""
    call()
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def decode(data: bytes) -> Any:
    """What the scoring server does with a body before the model sees it (MLflow 3.17)."""
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    request = json.loads(data)
    return infer_and_parse_data({"inputs": request["inputs"]}, None)


# -- server --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no server log)"


def start_server(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The server in a session (process group) of its own, its output to ``log``."""
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float, log: Path) -> float:
    """Seconds until ``url`` answers 200; SystemExit with the log tail if the server dies."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(
                f"server exited with code {proc.returncode} before answering {url}; "
                f"its output ends with:\n{log_tail(log)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit(
        f"{url} did not answer within {timeout:.0f} s; the server's output ends with:\n"
        f"{log_tail(log)}"
    )


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the server's process group (uvicorn and its workers); kill it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):  # workers may outlive the leader
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def sigterm_to_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} CPUs visible, {platform.system()} {platform.release()}"


def sizes_arg(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of integers") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be >= 1")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tissue", choices=["cortical", "trabecular"], default="cortical")
    parser.add_argument("--model-uri", help="default: models:/bonedamage-<tissue>@champion")
    parser.add_argument("--stand-in", action="store_true", help="serve the stand-in model")
    parser.add_argument("--sizes", type=sizes_arg, default=[1, 64, 512], help="tiles/request")
    parser.add_argument("--requests", type=int, default=40, help="timed requests per size")
    parser.add_argument("--budget-s", type=float, default=60, help="seconds per size (at most)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests per size")
    parser.add_argument("--distinct", type=int, default=2, help="distinct bodies per size")
    parser.add_argument("--concurrency", type=int, default=1, help="client threads")
    parser.add_argument("--workers", type=int, default=1, help="mlflow models serve --workers")
    parser.add_argument("--timeout", type=float, default=90, help="client seconds per request")
    parser.add_argument("--start-timeout", type=float, default=180, help="seconds for /ping")
    parser.add_argument("--tiles", type=Path, default=ROOT / "data/tiles")
    parser.add_argument("--splits", type=Path, default=ROOT / "data/splits.parquet")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--log", type=Path, help="keep the server's output here")
    args = parser.parse_args()
    if min(args.requests, args.concurrency, args.workers, args.distinct) < 1:
        parser.error("--requests, --concurrency, --workers and --distinct must be >= 1")
    if min(args.warmup, args.budget_s) < 0:
        parser.error("--warmup and --budget-s must be >= 0")
    if args.stand_in and args.model_uri:
        parser.error("--stand-in and --model-uri exclude each other")
    import mlflow

    from bonedamage.config import load_params
    from bonedamage.lifecycle import tracking  # noqa: F401 - MLflow offline

    for logger in ("mlflow", "alembic"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    from bonedamage.lifecycle.pyfunc import load_classifier

    params = load_params(args.params)
    env = dict(os.environ)
    db = ROOT / params["mlflow"]["db"]  # as tracking.configure does
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{db.resolve()}")
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("DO_NOT_TRACK", "true")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    name = f"bonedamage-{args.tissue}"

    signal.signal(signal.SIGTERM, sigterm_to_interrupt)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        uri, what = args.model_uri, "the given model"
        if uri is None and not args.stand_in:
            if champion_in_store(env["MLFLOW_TRACKING_URI"], name):
                uri, what = f"models:/{name}@champion", "the champion"
            else:
                print(f"note: {env['MLFLOW_TRACKING_URI']} has no {name}@champion: serving a "
                      "stand-in (--stand-in)", file=sys.stderr)  # fmt: skip
        if uri is None:
            env["MLFLOW_TRACKING_URI"], uri = register_stand_in(args.tissue, params, Path(tmp))
            what = "stand-in: searched CNN, random weights"
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        model = load_classifier(uri)
        shape, per_size, source = model.tile_shape, {}, ""
        for size in args.sizes:
            requests, source = request_tiles(
                args.tissue, args.tiles, args.splits, shape, size, args.distinct
            )
            bodies = [body(*r) for r in requests]
            per_size[size] = {
                "bodies": bodies,
                "decode_s": best_seconds(lambda b=bodies[0]: decode(b)),
                "model_s": best_seconds(lambda r=requests[0]: model.classify(*r)),
            }
        port = free_port()
        cmd = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", uri,
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(args.workers)]  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        log = args.log or Path(tmp) / "serve.log"
        proc = start_server(cmd, env, log)
        died, loads = None, {}
        try:
            start_s = wait_ready(proc, f"{base}/ping", args.start_timeout, log)
            # the load comes from another process, so that the client's threads share no
            # interpreter (nor GIL) with anything else; leaving the block terminates it
            with get_context("spawn").Pool(1) as pool:
                for size, job in per_size.items():
                    common = (f"{base}/invocations", job["bodies"], size)
                    warm = pool.apply(
                        client, (*common, args.warmup, args.concurrency, args.timeout, math.inf)
                    )
                    load = pool.apply(
                        client,
                        (*common, args.requests, args.concurrency, args.timeout, args.budget_s),
                    )
                    load["errors"] += warm["errors"]
                    loads[size] = load
            died = proc.poll()
        except KeyboardInterrupt:
            print("interrupted: stopping the server", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            stop_server(proc)
        if died is not None:
            print(f"server output ends with:\n{log_tail(log)}", file=sys.stderr)

    print(f"model       {uri} ({what}; {args.workers} worker(s))")
    dims = ", ".join(str(v) for v in shape)
    print(f"tiles       {source}, (n, {dims}) per request, with one scan's norm_lo/norm_hi")
    print(f"client      {args.concurrency} thread(s), {args.warmup} warm-up request(s) per size")
    print(f"machine     {machine()}")
    print(f"server      up in {start_s:.1f} s (to the first /ping answer)")
    head = (f"{'tiles/req':>9} {'MB/req':>7} {'requests':>8} {'errors':>6} {'p50 ms':>9} "
            f"{'p90 ms':>9} {'p99 ms':>9} {'tiles/s':>8} {'req/s':>7} {'decode ms':>9} "
            f"{'model ms':>9}")  # fmt: skip
    print(head)
    errors = []
    for size, load in loads.items():
        lat = [s * 1000 for s in load["latency_s"]]
        done, wall, mb = len(lat), load["wall_s"], len(per_size[size]["bodies"][0]) / 1e6
        errors += load["errors"]
        print(
            f"{size:>9} {mb:>7.2f} {done:>8} {len(load['errors']):>6} "
            f"{percentile(lat, 50):>9.1f} {percentile(lat, 90):>9.1f} "
            f"{percentile(lat, 99):>9.1f} {done * size / wall:>8.1f} {done / wall:>7.2f} "
            f"{per_size[size]['decode_s'] * 1000:>9.1f} {per_size[size]['model_s'] * 1000:>9.1f}"
        )
    if died is not None:
        errors.append(f"the server exited with code {died} during the load")
    if errors:
        shown = sorted(set(errors))[:5]
        print(f"first errors ({len(set(errors))} distinct):", *shown, sep="\n  ", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
