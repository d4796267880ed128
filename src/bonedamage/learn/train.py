"""Training loop: AdamW, cross-entropy, early stopping on validation balanced accuracy.

One loop serves the Optuna trials, the final CNN, the ResNet fine-tuning and the
classification pretraining tasks. It runs on a GPU when there is one (``device: auto``) with mixed
precision there, and on the CPU otherwise, where a fixed seed, deterministic algorithms
and a fixed thread count give the same weights and metrics on every run. Callbacks let
the caller prune (Optuna), log (MLflow) or change what trains (a freeze schedule)
without this module knowing about either. Under ``torchrun`` the same loop trains with
DistributedDataParallel (:mod:`bonedamage.learn.distributed`); without it nothing changes.
"""

from __future__ import annotations

import copy
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.utils.data import DataLoader

from bonedamage.config import TRAIN_DEFAULTS, ConfigError
from bonedamage.learn import distributed

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; ``device`` is ``auto``, ``cpu`` or ``cuda``.

    ``lr_schedule``: ``constant``, or ``cosine`` (the learning rate decays per step from
    ``lr`` to 0 over ``epochs``, so the last epochs settle instead of jumping around).
    """

    epochs: int = TRAIN_DEFAULTS.epochs
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = TRAIN_DEFAULTS.patience
    device: str = TRAIN_DEFAULTS.device
    amp: bool = TRAIN_DEFAULTS.amp
    seed: int = TRAIN_DEFAULTS.seed
    threads: int = TRAIN_DEFAULTS.threads
    lr_schedule: str = TRAIN_DEFAULTS.lr_schedule
    channels_last: bool = TRAIN_DEFAULTS.channels_last

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"lr_schedule {self.lr_schedule!r} is unknown: choose from {list(LR_SCHEDULES)} "
                "(params.yaml train.lr_schedule)"
            )

    @classmethod
    def from_params(cls, cfg: dict[str, Any], **overrides: Any) -> TrainConfig:
        """params ``train`` with a stage's own values (a recipe's lr, batch size, ...); a key
        that is no setting of the loop is an error, not silently dropped."""
        merged = {**cfg, **overrides}
        unknown = sorted(set(merged) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"train: unknown setting(s) {', '.join(unknown)}")
        return cls(**merged)


@dataclass
class FitResult:
    """Best weights (by validation balanced accuracy) and the per-epoch history."""

    state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


EpochCallback = Callable[[int, dict[str, float]], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available; use 'auto'")
    return torch.device(name)


def _cpu_model() -> str:
    """Vendor, family and model of the CPU (Linux /proc/cpuinfo; else ``platform``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            break  # the first processor's block ends at a blank line
        fields.setdefault(key.strip(), value.strip())
    parts = [fields.get("vendor_id", ""), fields.get("cpu family", ""), fields.get("model", "")]
    if not any(parts):
        return platform.processor() or platform.machine()
    return "{} family {} model {}".format(*parts)


def numerics_platform(device: torch.device) -> dict[str, str]:
    """What a model's floating-point results depend on besides data, code, params and seed.

    MKL and oneDNN pick their kernels by CPU type and instruction set, so the same seeded
    run gives other (equally valid) numbers on another CPU: results are reproduced
    exactly only where all of these match.
    """
    if device.type == "cuda":
        where = f"cuda {torch.cuda.get_device_name(device)}"
    else:
        where = f"cpu {torch.backends.cpu.get_cpu_capability()}"
    return {
        "torch": torch.__version__,
        "device": where,
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "threads": str(torch.get_num_threads()),
    }


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout of 4-D weights and batches: channels last (NHWC) runs oneDNN's and
    cuDNN's faster convolution kernels; its sums run in another order, so it is part of
    what a seeded run's numbers depend on."""
    return torch.channels_last if channels_last else torch.contiguous_format


def seed_everything(seed: int, threads: int) -> None:
    """Seed Python, numpy and torch; deterministic kernels; a fixed CPU thread count."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, threads))
    # use_deterministic_algorithms(True, warn_only=True) does the same and also sets
    # torch.compile's flag, importing torch._inductor for it: 2.5 s in every stage process
    torch.set_deterministic_debug_mode("warn")
    torch.backends.cudnn.benchmark = False


def fit(
    model: nn.Module,
    train: DataLoader,
    val: DataLoader,
    cfg: TrainConfig,
    *,
    on_epoch: EpochCallback | None = None,
    before_epoch: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``model`` and return its best-validation weights.

    ``before_epoch(epoch)`` runs first in every epoch (e.g. unfreeze the backbone);
    ``on_epoch(epoch, metrics)`` after validation (it may raise to stop, e.g. a pruned
    Optuna trial). Stops after ``patience`` epochs without improvement.

    Under ``torchrun`` (inside :func:`distributed.session`) each rank trains on its shard
    of ``train`` through a DDP wrapper, so the ranks keep identical weights; every rank
    validates on all of ``val``, they all take rank 0's metrics (and so its early-stopping
    decision), and the callbacks run on every rank.
    """
    device = resolve_device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    fmt = memory_format(cfg.channels_last)
    model.to(device, memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    train = distributed.shard(train, cfg.seed)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs * max(len(train), 1))
        if cfg.lr_schedule == "cosine"
        else None
    )
    loss_fn = nn.CrossEntropyLoss()
    best = FitResult(copy.deepcopy(model.state_dict()), -1, -1.0)
    stale, start = 0, time.perf_counter()
    net, trainable = model, ()  # what trains: ``model``, or its DDP wrapper under torchrun
    for epoch in range(cfg.epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        for loader in (train, val):
            distributed.set_epoch(loader, epoch)
        # DDP syncs only the parameters that required grad when it was built
        flags = tuple(p.requires_grad for p in model.parameters())
        if flags != trainable:
            net = model  # drop the old wrapper (and its gradient hooks) first
            net, trainable = distributed.wrap(model), flags
        net.train()
        total, count = 0.0, 0
        for x, y in train:
            x = x.to(device, memory_format=fmt, non_blocking=True)
            y = y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = loss_fn(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
        total, count = distributed.all_sum(total, count)
        distributed.broadcast_buffers(model)
        prob, labels, val_loss = predict(
            model, val, device, with_loss=True, channels_last=cfg.channels_last
        )
        score = float(balanced_accuracy_score(labels, prob.argmax(1)))
        metrics = distributed.agree(
            {
                "train_loss": total / max(count, 1),
                "val_loss": val_loss,
                "val_balanced_accuracy": score,
                "val_accuracy": float((prob.argmax(1) == labels).mean()),
            }
        )
        score = metrics["val_balanced_accuracy"]
        best.history.append({"epoch": epoch, **metrics})
        if score > best.best_score:
            best.state_dict = copy.deepcopy(model.state_dict())
            best.best_epoch, best.best_score, stale = epoch, score, 0
        else:
            stale += 1
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if stale >= cfg.patience:
            break
    best.seconds = time.perf_counter() - start
    model.load_state_dict(best.state_dict)
    model.to(memory_format=torch.contiguous_format)  # the layout a loaded checkpoint has
    return best


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    *,
    with_loss: bool = False,
    channels_last: bool = False,
) -> Any:
    """Class probabilities (n, classes) and labels; with ``with_loss`` also the mean loss."""
    device = torch.device(device)
    fmt = memory_format(channels_last)
    model.to(device, memory_format=fmt).eval()
    probs, labels, loss_sum = [], [], 0.0
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = model(x.to(device, memory_format=fmt)).float()
        loss_sum += float(nn.functional.cross_entropy(logits, y.to(device), reduction="sum"))
        probs.append(torch.softmax(logits, 1).cpu().numpy())
        labels.append(y.numpy())
    prob, label = np.concatenate(probs), np.concatenate(labels)
    if with_loss:
        return prob, label, loss_sum / max(len(label), 1)
    return prob, label
