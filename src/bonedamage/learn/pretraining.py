"""Pretraining of the ResNet backbone without the dataset's labels: the study transferred an
ImageNet ResNet; offline, the project makes its own starting weights, three ways.

- ``procedural``: supervised on the generated corpus (:mod:`bonedamage.data.corpus`), one
  class per generated scan, FractalDB-style: the labels come from the formula that made
  the images. Two classes of one specimen differ only by its load, so the task cannot be
  solved without seeing damage; classes of other specimens, without seeing structure.
- ``simsiam``: self-supervised, SimSiam (Chen and He, CVPR 2021) with lightly's heads and
  loss: two views of a tile (random crops at its own voxel size, mirrored, turned only
  where the plane is normal to the load axis, contrast and noise jittered as
  :class:`~bonedamage.learn.datasets.Augment` does) must map to the same embedding.
- ``rotation``: which quarter turn a tile was given (Gidaris et al., ICLR 2018).

``simsiam`` and ``rotation`` learn from a pool of unlabelled tiles (the corpus and the
dataset's train split); none of them sees a test or validation specimen of the dataset.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from bonedamage.config import PRETRAIN_METHODS, ConfigError
from bonedamage.data.corpus import holdout, scan_classes
from bonedamage.data.tilestore import TileStore
from bonedamage.learn import distributed
from bonedamage.learn.datasets import Augment, TileDataset, make_loader, split_rows
from bonedamage.learn.models import pretrained_model
from bonedamage.learn.train import (
    EpochCallback,
    FitResult,
    TrainConfig,
    fit,
    resolve_device,
    seed_everything,
)

METHODS: tuple[str, ...] = PRETRAIN_METHODS
ROTATIONS = 4  # quarter turns: the rotation task's classes


class TilePool(Dataset):
    """Several :class:`TileDataset` as one (tile, label) dataset that passes the epoch on."""

    def __init__(self, parts: Sequence[TileDataset]) -> None:
        if not parts or not sum(len(p) for p in parts):
            raise ValueError("the pool of pretraining tiles is empty")
        self.parts, self.joined = list(parts), ConcatDataset(list(parts))
        self.planes = np.concatenate([p.planes for p in self.parts])

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.joined)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.joined[i]


class RotationDataset(Dataset):
    """(tile turned by k quarter turns, k) for k drawn per (seed, epoch, item)."""

    def __init__(self, tiles: Dataset, seed: int) -> None:
        self.tiles, self.seed, self.epoch = tiles, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.tiles, "set_epoch"):
            self.tiles.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        tile, _ = self.tiles[i]
        k = int(np.random.default_rng([self.seed, self.epoch, i, ROTATIONS]).integers(ROTATIONS))
        return torch.rot90(tile, k, dims=(1, 2)).contiguous(), k


class TwoViews(Dataset):
    """Two augmented random crops of a tile (``crop`` px, no rescaling), drawn per (seed,
    epoch, item). ``tiles``: a pool without augmentation of its own."""

    def __init__(self, tiles: TilePool, augment: Augment, crop: int, seed: int) -> None:
        size = int(tiles[0][0].shape[-1]) if len(tiles) else 0
        if not 0 < crop <= size:
            raise ValueError(f"crop of {crop} px: must be between 1 and the tile size {size}")
        self.tiles, self.augment, self.crop, self.seed, self.epoch = tiles, augment, crop, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.tiles)

    def _view(self, tile: np.ndarray, rng: np.random.Generator, plane: str) -> torch.Tensor:
        tile = self.augment(tile, rng, plane)
        y, x = rng.integers(0, tile.shape[-1] - self.crop + 1, size=2)
        return torch.from_numpy(np.ascontiguousarray(tile[:, y : y + self.crop, x : x + self.crop]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        tile = self.tiles[i][0].numpy()
        rng = np.random.default_rng([self.seed, self.epoch, i])
        plane = str(self.tiles.planes[i])
        return self._view(tile, rng, plane), self._view(tile, rng, plane)


def supervised(
    model: nn.Module,
    train: Dataset,
    val: Dataset,
    cfg: TrainConfig,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train ``model`` on a pretraining classification task (procedural or rotation), best
    epoch by the held-out tiles' balanced accuracy."""
    return fit(
        model,
        make_loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed),
        make_loader(val, 256, shuffle=False),
        cfg,
        on_epoch=on_epoch,
    )


@dataclass
class SimSiamResult:
    """The last epoch's loss (-1 is perfect agreement of the views) and the history."""

    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def simsiam(
    backbone: nn.Module,
    views: TwoViews,
    cfg: TrainConfig,
    settings: dict[str, Any],
    on_epoch: EpochCallback | None = None,
) -> SimSiamResult:
    """SimSiam on ``views``: ``backbone`` (a ResNet whose ``fc`` is :class:`nn.Identity`)
    trains in place. SGD with momentum at ``settings['lr'] * batch_size / 256``, cosine
    decay, ``cfg.weight_decay``. Each epoch logs the loss and ``z_std``, the per-dimension
    spread of the normalised projections: ``1/sqrt(dim)`` when they use every direction,
    0 when they collapsed to one point (the failure SimSiam's stop-gradient prevents)."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead

    device = resolve_device(cfg.device)
    features = _feature_dim(backbone)
    dim, hidden = int(settings["projection_dim"]), int(settings["prediction_dim"])
    net = SimSiamNet(
        backbone,
        SimSiamProjectionHead(features, features, dim),
        SimSiamPredictionHead(dim, hidden, dim),
    ).to(device)
    lr = float(settings["lr"]) * cfg.batch_size / 256
    optimizer = torch.optim.SGD(
        net.parameters(), lr=lr, momentum=float(settings["momentum"]), weight_decay=cfg.weight_decay
    )
    loader = distributed.shard(
        make_loader(views, cfg.batch_size, shuffle=True, seed=cfg.seed), cfg.seed
    )
    steps = cfg.epochs * max(len(loader), 1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    criterion, use_amp = NegativeCosineSimilarity(), cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    trained = distributed.wrap(net)
    result, start = SimSiamResult(float("nan")), time.perf_counter()
    for epoch in range(cfg.epochs):
        distributed.set_epoch(loader, epoch)
        trained.train()
        total, spread, count = 0.0, 0.0, 0
        for a, b in loader:
            if len(a) < 2:  # the heads' batch norm needs two; DDP pads every rank alike
                continue
            a, b = a.to(device, non_blocking=True), b.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                pa, pb, za, zb = trained(a, b)
                loss = 0.5 * (criterion(pa, zb.detach()) + criterion(pb, za.detach()))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total += float(loss.detach()) * len(a)
            spread += float(
                nn.functional.normalize(za.detach().float(), dim=1).std(0).mean()
            ) * len(a)
            count += len(a)
        total, spread, count = distributed.all_sum(total, spread, count)
        metrics = distributed.agree(
            {"train_loss": total / max(count, 1), "z_std": spread / max(count, 1)}
        )
        result.history.append({"epoch": epoch, **metrics})
        result.final_loss = metrics["train_loss"]
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    result.seconds = time.perf_counter() - start
    backbone.to("cpu")
    return result


class SimSiamNet(nn.Module):
    """Backbone, projection and prediction heads: (a, b) -> (p_a, p_b, z_a, z_b)."""

    def __init__(self, backbone: nn.Module, projection: nn.Module, prediction: nn.Module) -> None:
        super().__init__()
        self.backbone, self.projection, self.prediction = backbone, projection, prediction

    def forward(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        za, zb = self.projection(self.backbone(a)), self.projection(self.backbone(b))
        return self.prediction(za), self.prediction(zb), za, zb


def _feature_dim(backbone: nn.Module) -> int:
    """Width of the pooled features of a torchvision ResNet (512 for ResNet-18)."""
    last = backbone.layer4[-1]
    conv = getattr(last, "conv3", None) or last.conv2
    return int(conv.out_channels)


@dataclass
class Pretrained:
    """What a pretraining run leaves: the per-epoch history, the sidecar of the saved
    backbone (how to rebuild it, what it learnt from, its task score) and a summary line."""

    history: list[dict[str, float]]
    meta: dict[str, Any]
    summary: str


def pretrain_backbone(
    method: str,
    corpus_tiles: Path,
    tiles: Path,
    splits: Path,
    tissues: Sequence[str],
    arch: str,
    stem: str,
    settings: dict[str, Any],
    loop: TrainConfig,
    augment_cfg: dict[str, Any],
) -> tuple[nn.Module, Pretrained]:
    """Pretrain a ResNet backbone by ``method`` (params ``pretrain`` in ``settings``).

    ``procedural`` learns from the corpus store at ``corpus_tiles``; ``simsiam`` and
    ``rotation`` from it and the train split (``splits``, grouped scheme) of the dataset's
    ``tissues`` in the store at ``tiles``. Every tile must have the same channels.
    """
    if method not in _RUNS:
        raise ValueError(f"pretrain method {method!r} is unknown: choose from {list(METHODS)}")
    seed_everything(loop.seed, loop.threads)
    corpus, store = TileStore(corpus_tiles), TileStore(tiles)
    parts = [(corpus, np.arange(len(corpus)))]
    if method != "procedural":
        table = pd.read_parquet(splits)
        parts += [(store, split_rows(store, table, t, "grouped", "train")[0]) for t in tissues]
    channels, size = _common_shape(corpus, store, tissues)
    n = sum(len(p) for _, p in parts)
    held = np.split(
        holdout(n, float(settings["val_fraction"]), loop.seed),
        np.cumsum([len(p) for _, p in parts])[:-1],
    )
    base = {"kind": "pretrained", "method": method, "arch": arch, "stem": stem}
    base |= {"in_channels": channels, "tiles": n, "epochs": loop.epochs}
    model, history, meta, summary = _RUNS[method](
        _Job(parts, held, channels, size, arch, stem, settings, loop, augment_cfg)
    )
    return model, Pretrained(history, base | meta, summary)


@dataclass(frozen=True)
class _Job:
    """What every method's run gets: the tile parts and which tiles are held out."""

    parts: list[tuple[TileStore, np.ndarray]]
    held: list[np.ndarray]
    channels: int
    size: int
    arch: str
    stem: str
    settings: dict[str, Any]
    loop: TrainConfig
    augment_cfg: dict[str, Any]


_Run = tuple[nn.Module, list[dict[str, float]], dict[str, Any], str]


def _procedural(job: _Job) -> _Run:
    """One class per generated scan of the corpus (the first part)."""
    corpus, positions = job.parts[0]
    classes, names = scan_classes(corpus.index)
    mask = job.held[0]
    augment = Augment.from_params(job.augment_cfg, float(job.settings["augment_strength"]))
    train = TileDataset(corpus, positions[~mask], classes[~mask], augment, job.loop.seed)
    val = TileDataset(corpus, positions[mask], classes[mask])
    model = pretrained_model(job.arch, job.stem, job.channels, len(names))
    result = supervised(model, train, val, job.loop)
    chance = 1.0 / len(names)
    meta = {"head_classes": len(names), "task": "generated scan (specimen x load)"}
    meta |= {"val_balanced_accuracy": result.best_score, "chance": chance}
    summary = f"{len(names)} classes, val balanced accuracy {result.best_score:.4f}"
    return model, result.history, meta, summary + f" (chance {chance:.4f})"


def _rotation(job: _Job) -> _Run:
    """Quarter turns of every tile, none augmented: the augmentation's own quarter turns
    of axial tiles would blur the task's labels."""
    train = RotationDataset(_pool(job.parts, job.held, keep=False), job.loop.seed)
    val = RotationDataset(_pool(job.parts, job.held, keep=True), job.loop.seed + 1)
    model = pretrained_model(job.arch, job.stem, job.channels, ROTATIONS)
    result = supervised(model, train, val, job.loop)
    meta = {"head_classes": ROTATIONS, "task": "quarter turns"}
    meta |= {"val_balanced_accuracy": result.best_score, "chance": 1.0 / ROTATIONS}
    summary = f"rotation task val balanced accuracy {result.best_score:.4f} (chance 0.25)"
    return model, result.history, meta, summary


def _simsiam(job: _Job) -> _Run:
    """SimSiam on every tile (the held-out ones too: no score is reported on them)."""
    sim = job.settings["simsiam"]
    if not 0 < int(sim["crop_px"]) <= job.size:
        raise ConfigError(
            f"pretrain.simsiam.crop_px {sim['crop_px']}: must be at most the tiles' {job.size} px"
        )
    augment = Augment.from_params(job.augment_cfg, float(sim["augment_strength"]))
    views = TwoViews(_pool(job.parts, None, keep=True), augment, int(sim["crop_px"]), job.loop.seed)
    model = pretrained_model(job.arch, job.stem, job.channels, 0)
    result = simsiam(model, views, job.loop, sim)
    spread = result.history[-1]["z_std"] if result.history else float("nan")
    meta = {"head_classes": 0, "task": "simsiam", "final_loss": result.final_loss}
    meta |= {"z_std": spread, "z_std_uniform": 1.0 / float(np.sqrt(int(sim["projection_dim"])))}
    summary = f"SimSiam loss {result.final_loss:.4f} (-1 best), projection spread {spread:.4f}"
    return model, result.history, meta, summary


_RUNS = {"procedural": _procedural, "simsiam": _simsiam, "rotation": _rotation}


def _pool(
    parts: list[tuple[TileStore, np.ndarray]], held: list[np.ndarray] | None, *, keep: bool
) -> TilePool:
    """The tiles of ``parts`` (no augmentation, label 0) that are (``keep``) or are not held
    out; ``held`` None: all of them."""
    chosen = []
    for k, (store, positions) in enumerate(parts):
        picked = positions if held is None else positions[held[k] == keep]
        if len(picked):
            chosen.append(TileDataset(store, picked, np.zeros(len(picked), dtype=np.int64)))
    return TilePool(chosen)


def _common_shape(corpus: TileStore, store: TileStore, tissues: Sequence[str]) -> tuple[int, int]:
    """The channels and size (px) every tile has: one backbone for every tissue, trained on
    one pool of tiles, needs one input shape."""
    found = {f"corpus {t}": _tile_shape(corpus, t) for t in sorted(set(corpus.index["tissue"]))}
    found |= {t: _tile_shape(store, t) for t in tissues}
    if len(set(found.values())) != 1:
        shown = ", ".join(f"{k} {c} x {px} px" for k, (c, px) in found.items())
        raise ConfigError(
            f"tiles of different shapes ({shown}): one pretrained backbone needs one (params "
            "tile.context_um above 0 for every tissue or 0 for all, and tile.tile_um / "
            "tile.working_voxel_um the same number of pixels)"
        )
    return next(iter(found.values()))


def _tile_shape(store: TileStore, tissue: str) -> tuple[int, int]:
    rows = np.flatnonzero(store.index["tissue"].to_numpy() == tissue)
    if len(rows) == 0:
        raise ConfigError(f"{store.root}: no {tissue} tiles (params pipeline.tissues)")
    return store.channels(tissue), int(store.index["tile_px"].iat[rows[0]])
