"""Read ``params.yaml``, the one source of configuration for every stage.

Each section of the file has a pydantic model below (in the file's order) that refuses
unknown keys, so a misspelt key is an error instead of a silently ignored setting, and
that holds the defaults of the keys the code treats as optional (nowhere else).

Values keep the exact Python type YAML gave them (an ``int`` stays an ``int`` where a
number may be either, lists stay lists): the plain dicts of :func:`load_params` equal
``yaml.safe_load`` of the file, so hashes and records made from them do not change.

Entry points: :func:`load_config` (typed, every section), :func:`load_params` (plain
dicts), :func:`stage_params` (typed, only the sections a stage declares).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    StrictBool,
    StrictStr,
    Tag,
    TypeAdapter,
    ValidationError,
)

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """``params.yaml`` is missing, unreadable, lacks a section or holds a bad value."""


# -- value types: each refuses what the code cannot use, in plain words, and keeps the type --


def _show(value: Any) -> str:
    """A value as the message shows it (YAML spelling for null and booleans)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(
    noun: str, gt: float | None, ge: float | None, lt: float | None, le: float | None
) -> str:
    article = "an" if noun == "integer" else "a"
    low = f"({gt}" if gt is not None else f"[{ge}" if ge is not None else None
    high = f"{lt})" if lt is not None else f"{le}]" if le is not None else None
    if low and high:
        return f"{article} {noun} in {low}, {high}"
    if gt == 0:
        return f"a positive {noun}"
    for op, bound in ((">", gt), (">=", ge), ("<", lt), ("<=", le)):
        if bound is not None:
            return f"{article} {noun} {op} {bound}"
    return f"{article} {noun}"


def _bounds(
    integer: bool,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> PlainValidator:
    """Accept a finite int (``integer``) or int-or-float within the bounds and return it
    as given: no bool, no string, and no int turned into a float (dumps match the file)."""
    what = _describe("integer" if integer else "number", gt, ge, lt, le)
    wanted = int if integer else (int, float)

    def check(value: Any) -> Any:
        if (
            isinstance(value, bool)
            or not isinstance(value, wanted)
            or not math.isfinite(value)
            or (gt is not None and not value > gt)
            or (ge is not None and not value >= ge)
            or (lt is not None and not value < lt)
            or (le is not None and not value <= le)
        ):
            raise ValueError(f"must be {what}, got {_show(value)}")
        return value

    return PlainValidator(check, json_schema_input_type=int if integer else float)


def _whole(**bounds: float) -> PlainValidator:
    return _bounds(True, **bounds)


def _real(**bounds: float) -> PlainValidator:
    return _bounds(False, **bounds)


def _count(exactly: int | None = None) -> AfterValidator:
    """A non-empty list (of ``exactly`` items when given)."""

    def check(value: list[Any]) -> list[Any]:
        if exactly is not None and len(value) != exactly:
            raise ValueError(f"must hold exactly {exactly} items, got {len(value)}")
        if not value:
            raise ValueError("must hold at least one item, got none")
        return value

    return AfterValidator(check)


def _pair(strict: bool = False) -> AfterValidator:
    """``[low, high]`` with low <= high (low < high when ``strict``)."""
    op = "<" if strict else "<="

    def check(value: list[Any]) -> list[Any]:
        if len(value) != 2:
            raise ValueError(f"must be a [low, high] pair, got {_show(value)}")
        low, high = value
        if low > high or (strict and low == high):
            raise ValueError(f"must be [low, high] with low {op} high, got {_show(value)}")
        return value

    return AfterValidator(check)


def _nonempty(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


_NONEMPTY = _count()
_PAIR = _pair()
_ORDERED = _pair(strict=True)

PosInt = Annotated[int, _whole(gt=0)]
NonNegInt = Annotated[int, _whole(ge=0)]
Seed = NonNegInt  # NumPy seed sequences and scikit-learn random states want >= 0
Real = Annotated[float, _real()]
PosReal = Annotated[float, _real(gt=0)]
NonNegReal = Annotated[float, _real(ge=0)]
Fraction = Annotated[float, _real(ge=0, le=1)]  # a share or probability
BelowOne = Annotated[float, _real(ge=0, lt=1)]
AtLeastOne = Annotated[float, _real(ge=1)]  # a ratio max / min
Name = Annotated[StrictStr, AfterValidator(_nonempty)]  # a name, path or URL

# [low, high] ranges that values are drawn from
RealRange = Annotated[list[Real], _PAIR]
PosRange = Annotated[list[PosReal], _PAIR]
NonNegRange = Annotated[list[NonNegReal], _PAIR]
FractionRange = Annotated[list[Fraction], _PAIR]
CountRange = Annotated[list[NonNegInt], _PAIR]

Tissue = Literal["cortical", "trabecular"]
Plane = Literal["axial", "coronal", "sagittal"]  # axial: normal to the load axis z
Planes = Annotated[list[Plane], _NONEMPTY]


def _mapping_or_value(value: Any) -> str:
    """Tag of a union of a mapping (model) and a plain value: picks the one branch whose
    errors are reported (also called with model instances when dumping)."""
    return "mapping" if isinstance(value, dict | BaseModel) else "value"


_BY_MAPPING = Discriminator(_mapping_or_value)


class _Section(BaseModel):
    """A mapping of params.yaml: unknown keys are errors; read-only once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# -- pipeline -------------------------------------------------------------------------------


class PipelinePaths(_Section):
    """Where the stages read and write (relative to the repo root)."""

    raw: Name
    tiles: Name
    splits: Name
    corpus: Name
    models: Name
    metrics: Name
    plots: Name
    registry: Name
    reports: Name


class PipelineSection(_Section):
    """What dvc.yaml (``${pipeline.*}``), the CLI and every stage share."""

    seed: Seed
    tissues: Annotated[list[Tissue], _NONEMPTY]
    paths: PipelinePaths


# -- synth ----------------------------------------------------------------------------------


class SynthPose(_Section):
    """Largest rigid displacement of a specimen at a scan (keywords of ``fields.Pose.random``)."""

    max_shift_vox: NonNegReal
    max_tilt_deg: NonNegReal
    max_spin_deg: NonNegReal


class TrabecularStructure(_Section):
    """Ranges the architecture of each trabecular specimen is drawn from."""

    cell_spacing_um: PosRange
    anisotropy: PosRange
    plate_fraction: FractionRange
    plate_thickness_um: PosRange
    rod_diameter_um: PosRange
    perforation: FractionRange
    mineral_variation: NonNegReal


class TrabecularFailure(_Section):
    """Compaction band and the buckling, fracture and crushing of its rods."""

    band_height_frac: PosRange
    band_centre_jitter_frac: NonNegReal
    band_strain: Annotated[list[BelowOne], _PAIR]  # compaction divides by 1 - strain
    lateral_flow_um: NonNegRange
    lateral_flow_length_um: PosReal
    effective_length_factor: PosReal
    bending_strain_at_fracture: PosReal
    hinge_jitter: Annotated[float, _real(ge=0, lt=0.5)]
    fracture_slip_frac: NonNegRange
    fracture_overlap_frac: NonNegRange
    fracture_surface_um: NonNegReal


class CorticalStructure(_Section):
    """Ranges the microstructure of each cortical specimen is drawn from."""

    canal_density_per_mm2: NonNegRange
    canal_diameter_um: PosRange
    volkmann_per_mm3: NonNegRange
    lacuna_density_per_mm3: NonNegRange
    osteon_radius_um: PosRange
    lamella_period_um: PosReal
    lacuna_axes_um: Annotated[list[PosRange], _count(3)]  # thin, wide, long full axes
    mineral_variation: NonNegReal


class CorticalFailure(_Section):
    """Microcracks (and maybe one macro crack) of a failed cortical specimen: the
    distributions they are drawn from (sources in ``data/synth/cortical.py``)."""

    crack_density_median_per_mm3: PosReal  # lognormal density; Poisson count, at least 1
    crack_density_log_sd: NonNegReal
    crack_length_median_um: PosReal  # lognormal 3D length (long axis)
    crack_length_log_sd: NonNegReal
    crack_aspect_median: AtLeastOne  # lognormal length / width, clipped at >= 1
    crack_aspect_log_sd: NonNegReal
    crack_aperture_um: PosRange  # uniform
    crack_angle_deg: Annotated[list[Annotated[float, _real(ge=0, le=90)]], _PAIR]  # to z
    interstitial_share: Fraction
    shear_band_width_frac: PosReal
    in_band_share: Fraction
    deflection_share: Fraction  # cracks a cement line deflects rather than arrests
    deflection_um: NonNegRange  # uniform run along the cement line
    max_redraws: NonNegInt
    macro_crack_probability: Fraction
    macro_aperture_um: PosRange


class Imaging(_Section):
    """The simulated beamline: attenuation, blur, phase contrast, noise and rings."""

    mu_bone: NonNegReal
    mu_soft: NonNegReal
    mu_air: NonNegReal
    fov_outside: Real
    window: Annotated[list[Real], _ORDERED]  # attenuation range quantised to the dtype
    psf_sigma_vox: NonNegRange
    phase_strength: NonNegRange
    phase_sigma_vox: NonNegReal
    snr: PosRange
    noise_corr_vox: NonNegReal
    ring_count: CountRange
    ring_amplitude: NonNegReal


class _SynthTissue(_Section):
    """Specimen, scan geometry and mechanics shared by both tissues."""

    species: Name
    voxel_size_um: PosReal
    shape: Annotated[list[PosInt], _count(3)]  # z (load axis), y, x voxels
    specimen_radius_frac: Annotated[list[Annotated[float, _real(gt=0, le=1)]], _PAIR]
    elastic_strain: NonNegReal
    applied_strain_at_failure: NonNegReal


class SynthTrabecular(_SynthTissue):
    """The trabecular phantoms."""

    structure: TrabecularStructure
    failure: TrabecularFailure
    imaging: Imaging


class SynthCortical(_SynthTissue):
    """The cortical phantoms."""

    structure: CorticalStructure
    failure: CorticalFailure
    imaging: Imaging


class SynthSection(_Section):
    """``bonedamage synth``: the embedded phantom dataset."""

    seed: Seed
    dtype: Literal["uint16", "uint8", "float32"]
    specimens_per_tissue: PosInt
    load_steps: Annotated[list[Fraction], _NONEMPTY]  # 0 = pristine, 1 = failed
    yield_step: Fraction
    workers: PosInt = 1  # processes; the output does not depend on it
    pose: SynthPose
    trabecular: SynthTrabecular
    cortical: SynthCortical


# -- describe, tile, split, validate --------------------------------------------------------


class DescribeSection(_Section):
    """``bonedamage describe``: morphometry, microdamage and damage coverage of the raw data."""

    slice_stride: PosInt
    min_specimen_fraction: Fraction
    visible_damage_fraction: Fraction
    # Gaussian smoothing (voxels) before Otsu's threshold, per tissue
    smooth_sigma_vox: dict[Tissue, NonNegReal] = {
        "cortical": 0.5,
        "trabecular": 1.0,
    }
    min_component_voxels: PosInt = 8  # smaller crack/fracture components have no shape
    merge_gap_vox: NonNegInt = 1  # damage voxels this close belong to one component
    workers: PosInt = 1  # processes; the output does not depend on it


class TissueLengths(_Section):
    """A length (um) per tissue."""

    cortical: PosReal
    trabecular: PosReal


class TissuePlanes(_Section):
    """The planes tiled per tissue."""

    cortical: Planes
    trabecular: Planes


class TissueContext(_Section):
    """2.5-D context per tissue (um); a tissue not named gets none."""

    cortical: NonNegReal = 0.0
    trabecular: NonNegReal = 0.0


class TileSection(_Section):
    """``bonedamage tile``: scans -> 2D tiles."""

    tile_um: TissueLengths
    working_voxel_um: TissueLengths
    # one list for every tissue, or one per tissue
    planes: Annotated[
        Annotated[Planes, Tag("value")] | Annotated[TissuePlanes, Tag("mapping")], _BY_MAPPING
    ]
    slice_stride: PosInt
    # one for every tissue, or one per tissue; 0: one plane, no context
    context_um: Annotated[
        Annotated[NonNegReal, Tag("value")] | Annotated[TissueContext, Tag("mapping")],
        _BY_MAPPING,
    ] = 0.0
    percentiles: Annotated[list[Annotated[float, _real(ge=0, le=100)]], _ORDERED]
    min_fov_fraction: Fraction
    min_bone_fraction: Fraction
    chunk_tiles: PosInt


class SplitFractions(_Section):
    """Relative sizes of the splits (normalised by their sum)."""

    train: PosReal
    val: PosReal
    test: PosReal


class SplitSection(_Section):
    """``bonedamage split``: specimen-grouped splits (and a leaky one)."""

    seed: Seed
    fractions: SplitFractions


class ValidateSection(_Section):
    """``bonedamage validate``: the great-expectations suites."""

    max_class_imbalance: AtLeastOne
    min_tiles_per_class: NonNegInt


# -- mlflow, augment, train -----------------------------------------------------------------


class MlflowSection(_Section):
    """The tracking store (MLFLOW_TRACKING_URI overrides ``db``)."""

    db: Name
    artifacts: Name
    experiment: Name


class AugmentSection(_Section):
    """Training-time augmentation; a key left out turns its augmentation off."""

    flips: StrictBool = False
    rot90: StrictBool = False
    rot90_planes: Planes | None = None  # None: quarter turns in every plane
    gain: NonNegReal = 0.0
    offset: NonNegReal = 0.0
    noise: NonNegReal = 0.0


DEFAULT_SEED: Final = 20210814


class TrainSection(_Section):
    """Optimisation settings shared by search trials and final models.

    Every key has a default equal to the committed params.yaml's value: ``TRAIN_DEFAULTS``
    is the one place ``learn.train.TrainConfig`` may take its defaults from.
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: StrictBool = True  # mixed precision on CUDA
    seed: Seed = DEFAULT_SEED
    threads: PosInt = 2
    epochs: PosInt = 10
    patience: PosInt = 4
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    channels_last: StrictBool = True


TRAIN_DEFAULTS: Final = TrainSection()


class TrainCnnSection(_Section):
    """``bonedamage train-cnn``: the final CNN of the best trial."""

    ensemble: PosInt = 1  # networks averaged (seeds train.seed, +1, ...)


# -- search ---------------------------------------------------------------------------------


class MedianPruner(_Section):
    """Prune a trial below the median of earlier trials at the same epoch."""

    kind: Literal["median"] = "median"
    n_startup_trials: NonNegInt = 3
    n_warmup_steps: NonNegInt = 1


class PercentilePruner(_Section):
    """Keep the trials in the top ``percentile`` % at each epoch."""

    kind: Literal["percentile"]
    percentile: Annotated[float, _real(gt=0, lt=100)] = 25.0
    n_startup_trials: NonNegInt = 3
    n_warmup_steps: NonNegInt = 1


class HyperbandPruner(_Section):
    """Hyperband over the epochs of a trial."""

    kind: Literal["hyperband"]
    min_resource: PosInt = 1
    reduction_factor: Annotated[int, _whole(ge=2)] = 3


class SuccessiveHalvingPruner(_Section):
    """One Hyperband bracket: at rungs keep the top 1 / ``reduction_factor``."""

    kind: Literal["successive_halving"]
    min_resource: PosInt = 1
    reduction_factor: Annotated[int, _whole(ge=2)] = 3


class NoPruner(_Section):
    """Run every trial to its end."""

    kind: Literal["none"]


PRUNER_KINDS: Final = ("median", "percentile", "hyperband", "successive_halving", "none")


def _pruner_kind(value: Any) -> str:
    """The pruner branch: ``kind`` (median when left out); others fail as unknown_kind."""
    if isinstance(value, BaseModel):
        return str(getattr(value, "kind", ""))
    kind = value.get("kind", "median") if isinstance(value, dict) else "median"
    return kind if isinstance(kind, str) else repr(kind)


Pruner = Annotated[
    Annotated[MedianPruner, Tag("median")]
    | Annotated[PercentilePruner, Tag("percentile")]
    | Annotated[HyperbandPruner, Tag("hyperband")]
    | Annotated[SuccessiveHalvingPruner, Tag("successive_halving")]
    | Annotated[NoPruner, Tag("none")],
    Discriminator(
        _pruner_kind,
        custom_error_type="unknown_kind",
        custom_error_message="unknown pruner kind",
        custom_error_context={"field": "kind", "expected": ", ".join(map(repr, PRUNER_KINDS))},
    ),
]


class SearchSpace(_Section):
    """Ranges (``[low, high]``) and choices (lists) the trials draw from."""

    n_blocks: Annotated[list[PosInt], _PAIR]
    base_filters: Annotated[list[PosInt], _NONEMPTY]
    filter_growth: PosRange
    kernel_size: Annotated[list[PosInt], _NONEMPTY]
    norm: Annotated[list[Literal["batch", "group", "none"]], _NONEMPTY]
    pool: Annotated[list[Literal["max", "avg"]], _NONEMPTY]
    dropout: Annotated[list[BelowOne], _PAIR]
    dense_units: Annotated[list[PosInt], _NONEMPTY]
    lr: PosRange  # drawn log-uniformly
    weight_decay: PosRange  # drawn log-uniformly
    batch_size: Annotated[list[PosInt], _NONEMPTY]
    augment_strength: FractionRange


class SearchSection(_Section):
    """``bonedamage search``: the Optuna study per tissue."""

    n_trials: PosInt
    timeout_s: PosReal | None = None  # None: no time limit
    epochs: PosInt
    seed: Seed
    n_startup_trials: NonNegInt = 5
    storage: Name  # a journal file, or a database URL
    study_prefix: Name = "bonedamage"
    min_trials_for_importance: Annotated[int, _whole(ge=2)] = 8  # to rank the parameters
    pruner: Pruner = MedianPruner()
    space: SearchSpace


# -- resnet, evaluate, registry, domain -----------------------------------------------------


PretrainMethod = Literal["procedural", "simsiam", "rotation"]
PRETRAIN_METHODS: Final = get_args(PretrainMethod)
PRETRAINED_FOLDER: Final = "pretrained"  # <models>/pretrained/<method>.pt (pretrain stage)


class PretrainCorpus(_Section):
    """``bonedamage corpus``: more phantoms of the synth physics for pretraining."""

    specimens_per_tissue: PosInt
    first_specimen: NonNegInt  # generator index of the first corpus specimen
    shape: dict[Tissue, Annotated[list[PosInt], _count(3)]]  # z, y, x voxels per tissue
    slice_stride: PosInt


class PretrainSimsiam(_Section):
    """SimSiam (Chen and He, 2021) settings: views, heads and optimiser."""

    crop_px: PosInt  # random crops at the native voxel size (no rescaling)
    augment_strength: Fraction  # of params augment, for each view
    projection_dim: PosInt
    prediction_dim: PosInt
    lr: PosReal  # SGD, scaled by batch_size / 256
    momentum: BelowOne


def _unique(values: list[Any]) -> list[Any]:
    if len(set(values)) != len(values):
        raise ValueError(f"lists a value twice: {values}")
    return values


class PretrainSection(_Section):
    """``bonedamage corpus`` / ``pretrain``: backbones for the ResNet's transfer learning."""

    methods: Annotated[list[PretrainMethod], _NONEMPTY, AfterValidator(_unique)]
    corpus: PretrainCorpus
    epochs: PosInt
    batch_size: PosInt
    lr: PosReal
    weight_decay: NonNegReal
    augment_strength: Fraction  # of params augment (procedural; rotation: none)
    val_fraction: Annotated[float, _real(gt=0, lt=1)]
    simsiam: PretrainSimsiam


class ResnetSection(_Section):
    """``bonedamage train-resnet``: transfer learning."""

    arch: Literal["resnet18", "resnet50"]
    inits: Annotated[
        list[Literal["imagenet", "procedural", "simsiam", "rotation", "scratch"]],
        AfterValidator(_unique),
    ]
    weights_path: Name | None = None  # ImageNet weights file; None: the torch cache
    stem: Literal["imagenet", "fine"] = "imagenet"  # learn.models.DEFAULT_STEM
    freeze_epochs: NonNegInt = 0
    epochs: PosInt
    patience: PosInt
    lr: PosReal
    weight_decay: NonNegReal
    batch_size: PosInt
    augment_strength: Fraction = 1.0
    channels_last: StrictBool  # overrides train.channels_last


class EvaluateSection(_Section):
    """``bonedamage evaluate``."""

    visible_damage_fraction: Fraction
    bootstrap: PosInt
    seed: Seed
    baseline: Literal["logistic", "forest"]


class SegmentClasses(_Section):
    """The damage kinds a tissue's segmentation model tells apart."""

    cortical: Annotated[list[Literal["microcrack", "fracture", "buckled"]], _NONEMPTY]
    trabecular: Annotated[list[Literal["microcrack", "fracture", "buckled"]], _NONEMPTY]


class SegmentWeights(_Section):
    """Loss weights of a tissue's damage classes (``segment.classes`` order); None: equal."""

    cortical: Annotated[list[PosReal], _NONEMPTY] | None = None
    trabecular: Annotated[list[PosReal], _NONEMPTY] | None = None


class SegmentArch(_Section):
    """A 2D MONAI UNet: channels per level and the strides between them."""

    channels: Annotated[list[PosInt], _NONEMPTY]
    strides: Annotated[list[PosInt], _NONEMPTY]
    num_res_units: NonNegInt
    dropout: Fraction


class SegmentSection(_Section):
    """``bonedamage train-seg`` / ``evaluate-seg``: damage segmentation."""

    classes: SegmentClasses
    class_weights: SegmentWeights
    arch: SegmentArch
    loss: Literal["dice_ce", "dice_focal"]
    epochs: PosInt
    patience: PosInt
    lr: PosReal
    weight_decay: NonNegReal
    batch_size: PosInt
    augment_strength: Fraction
    min_object_px: PosInt
    object_iou: Annotated[float, _real(gt=0, le=1)]
    cam_thresholds: Annotated[list[Fraction], _NONEMPTY]
    seed: Seed


class RegistryTolerance(_Section):
    """Largest drop a challenger may show against the champion."""

    balanced_accuracy: NonNegReal
    roc_auc: NonNegReal


class SegTolerance(_Section):
    """Largest drop a segmentation challenger may show against the champion."""

    dice_damage: NonNegReal
    object_f1: NonNegReal


class RegistrySegmentation(_Section):
    """Promotion of the segmentation models (``<prefix>-<tissue>-seg``)."""

    min_dice_damage: Fraction
    tolerance: SegTolerance


class RegistrySection(_Section):
    """``bonedamage register`` / ``promote``: the MLflow model registry."""

    prefix: Name
    min_balanced_accuracy: Fraction
    tolerance: RegistryTolerance
    segmentation: RegistrySegmentation


class DomainSection(_Section):
    """Each model's applicability domain (``register`` fits it, ``predict`` applies it)."""

    accept: Annotated[float, _real(gt=0, le=1)]
    max_voxel_ratio: AtLeastOne
    max_out_of_domain_share: Fraction
    max_output_ratio: PosReal


# -- explain --------------------------------------------------------------------------------


class LayerPerArchitecture(_Section):
    """A Grad-CAM target layer per architecture; None: its last conv block."""

    cnn: Name | None = None
    resnet: Name | None = None


class LayerChoices(_Section):
    """Candidate target layers per architecture; None: no choice (``explain.layer``)."""

    cnn: Annotated[list[Name], _NONEMPTY] | None = None
    resnet: Annotated[list[Name], _NONEMPTY] | None = None


class ExplainSection(_Section):
    """``bonedamage explain``: Grad-CAM of each tissue's CNN and ResNet."""

    method: Literal["gradcam", "gradcam++", "eigencam", "scorecam"]
    # one module name for every architecture, one per architecture, or None (last block)
    layer: (
        Annotated[
            Annotated[Name, Tag("value")] | Annotated[LayerPerArchitecture, Tag("mapping")],
            _BY_MAPPING,
        ]
        | None
    ) = None
    layer_choices: LayerChoices | None = None
    batch_size: PosInt
    n_per_outcome: PosInt
    visible_damage_fraction: Fraction
    localization_tiles: PosInt
    faithfulness_tiles: PosInt
    seed: Seed


# -- gate -----------------------------------------------------------------------------------

GateModel = Literal[
    "cnn",
    "cnn_leaky_split",
    "resnet_imagenet",
    "resnet_procedural",
    "resnet_simsiam",
    "resnet_rotation",
    "resnet_scratch",
    "baseline",
]
# the gate tolerates a drop (baseline - new), so only metrics where higher is better
GatedMetric = Literal[
    "accuracy",
    "balanced_accuracy",
    "roc_auc",
    "f1",
    "precision",
    "recall",
    "scan_accuracy",
    "accuracy_visible_damage",
    "accuracy_no_visible_damage",
]


SegGateModel = Literal["seg", "seg_damage", "gradcam_cnn"]
SegGatedMetric = Literal[
    "dice_damage",
    "iou_damage",
    "mean_iou",
    "mean_iou_damage_kinds",
    "mean_dice_damage_kinds",
    "object_f1",
    "object_precision",
    "object_recall",
]


class GateSegmentation(_Section):
    """The segmentation's scores (``metrics/<tissue>-seg.json``) in the gate."""

    models: Annotated[list[SegGateModel], _NONEMPTY]
    metrics: dict[SegGatedMetric, NonNegReal] | None = None
    cross_platform: dict[SegGatedMetric, NonNegReal] | None = None


class GateSection(_Section):
    """``bonedamage gate``: reproduced metrics against the committed ones.

    ``metrics`` and ``cross_platform`` map a metric to the largest drop tolerated, on the
    baseline's platform and on another one; the gate asks for the one it needs.
    """

    models: Annotated[list[GateModel], _NONEMPTY]
    metrics: dict[GatedMetric, NonNegReal] | None = None
    cross_platform: dict[GatedMetric, NonNegReal] | None = None
    segmentation: GateSegmentation | None = None


# -- the whole file -------------------------------------------------------------------------


class Params(_Section):
    """Every section of params.yaml (attribute ``validate_``: ``validate`` is taken)."""

    model_config = ConfigDict(serialize_by_alias=True)

    pipeline: PipelineSection
    synth: SynthSection
    describe: DescribeSection
    tile: TileSection
    split: SplitSection
    validate_: ValidateSection = Field(alias="validate")
    mlflow: MlflowSection
    augment: AugmentSection
    train: TrainSection
    train_cnn: TrainCnnSection
    search: SearchSection
    pretrain: PretrainSection
    resnet: ResnetSection
    evaluate: EvaluateSection
    segment: SegmentSection
    registry: RegistrySection
    domain: DomainSection
    explain: ExplainSection
    gate: GateSection


#: section name in params.yaml -> its model, in the file's order
SECTIONS: Final[Mapping[str, type[_Section]]] = {
    (field.alias or name): field.annotation  # type: ignore[misc]
    for name, field in Params.model_fields.items()
}


# -- reading and checking -------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path}: params file not found (run from the repo root or pass --params)"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def _clean_loc(raw: Any, loc: Sequence[int | str]) -> list[int | str]:
    """``loc`` without pydantic's union tags and ``[key]`` markers: walks the input and
    keeps a part that names a key or index there, or that names a missing key (last)."""
    node, kept = raw, []
    for i, part in enumerate(loc):
        is_key = isinstance(node, dict) and part in node
        is_index = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if is_key or is_index:
            node = node[part]
        elif not (isinstance(node, dict) and i == len(loc) - 1):
            continue  # a tag of a union branch, or pydantic's "[key]"
        kept.append(part)
    return kept


def _dotted(loc: Iterable[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _problem(raw: Mapping[str, Any], error: Mapping[str, Any]) -> str:
    """One pydantic error as ``dotted.key: what is wrong``."""
    loc = _clean_loc(raw, error["loc"])
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    where, parent = _dotted(loc), _dotted(loc[:-1])
    if "[key]" in error["loc"] and kind == "literal_error":
        return f"{where}: unknown key in section '{parent}' (expected {ctx['expected']})"
    if kind == "extra_forbidden":
        return f"{where}: unknown key in section '{parent}'"
    if kind == "missing":
        return f"{where}: missing key (required in section '{parent}')"
    if kind == "unknown_kind":
        wrong = value.get(ctx["field"]) if isinstance(value, dict) else value
        where = _dotted([*loc, ctx["field"]])
        return f"{where}: must be one of {ctx['expected']}, got {_show(wrong)}"
    messages: dict[str, Callable[[], str]] = {
        "value_error": lambda: str(error["msg"]).removeprefix("Value error, "),
        "literal_error": lambda: f"must be one of {ctx.get('expected')}, got {_show(value)}",
        "model_type": lambda: f"must be a mapping, got {_show(value)}",
        "dict_type": lambda: f"must be a mapping, got {_show(value)}",
        "list_type": lambda: f"must be a list, got {_show(value)}",
        "string_type": lambda: f"must be a string, got {_show(value)}",
        "bool_type": lambda: f"must be true or false, got {_show(value)}",
    }
    if kind in messages:
        return f"{where}: {messages[kind]()}"
    text = str(error["msg"])
    return f"{where}: {text[:1].lower()}{text[1:]}, got {_show(value)}"


# settings of earlier params files and where they live now (named in the error)
MOVED: Final = {
    "data": "data.root is pipeline.paths.raw now",
    "cnn": "cnn.ensemble is train_cnn.ensemble now",
    "gate.tissues": "the tissues are pipeline.tissues now",
}


def _check(raw: dict[str, Any], path: Path, required: Iterable[str]) -> dict[str, _Section]:
    """Validate every section present in ``raw`` and require ``required``; all problems
    go into one ConfigError, each line naming the file, the key and what is wrong."""
    problems: list[str] = []
    sections: dict[str, _Section] = {}
    for name, value in raw.items():
        model = SECTIONS.get(name) if isinstance(name, str) else None
        if model is None:
            moved = f"; {MOVED[name]}" if name in MOVED else ""
            problems.append(f"unknown section '{name}' (sections: {', '.join(SECTIONS)}){moved}")
            continue
        try:
            sections[name] = model.model_validate(value)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            problems += [_problem(raw, {**e, "loc": (name, *e["loc"])}) for e in errors]
    problems = [
        f"{p}; {MOVED[p.split(':')[0]]}" if p.split(":")[0] in MOVED else p for p in problems
    ]
    problems += [f"missing section '{name}'" for name in required if name not in raw]
    if problems:
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems))
    return sections


def load_config(path: str | os.PathLike[str] = DEFAULT_PARAMS) -> Params:
    """The whole params file as typed sections; every section must be there."""
    path = Path(path)
    return Params.model_validate(_check(_read(path), path, SECTIONS))


def load_params(
    path: str | os.PathLike[str] = DEFAULT_PARAMS, *, partial: bool = False
) -> dict[str, Any]:
    """The params file as plain dicts (equal to the YAML, defaults filled in), checked
    like :func:`load_config`; ``partial``: only the sections the file holds."""
    path = Path(path)
    if not partial:
        return load_config(path).model_dump()
    sections = _check(_read(path), path, ())
    return {name: section.model_dump() for name, section in sections.items()}


class StageParams:
    """The sections a stage declares (as typed models); reading another one is an error,
    so a stage cannot depend on a section dvc.yaml does not list for it."""

    def __init__(self, path: Path, sections: Mapping[str, _Section]) -> None:
        self._path = path
        self._sections = dict(sections)

    @property
    def declared(self) -> tuple[str, ...]:
        return tuple(self._sections)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        key = name.removesuffix("_") if name.removesuffix("_") in SECTIONS else name
        if key in self._sections:
            return self._sections[key]
        if key in SECTIONS:
            raise ConfigError(
                f"{self._path}: this stage reads params section '{key}', which it does not "
                f"declare (declared: {', '.join(self._sections) or 'none'})"
            )
        raise AttributeError(f"params has no section '{name}'")

    def as_dict(self) -> dict[str, Any]:
        """The declared sections as plain dicts."""
        return {name: section.model_dump() for name, section in self._sections.items()}

    def __repr__(self) -> str:
        return f"StageParams({str(self._path)!r}, declared={list(self._sections)})"


def stage_params(path: str | os.PathLike[str], sections: Sequence[str]) -> StageParams:
    """The ``sections`` of the params file a stage declares. Every section in the file is
    checked; the declared ones must be there, others may be left out."""
    path = Path(path)
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        raise ConfigError(
            f"{path}: a stage declares unknown params section(s) {', '.join(unknown)} "
            f"(sections: {', '.join(SECTIONS)})"
        )
    checked = _check(_read(path), path, sections)
    return StageParams(path, {name: checked[name] for name in sections})


def require_tissue(tissue: str, pipeline: PipelineSection) -> str:
    """``tissue`` when the pipeline runs it (params ``pipeline.tissues``), else ConfigError."""
    if tissue not in pipeline.tissues:
        raise ConfigError(
            f"tissue {tissue!r} is not one of params pipeline.tissues "
            f"({', '.join(pipeline.tissues)})"
        )
    return tissue


def pruner_settings(value: dict[str, Any]) -> dict[str, Any]:
    """params ``search.pruner`` checked, with its kind's defaults filled in: the one place
    a pruner's settings get their defaults (ConfigError naming the problem otherwise)."""
    try:
        return TypeAdapter(Pruner).validate_python(value).model_dump()
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        problems = [
            _problem({"search": {"pruner": value}}, {**e, "loc": ("search", "pruner", *e["loc"])})
            for e in errors
        ]
        raise ConfigError("; ".join(problems)) from None
