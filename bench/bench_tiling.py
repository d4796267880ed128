"""Benchmark the tile stage: throughput against a raw read, and memory on a large scan.

    python bench/bench_tiling.py [--throughput-gib 0.5] [--big-gib 4] [--cap-gib 1]

1. Throughput: tiling a scan with slice stride 1 (every byte of the file is read) against
   a plain sequential read of the same file, both from a warm page cache; prints the
   ratio (goal >= 0.5).
2. Memory: tiles a scan of ``--big-gib`` GiB in a child process whose data segment is
   capped at ``--cap-gib`` GiB (RLIMIT_DATA: heap and anonymous memory; the read-only
   memory map of the scan is file-backed) and prints the child's peak RSS (goal: under
   the cap).

Figures only, no pass/fail. Scans are written to a temporary folder (``--tmp``).
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bonedamage.config import load_params
from bonedamage.data.manifest import COLUMNS, format_shape, write_manifest
from bonedamage.data.tiling import tile_dataset
from bonedamage.data.volume import write_volume

VOXEL_UM = 20.0


def make_scan(root: Path, gib: float) -> Path:
    """A trabecular-like uint16 scan of about ``gib`` GiB with its manifest."""
    side = 1024 if gib >= 1 else 512
    nz = max(8, int(gib * 2**30 / (side * side * 2)))
    shape = (nz, side, side)
    rng = np.random.default_rng(0)
    base = (rng.random((side, side)) < 0.3).astype(np.uint16) * 30000 + 8000

    def slices():
        for z in range(nz):
            yield base + rng.integers(0, 4000, size=(side, side), dtype=np.uint16) + z % 7

    path = root / "trabecular" / "big-0-pristine.tif"
    digest = write_volume(path, slices(), shape, np.uint16, VOXEL_UM)
    row = dict(
        scan_id="big-0-pristine",
        specimen_id="big",
        tissue="trabecular",
        species="bench",
        state="pristine",
        load_step=0,
        applied_strain=0.0,
        voxel_size_um=VOXEL_UM,
        path="trabecular/big-0-pristine.tif",
        mask_path="",
        shape=format_shape(shape),
        dtype="uint16",
        sha256=digest,
        source="ingest",
    )
    write_manifest(pd.DataFrame([row], columns=list(COLUMNS)), root)
    return path


def tile_cfg(params: dict, stride: int) -> dict:
    cfg = copy.deepcopy(params["tile"])
    cfg["slice_stride"] = stride
    cfg["working_voxel_um"]["trabecular"] = VOXEL_UM
    return cfg


def set_cache(path: Path, warm: bool) -> None:
    """Load the file into the page cache (warm) or evict it (cold, posix_fadvise)."""
    with open(path, "rb") as fh:
        if warm:
            while fh.read(1 << 23):
                pass
        else:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def raw_read_seconds(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        while fh.read(1 << 23):
            pass
    return time.perf_counter() - t0


def throughput(params: dict, tmp: Path, gib: float) -> None:
    root = tmp / "thr" / "raw"
    scan = make_scan(root, gib)
    size = scan.stat().st_size
    print(f"scan            {size / 2**20:.0f} MiB uint16")
    for stride in (1, int(params["tile"]["slice_stride"])):
        for warm in (False, True):
            set_cache(scan, warm)
            raw = raw_read_seconds(scan)
            set_cache(scan, warm)
            t0 = time.perf_counter()
            index = tile_dataset(
                root, tmp / "thr" / "tiles", tile_cfg(params, stride), progress=False
            )
            tiling = time.perf_counter() - t0
            cache = "warm page cache" if warm else "cold (evicted)"
            print(
                f"-- slice stride {stride}, {cache}: {len(index)} tiles; scan MiB/s: raw read "
                f"{size / raw / 2**20:.0f}, tiling {size / tiling / 2**20:.0f}, "
                f"ratio {raw / tiling:.2f} (goal >= 0.5)"
            )


def child(root: str, out: str, params_path: str, cap: int) -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    params = load_params(params_path)
    t0 = time.perf_counter()
    index = tile_dataset(
        Path(root), Path(out), tile_cfg(params, params["tile"]["slice_stride"]), progress=False
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"tiles           {len(index)} in {time.perf_counter() - t0:.1f} s")
    print(f"peak RSS        {peak:.0f} MiB")


def memory(args: argparse.Namespace, tmp: Path) -> None:
    root = tmp / "big" / "raw"
    scan = make_scan(root, args.big_gib)
    cap = int(args.cap_gib * 2**30)
    print(
        f"scan            {scan.stat().st_size / 2**30:.2f} GiB; data segment cap "
        f"{cap / 2**30:.2f} GiB"
    )
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            str(root),
            str(tmp / "big" / "tiles"),
            args.params,
            str(cap),
        ],
        check=True,
    )


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--throughput-gib", type=float, default=0.5)
    parser.add_argument("--big-gib", type=float, default=4.0)
    parser.add_argument("--cap-gib", type=float, default=1.0)
    parser.add_argument("--tmp", help="folder for the scans (default: system temp)")
    args = parser.parse_args()
    params = load_params(args.params)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        print("== throughput")
        throughput(params, Path(tmp), args.throughput_gib)
        print("== memory")
        memory(args, Path(tmp))


if __name__ == "__main__":
    main()
