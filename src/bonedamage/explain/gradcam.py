"""Grad-CAM core: class activation maps for the failed class, and how to judge them.

Pure functions over a model and tiles (``(N, H, W)`` float32, about [0, 1]; ``(N, C, H, W)``
for 2.5-D tiles, shown by their middle plane); no tracking,
no CLI. Maps come from pytorch-grad-cam (``METHODS``) at :func:`target_layer` (by default
the last conv block, :func:`bonedamage.learn.models.gradcam_target_layer`), for class 1
(failed), one per tile, resized to the tile and scaled to [0, 1] per tile.

Two questions are answered separately:

* localization (plain numpy, needs a ground-truth damage mask): does the map put its
  mass on the damage? :func:`energy_ratio`, :func:`cam_iou`, and the same numbers for
  two maps that know nothing about the tile (:func:`uniform_map`,
  :func:`centre_bias_map`) as baselines (:func:`localization_summary`);
* faithfulness (no mask): does the model really rely on the highlighted pixels?
  :func:`faithfulness` (ROAD, from pytorch-grad-cam's metrics).

Export: :func:`overlay_figure` (a grid of tiles under their maps, with a colour bar, a
scale bar and labels) and :func:`overlay_grid` (it as a PNG), :func:`write_cam_tiff`
(float32 TIFF), and :func:`select_by_outcome` to pick true/false positives/negatives to
show.
"""

from __future__ import annotations

import math
import os
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.metrics.perturbation_confidence import (
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from bonedamage.atomic import atomic_path
from bonedamage.data.tilestore import centre_plane, with_channels
from bonedamage.learn.models import Ensemble, gradcam_target_layer

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FAILED = 1  # class index of "failed" in the models' two logits
DEFAULT_METHOD = "gradcam"
METHODS: Mapping[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    # gradient-free. EigenCAM: first principal component of the layer's activations; it
    # ignores the target class and its sign is arbitrary (a map may come out inverted).
    "eigencam": EigenCAM,
    # ScoreCAM: one forward pass per channel of the layer and tile (512 for ResNet
    # layer4: about 1 s per 64 px tile on 2 CPU cores, ~100x Grad-CAM). pytorch-grad-cam
    # draws a tqdm bar per tile; TQDM_DISABLE=1 (set before Python starts) silences it.
    "scorecam": ScoreCAM,
}
OUTCOMES = ("tp", "fp", "tn", "fn")
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


# ---------------------------------------------------------------------------- inputs


def _as_maps(maps: np.ndarray, name: str = "cams") -> np.ndarray:
    arr = np.asarray(maps, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be an (N, H, W) array, got shape {arr.shape}")
    return arr


def _as_tiles(tiles: np.ndarray) -> np.ndarray:
    """Model input (N, C, H, W) float32 from (N, H, W) tiles or (N, C, H, W) 2.5-D tiles."""
    return with_channels(np.asarray(tiles, dtype=np.float32))


def _check_pairs(arr: np.ndarray, cams: np.ndarray) -> None:
    if cams.shape != (len(arr), *arr.shape[2:]):
        raise ValueError(
            f"cams {cams.shape} and tiles {arr.shape} must have the same shape (N, H, W)"
        )


def _as_map_and_mask(cam: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cam = np.asarray(cam, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if cam.ndim != 2 or cam.shape != mask.shape:
        raise ValueError(
            f"cam and mask must be 2D arrays of the same shape, got {cam.shape} and {mask.shape}"
        )
    return cam, mask


def _batches(n: int, batch_size: int) -> range:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return range(0, n, batch_size)


def _layer_names(model: nn.Module) -> list[str]:
    """Names of submodules holding a convolution (Grad-CAM candidates), shallow to deep."""
    return [
        name
        for name, mod in model.named_modules()
        if name and any(isinstance(m, nn.Conv2d | nn.Conv3d) for m in mod.modules())
    ]


# ---------------------------------------------------------------------- maps, probs


def target_layer(model: nn.Module, override: str | None = None) -> nn.Module:
    """The layer Grad-CAM looks at: the last conv block, or the submodule named ``override``.

    ``override`` is a dotted name as in ``model.named_modules()`` (``"features.1"``,
    ``"layer4.1"``, ``"layer3"``). An unknown name is a ValueError listing valid ones.
    """
    if override is None:
        return gradcam_target_layer(model)
    if not isinstance(override, str) or not override:
        raise ValueError(f"target layer override must be a non-empty module name, got {override!r}")
    try:
        return model.get_submodule(override)
    except AttributeError:
        names = _layer_names(model)
        shown = names if len(names) <= 12 else [*names[:4], "...", *names[-8:]]
        raise ValueError(
            f"{type(model).__name__} has no layer {override!r}; layers with convolutions "
            f"({len(names)}): {', '.join(shown)}"
        ) from None


def target_layers(model: nn.Module, override: str | None = None) -> list[nn.Module]:
    """The layers Grad-CAM looks at: :func:`target_layer` of the model, or of each member of
    an :class:`~bonedamage.learn.models.Ensemble` (pytorch-grad-cam averages their maps)."""
    return [target_layer(net, override) for net in networks(model)]


def networks(model: nn.Module) -> list[nn.Module]:
    """The networks Grad-CAM looks into: the members of an ensemble, else the model."""
    return list(model.members) if isinstance(model, Ensemble) else [model]


def compute_cams(
    model: nn.Module,
    tiles: np.ndarray,
    method: str = DEFAULT_METHOD,
    layer: str | nn.Module | Sequence[nn.Module] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Class activation maps for the failed class: ``(N, H, W)`` float32 in [0, 1].

    ``tiles`` is ``(N, H, W)`` (or ``(N, C, H, W)``: 2.5-D tiles); each map has its tile's
    size and is scaled to [0, 1] on its own (pytorch-grad-cam's min-max; a map with no
    positive evidence is all 0). ``method`` is a key of :data:`METHODS`; ``layer`` a module
    of ``model``, a list of them (maps averaged), a name for :func:`target_layers`, or None
    (the last conv block; of each member of an ensemble). The model is moved to
    ``device`` and run in eval mode; its train/eval mode is restored afterwards, its
    parameter gradients are cleared (``.grad = None``), and no hooks stay behind.
    Autograd is switched on inside (also under ``torch.no_grad``/``inference_mode``), as
    pytorch-grad-cam needs it, and works with frozen parameters (the input requires grad).
    Deterministic on the CPU.
    """
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}: choose from {list(METHODS)}")
    arr = _as_tiles(tiles)
    n, _, h, w = arr.shape
    batches = _batches(n, batch_size)
    if isinstance(layer, nn.Module):
        layers = [layer]
    elif isinstance(layer, list | tuple):
        layers = list(layer)
    else:
        layers = target_layers(model, layer)
    device = torch.device(device)
    was_training = model.training
    out = np.empty((n, h, w), dtype=np.float32)
    model.to(device)
    try:
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            METHODS[method](model=model, target_layers=layers) as cam,
        ):
            cam.batch_size = batch_size  # read by ScoreCAM only
            for start in batches:
                x = torch.from_numpy(arr[start : start + batch_size]).to(device)
                if cam.uses_gradients:
                    x.requires_grad_(True)  # activations need grad even if weights are frozen
                try:
                    maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(FAILED)] * len(x))
                except IndexError as exc:  # BaseCAM.__exit__ would swallow it silently
                    raise RuntimeError(f"{method} failed on tiles {start}..: {exc}") from exc
                out[start : start + len(x)] = maps
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return np.clip(out, 0.0, 1.0, out=out)


def failed_probability(
    model: nn.Module,
    tiles: np.ndarray,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Softmax probability of the failed class per tile, ``(N,)`` float32.

    Eval mode under ``torch.inference_mode``; the model's train/eval mode is restored.
    """
    arr = _as_tiles(tiles)
    batches = _batches(len(arr), batch_size)
    device = torch.device(device)
    was_training = model.training
    probs = np.empty(len(arr), dtype=np.float32)
    model.to(device).eval()
    try:
        with torch.inference_mode():
            for start in batches:
                x = torch.from_numpy(arr[start : start + batch_size]).to(device)
                p = torch.softmax(model(x).float(), dim=1)[:, FAILED]
                probs[start : start + len(x)] = p.cpu().numpy()
    finally:
        model.train(was_training)
    return probs


# ---------------------------------------------------------------------- localization


def energy_ratio(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's mass inside the mask, relative to the mask's share of the tile.

    ``(sum(cam[mask]) / sum(cam)) / (mask.sum() / mask.size)`` for a non-negative ``cam``.
    1.0: no better than a uniform map; ``1 / area share`` (its maximum): all mass inside
    the mask; below 1: the map avoids the mask. NaN when the mask is empty or the map
    sums to 0.
    """
    cam, mask = _as_map_and_mask(cam, mask)
    if np.any(cam < 0):
        raise ValueError("energy_ratio needs a non-negative map")
    total, area = float(cam.sum()), int(mask.sum())
    if area == 0 or total <= 0:
        return math.nan
    return float(cam[mask].sum()) / total / (area / mask.size)


def cam_iou(cam: np.ndarray, mask: np.ndarray, threshold: float | None = None) -> float:
    """Intersection over union of the thresholded map and the mask.

    ``threshold=None`` (default, scale-free): keep the k highest pixels of the map, with
    k = mask area; pixels tied with the k-th highest value are all kept (so a constant map
    keeps the whole tile and scores the mask's area share). A number: keep
    ``cam >= threshold``. IoU = |kept & mask| / |kept | mask|. NaN when the mask is empty.
    """
    cam, mask = _as_map_and_mask(cam, mask)
    area = int(mask.sum())
    if area == 0:
        return math.nan
    if threshold is None:
        kth = np.partition(cam.ravel(), cam.size - area)[cam.size - area]  # k-th highest
        kept = cam >= kth
    else:
        kept = cam >= threshold
    union = int(np.count_nonzero(kept | mask))
    return int(np.count_nonzero(kept & mask)) / union


def uniform_map(shape: tuple[int, int]) -> np.ndarray:
    """Baseline map that knows nothing: all ones, float32."""
    return np.ones(shape, dtype=np.float32)


def centre_bias_map(shape: tuple[int, int], sigma_frac: float = 0.25) -> np.ndarray:
    """Baseline map "damage is in the middle": isotropic Gaussian on the tile centre.

    ``exp(-r^2 / (2 sigma^2))`` with r the distance to the centre ``((H-1)/2, (W-1)/2)``
    and ``sigma = sigma_frac * min(H, W)``; float32, 1 at the centre.
    """
    h, w = shape
    if sigma_frac <= 0:
        raise ValueError(f"sigma_frac must be > 0, got {sigma_frac}")
    sigma = sigma_frac * min(h, w)
    y = np.arange(h, dtype=np.float64)[:, None] - (h - 1) / 2
    x = np.arange(w, dtype=np.float64)[None, :] - (w - 1) / 2
    return np.exp(-(y**2 + x**2) / (2 * sigma**2)).astype(np.float32)


def localization_summary(
    cams: np.ndarray, masks: np.ndarray, threshold: float | None = None
) -> dict[str, float | int]:
    """Mean localization metrics over the tiles whose mask is not empty.

    Keys: ``cam_energy_ratio``, ``cam_iou`` (the maps), ``uniform_energy_ratio``,
    ``uniform_iou`` (:func:`uniform_map`), ``centre_energy_ratio``, ``centre_iou``
    (:func:`centre_bias_map`), and ``n_tiles`` (tiles with a non-empty mask). Means skip
    NaN (a map that sums to 0); NaN where no tile counts. ``threshold`` goes to
    :func:`cam_iou`.
    """
    cams = _as_maps(cams)
    masks = np.asarray(masks, dtype=bool)
    if masks.shape != cams.shape:
        raise ValueError(f"cams {cams.shape} and masks {masks.shape} must have the same shape")
    keep = masks.reshape(len(masks), -1).any(axis=1)
    shape = cams.shape[1:]
    baselines = {"cam": None, "uniform": uniform_map(shape), "centre": centre_bias_map(shape)}
    out: dict[str, float | int] = {}
    for name, base in baselines.items():
        energy, iou = [], []
        for cam, mask in zip(cams[keep], masks[keep], strict=True):
            m = cam if base is None else base
            energy.append(energy_ratio(m, mask))
            iou.append(cam_iou(m, mask, threshold))
        for key, vals in (("energy_ratio", energy), ("iou", iou)):
            finite = [v for v in vals if not math.isnan(v)]
            out[f"{name}_{key}"] = float(np.mean(finite)) if finite else math.nan
    out["n_tiles"] = int(keep.sum())
    return out


def best_layers(
    model: nn.Module,
    tiles: np.ndarray,
    masks: np.ndarray,
    names: Sequence[str],
    method: str = DEFAULT_METHOD,
    batch_size: int = 64,
) -> tuple[list[str], list[dict[str, float]]]:
    """Of the layers ``names``, the one whose maps put the most energy on ``masks`` (mean
    energy ratio; the first of equals), for the model or for each member of an ensemble on
    its own: which intermediate layer localizes depends on the training seed.

    Names a network lacks are skipped (searched CNNs differ in depth); none found is a
    ValueError. Returns the chosen name per network and each network's ratio per name.
    Choose on validation tiles, so that test-split localization figures stay unbiased.
    """
    chosen, scores = [], []
    for net in networks(model):
        modules = dict(net.named_modules())
        present = [n for n in names if n in modules]
        if not present:
            raise ValueError(
                f"{type(net).__name__} has none of the layers {list(names)}; layers with "
                f"convolutions: {', '.join(_layer_names(net))}"
            )
        ratios = {
            n: localization_summary(compute_cams(net, tiles, method, n, batch_size), masks)[
                "cam_energy_ratio"
            ]
            for n in present
        }
        finite = {n: r for n, r in ratios.items() if not math.isnan(r)}
        chosen.append(max(finite, key=finite.__getitem__) if finite else present[0])
        scores.append(ratios)
    return chosen, scores


# ---------------------------------------------------------------------- faithfulness


def _rank_map(cam: np.ndarray) -> np.ndarray:
    """``cam`` replaced by its rank in [0, 1] (ties by pixel index): no two pixels equal."""
    order = np.argsort(-cam.ravel(), kind="stable")  # most relevant first
    ranks = np.empty(cam.size, dtype=np.float32)
    ranks[order] = np.linspace(1.0, 0.0, cam.size, dtype=np.float32)
    return ranks.reshape(cam.shape)


def faithfulness(
    model: nn.Module,
    tiles: np.ndarray,
    cams: np.ndarray,
    device: str | torch.device = "cpu",
    percentiles: Sequence[int] = ROAD_PERCENTILES,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """ROAD faithfulness of ``cams`` (pytorch-grad-cam's ``ROADCombined``), mean over tiles.

    For each percentile p, ROAD imputes (noisy linear infill) the (100-p) % most relevant
    pixels (MoRF), or the (100-p) % least relevant (LeRF), and reads the model's softmax
    probability of the failed class. Per tile the score is
    ``mean_p [P(failed | LeRF) - P(failed | MoRF)] / 2``, in [-0.5, 0.5]. Higher is more
    faithful: removing what the map highlights hurts the prediction more than removing
    what it ignores. 0: no better than an arbitrary map; negative: the map points away
    from the evidence. The maps are replaced by their pixel ranks first (ties by pixel
    index) so every percentile removes exactly its share even where a map is flat (Grad-
    CAM maps are often 0 over large areas). One-channel input works. Tile i's imputation
    noise comes from torch's RNG seeded with ``seed + i`` (the global RNG is left as it
    was), so a tile's score does not depend on the others: deterministic on the CPU.

    The imputation is the library's (its ``RemoveLeastRelevantFirst`` /
    ``RemoveMostRelevantFirst`` with a ``NoisyLinearImputer``), drawing each tile's noise
    in the order ``ROADCombined`` does; only the model calls are batched: ``ROADCombined``
    reads one probability per call, so it had to be called per tile, with 2 batch-1
    forward passes per tile, side and percentile (the unperturbed one each time). Here
    there is one batched pass per side and percentile, and one for the unperturbed tiles
    (in batches of at most ``batch_size`` tiles, which bounds the activations' memory).
    Cost on 2 CPU cores, nine percentiles, 64 px tiles: about 0.27 s per tile for
    ResNet-18 (0.70 called per tile) and 0.25 s for a 3-block CNN (0.32), most of it the
    imputation's sparse solves. NaN for no tiles.
    """
    arr = _as_tiles(tiles)
    cams = _as_maps(cams)
    _check_pairs(arr, cams)
    if len(arr) == 0:
        return math.nan
    x = torch.from_numpy(arr)
    ranks = [torch.from_numpy(_rank_map(cam)) for cam in cams]
    before = failed_probability(model, arr, batch_size, device)
    side_means = []
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # ROAD's imputer hands torch tensors to np.argwhere: numpy 2 warns each time
        warnings.filterwarnings("ignore", "__array_wrap__ must accept", DeprecationWarning)
        rng = []  # each tile's own RNG state, carried between its draws
        for i in range(len(arr)):
            torch.manual_seed(seed + i)
            rng.append(torch.get_rng_state())
        for remove in (RemoveLeastRelevantFirst, RemoveMostRelevantFirst):
            diffs = []
            for p in percentiles:
                perturb = remove(p, NoisyLinearImputer())
                perturbed = []
                for i in range(len(arr)):
                    torch.set_rng_state(rng[i])
                    perturbed.append(perturb(x[i], ranks[i]))
                    rng[i] = torch.get_rng_state()
                after = failed_probability(
                    model, torch.stack(perturbed).numpy(), batch_size, device
                )
                diffs.append(after - before)
            # per tile, a mean over its own contiguous row, as ROADCombined takes it
            side_means.append(np.ascontiguousarray(np.float32(diffs).T).mean(axis=1))
    lerf, morf = side_means
    return float(((lerf - morf) / 2).astype(np.float64).mean())


# ---------------------------------------------------------------------------- export


def select_by_outcome(
    labels: np.ndarray, probs: np.ndarray, n_per_group: int, threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """Indices of up to ``n_per_group`` tiles per outcome: ``"tp"``, ``"fp"``, ``"tn"``, ``"fn"``.

    Predicted failed: ``probs > threshold``; ``labels`` 1 = failed. Within a group the
    most confident predictions come first (highest ``probs`` for tp/fp, lowest for tn/fn),
    ties by index. int64 arrays, possibly shorter than ``n_per_group`` or empty.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != probs.shape:
        raise ValueError(f"labels {labels.shape} and probs {probs.shape} must be equal 1D shapes")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (pristine) or 1 (failed)")
    if n_per_group < 0:
        raise ValueError(f"n_per_group must be >= 0, got {n_per_group}")
    pred = probs > threshold  # evaluate's and the registered model's rule
    truth = labels == 1
    groups = {"tp": pred & truth, "fp": pred & ~truth, "tn": ~pred & ~truth, "fn": ~pred & truth}
    out = {}
    idx = np.arange(len(probs))
    for name, member in groups.items():
        conf = probs if name in ("tp", "fp") else -probs
        sel = idx[member]
        order = np.lexsort((sel, -conf[member]))  # last key first: confidence, then index
        out[name] = sel[order][:n_per_group].astype(np.int64)
    return out


CAM_NAMES: Mapping[str, str] = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "eigencam": "EigenCAM",
    "scorecam": "Score-CAM",
}
OUTCOME_TEXT: Mapping[str, str] = {
    "tp": "true positives: failed tiles called failed",
    "fp": "false positives: pristine tiles called failed",
    "tn": "true negatives: pristine tiles called pristine",
    "fn": "false negatives: failed tiles called pristine",
}
# the map over the tile: a perceptual colormap, translucent so that the bone stays visible
CAM_CMAP = "inferno"
CAM_ALPHA = 0.4
SCALE_BAR_STEPS = (1.0, 2.0, 5.0)  # a scale bar is 1, 2 or 5 x 10^k um long
SCALE_BAR_SHARE = 0.3  # at most this share of the tile's width


def scale_bar_um(width_um: float) -> float:
    """A round scale-bar length for a panel ``width_um`` wide: the longest 1, 2 or 5 x 10^k
    um that is at most :data:`SCALE_BAR_SHARE` of the width (readable, never crowding)."""
    if not (math.isfinite(width_um) and width_um > 0):
        raise ValueError(f"panel width must be a positive length in um, got {width_um}")
    limit = SCALE_BAR_SHARE * width_um
    power = 10.0 ** math.floor(math.log10(limit))
    return max(s * power for s in SCALE_BAR_STEPS if s * power <= limit * (1 + 1e-9))


def _length_text(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


def _scale_bar(ax: Axes, shape: tuple[int, int], pixel_um: float) -> None:
    """A white bar with its length in um, bottom right inside the panel (gid "scale-bar")."""
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    h, w = shape
    length_um = scale_bar_um(w * pixel_um)
    length = length_um / pixel_um  # in pixels: the axes' data units
    thick, margin = max(1.0, 0.03 * h), 0.05 * w
    x0, y0 = w - 0.5 - margin - length, h - 0.5 - margin - thick
    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    ax.add_patch(
        Rectangle((x0, y0), length, thick, facecolor="white", edgecolor="black",
                  linewidth=0.6, gid="scale-bar")
    )  # fmt: skip
    ax.text(x0 + length / 2, y0 - 0.5, _length_text(length_um), ha="center", va="bottom",
            color="white", fontsize=7, path_effects=outline, gid="scale-bar-label")  # fmt: skip


def _wrap(text: str, width_in: float, fontsize: float) -> list[str]:
    """``text`` wrapped to lines about ``width_in`` inches wide (paragraphs kept)."""
    chars = max(20, int(width_in * 72 / (0.52 * fontsize)))
    return [line for part in text.split("\n") for line in textwrap.wrap(part, chars) or [""]]


def overlay_figure(
    tiles: np.ndarray,
    cams: np.ndarray,
    labels: Sequence[str] | None = None,
    *,
    title: str = "",
    note: str = "",
    pixel_um: float | None = None,
    empty: str = "no tiles",
    map_name: str = CAM_NAMES[DEFAULT_METHOD],
    ncols: int = 4,
    alpha: float = CAM_ALPHA,
    cmap: str = CAM_CMAP,
) -> Figure:
    """A grid figure of tiles with their maps (a matplotlib ``Figure`` on an Agg canvas).

    Each panel is a tile in grey (0..1; a 2.5-D tile by its tiled, middle plane) under its
    map (``cmap`` at ``alpha``, 0..1) with ``labels[i]`` above it; a colour bar names the
    map (``map_name``, 0-1); ``pixel_um`` (the tiles' pixel size) adds a scale bar to the
    first panel. ``title`` heads the figure and ``note`` (wrapped) explains it below the
    grid. No tiles: one placeholder panel saying ``empty``, so that the file still exists
    and says why it shows nothing. Always ``ncols`` columns, so figures of the same
    settings have the same width. No pyplot state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if pixel_um is not None and not (math.isfinite(pixel_um) and pixel_um > 0):
        raise ValueError(f"pixel_um must be a positive pixel size in um, got {pixel_um}")
    n = len(tiles)
    if n:
        arr = _as_tiles(tiles)
        cams = _as_maps(cams)
        _check_pairs(arr, cams)
        grey = centre_plane(arr)  # 2.5-D tiles: the tiled (middle) plane
    elif len(cams):
        raise ValueError(f"{len(cams)} maps for no tiles")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} titles for {n} tiles")
    nrows = max(1, math.ceil(n / ncols))
    # layout in inches: title, rows of (label, panel), note; colour bar on the right
    panel, gap, label_h, side = 1.8, 0.12, 0.34 if labels is not None else 0.08, 0.2
    bar_gap, bar_w, bar_label = 0.2, 0.14, 0.75
    grid_w = ncols * panel + (ncols - 1) * gap
    width = side + grid_w + bar_gap + bar_w + bar_label
    title_lines = _wrap(title, width - 2 * side, 10) if title else []
    note_lines = _wrap(note, width - 2 * side, 7.5) if note else []
    top = 0.1 + 0.22 * len(title_lines)
    bottom = 0.15 + 0.16 * len(note_lines)
    grid_h = nrows * (label_h + panel)
    height = top + grid_h + bottom
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)

    def box(x: float, y_top: float, w: float, h: float) -> list[float]:
        """[left, bottom, width, height] in figure fractions of a box given in inches."""
        return [x / width, 1 - (y_top + h) / height, w / width, h / height]

    for k, line in enumerate(title_lines):
        weight = "bold" if k == 0 else "normal"
        fig.text(side / width, 1 - (0.1 + 0.22 * k) / height, line, fontsize=10,
                 fontweight=weight, va="top", ha="left")  # fmt: skip
    for k, line in enumerate(note_lines):
        fig.text(side / width, (bottom - 0.1 - 0.16 * k) / height, line, fontsize=7.5,
                 va="top", ha="left", color="0.2")  # fmt: skip
    if n == 0:
        ax = fig.add_axes(box(side, top + label_h, grid_w, panel))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_facecolor("0.92")
        ax.text(0.5, 0.5, empty, ha="center", va="center", fontsize=11, color="0.25",
                transform=ax.transAxes, wrap=True)  # fmt: skip
    for i in range(n):
        r, c = divmod(i, ncols)
        y = top + r * (label_h + panel) + label_h
        ax = fig.add_axes(box(side + c * (panel + gap), y, panel, panel))
        ax.set_axis_off()
        ax.imshow(grey[i], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.imshow(cams[i], cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha, interpolation="nearest")
        if labels is not None:
            ax.set_title(str(labels[i]), fontsize=8, pad=3)
        if pixel_um is not None and i == 0:
            _scale_bar(ax, grey.shape[1:], pixel_um)
    if n:
        cax = fig.add_axes(box(side + grid_w + bar_gap, top + label_h, bar_w, grid_h - label_h))
        mappable = ScalarMappable(Normalize(0.0, 1.0), cmap)
        bar = fig.colorbar(mappable, cax=cax, ticks=[0.0, 0.5, 1.0])
        bar.set_label(f"{map_name}, 0-1\n(scaled per tile)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return fig


def overlay_grid(
    tiles: np.ndarray,
    cams: np.ndarray,
    titles: Sequence[str] | None,
    path: str | os.PathLike[str],
    **figure: Any,
) -> None:
    """Write :func:`overlay_figure` (``titles``: the panels' labels; ``figure``: its
    keywords) as a PNG, atomically. The PNG has no software/date metadata, so the same
    input gives the same bytes."""
    fig = overlay_figure(tiles, cams, titles, **figure)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})


def write_cam_tiff(path: str | os.PathLike[str], cam: np.ndarray) -> None:
    """Write one map (2D) as an uncompressed float32 TIFF, atomically."""
    arr = np.asarray(cam, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"a CAM must be a 2D array, got shape {arr.shape}")
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, arr, photometric="minisblack")
