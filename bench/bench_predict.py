"""Benchmark: whole-scan prediction against the bare model forward on the same tiles.

    python bench/bench_predict.py [--model models:/bonedamage-cortical@champion]
        [--scan data/raw/cortical/cortical-08-1-failed.tif] [--voxel-size-um UM] [--repeat 3]

Runs ``predict_scan`` on the scan (with and without the CAM volume), then the bare
forward pass of the same model on the same tiles already normalised in memory, in
batches of the same size; prints tiles/s for each, their ratio (goal: prediction without
CAM at least 0.7 of the bare forward) and the peak RSS of the process. Figures only, no
pass/fail. Needs a registered model (run the pipeline first).
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

from bonedamage.explain.predict import load_model, predict_scan
from bonedamage.learn.train import seed_everything


def bare_forward(model: torch.nn.Module, tiles: np.ndarray, batch: int) -> float:
    """Seconds of the model's forward + softmax over ``tiles`` (normalised, in memory)."""
    x = torch.from_numpy(tiles).unsqueeze(1)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            torch.softmax(model(x[start : start + batch]), dim=1)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/bonedamage-cortical@champion")
    parser.add_argument("--scan", default="data/raw/cortical/cortical-08-1-failed.tif")
    parser.add_argument("--voxel-size-um", type=float, help="when the TIFF tags lack it")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path('mlflow.db').resolve()}")
    seed_everything(0, args.threads)
    model = load_model(args.model)
    scan = Path(args.scan)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cam in (False, True):
            runs = []
            for i in range(args.repeat):
                t0 = time.perf_counter()
                predict_scan(model, scan, Path(tmp) / f"{cam}-{i}", cam=cam,
                             voxel_size_um=args.voxel_size_um, batch_size=args.batch_size,
                             progress=False)  # fmt: skip
                runs.append(time.perf_counter() - t0)
            timings["predict+cam" if cam else "predict"] = min(runs)
        tiles_csv = pd.read_csv(Path(tmp) / "False-0" / "tiles.csv")
    n = len(tiles_csv)
    # as many tiles of the same shape, in memory (a forward's cost does not depend on
    # the values)
    rng = np.random.default_rng(0)
    tiles = rng.random((n, model.tile_px, model.tile_px), dtype=np.float32)
    timings["bare forward"] = min(
        bare_forward(model.module, tiles, args.batch_size) for _ in range(args.repeat)
    )
    print(f"scan             {scan} ({n} tiles of {model.tile_px} px; model {args.model})")
    for name, seconds in timings.items():
        print(f"{name:16s} {seconds:7.2f} s  {n / seconds:8.1f} tiles/s")
    base = timings["bare forward"]
    print(f"ratio predict / bare forward        {base / timings['predict']:.2f} (goal >= 0.7)")
    print(f"ratio predict+cam / bare forward    {base / timings['predict+cam']:.2f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS         {rss:.0f} MiB")


if __name__ == "__main__":
    main()
