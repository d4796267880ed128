"""Models: the searchable CNN family and ResNets for transfer learning (offline weights).

``build_cnn`` turns a parameter dict (the Optuna search space of ``params.yaml``
``search.space``) into a network: conv blocks with growing filter counts, normalisation
and pooling, then a dense head with two logits (class 1 = failed). The whole family is
the search space of the architecture study, so every knob is a key of ``arch``.

``resnet_from_init`` builds torchvision's ResNet with a one-channel first convolution (three
for 2.5-D tiles) for
the initialisations compared: ImageNet weights (transfer learning, as Shen et al. (2021)),
the project's own pretrained backbones (``procedural``, ``simsiam``, ``rotation``: the
``pretrain`` stage, :mod:`bonedamage.learn.pretraining`), and random weights (scratch).

Offline weights policy: ImageNet weights are only ever read from a file
(``resnet.weights_path`` in ``params.yaml`` or torchvision's cache under
``torch.hub.get_dir()``). Nothing is downloaded at run time; a missing file is a
:class:`WeightsError` that says where we looked, never a silent download or a silent
fallback to random weights. Every weights file is read with
``torch.load(weights_only=True)``, so no arbitrary pickled object is ever executed.

Modules stay plain ``nn.Module`` classes with stable submodule names (``features``,
``head``, ``layer4``, ``fc``) so Grad-CAM target layers survive saving: save state dicts
(or MLflow's pickle format), not ``torch.export`` graphs.
"""

from __future__ import annotations

import json
import numbers
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from bonedamage.config import PRETRAIN_METHODS, ConfigError, ResnetSection

RESNET_ARCHS = ("resnet18", "resnet50")
RESNET_STEMS = ("imagenet", "fine")
# params resnet.stem left out: torchvision's own stride-2 first convolution
DEFAULT_STEM: str = ResnetSection.model_fields["stem"].default
PRETRAINED: tuple[str, ...] = PRETRAIN_METHODS  # the pretrain stage's methods
INITS = ("imagenet", *PRETRAINED, "scratch")
_IMAGENET_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights"}
_WRAPPER_KEYS = ("state_dict", "model")  # common checkpoint formats: {"state_dict": {...}, ...}


def _int_in(lo: int, hi: float) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and lo <= v <= hi


def _real_in(lo: float, hi: float, *, hi_open: bool = False) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            return False
        return lo <= v < hi if hi_open else lo <= v <= hi

    return ok


# key -> (check, what is allowed); the ranges cover the search space with some margin
_ARCH_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n_blocks": (_int_in(2, 5), "an int in 2..5"),
    "base_filters": (_int_in(1, 1024), "an int in 1..1024"),
    "filter_growth": (_real_in(0.5, 4.0), "a number in 0.5..4"),
    "kernel_size": (lambda v: v in (3, 5) and not isinstance(v, bool), "3 or 5"),
    "norm": (lambda v: v in ("batch", "group", "none"), "'batch', 'group' or 'none'"),
    "pool": (lambda v: v in ("max", "avg"), "'max' or 'avg'"),
    "dropout": (_real_in(0.0, 0.6), "a number in 0..0.6"),
    "dense_units": (_int_in(1, 4096), "an int in 1..4096"),
}
ARCH_KEYS = tuple(_ARCH_RULES)


class WeightsError(ValueError):
    """A weights file is missing, unreadable or not a state dict (the message says how to fix)."""


class CNN(nn.Module):
    """Conv blocks (``features``; ``features[-1]`` is the last one) then a dense ``head``.

    Input (B, 1, H, W) with H, W >= 2**n_blocks; output (B, 2) logits, class 1 = failed.
    """

    def __init__(self, features: nn.Sequential, head: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.min_size = 2 ** len(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < self.min_size or x.shape[-2] < self.min_size:
            raise ValueError(
                f"CNN with {len(self.features)} blocks needs tiles of at least "
                f"{self.min_size} px, got {tuple(x.shape[-2:])}"
            )
        return self.head(self.features(x))


class Ensemble(nn.Module):
    """Several networks as one classifier: the mean of their class probabilities.

    The output is the log of that mean, so that it can stand where logits stand: its
    softmax is the mean probability, and Grad-CAM's class score flows back into every
    member (a target layer per member, :func:`bonedamage.explain.gradcam.target_layers`).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).softmax(dim=1) for m in self.members]).mean(dim=0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":  # up to 8 groups; the count must divide the channels
        groups = next(g for g in range(min(8, channels), 0, -1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


def check_arch(arch: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first missing, unknown or out-of-range key of ``arch``."""
    if not isinstance(arch, Mapping):
        raise ValueError(f"CNN arch must be a dict, got {type(arch).__name__}")
    unknown = sorted(set(arch) - set(_ARCH_RULES))
    if unknown:
        raise ValueError(f"CNN arch has unknown key(s) {unknown}; allowed: {list(ARCH_KEYS)}")
    for key, (ok, allowed) in _ARCH_RULES.items():
        if key not in arch:
            raise ValueError(f"CNN arch is missing {key!r} ({allowed})")
        if not ok(arch[key]):
            raise ValueError(f"CNN arch {key}={arch[key]!r} is not allowed: must be {allowed}")


def build_cnn(arch: Mapping[str, Any], in_channels: int = 1) -> CNN:
    """The CNN described by ``arch`` (keys: :data:`ARCH_KEYS`, see ``params.yaml``), for
    tiles of ``in_channels`` channels (1, or 3 for 2.5-D tiles).

    Block i has ``round(base_filters * filter_growth**i)`` filters and is
    conv -> norm -> ReLU -> conv -> norm -> ReLU -> pool(2) ("same" padding); the head is
    global average pool -> dropout -> Linear(dense_units) -> ReLU -> dropout -> Linear(2).
    """
    check_arch(arch)
    k, norm, dropout = int(arch["kernel_size"]), str(arch["norm"]), float(arch["dropout"])
    bias = norm == "none"  # a following norm layer makes a conv bias redundant
    blocks, channels = [], _check_channels(in_channels)
    for i in range(int(arch["n_blocks"])):
        out = max(1, round(int(arch["base_filters"]) * float(arch["filter_growth"]) ** i))
        blocks.append(
            nn.Sequential(
                nn.Conv2d(channels, out, k, padding=k // 2, bias=bias),
                _norm(norm, out),
                nn.ReLU(inplace=True),
                nn.Conv2d(out, out, k, padding=k // 2, bias=bias),
                _norm(norm, out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2) if arch["pool"] == "max" else nn.AvgPool2d(2),
            )
        )
        channels = out
    dense = int(arch["dense_units"])
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(channels, dense),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(dense, 2),
    )
    return CNN(nn.Sequential(*blocks), head)


def _check_channels(in_channels: int) -> int:
    if not (isinstance(in_channels, int) and in_channels >= 1):
        raise ValueError(f"in_channels {in_channels!r}: must be a positive integer")
    return in_channels


def _torchvision() -> ModuleType:
    """torchvision, imported on first use: it takes ~2 s (it loads ``torch._dynamo``), which
    every stage process that trains or registers only a CNN would otherwise pay at start."""
    import torchvision

    return torchvision


def _check_resnet_arch(arch: str) -> None:
    if arch not in RESNET_ARCHS:
        raise ValueError(f"resnet arch {arch!r} is unknown: choose from {list(RESNET_ARCHS)}")


def build_resnet(
    arch: str = "resnet18", num_classes: int = 2, stem: str = DEFAULT_STEM, in_channels: int = 1
) -> nn.Module:
    """torchvision ResNet with random weights, ``in_channels`` input channels (1, or 3 for
    2.5-D tiles) and ``num_classes`` outputs.

    ``stem``: ``imagenet`` keeps the stride-2 first convolution (with the max pooling, the
    first block sees 1/4 of the tile's resolution: 16 px of a 64 px tile); ``fine`` makes
    it stride 1, so the first block sees 1/2 (32 px) and 1-2 px cracks survive the stem,
    for about 4x the compute. Weight shapes are the same, so ImageNet weights load into both.
    """
    _check_resnet_arch(arch)
    if stem not in RESNET_STEMS:
        raise ConfigError(
            f"resnet stem {stem!r} is unknown: choose from {list(RESNET_STEMS)} "
            "(params.yaml resnet.stem, or a saved model's sidecar)"
        )
    model = getattr(_torchvision().models, arch)(weights=None)  # weights=None: never downloads
    old = model.conv1
    stride = 1 if stem == "fine" else old.stride
    model.conv1 = nn.Conv2d(
        _check_channels(in_channels),
        old.out_channels,
        old.kernel_size,
        stride,
        old.padding,
        bias=False,
    )
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def pretrained_model(arch: str, stem: str, in_channels: int, head_classes: int) -> nn.Module:
    """The ResNet a pretraining method trains: ``head_classes`` outputs (the procedural
    task's classes, 4 rotations), or none (``fc`` an identity: SimSiam's backbone)."""
    model = build_resnet(arch, max(head_classes, 1), stem=stem, in_channels=in_channels)
    if head_classes == 0:
        model.fc = nn.Identity()
    return model


def _load_error_detail(exc: Exception) -> str:
    """The specific line of a torch.load error (not its advice to drop ``weights_only``)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Check the documentation")]
    if not lines:
        return "no detail"
    detail = lines[-1] if len(lines) > 1 else lines[0].split(". ")[0]
    return detail.split(". Please use")[0][:200]


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict (str -> Tensor) from ``path``, read with ``weights_only=True``.

    A checkpoint dict that wraps the state dict under ``"state_dict"`` or ``"model"``
    (e.g. ``{"epoch": 3, "state_dict": {...}}``) is unwrapped. Anything else (a missing or
    corrupt file, a pickled module or other object, a list, non-tensor values) raises
    :class:`WeightsError` naming the file; arbitrary pickles are never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # refused pickle, corrupt or truncated file, not a torch file...
        why = (
            "refused by weights_only=True (pickled Python objects such as a whole model, or "
            "not a torch file)"
            if isinstance(exc, pickle.UnpicklingError)
            else "corrupt, truncated or not a torch file"
        )
        raise WeightsError(
            f"{path}: not a loadable state-dict file: {why} ({type(exc).__name__}: "
            f"{_load_error_detail(exc)}). Save weights with torch.save(model.state_dict(), path)."
        ) from exc
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if not obj:
        raise WeightsError(f"{path}: holds an empty state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise WeightsError(
            f"{path}: not a state dict (entries that are not str -> Tensor: {bad[:3]})"
        )
    return dict(obj)


def build_module(meta: Mapping[str, Any], weights: str | Path | None = None) -> nn.Module:
    """The module a saved model's JSON sidecar describes (a CNN, an :class:`Ensemble` of
    ``members`` CNNs, or a ResNet); with ``weights``
    (a state-dict file, read with ``weights_only=True``) loaded and in eval mode."""
    kind = meta.get("kind")
    channels = int(meta.get("in_channels", 1))
    members = meta.get("members", 1)
    if not (isinstance(members, int) and members >= 1) or (members > 1 and kind != "cnn"):
        raise WeightsError(f"members {members!r}: must be a positive integer (ensembles: CNNs)")
    if kind == "cnn" and members > 1:
        model: nn.Module = Ensemble([build_cnn(meta["arch"], channels) for _ in range(members)])
    elif kind == "cnn":
        model = build_cnn(meta["arch"], channels)
    elif kind == "resnet":
        stem = meta.get("stem", DEFAULT_STEM)
        model = build_resnet(meta["arch"], 2, stem=stem, in_channels=channels)
    elif kind == "pretrained":
        stem = meta.get("stem", DEFAULT_STEM)
        model = pretrained_model(meta["arch"], stem, channels, int(meta.get("head_classes", 0)))
    else:
        raise WeightsError(f"model kind {kind!r} is unknown: expected cnn, resnet or pretrained")
    if weights is None:
        return model
    model.load_state_dict(load_state_dict_file(weights))
    return model.eval()


def imagenet_cache_path(arch: str) -> Path:
    """Where torchvision caches the IMAGENET1K_V1 weights of ``arch`` (nothing downloaded)."""
    _check_resnet_arch(arch)
    # reading ``.url`` downloads nothing: it names torchvision's cache file
    weights = getattr(_torchvision().models, _IMAGENET_WEIGHTS[arch]).IMAGENET1K_V1
    name = Path(weights.url).name
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def imagenet_state_dict(
    arch: str, weights_path: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """ImageNet weights for ``arch`` from ``weights_path``, else from torchvision's cache.

    Never downloads: a missing file is a :class:`WeightsError` saying where it looked.
    """
    _check_resnet_arch(arch)
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise WeightsError(
                f"{weights_path}: no such ImageNet weights file for {arch} (from "
                "resnet.weights_path in params.yaml). Fix the path, or set it to null to use "
                f"torchvision's cache ({imagenet_cache_path(arch)}). Nothing is downloaded."
            )
        return load_state_dict_file(weights_path)
    cached = imagenet_cache_path(arch)
    if not cached.is_file():
        raise WeightsError(
            f"ImageNet weights for {arch} not found at {cached}. Nothing is downloaded at run "
            f"time: put torchvision's {cached.name} there (from a machine with network access), "
            "or set resnet.weights_path in params.yaml (read by the train_resnet stage) to a "
            "state-dict file, or leave 'imagenet' out of resnet.inits."
        )
    return load_state_dict_file(cached)


def adapt_first_conv(
    state: Mapping[str, torch.Tensor], key: str = "conv1.weight", in_channels: int = 1
) -> dict[str, torch.Tensor]:
    """A copy of ``state`` whose first conv takes ``in_channels`` channels.

    RGB weights (out, 3, k, k) are summed over the input-channel axis (so a grey image
    replicated to RGB gives the same response); a one-channel weight passes unchanged.
    For ``in_channels`` > 1 (2.5-D tiles) that grey filter is shared equally by the planes,
    ``w / in_channels`` each: three identical planes give the grey response again.
    """
    if key not in state:
        raise WeightsError(f"state dict has no {key!r} (first convolution) to adapt")
    weight = state[key]
    if weight.ndim != 4:
        raise WeightsError(f"{key} has shape {tuple(weight.shape)}, not (out, in, k, k)")
    state = dict(state)
    grey = weight.sum(dim=1, keepdim=True) if weight.shape[1] != 1 else weight
    channels = _check_channels(in_channels)
    state[key] = grey if channels == 1 else grey.repeat(1, channels, 1, 1) / channels
    return state


def _load_backbone(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load all of ``state`` but ``fc.*`` into ``model``; strict on everything else."""
    keep = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(keep, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = " ".join(str(exc).split())[:400]
        raise WeightsError(f"{source}: does not fit the backbone ({detail})") from exc
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise WeightsError(
            f"{source}: does not fit the {type(model).__name__} backbone "
            f"({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]})"
        )


def resnet_from_init(
    arch: str,
    init: str,
    num_classes: int = 2,
    weights_path: str | Path | None = None,
    pretrained_path: str | Path | None = None,
    stem: str = DEFAULT_STEM,
    in_channels: int = 1,
) -> nn.Module:
    """A ResNet classifier of ``in_channels`` input channels initialised from ImageNet, a
    pretraining method of the ``pretrain`` stage, or at random.

    ``imagenet``: :func:`imagenet_state_dict` (``weights_path`` or the torch cache), first
    conv summed to one channel, everything but ``fc`` loaded strictly. ``procedural``,
    ``simsiam``, ``rotation``: the backbone saved by that method (``pretrained_path``; its
    sidecar must name the method, ``arch`` and ``stem``), its first conv adapted as
    ImageNet's when the tiles have another number of channels. ``scratch``: torch's default
    random init (seeding is the caller's job). The ``fc`` head is always fresh; ``stem`` as
    in :func:`build_resnet`.
    """
    if init not in INITS:
        raise ValueError(f"resnet init {init!r} is unknown: choose from {list(INITS)}")
    model = build_resnet(arch, num_classes, stem, in_channels)
    if init == "imagenet":
        state = imagenet_state_dict(arch, weights_path)
        source = str(weights_path or imagenet_cache_path(arch))
        try:
            state = adapt_first_conv(state, in_channels=in_channels)
        except WeightsError as exc:
            raise WeightsError(f"{source}: {exc}") from exc
        _load_backbone(model, state, source)
    elif init in PRETRAINED:
        if pretrained_path is None or not Path(pretrained_path).is_file():
            raise WeightsError(
                f"{init} pretrained weights not found at {pretrained_path}: run the pretrain "
                f"stage first (dvc repro pretrain@{init}, or bonedamage pretrain --method "
                f"{init}), with {init} in params.yaml pretrain.methods"
            )
        _check_pretrained_sidecar(Path(pretrained_path), init, arch, stem)
        state = load_state_dict_file(pretrained_path)
        first = state.get("conv1.weight")
        if first is not None and first.ndim == 4 and first.shape[1] != in_channels:
            state = adapt_first_conv(state, in_channels=in_channels)
        _load_backbone(model, state, str(pretrained_path))
    return model


def _check_pretrained_sidecar(path: Path, method: str, arch: str, stem: str) -> None:
    """Refuse pretrained weights whose sidecar names another method, arch or stem: a
    stride-2 backbone loads into a stride-1 stem without a shape error, so only the
    sidecar can tell."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise WeightsError(f"{path}: no sidecar {sidecar.name} saying how it was pretrained")
    meta = json.loads(sidecar.read_text())
    found = (meta.get("method"), meta.get("arch"), meta.get("stem", DEFAULT_STEM))
    if found[0] != method:
        raise WeightsError(
            f"{path}: holds the backbone pretrained by {found[0]!r} ({sidecar.name}), not by "
            f"{method!r}: re-run the pretrain stage (dvc repro pretrain@{method})"
        )
    if found[1:] != (arch, stem):
        raise WeightsError(
            f"{path}: pretrained as {found[1]} with stem {found[2]!r} ({sidecar.name}), but "
            f"the ResNet is {arch} with stem {stem!r}: re-run the pretrain stage (dvc repro "
            "pretrain) after changing resnet.arch or resnet.stem"
        )


def _head(model: nn.Module) -> nn.Module:
    if isinstance(model, CNN):
        return model.head
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Module):
        return fc
    raise ValueError(f"no classifier head known for {type(model).__name__} (expected head/fc)")


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (False) or unfreeze (True) every parameter but the classifier (CNN ``head``,
    ResNet ``fc``); the classifier always stays trainable."""
    head = {id(p) for p in _head(model).parameters()}
    for p in model.parameters():
        p.requires_grad_(trainable or id(p) in head)


def gradcam_target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block, where Grad-CAM looks.

    CNN: ``features[-1]``; torchvision ResNet: ``layer4[-1]``; otherwise the last child
    that contains an ``nn.Conv2d``. ValueError if the model has no convolution.
    """
    if isinstance(model, CNN):
        return model.features[-1]
    if isinstance(model, _torchvision().models.ResNet):
        return model.layer4[-1]
    blocks = [m for m in model.children() if any(isinstance(c, nn.Conv2d) for c in m.modules())]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no convolutional layer for Grad-CAM")
    return blocks[-1]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
