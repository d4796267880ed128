"""Training data: tiles of one tissue and split as a torch Dataset, with CT-aware augmentation.

Tiles are read from the chunked tile store on demand (memory-mapped), normalised with
their scan's recorded range, and augmented with transforms that make physical sense for
a CT slice: a mirror image; 90-degree rotations only where the slice is normal to the
load axis (axial: no preferred in-plane orientation), not where it contains the load
axis (coronal, sagittal: a quarter turn would lay the compaction band and the buckled
struts on their side, which no compression test produces); a small gain/offset jitter
(calibration drift between beamline sessions) and a little Gaussian noise. Augmentation
draws come from a generator seeded by (seed, epoch, item), so an epoch is the same
whatever the batch order or the number of loader workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from bonedamage.data.tilestore import TileStore


@dataclass(frozen=True)
class Augment:
    """Augmentation settings (``augment`` in params.yaml), scaled by ``strength``.

    Tiles are (h, w) or (channels, h, w); every channel gets the same transform.
    ``flips`` mirrors the columns (tiles of planes that contain the load axis z keep z
    along their rows). ``rot90`` turns tiles by quarter turns, only those of a plane in
    ``rot90_planes`` (None: every plane).
    """

    flips: bool = True
    rot90: bool = True
    gain: float = 0.0
    offset: float = 0.0
    noise: float = 0.0
    rot90_planes: tuple[str, ...] | None = None

    @classmethod
    def from_params(cls, cfg: dict[str, Any] | None, strength: float = 1.0) -> Augment:
        cfg = cfg or {}
        planes = cfg.get("rot90_planes")
        return cls(
            bool(cfg.get("flips", False)),
            bool(cfg.get("rot90", False)),
            float(cfg.get("gain", 0.0)) * strength,
            float(cfg.get("offset", 0.0)) * strength,
            float(cfg.get("noise", 0.0)) * strength,
            None if planes is None else tuple(planes),
        )

    def rotates(self, plane: str | None) -> bool:
        """Whether tiles of ``plane`` get quarter turns (``None``: a plane not known)."""
        return self.rot90 and (self.rot90_planes is None or plane in self.rot90_planes)

    def __call__(
        self, tile: np.ndarray, rng: np.random.Generator, plane: str | None = None
    ) -> np.ndarray:
        if self.flips and rng.random() < 0.5:
            tile = tile[..., ::-1]
        if self.rotates(plane):
            tile = np.rot90(tile, int(rng.integers(4)), axes=(-2, -1))
        if self.gain or self.offset:
            tile = tile * (1.0 + rng.uniform(-self.gain, self.gain)) + rng.uniform(
                -self.offset, self.offset
            )
        if self.noise:
            tile = tile + rng.normal(0.0, self.noise, tile.shape)
        return np.ascontiguousarray(tile, dtype=np.float32)


def split_rows(
    store: TileStore, splits: pd.DataFrame, tissue: str, scheme: str, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Store positions and labels of one tissue's tiles in ``split`` of ``scheme``."""
    chosen = splits[
        (splits["tissue"] == tissue) & (splits["scheme"] == scheme) & (splits["split"] == split)
    ]
    position = pd.Series(np.arange(len(store.index)), index=store.index["tile_id"].to_numpy())
    missing = ~chosen["tile_id"].isin(position.index)
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} tile ids of split {scheme}/{split} are not in "
            f"the tile store {store.root}; re-run the tile and split stages"
        )
    positions = position.loc[chosen["tile_id"].to_numpy()].to_numpy()
    return positions, chosen["label"].to_numpy(dtype=np.int64)


class TileDataset(Dataset):
    """(tile tensor (C, H, W) float32, label) pairs for the given store positions
    (C = 1, or 3 for 2.5-D tiles)."""

    def __init__(
        self,
        store: TileStore,
        positions: np.ndarray,
        labels: np.ndarray,
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        if len(positions) != len(labels):
            raise ValueError("positions and labels differ in length")
        self.store, self.positions, self.labels = store, np.asarray(positions), labels
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.planes = store.index["plane"].to_numpy()[self.positions]

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation draws of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        tile = self.store.tile(int(self.positions[i]))
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            tile = self.augment(tile, rng, str(self.planes[i]))
        return torch.from_numpy(tile if tile.ndim == 3 else tile[None]), int(self.labels[i])


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, workers: int = 0
) -> DataLoader:
    """A DataLoader whose shuffling is seeded (same order for the same seed and epoch)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        drop_last=False,
    )
