"""Self-supervised pretraining: predict the rotation (0/90/180/270 deg) of a tile.

The study transferred an ImageNet ResNet; offline, the project pretrains the same
backbone on its own tiles instead (labels unused). Rotation prediction forces the
network to learn oriented structure (trabecular struts, canals, lamellae, crack traces)
that fine-tuning then builds on. Only train-split tiles are used, so no test specimen is
seen, even without labels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from bonedamage.learn.datasets import TileDataset, make_loader
from bonedamage.learn.train import EpochCallback, FitResult, TrainConfig, fit


class RotationDataset(Dataset):
    """(rotated tile, rotation index 0-3) from a TileDataset; rotations seeded per item."""

    def __init__(self, tiles: TileDataset, seed: int) -> None:
        self.tiles, self.seed, self.epoch = tiles, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.tiles.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        tile, _ = self.tiles[i]
        k = int(np.random.default_rng([self.seed, self.epoch, i, 4]).integers(4))
        return torch.rot90(tile, k, dims=(1, 2)).contiguous(), k


def pretrain(
    model: nn.Module,
    train: TileDataset,
    val: TileDataset,
    cfg: TrainConfig,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train ``model`` (a 4-way rotation classifier) on rotated tiles."""
    train_loader = make_loader(
        RotationDataset(train, cfg.seed), cfg.batch_size, shuffle=True, seed=cfg.seed
    )
    val_loader = make_loader(RotationDataset(val, cfg.seed + 1), 256, shuffle=False)
    return fit(model, train_loader, val_loader, cfg, on_epoch=on_epoch)
