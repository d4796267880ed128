"""Damage segmentation: a MONAI U-Net that labels every pixel of a tile with its damage kind.

The classifiers answer one question per tile; this model answers it per pixel, trained on
the phantoms' ground-truth label volumes (:mod:`bonedamage.data.labels`: microcrack,
fracture, buckled bone). Class 0 is background; the others are the damage kinds a tissue
shows (params ``segment.classes``). The loss is MONAI's Dice + cross-entropy (or Dice +
focal) with the Dice part over the damage classes only and pooled over the batch, so tiles
without damage still teach the background without making the rare classes' Dice undefined.
The damage classes may be weighted (``segment.class_weights``: a microcrack trace is 1-2 px
wide, a macro-crack several, and with equal weights the wide one is learned first and the
thin ones missed). Augmentation moves tile and label together (mirror, quarter turns where
the plane allows them) and changes only the tile's intensities (gain, offset, noise). The
best epoch by the validation split's mean Dice of the damage classes is kept.
Deterministic on the CPU.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from bonedamage.data.labels import NAMES
from bonedamage.data.tilestore import TileStore
from bonedamage.data.tiling import damage_labels
from bonedamage.learn.datasets import Augment, make_loader, split_rows
from bonedamage.learn.models import load_state_dict_file
from bonedamage.learn.train import resolve_device

KIND = "segmenter"  # the ``kind`` of a segmentation model's sidecar
BACKGROUND = "background"
LABEL_VALUE = {name: value for value, name in NAMES.items()}  # microcrack -> 1, ...


def class_names(damage_kinds: Sequence[str]) -> list[str]:
    """The model's classes: background, then the tissue's damage kinds (params order)."""
    unknown = [k for k in damage_kinds if k not in LABEL_VALUE or LABEL_VALUE[k] == 0]
    if len(set(damage_kinds)) != len(damage_kinds):
        raise ValueError(f"damage kinds {list(damage_kinds)}: each kind may be named once")
    if unknown or not damage_kinds:
        kinds = [n for v, n in NAMES.items() if v]
        raise ValueError(f"damage kinds {list(damage_kinds)}: choose one or more of {kinds}")
    return [BACKGROUND, *damage_kinds]


def to_classes(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Label-volume values (0 none, 1 microcrack, ...) as class indices of ``classes``
    (uint8); a damage kind the model does not know is an error, not silently background."""
    lut = np.full(256, 255, dtype=np.uint8)
    for index, name in enumerate(classes):
        lut[0 if name == BACKGROUND else LABEL_VALUE[name]] = index
    out = lut[np.asarray(labels, dtype=np.uint8)]
    if (out == 255).any():
        bad = sorted({NAMES.get(int(v), str(int(v))) for v in np.unique(labels[out == 255])})
        raise ValueError(f"labels hold damage kind(s) {bad} that are not classes {list(classes)}")
    return out


def build_segmenter(arch: Mapping[str, Any], in_channels: int, n_classes: int) -> nn.Module:
    """A 2D MONAI U-Net (residual units) from params ``segment.arch``: logits (n, K, h, w)."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=int(in_channels),
        out_channels=int(n_classes),
        channels=tuple(int(c) for c in arch["channels"]),
        strides=tuple(int(s) for s in arch["strides"]),
        num_res_units=int(arch["num_res_units"]),
        dropout=float(arch.get("dropout", 0.0)),
    )


def load_segmenter(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A saved segmentation model (eval mode) and its sidecar; the state dict is read with
    ``weights_only=True``."""
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    if meta.get("kind") != KIND:
        raise ValueError(f"{path}: not a segmentation model (kind {meta.get('kind')!r})")
    model = build_segmenter(meta["arch"], int(meta["in_channels"]), len(meta["classes"]))
    model.load_state_dict(load_state_dict_file(path))
    return model.eval(), meta


@dataclass(frozen=True)
class SegSplit:
    """A split's tiles of one tissue as the segmentation model sees them."""

    positions: np.ndarray  # rows of the tile store
    tiles: np.ndarray  # (n, C, h, w) float32, normalised
    classes: np.ndarray  # (n, h, w) uint8 class indices
    planes: list[str]
    labels: np.ndarray  # tile labels (1 = failed)


def seg_split(
    store: TileStore,
    splits: pd.DataFrame,
    data_root: Path,
    tissue: str,
    split: str,
    classes: Sequence[str],
) -> SegSplit:
    """Tiles and ground-truth class maps of a tissue's split (specimen-grouped scheme)."""
    positions, labels = split_rows(store, splits, tissue, "grouped", split)
    rows = store.index.iloc[positions]
    tiles = store.tiles(positions)
    values = damage_labels(Path(data_root), rows)
    try:
        maps = to_classes(values, classes)
    except ValueError as exc:
        known = [LABEL_VALUE.get(c, 0) for c in classes]
        bad = sorted(set(rows["scan_id"][~np.isin(values, known).all(axis=(1, 2))]))
        raise ValueError(f"{data_root}: label volumes (mask_path) of scan(s) {bad}: {exc}") from exc
    return SegSplit(
        positions,
        tiles if tiles.ndim == 4 else tiles[:, None],
        maps,
        [str(p) for p in rows["plane"]],
        labels,
    )


def make_loss(kind: str, weights: Sequence[float] | None = None) -> nn.Module:
    """Dice over the damage classes (pooled over the batch) + cross-entropy or focal loss;
    ``weights``: one per damage class (MONAI applies them to both terms), None: equal."""
    from monai.losses import DiceCELoss, DiceFocalLoss

    losses = {"dice_ce": DiceCELoss, "dice_focal": DiceFocalLoss}
    if kind not in losses:
        raise ValueError(f"loss {kind!r} is unknown: choose from {list(losses)}")
    weight = None if weights is None else torch.tensor([float(w) for w in weights])
    if weight is not None and kind == "dice_ce":  # MONAI's CE term weighs background too
        weight = torch.cat([torch.ones(1), weight])
    return losses[kind](
        to_onehot_y=True, softmax=True, include_background=False, batch=True, weight=weight
    )


class SegDataset(Dataset):
    """(tile (C, h, w) float32, class map (1, h, w) int64) pairs, augmented together; draws
    seeded by (seed, epoch, item) as in :class:`~bonedamage.learn.datasets.TileDataset`."""

    def __init__(
        self,
        tiles: np.ndarray,
        labels: np.ndarray,
        planes: Sequence[str],
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        if not (len(tiles) == len(labels) == len(planes)):
            raise ValueError("tiles, labels and planes differ in length")
        self.tiles = tiles if tiles.ndim == 4 else tiles[:, None]
        self.labels, self.planes = labels, list(planes)
        self.augment, self.seed, self.epoch = augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        tile, label = self.tiles[i], self.labels[i]
        aug = self.augment
        if aug is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            if aug.flips and rng.random() < 0.5:
                tile, label = tile[..., ::-1], label[..., ::-1]
            if aug.rotates(self.planes[i]):
                k = int(rng.integers(4))
                tile, label = np.rot90(tile, k, axes=(-2, -1)), np.rot90(label, k, axes=(-2, -1))
            # intensities only: the geometry is done, rotations are off
            tile = Augment(False, False, aug.gain, aug.offset, aug.noise)(tile, rng)
        tile = np.ascontiguousarray(tile, dtype=np.float32)
        label = np.ascontiguousarray(label, dtype=np.int64)[None]
        return torch.from_numpy(tile), torch.from_numpy(label)


@dataclass
class SegFit:
    """Best weights (by validation mean damage Dice) and the per-epoch history."""

    state_dict: dict[str, torch.Tensor]
    best_epoch: int = -1
    best_score: float = -1.0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def predict_probs(
    model: nn.Module, tiles: np.ndarray, batch_size: int = 128, device: str = "cpu"
) -> np.ndarray:
    """Softmax class probabilities (n, K, h, w) float32 of normalised tiles (n, [C,] h, w)."""
    x_all = torch.from_numpy(np.ascontiguousarray(tiles if tiles.ndim == 4 else tiles[:, None]))
    model.to(device).eval()
    out = []
    for start in range(0, len(x_all), batch_size):
        logits = model(x_all[start : start + batch_size].to(device)).float()
        out.append(torch.softmax(logits, 1).cpu().numpy())
    n_classes = int(getattr(model, "out_channels", 0) or (out[0].shape[1] if out else 0))
    return np.concatenate(out) if out else np.empty((0, n_classes, 0, 0), np.float32)


def damage_dice(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> float:
    """Mean over the damage classes of the Dice pooled over all pixels of all tiles (a class
    absent from both counts 1: nothing to find, nothing found)."""
    scores = []
    for k in range(1, n_classes):
        p, t = pred == k, truth == k
        denom = int(p.sum()) + int(t.sum())
        scores.append(1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return float(np.mean(scores))


def fit_segmenter(
    model: nn.Module,
    train: SegDataset,
    val: tuple[np.ndarray, np.ndarray],
    cfg: Mapping[str, Any],
    *,
    seed: int,
    device: str = "cpu",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> SegFit:
    """Train with AdamW and a cosine schedule; keep the epoch with the best validation mean
    damage Dice; stop after ``patience`` epochs without improvement."""
    dev = resolve_device(device)
    model.to(dev)
    weights = cfg.get("class_weights")
    if weights is not None and len(weights) != int(model.out_channels) - 1:
        raise ValueError(
            f"class_weights {list(weights)}: one weight per damage class "
            f"({int(model.out_channels) - 1}), in the order of the classes"
        )
    loss_fn = make_loss(str(cfg["loss"]), weights)
    loader = make_loader(train, int(cfg["batch_size"]), shuffle=True, seed=seed)
    epochs = int(cfg["epochs"])
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"])
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * max(len(loader), 1))
    n_classes = int(model.out_channels)
    best, stale, start = SegFit(copy.deepcopy(model.state_dict())), 0, time.perf_counter()
    for epoch in range(epochs):
        train.set_epoch(epoch)
        model.train()
        total, count = 0.0, 0
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x.to(dev)), y.to(dev))
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
        prob = predict_probs(model, val[0], device=str(dev))
        score = damage_dice(prob.argmax(1), val[1], n_classes)
        metrics = {"train_loss": total / max(count, 1), "val_dice_damage": score}
        best.history.append({"epoch": epoch, **metrics})
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if score > best.best_score:
            best.state_dict = copy.deepcopy(model.state_dict())
            best.best_epoch, best.best_score, stale = epoch, score, 0
        else:
            stale += 1
            if stale >= int(cfg["patience"]):
                break
    best.seconds = time.perf_counter() - start
    model.load_state_dict(best.state_dict)
    return best
