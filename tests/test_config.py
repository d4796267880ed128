"""params.yaml as typed, strict sections (config.py): exact round trip, plain-word errors,
defaults in one place, and stages that read only the sections they declare."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from bonedamage import config
from bonedamage.config import (
    SECTIONS,
    TRAIN_DEFAULTS,
    ConfigError,
    Params,
    ResnetSection,
    TrainSection,
    load_config,
    load_params,
    stage_params,
)

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "params.yaml"


@pytest.fixture
def committed() -> dict[str, Any]:
    """The committed params.yaml as YAML reads it (a fresh copy to change)."""
    return yaml.safe_load(COMMITTED.read_text(encoding="utf-8"))


@pytest.fixture
def write(tmp_path: Path) -> Callable[[Any], Path]:
    """Write a params file into tmp_path and return its path."""

    def _write(data: Any) -> Path:
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return _write


def changed(params: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``params`` with the dotted ``key`` set to ``value``."""
    out = copy.deepcopy(params)
    *parents, last = key.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[last] = value
    return out


def without(params: dict[str, Any], key: str) -> dict[str, Any]:
    """A copy of ``params`` without the dotted ``key``."""
    out = copy.deepcopy(params)
    *parents, last = key.split(".")
    node = out
    for part in parents:
        node = node[part]
    del node[last]
    return out


def assert_same_leaves(a: Any, b: Any, where: str = "") -> None:
    """Equal values with the very same Python type at every leaf, and keys in order."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same_leaves(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_leaves(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# -- the committed file -----------------------------------------------------------------------


def test_committed_params_load_into_typed_sections() -> None:
    params = load_config(COMMITTED)
    assert isinstance(params, Params)
    assert params.train.lr_schedule == "cosine"
    assert params.search.pruner.kind == "median"
    assert params.validate_.min_tiles_per_class > 0
    assert list(Params.model_fields) == [
        name if name != "validate" else "validate_" for name in SECTIONS
    ]


def test_load_params_equals_the_yaml_with_the_same_type_at_every_leaf(
    committed: dict[str, Any],
) -> None:
    loaded = load_params(COMMITTED)
    assert loaded == committed
    assert_same_leaves(loaded, committed)


def test_an_int_where_a_number_is_meant_stays_an_int(
    committed: dict[str, Any], write: Callable[[Any], Path]
) -> None:
    as_int = load_params(write(changed(committed, "tile.tile_um.trabecular", 1280)))
    assert type(as_int["tile"]["tile_um"]["trabecular"]) is int
    as_float = load_params(write(changed(committed, "tile.tile_um.trabecular", 1280.0)))
    assert type(as_float["tile"]["tile_um"]["trabecular"]) is float


def test_every_model_refuses_unknown_keys() -> None:
    models = [
        obj
        for obj in vars(config).values()
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj is not BaseModel
    ]
    assert len(models) > 30
    assert all(model.model_config.get("extra") == "forbid" for model in models)


def test_sections_are_read_only() -> None:
    with pytest.raises(ValidationError):
        load_config(COMMITTED).train.epochs = 1  # type: ignore[misc]


# -- unknown keys, wrong values, missing sections: one ConfigError in plain words -----------


@pytest.mark.parametrize(
    "where",
    [
        "train",
        "pipeline.paths",
        "synth.cortical.failure",
        "synth.trabecular.structure",
        "tile.tile_um",
        "search.pruner",
        "search.space",
        "explain.layer",
        "gate",
    ],
)
def test_an_unknown_key_is_refused_naming_the_key_and_its_section(
    where: str, committed: dict[str, Any], write: Callable[[Any], Path]
) -> None:
    path = write(changed(committed, f"{where}.bogus_key", 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {where}.bogus_key: unknown key in section '{where}'"


def test_a_misspelt_key_is_refused(committed: dict[str, Any], write: Callable[[Any], Path]) -> None:
    path = write(changed(without(committed, "train.lr_schedule"), "train.lr_shedule", "cosine"))
    with pytest.raises(ConfigError, match=r"train\.lr_shedule: unknown key in section 'train'"):
        load_params(path)


def test_an_unknown_section_is_refused(
    committed: dict[str, Any], write: Callable[[Any], Path]
) -> None:
    path = write(dict(committed, data={"root": "data/raw"}))
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: unknown section 'data' "):
        load_config(path)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("search.n_trials", 0, "search.n_trials: must be a positive integer, got 0"),
        ("train.epochs", 2.0, "train.epochs: must be a positive integer, got 2.0"),
        ("train.device", "gpu", "train.device: must be one of 'auto', 'cpu' or 'cuda', got 'gpu'"),
        ("train.lr_schedule", "linear", "train.lr_schedule: must be one of 'constant' or 'cosine'"),
        ("train.amp", "yes", "train.amp: must be true or false, got 'yes'"),
        ("synth.dtype", "int16", "synth.dtype: must be one of 'uint16', 'uint8' or 'float32'"),
        ("explain.method", "lime", "explain.method: must be one of 'gradcam', 'gradcam++'"),
        ("evaluate.baseline", "svm", "evaluate.baseline: must be one of 'logistic' or 'forest'"),
        ("resnet.arch", "resnet34", "resnet.arch: must be one of 'resnet18' or 'resnet50'"),
        ("resnet.stem", "tiny", "resnet.stem: must be one of 'imagenet' or 'fine', got 'tiny'"),
        ("resnet.inits", "scratch", "resnet.inits: must be a list, got 'scratch'"),
        (
            "resnet.inits",
            ["pretext"],  # the rotation pretext of old: now one of the pretraining methods
            "resnet.inits[0]: must be one of 'imagenet', 'procedural', 'simsiam', 'rotation' "
            "or 'scratch', got 'pretext'",
        ),
        ("resnet.inits", ["scratch", "scratch"], "resnet.inits: lists a value twice"),
        (
            "pretrain.methods",
            ["fractal"],
            "pretrain.methods[0]: must be one of 'procedural', 'simsiam' or 'rotation', "
            "got 'fractal'",
        ),
        ("pretrain.methods", ["simsiam", "rotation", "simsiam"], "lists a value twice"),
        ("pretrain.methods", [], "pretrain.methods: must hold at least one item, got none"),
        ("pretrain.corpus.first_specimen", -1, "pretrain.corpus.first_specimen: must be"),
        ("pretrain.simsiam.crop_px", 0, "pretrain.simsiam.crop_px: must be a positive integer"),
        ("pretrain.val_fraction", 1.0, "pretrain.val_fraction: must be"),
        ("pretrain.corpus.shape.trabecular", [64, 160], "must hold exactly 3 items"),
        ("tile.planes.cortical", ["oblique"], "tile.planes.cortical[0]: must be one of 'axial'"),
        ("search.pruner.kind", "patient", "search.pruner.kind: must be one of 'median'"),
        ("search.timeout_s", True, "search.timeout_s: must be a positive number, got true"),
        ("search.space.lr", [1e-2, 1e-4], "search.space.lr: must be [low, high] with low <= high"),
        ("synth.cortical.shape", [128, 160], "synth.cortical.shape: must hold exactly 3 items"),
        ("split.fractions.val", 0, "split.fractions.val: must be a positive number, got 0"),
        ("describe.visible_damage_fraction", 1.5, "must be a number in [0, 1], got 1.5"),
        ("tile.context_um.cortical", -1.0, "tile.context_um.cortical: must be a number >= 0"),
        ("explain.layer", 5, "explain.layer: must be a string, got 5"),
        ("gate.metrics.roc_aus", 0.02, "unknown key in section 'gate.metrics'"),
        ("mlflow.db", "", "mlflow.db: must not be empty"),
        ("tile", None, "tile: must be a mapping, got null"),
    ],
)
def test_a_wrong_value_is_refused_naming_the_dotted_key(
    key: str, value: Any, expected: str, committed: dict[str, Any], write: Callable[[Any], Path]
) -> None:
    path = write(changed(committed, key, value))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {key}")
    assert expected in str(info.value)


def test_every_problem_is_reported_at_once_without_pydantic_noise(
    committed: dict[str, Any], write: Callable[[Any], Path]
) -> None:
    data = changed(changed(committed, "train.epochs", 0), "gate.models", ["cnn", "vit"])
    path = write(without(data, "tile"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert lines == [
        f"{path}: train.epochs: must be a positive integer, got 0",
        f"{path}: gate.models[1]: must be one of 'cnn', 'cnn_leaky_split', 'resnet_imagenet', "
        "'resnet_procedural', 'resnet_simsiam', 'resnet_rotation', 'resnet_scratch' or "
        "'baseline', got 'vit'",
        f"{path}: missing section 'tile'",
    ]
    assert "pydantic" not in str(info.value)


def test_a_missing_required_key_is_named(
    committed: dict[str, Any], write: Callable[[Any], Path]
) -> None:
    path = write(without(committed, "tile.slice_stride"))
    with pytest.raises(ConfigError, match=r"tile\.slice_stride: missing key .*section 'tile'"):
        load_config(path)


def test_a_missing_unreadable_or_non_mapping_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_params(listed)


# -- defaults in one place --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "default"),
    [
        ("resnet.stem", "imagenet"),
        ("resnet.freeze_epochs", 0),
        ("resnet.augment_strength", 1.0),
        ("resnet.weights_path", None),
        ("train_cnn.ensemble", 1),
        ("synth.workers", 1),
        ("explain.layer", None),
        ("explain.layer_choices", None),
        ("tile.context_um", 0.0),
        ("search.timeout_s", None),
        ("search.pruner", {"kind": "median", "n_startup_trials": 3, "n_warmup_steps": 1}),
        ("augment.rot90_planes", None),
    ],
)
def test_a_missing_optional_key_gets_its_default(
    key: str, default: Any, committed: dict[str, Any], write: Callable[[Any], Path]
) -> None:
    loaded = load_params(write(without(committed, key)))
    name, *rest = key.split(".")
    value = loaded[name]
    for part in rest:
        value = value[part]
    assert value == default
    assert type(value) is type(default)


def test_the_default_lives_on_the_section_model(
    committed: dict[str, Any], write: Callable[[Any], Path]
) -> None:
    assert ResnetSection.model_fields["stem"].default == "imagenet"
    params = load_config(write(without(committed, "resnet.stem")))
    assert params.resnet.stem == ResnetSection.model_fields["stem"].default


def test_a_pruner_kind_gets_its_own_defaults(
    committed: dict[str, Any], write: Callable[[Any], Path]
) -> None:
    path = write(changed(committed, "search.pruner", {"kind": "percentile"}))
    pruner = load_config(path).search.pruner
    assert pruner.model_dump() == {
        "kind": "percentile",
        "percentile": 25.0,
        "n_startup_trials": 3,
        "n_warmup_steps": 1,
    }
    path = write(changed(committed, "search.pruner", {"kind": "hyperband", "n_warmup_steps": 1}))
    with pytest.raises(ConfigError, match=r"search\.pruner\.n_warmup_steps: unknown key"):
        load_config(path)


def test_train_defaults_equal_the_committed_train_section(committed: dict[str, Any]) -> None:
    assert TRAIN_DEFAULTS.model_dump() == committed["train"]
    assert_same_leaves(TrainSection().model_dump(), committed["train"])
    assert TrainSection.model_fields["lr_schedule"].default == "cosine"


def test_an_empty_train_section_takes_every_default(
    committed: dict[str, Any], write: Callable[[Any], Path]
) -> None:
    assert load_config(write(changed(committed, "train", {}))).train == TRAIN_DEFAULTS


# -- partial files and the sections a stage declares ------------------------------------------


@pytest.fixture
def gate_only(committed: dict[str, Any], write: Callable[[Any], Path]) -> Path:
    """A small params file holding only the mlflow and gate sections."""
    return write({"mlflow": committed["mlflow"], "gate": committed["gate"]})


def test_load_params_needs_every_section_unless_partial(gate_only: Path) -> None:
    with pytest.raises(ConfigError, match="missing section 'pipeline'"):
        load_params(gate_only)
    loaded = load_params(gate_only, partial=True)
    assert list(loaded) == ["mlflow", "gate"]
    assert loaded["gate"]["models"]


def test_a_partial_file_is_still_checked_strictly(
    committed: dict[str, Any], write: Callable[[Any], Path]
) -> None:
    path = write({"gate": dict(committed["gate"], tissues=["cortical"])})
    with pytest.raises(ConfigError, match=r"gate\.tissues: unknown key in section 'gate'"):
        load_params(path, partial=True)
    with pytest.raises(ConfigError, match=r"gate\.tissues: unknown key"):
        stage_params(path, ["gate"])


def test_stage_params_gives_the_declared_sections_typed(gate_only: Path) -> None:
    stage = stage_params(gate_only, ["gate", "mlflow"])
    assert stage.declared == ("gate", "mlflow")
    assert stage.gate.models[0] == "cnn"
    assert stage.mlflow.experiment
    assert stage.as_dict()["gate"] == yaml.safe_load(gate_only.read_text())["gate"]


def test_stage_params_refuses_a_section_the_stage_does_not_declare(gate_only: Path) -> None:
    stage = stage_params(gate_only, ["gate"])
    with pytest.raises(ConfigError) as info:
        _ = stage.mlflow
    assert str(info.value) == (
        f"{gate_only}: this stage reads params section 'mlflow', which it does not declare "
        "(declared: gate)"
    )
    with pytest.raises(ConfigError, match="does not declare"):
        _ = stage.train  # not even in the file


def test_stage_params_names_a_missing_declared_section(gate_only: Path) -> None:
    with pytest.raises(
        ConfigError, match=f"^{re.escape(str(gate_only))}: missing section 'train'$"
    ):
        stage_params(gate_only, ["gate", "train"])


def test_stage_params_refuses_an_unknown_declared_section(gate_only: Path) -> None:
    with pytest.raises(ConfigError, match="unknown params section"):
        stage_params(gate_only, ["gates"])


def test_stage_params_reads_the_validate_section_by_its_name() -> None:
    stage = stage_params(COMMITTED, ["validate"])
    assert stage.validate is stage.validate_
    assert stage.validate.max_class_imbalance >= 1


def test_a_pruner_gets_the_defaults_of_its_kind_from_the_one_place() -> None:
    from bonedamage.config import HyperbandPruner, pruner_settings

    filled = pruner_settings({"kind": "hyperband"})
    assert filled == {"kind": "hyperband", "min_resource": 1, "reduction_factor": 3}
    assert filled["reduction_factor"] == HyperbandPruner.model_fields["reduction_factor"].default
    assert pruner_settings({})["kind"] == "median"  # the kind left out
    with pytest.raises(ConfigError, match=r"search\.pruner\.min_resource: unknown key"):
        pruner_settings({"kind": "median", "min_resource": 2})


def test_a_setting_of_an_earlier_params_file_is_named_with_where_it_lives_now(
    tmp_path: Path,
) -> None:
    path = tmp_path / "params.yaml"
    gate = {"tissues": ["cortical"], "models": ["cnn"], "metrics": {"balanced_accuracy": 0.02}}
    path.write_text(
        yaml.safe_dump({"data": {"root": "data/raw"}, "cnn": {"ensemble": 2}, "gate": gate})
    )
    with pytest.raises(ConfigError) as refused:
        load_params(path, partial=True)
    message = str(refused.value)
    assert "unknown section 'data'" in message and "pipeline.paths.raw now" in message
    assert "unknown section 'cnn'" in message and "train_cnn.ensemble now" in message
    assert (
        "gate.tissues: unknown key in section 'gate'; the tissues are pipeline.tissues" in message
    )
