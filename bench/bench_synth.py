"""Benchmark: generate the default phantom dataset; print wall time, peak memory, size.

    python bench/bench_synth.py [--params params.yaml] [--workers N]

Figures only, no pass/fail: speed and memory goals live here, not in tests.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from bonedamage.config import load_params
from bonedamage.data.synth.generate import generate_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--workers", type=int)
    args = parser.parse_args()
    cfg = load_params(args.params)["synth"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "raw"
        t0 = time.perf_counter()
        manifest = generate_dataset(cfg, out, workers=args.workers, progress=False)
        wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"scans            {len(manifest)} ({manifest['specimen_id'].nunique()} specimens)")
    print(f"wall time        {wall:.1f} s (workers={args.workers or cfg.get('workers', 1)})")
    print(f"per scan         {wall / len(manifest):.2f} s")
    print(f"peak RSS         {max(own, children):.0f} MiB (largest process)")
    print(f"size on disk     {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
