"""Load benchmark: a champion model behind ``mlflow models serve``, hit by concurrent clients.

    python bench/bench_serve.py [--tissue cortical] [--model-uri URI] [--batch 8]
        [--concurrency 8] [--requests 200] [--workers 1]

Starts ``mlflow models serve -m models:/bonedamage-<tissue>@champion --env-manager local``
on a free local port (the repository's MLflow store unless MLFLOW_TRACKING_URI says
otherwise) and waits for ``/ping``. Requests carry ``--batch`` raw test tiles of one scan
each (the grouped test split of the tissue, read with the project's TileStore, in the
scans' dtype as the pyfunc expects them) with that scan's ``norm_lo`` / ``norm_hi``. A
separate client process sends ``--requests`` of them with ``--concurrency`` threads
(urllib only) and checks every answer: HTTP 200 and one prediction per tile with
``prob_failed`` in [0, 1]. Prints the latency percentiles, requests/s and tiles/s, and
the server's start time. Goal: no errors at the default load; the figures are for
comparing settings (``--workers``, ``--batch``) on one machine. Exits 1 on any error. The
server's whole process group is stopped on the way out, errors and Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# -- requests ------------------------------------------------------------------------------
def request_bodies(
    tissue: str, tiles: Path, splits: Path, params: Path, batch: int
) -> tuple[list[bytes], int, str]:
    """JSON bodies of ``batch`` raw test tiles of one scan each; the tile size and dtype.

    Tiles are taken in split order, scan by scan; a scan's last incomplete batch is left
    out, so every request carries exactly ``batch`` tiles.
    """
    import numpy as np
    import pandas as pd

    from bonedamage.config import load_params, section
    from bonedamage.data.tilestore import TileStore
    from bonedamage.learn.data import split_rows

    tile_cfg = section(load_params(params), "tile", params)
    want_px = round(tile_cfg["tile_um"][tissue] / tile_cfg["working_voxel_um"][tissue])
    store = TileStore(tiles)
    positions, _ = split_rows(store, pd.read_parquet(splits), tissue, "grouped", "test")
    if len(positions) == 0:
        raise SystemExit(f"no {tissue} tiles in the grouped test split of {splits}")
    index = store.index.iloc[positions].assign(position=positions)
    tile_px = int(index["tile_px"].iloc[0])
    if tile_px != want_px:
        print(f"warning: stored tiles are {tile_px} px, {params} says {want_px} px")
    bodies: list[bytes] = []
    dtype = ""
    for _, scan in index.groupby("scan_id", sort=False):
        rows = scan["position"].to_numpy()
        lo, hi = float(scan["norm_lo"].iloc[0]), float(scan["norm_hi"].iloc[0])
        for start in range(0, len(rows) - batch + 1, batch):
            raw = np.stack([store.raw(int(p)) for p in rows[start : start + batch]])
            dtype = str(raw.dtype)
            body = {"inputs": raw.tolist(), "params": {"norm_lo": lo, "norm_hi": hi}}
            bodies.append(json.dumps(body).encode())
    if not bodies:
        raise SystemExit(f"no scan has {batch} test tiles of {tissue}: lower --batch")
    return bodies, tile_px, dtype


def check_answer(status: int, payload: bytes, batch: int) -> str | None:
    """None for a good answer, else what is wrong with it."""
    if status != 200:
        return f"HTTP {status}: {payload[:200]!r}"
    try:
        predictions = json.loads(payload)["predictions"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"not a JSON answer with predictions ({exc}): {payload[:200]!r}"
    if not isinstance(predictions, list) or len(predictions) != batch:
        n = len(predictions) if isinstance(predictions, list) else type(predictions).__name__
        return f"{n} predictions for {batch} tiles"
    for row in predictions:
        prob = row.get("prob_failed") if isinstance(row, dict) else None
        if not isinstance(prob, int | float) or not 0.0 <= prob <= 1.0:
            return f"prob_failed {prob!r} is not a number in [0, 1]"
    return None


def post(url: str, body: bytes, batch: int, timeout: float) -> tuple[float, str | None]:
    """Seconds one request took, and its error (None when the answer is good)."""
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    except OSError as exc:  # refused, reset, timed out
        return time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
    return time.perf_counter() - t0, check_answer(status, payload, batch)


def client(
    url: str, bodies: list[bytes], batch: int, requests: int, concurrency: int, timeout: float
) -> dict[str, Any]:
    """The load (run in the client process): ``requests`` posts from ``concurrency`` threads."""
    with ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        results = list(
            pool.map(lambda i: post(url, bodies[i % len(bodies)], batch, timeout), range(requests))
        )
        wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "latency_s": [seconds for seconds, _ in results],
        "errors": [error for _, error in results if error is not None],
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tissue", choices=["cortical", "trabecular"], default="cortical")
    parser.add_argument("--model-uri", help="default: models:/bonedamage-<tissue>@champion")
    parser.add_argument("--batch", type=int, default=8, help="tiles per request")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=4, help="requests before timing")
    parser.add_argument("--workers", type=int, default=1, help="mlflow models serve --workers")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per request")
    parser.add_argument("--start-timeout", type=float, default=180, help="seconds for /ping")
    parser.add_argument("--tiles", type=Path, default=ROOT / "data/tiles")
    parser.add_argument("--splits", type=Path, default=ROOT / "data/splits.parquet")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--log", type=Path, help="keep the server's output here")
    args = parser.parse_args()
    if min(args.batch, args.concurrency, args.requests, args.workers) < 1 or args.warmup < 0:
        parser.error("--batch, --concurrency, --requests, --workers >= 1; --warmup >= 0")
    from bonedamage.config import load_params

    uri = args.model_uri or f"models:/bonedamage-{args.tissue}@champion"

    bodies, tile_px, dtype = request_bodies(
        args.tissue, args.tiles, args.splits, args.params, args.batch
    )
    env = dict(os.environ)
    db = ROOT / load_params(args.params)["mlflow"]["db"]  # as tracking.configure does
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{db.resolve()}")
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("DO_NOT_TRACK", "true")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", uri,
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(args.workers)]  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    signal.signal(signal.SIGTERM, sigterm_to_interrupt)
    with tempfile.TemporaryDirectory() as tmp:
        log = args.log or Path(tmp) / "serve.log"
        proc = start_server(cmd, env, log)
        died = None
        try:
            start_s = wait_ready(proc, f"{base}/ping", args.start_timeout, log)
            # the load comes from another process, so that the client's threads and JSON
            # work share no interpreter (nor GIL) with anything else; leaving the block
            # terminates it
            with get_context("spawn").Pool(1) as pool:
                common = (f"{base}/invocations", bodies, args.batch)
                warm = pool.apply(client, (*common, args.warmup, args.concurrency, args.timeout))
                load = pool.apply(client, (*common, args.requests, args.concurrency, args.timeout))
            died = proc.poll()
        except KeyboardInterrupt:
            print("interrupted: stopping the server", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            stop_server(proc)
        errors = warm["errors"] + load["errors"]
        if died is not None:
            errors.append(f"the server exited with code {died} during the load")
            print(f"server output ends with:\n{log_tail(log)}", file=sys.stderr)

    lat_ms = [s * 1000 for s in load["latency_s"]]
    wall = load["wall_s"]
    print(f"model            {uri} (workers {args.workers}; {tile_px} px {dtype} tiles)")
    print(f"requests         {args.requests} (+{args.warmup} warm-up, not timed)")
    print(f"errors           {len(errors)}")
    print(f"concurrency      {args.concurrency}")
    print(f"batch            {args.batch} tiles/request ({len(bodies)} distinct requests)")
    print(f"latency p50      {percentile(lat_ms, 50):8.1f} ms")
    print(f"latency p90      {percentile(lat_ms, 90):8.1f} ms")
    print(f"latency p99      {percentile(lat_ms, 99):8.1f} ms")
    print(f"throughput       {args.requests / wall:8.1f} requests/s")
    print(f"throughput       {args.requests * args.batch / wall:8.1f} tiles/s")
    print(f"server start     {start_s:8.1f} s (to the first /ping answer)")
    if errors:
        shown = sorted(set(errors))[:5]
        print(f"first errors ({len(set(errors))} distinct):", *shown, sep="\n  ", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
