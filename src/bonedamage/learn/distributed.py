"""Data-parallel training on several processes: PyTorch DDP under ``torchrun``.

``torchrun`` starts one process per rank and tells each its place through the
environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...). Inside
:func:`session` the processes form a group; :func:`shard` gives each rank its share of
every epoch's training tiles and :func:`wrap` averages the gradients across ranks, so all
ranks take the same optimiser step and hold the same weights. Without ``torchrun`` every
helper is a no-op that returns its argument: the single-process path is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "BONEDAMAGE_DDP_TIMEOUT_S"


def launched() -> bool:
    """Whether ``torchrun`` (or another launcher) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether this process is in an initialised group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the group (0 without a group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks in the group (1 without a group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this rank tracks and writes outputs (rank 0; always true without a group)."""
    return rank() == 0


def _uses_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


@contextmanager
def session(device: str = "cpu", timeout_s: float | None = None) -> Iterator[None]:
    """Join the ``torchrun`` process group for the duration of the block; a no-op otherwise.

    ``device`` is the training device setting (``auto``, ``cpu``, ``cuda``): on CUDA each
    rank takes the GPU of its ``LOCAL_RANK`` and gradients go through NCCL (small CPU
    tensors such as the train-loss sums through gloo); on the CPU everything uses gloo.
    A collective waits at most ``timeout_s`` (default: ``$BONEDAMAGE_DDP_TIMEOUT_S`` or
    300 s; rank 0 logs to MLflow and writes files while the others wait), so a dead peer
    ends the run with an error instead of a hang.
    """
    if not launched() or dist.is_initialized():
        yield
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    timeout = timedelta(seconds=float(timeout_s or os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    backend = "gloo"
    if _uses_cuda(device):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} visible): start "
                "at most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard(loader: DataLoader, seed: int) -> DataLoader:
    """This rank's share of ``loader``: the same loader without a group.

    In a group: a DataLoader over the same dataset whose ``DistributedSampler`` (seeded
    with ``seed``, shuffled if ``loader`` was, no sample dropped: the last ones are
    repeated so every rank has as many batches) gives each rank a disjoint part of each
    epoch; the batch size per rank is ``batch_size // world_size``, so one optimiser step
    still sees about ``batch_size`` samples. Call :func:`set_epoch` every epoch.
    """
    if not active():
        return loader
    if loader.batch_size is None:
        raise ValueError("cannot shard a DataLoader without a batch_size (custom batch_sampler)")
    per_rank = loader.batch_size // world_size()
    if per_rank < 1:
        raise ValueError(
            f"batch size {loader.batch_size} is smaller than the {world_size()} processes: "
            "raise the batch size or start fewer processes"
        )
    sampler = DistributedSampler(
        loader.dataset,
        num_replicas=world_size(),
        rank=rank(),
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=seed,
        drop_last=False,
    )
    return DataLoader(
        loader.dataset,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=False,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Give the loader's dataset and sampler the epoch (augmentation draws, shard order)."""
    for part in (loader.dataset, loader.sampler):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


def wrap(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel in a group; ``model`` itself otherwise.

    DDP averages the gradients of the parameters that require grad *now*: wrap again
    when that set changes (a freeze schedule). The model must already be on its device.
    """
    if not active():
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def all_sum(*values: float) -> tuple[float, ...]:
    """The sums of ``values`` over all ranks (the values themselves without a group)."""
    if not active():
        return values
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return tuple(total.tolist())


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP does this before each training forward; after the last step of an epoch each
    rank's running statistics have moved with its own batch, and validation needs them
    equal on all ranks.
    """
    if not active():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def agree(metrics: Mapping[str, float]) -> dict[str, float]:
    """Rank 0's ``metrics`` on every rank, so that all ranks take the same early-stopping
    decision even if floating-point results differed (different CPUs or GPUs)."""
    if not active():
        return dict(metrics)
    values = torch.tensor(list(metrics.values()), dtype=torch.float64)
    dist.broadcast(values, src=0)
    return dict(zip(metrics, values.tolist(), strict=True))


def print_once(line: str) -> None:
    """Print ``line`` once per launch (on rank 0 under ``torchrun``)."""
    if is_main():
        print(line)
