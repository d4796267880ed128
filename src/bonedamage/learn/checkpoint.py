"""Model checkpoints: a state dict anyone can load safely, and a JSON sidecar that says how
to rebuild the module (architecture, tissue, tile size, channels, scores)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bonedamage.atomic import atomic_path, write_text_atomic
from bonedamage.learn.models import build_module


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write the state dict (``.pt``, loadable with ``weights_only=True``) and a JSON sidecar
    describing how to rebuild the module, both atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # through a file object: torch.save names the archive's root folder after a path it is
    # given (here a random temp name), which would change the bytes from run to run
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)
    write_text_atomic(
        path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True, default=float) + "\n"
    )


def load_checkpoint(path: Path) -> nn.Module:
    """Rebuild a saved model from its JSON sidecar and state dict (weights_only load)."""
    return build_module(json.loads(path.with_suffix(".json").read_text()), path)
