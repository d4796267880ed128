"""Benchmark whole-plane segmentation: against MONAI's sliding window and the bare forward,
and its memory on a scan streamed plane by plane.

    python bench/bench_segment.py [--weights models/<tissue>/seg.pt] [--scan SCAN.tif]
        [--planes 4] [--size 1024] [--overlap 0.5] [--batch-size 64] [--repeat 3]
        [--threads 2] [--big-mib 2048] [--big-side 2048] [--big-overlap 0] [--tmp DIR]

1. Throughput, on every plane of a scan (a seeded random uint16 volume of ``--planes``
   planes of ``--size`` px, or the first ``--planes`` planes of ``--scan``, 0: all; read
   with ``open_volume``), normalised with a fixed range (``--range``), 2.5-D for a model of
   3 channels: (a) ``segment_plane``; (b) MONAI's ``sliding_window_inference(mode=
   "gaussian")`` with the same roi size, sw_batch_size, overlap and softmax; (c) the bare
   forward + softmax of exactly the tiles (a) evaluates (cut beforehand), in batches of the
   same size. Interleaved plane by plane, in a rotating order (so load from other processes
   hits all alike); the best of ``--repeat`` runs counts. Prints planes/s, tiles/s, the
   ratios a/b (goal >= 1: a at least as fast as MONAI) and a/c (the cost of cutting and
   blending), and the largest difference between a's and b's probabilities.
2. Memory: writes a uint16 TIFF stack larger than ``--big-mib`` MiB (planes of
   ``--big-side`` px, page by page, to a temporary folder, ``--tmp``) and streams it plane by
   plane through ``segment_plane`` in a child process (its own peak RSS), writing P(damage) =
   1 - P(background) as a uint8 stack page by page. Prints the child's RSS once the model is
   built (torch and MONAI alone hold ~1 GiB), its peak after the first plane and at the end,
   against the scan's size: a bounded stream's peak does not grow after the first plane.
   (A cap on the data segment, as bench_tiling.py sets, is not usable here: importing torch
   and MONAI fails under RLIMIT_DATA of 4 GiB.) Defaults: a 2 GiB scan of 2048 x 2048 planes
   at overlap 0 (1024 tiles a plane: a plane's memory does not depend on the overlap, its
   time does, 0.5 is ~4x the tiles); at the ~1700 tiles/s of the default model on 2 idle
   cores, about 3 minutes (the whole default run: about 4).

The model is a MONAI U-Net (channels 16-32-64-128, strides 2, one residual unit, 3 input
channels, 3 classes) with weights seeded by ``--seed``, or ``--weights`` (a state dict with
its JSON sidecar, rebuilt by ``load_segmenter``; its ``tile_px`` and ``in_channels``
apply). Torch uses ``--threads`` threads. Figures only, no pass/fail.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile
import torch
from torch import nn

from bonedamage.data.tilestore import normalize
from bonedamage.data.tiling import plane_with_context
from bonedamage.data.volume import open_volume
from bonedamage.learn.tiled_inference import (
    model_in_channels,
    pad_to_tile,
    segment_plane,
    window_origins,
)

METHODS = ("(a) segment_plane", "(b) MONAI sliding window", "(c) bare forward")


def build_model(args: argparse.Namespace) -> tuple[nn.Module, int, str]:
    """The model in eval mode, its tile size and a line describing it."""
    if args.weights:
        from bonedamage.learn.segmentation import load_segmenter

        path = Path(args.weights)
        model, meta = load_segmenter(path)
        return model, int(meta.get("tile_px", args.tile_px)), str(path)
    from monai.networks.nets import UNet

    torch.manual_seed(args.seed)
    model = UNet(spatial_dims=2, in_channels=3, out_channels=3, channels=(16, 32, 64, 128),
                 strides=(2, 2, 2), num_res_units=1)  # fmt: skip
    return (
        model.eval(),
        args.tile_px,
        f"MONAI UNet 3 -> 3 classes, random weights (seed {args.seed})",
    )


def plane_loader(
    read: Callable[[int], np.ndarray], count: int, channels: int, lo: float, hi: float
) -> Callable[[int], np.ndarray]:
    """Plane z as the model's input (C, H, W) float32: normalised, 2.5-D for 3 channels."""
    if channels not in (1, 3):
        raise SystemExit(f"the model takes {channels} channels: 1 or 3 (2.5-D) supported")
    context = 1 if channels == 3 else 0

    def load(z: int) -> np.ndarray:
        image = normalize(plane_with_context(read, count, z, context), lo, hi)
        return image[None] if image.ndim == 2 else image

    return load


def cut_tiles(image: np.ndarray, tile: int, overlap: float) -> torch.Tensor:
    """The tiles ``segment_plane`` evaluates on ``image``, (n, C, tile, tile)."""
    padded, _ = pad_to_tile(image, tile)
    origins = window_origins(image.shape[1:], tile, overlap)
    return torch.from_numpy(np.stack([padded[:, y : y + tile, x : x + tile] for y, x in origins]))


def bare_forward(model: nn.Module, tiles: torch.Tensor, batch: int) -> None:
    """(c): forward + softmax of tiles cut beforehand, in batches, nothing blended."""
    with torch.inference_mode():
        for start in range(0, len(tiles), batch):
            torch.softmax(model(tiles[start : start + batch]), dim=1)


def monai_window(
    model: nn.Module, image: np.ndarray, args: argparse.Namespace, tile: int
) -> torch.Tensor:
    """(b): MONAI's sliding window over the plane, blending softmax probabilities."""
    from monai.inferers import sliding_window_inference

    with torch.inference_mode():
        return sliding_window_inference(torch.from_numpy(image)[None], roi_size=(tile, tile),
                                        sw_batch_size=args.batch_size, overlap=args.overlap,
                                        predictor=lambda x: torch.softmax(model(x), dim=1),
                                        mode="gaussian")  # fmt: skip


def throughput(model: nn.Module, tile: int, load: Callable[[int], np.ndarray],
               planes: int, args: argparse.Namespace) -> None:  # fmt: skip
    """Time (a), (b), (c) on every plane, interleaved; print the best of the repeats."""
    image = load(0)
    a = segment_plane(model, image, tile, args.overlap, batch_size=args.batch_size)
    b = monai_window(model, image, args, tile)[0].numpy()  # also the warm-up
    per_plane = len(window_origins(image.shape[1:], tile, args.overlap))
    tiles = per_plane * planes
    print(f"plane            {image.shape} float32, {per_plane} tiles of {tile} px at overlap "
          f"{args.overlap} ({tiles} in all); batch {args.batch_size}; "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    best = dict.fromkeys(METHODS, float("inf"))
    for r in range(args.repeat):
        seconds = dict.fromkeys(METHODS, 0.0)
        for z in range(planes):
            image = load(z)
            cut = cut_tiles(image, tile, args.overlap)
            runs = {
                METHODS[0]: lambda image=image: segment_plane(
                    model, image, tile, args.overlap, batch_size=args.batch_size
                ),
                METHODS[1]: lambda image=image: monai_window(model, image, args, tile),
                METHODS[2]: lambda cut=cut: bare_forward(model, cut, args.batch_size),
            }
            for name in METHODS[r % 3 :] + METHODS[: r % 3]:
                t0 = time.perf_counter()
                runs[name]()
                seconds[name] += time.perf_counter() - t0
        best = {name: min(best[name], seconds[name]) for name in METHODS}
    for name, s in best.items():
        print(f"{name:25s} {s:7.2f} s  {planes / s:7.2f} planes/s  {tiles / s:8.1f} tiles/s")
    print(f"ratio a / b                {best[METHODS[1]] / best[METHODS[0]]:.2f} (goal >= 1)")
    print(f"ratio a / c                {best[METHODS[2]] / best[METHODS[0]]:.2f}")
    print(f"max |a - b| (plane 0)      {np.abs(a - b).max():.1e}")


def write_big(path: Path, mib: float, side: int, seed: int) -> tuple[int, int, int]:
    """A bone-like uint16 stack of more than ``mib`` MiB, written page by page."""
    nz = int(mib * 2**20 // (side * side * 2)) + 1
    rng = np.random.default_rng(seed)
    base = (rng.random((side, side)) < 0.3).astype(np.uint16) * 30000 + 8000

    def pages() -> Iterator[np.ndarray]:
        for z in range(nz):
            yield base + rng.integers(0, 4000, size=(side, side), dtype=np.uint16) + z % 7

    shape = (nz, side, side)
    with tifffile.TiffWriter(path, bigtiff=nz * side * side * 2 > 2**32 - 2**25) as tif:
        tif.write(pages(), shape=shape, dtype=np.uint16, photometric="minisblack")
    return shape


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """The resident set now (Linux), MiB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def streamed(args: argparse.Namespace, scan: Path, out: Path) -> None:
    """The child: segment ``scan`` plane by plane into ``out`` (uint8 P(damage))."""
    torch.set_num_threads(args.threads)
    model, tile, _ = build_model(args)
    built = rss_mib()
    peaks: list[float] = []  # after the first plane, after half of them
    t0 = time.perf_counter()
    with open_volume(scan) as vol:
        count, height, width = vol.shape
        load = plane_loader(vol.read, count, model_in_channels(model) or 1, *args.range)

        def damage() -> Iterator[np.ndarray]:
            for z in range(count):
                probs = segment_plane(model, load(z), tile, args.big_overlap,
                                      batch_size=args.batch_size)  # fmt: skip
                yield np.rint((1 - probs[0]) * 255).astype(np.uint8)
                if z in (0, count // 2):
                    peaks.append(peak_rss_mib())

        with tifffile.TiffWriter(out, bigtiff=count * height * width > 2**32 - 2**25) as tif:
            tif.write(damage(), shape=(count, height, width), dtype=np.uint8,
                      photometric="minisblack")  # fmt: skip
    seconds = time.perf_counter() - t0
    tiles = len(window_origins((height, width), tile, args.big_overlap)) * count
    size = scan.stat().st_size / 2**20
    print(f"streamed         {count} planes in {seconds:.1f} s: {count / seconds:.2f} planes/s, "
          f"{tiles / seconds:.1f} tiles/s, {size / seconds:.1f} MiB/s of scan")  # fmt: skip
    print(f"output           {out.stat().st_size / 2**20:.0f} MiB uint8 P(damage)")
    print(f"RSS              {built:.0f} MiB with the model built; peak {peaks[0]:.0f} MiB "
          f"after the first plane, {peaks[-1]:.0f} after {count // 2 + 1}, "
          f"{peak_rss_mib():.0f} after all {count}")  # fmt: skip
    print(f"scan / peak RSS  {size / peak_rss_mib():.2f} ({size:.0f} MiB scan)")


def memory(args: argparse.Namespace) -> None:
    """Write the big scan, then stream it through ``segment_plane`` in a child process."""
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        scan, out = Path(tmp) / "big.tif", Path(tmp) / "damage.tif"
        t0 = time.perf_counter()
        shape = write_big(scan, args.big_mib, args.big_side, args.seed)
        print(f"scan             {scan.stat().st_size / 2**20:.0f} MiB uint16 {shape} (written "
              f"in {time.perf_counter() - t0:.1f} s); overlap {args.big_overlap}",
              flush=True)  # fmt: skip
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", str(scan), str(out)],
                       check=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="models/<tissue>/seg.pt with its seg.json sidecar")
    parser.add_argument("--scan", help="a TIFF stack (default: a seeded random volume)")
    parser.add_argument("--planes", type=int, default=4, help="planes compared (0: all)")
    parser.add_argument("--size", type=int, default=1024, help="random volume's plane side")
    parser.add_argument("--range", type=float, nargs=2, default=(0.0, 65535.0),
                        metavar=("LO", "HI"), help="(raw - LO) / (HI - LO)")  # fmt: skip
    parser.add_argument("--tile-px", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--big-mib", type=float, default=2048, help="streamed scan (0: skip)")
    parser.add_argument("--big-side", type=int, default=2048)
    parser.add_argument("--big-overlap", type=float, default=0.0)
    parser.add_argument("--tmp", help="folder for the streamed scan (default: system temp)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        streamed(args, Path(args.child[0]), Path(args.child[1]))
        return
    torch.set_num_threads(args.threads)
    model, tile, name = build_model(args)
    print(f"model            {name}")
    channels = model_in_channels(model) or 1
    print("== throughput")
    if args.scan:
        with open_volume(args.scan) as vol:
            count = len(vol) if args.planes <= 0 else min(args.planes, len(vol))
            print(f"scan             {args.scan} {vol.shape} {vol.dtype}")
            throughput(model, tile, plane_loader(vol.read, len(vol), channels, *args.range),
                       count, args)  # fmt: skip
    else:
        count = max(args.planes, 1)
        volume = np.random.default_rng(args.seed).integers(
            0, 65536, size=(count, args.size, args.size), dtype=np.uint16
        )
        print(f"scan             random uint16 {volume.shape} (seed {args.seed})")
        throughput(model, tile, plane_loader(volume.__getitem__, count, channels, *args.range),
                   count, args)  # fmt: skip
    if args.big_mib > 0:
        print("== memory (streamed, child process)", flush=True)
        memory(args)


if __name__ == "__main__":
    main()
