"""Benchmark: whole-scan prediction against the bare model forward on the same tiles.

    python bench/bench_predict.py [--model models:/bonedamage-cortical@champion]
        [--scan data/raw/cortical/cortical-08-1-failed.tif] [--voxel-size-um UM] [--repeat 5]
        [--stack 8]

Runs ``predict_scan`` on the scan (with and without the CAM volume) and the bare forward
pass of the same model on as many tiles already normalised in memory, in batches of the
same size, interleaved (so load from other processes hits both alike; the best of
``--repeat`` runs counts). Prints tiles/s for each, their ratio (goal: prediction without
CAM at least 0.7 of the bare forward) and the peak RSS of the process.

A default phantom scan holds only about a hundred tiles, so its ratio is dominated by
the fixed cost of a prediction (opening the scan, the intensity range, writing the
stacks, tables and PNG). ``--stack N`` also measures a scan N times as long (the same
scan repeated along z, in a temporary file): the steady-state throughput that a real
SR-microCT scan of thousands of tiles sees. Figures only, no pass/fail. Needs a
registered model (run the pipeline first).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bonedamage.data.tilestore import with_channels
from bonedamage.data.volume import open_volume, write_volume
from bonedamage.explain.scan import load_registered, predict_scan
from bonedamage.learn.train import seed_everything


def bare_forward(model: torch.nn.Module, tiles: np.ndarray, batch: int) -> float:
    """Seconds of the model's forward + softmax over ``tiles`` (normalised, in memory)."""
    x = torch.from_numpy(with_channels(tiles))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            torch.softmax(model(x[start : start + batch]), dim=1)
    return time.perf_counter() - t0


def measure(model, scan: Path, voxel: float | None, args: argparse.Namespace) -> None:
    """Print predict, predict+cam and bare-forward throughput on one scan."""
    runs: dict[str, list[float]] = {"predict": [], "predict+cam": [], "bare forward": []}
    with tempfile.TemporaryDirectory() as tmp:
        predict_scan(model, scan, Path(tmp) / "warm", cam=False, voxel_size_um=voxel,
                     batch_size=args.batch_size, progress=False)  # fmt: skip
        n = len(pd.read_csv(Path(tmp) / "warm" / "tiles.csv"))
        # as many tiles of the same shape, in memory (a forward's cost does not depend on
        # the values)
        tiles = np.random.default_rng(0).random((n, *model.tile_shape), np.float32)
        for i in range(args.repeat):
            for cam in (False, True):
                t0 = time.perf_counter()
                predict_scan(model, scan, Path(tmp) / f"{cam}-{i}", cam=cam, voxel_size_um=voxel,
                             batch_size=args.batch_size, progress=False)  # fmt: skip
                runs["predict+cam" if cam else "predict"].append(time.perf_counter() - t0)
            runs["bare forward"].append(bare_forward(model.module, tiles, args.batch_size))
    timings = {name: min(values) for name, values in runs.items()}
    print(f"scan             {scan} ({n} tiles of {model.tile_px} px)")
    for name, seconds in timings.items():
        print(f"{name:16s} {seconds:7.2f} s  {n / seconds:8.1f} tiles/s")
    base = timings["bare forward"]
    print(f"ratio predict / bare forward        {base / timings['predict']:.2f} (goal >= 0.7)")
    print(f"ratio predict+cam / bare forward    {base / timings['predict+cam']:.2f}")


def stacked(scan: Path, times: int, voxel: float | None, out: Path) -> Path:
    """The scan repeated ``times`` along z, as a multi-page TIFF with its voxel size."""
    with open_volume(scan) as vol:
        pages = [vol.read(z) for z in range(vol.shape[0])]
        size = voxel if voxel is not None else vol.voxel_size_um
    shape = (len(pages) * times, *pages[0].shape)
    write_volume(out, (p for _ in range(times) for p in pages), shape, pages[0].dtype,
                 voxel_size_um=size)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/bonedamage-cortical@champion")
    parser.add_argument("--scan", default="data/raw/cortical/cortical-08-1-failed.tif")
    parser.add_argument("--voxel-size-um", type=float, help="when the TIFF tags lack it")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--stack", type=int, default=8, help="long scan: N copies (0: skip)")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path('mlflow.db').resolve()}")
    seed_everything(0, args.threads)
    model = load_registered(args.model)
    print(f"model            {args.model}")
    measure(model, Path(args.scan), args.voxel_size_um, args)
    if args.stack > 1:
        with tempfile.TemporaryDirectory() as tmp:
            long_scan = stacked(Path(args.scan), args.stack, args.voxel_size_um,
                                Path(tmp) / f"stacked-x{args.stack}.tif")  # fmt: skip
            measure(model, long_scan, None, args)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS         {rss:.0f} MiB")


if __name__ == "__main__":
    main()
