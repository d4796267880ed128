"""The house rules, checked: one pipeline stage, one module named after it; ``dvc.yaml``
deps and params are the stage's true import closure and params sections; no two public
functions share a name; the CLI only parses and dispatches."""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from bonedamage import cli

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = SRC / "bonedamage"
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# the tissue modules of the phantom generator implement one interface on purpose
TISSUE_INTERFACE = {"build", "draw_failure", "draw_params"}


def _module_file(dotted: str) -> Path | None:
    """The file of a ``bonedamage`` module, or None for a name that is not one."""
    base = SRC.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (never run)."""
    nodes, todo = [], [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        todo += [child for child in ast.iter_child_nodes(node) if not _type_checking(child)]
    return nodes


def _imports(path: Path) -> set[Path]:
    """The ``bonedamage`` modules ``path`` imports when it runs (lazy imports included)."""
    package = ".".join(path.relative_to(SRC).with_suffix("").parts[:-1])
    found: set[Path] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name.startswith("bonedamage.") and (file := _module_file(name)):
                found.add(file)
        # a module run by path, e.g. the registered model's code: with_name("x.py")
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "with_name":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and str(arg.value).endswith(".py"):
                found.add(path.with_name(arg.value))
    return found


def import_closure(path: Path) -> set[Path]:
    """Every ``bonedamage`` module ``path`` runs, itself included, without package
    ``__init__`` files (test below: they hold no code)."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += _imports(current)
    return {p for p in seen if p.name != "__init__.py"}


def _stage_names() -> list[str]:
    return sorted(DVC)


def test_dvc_yaml_has_the_pipeline_stages() -> None:
    assert list(DVC) == [
        "describe", "tile", "split", "validate", "search", "train_cnn", "corpus",
        "pretrain", "train_resnet", "train_seg", "evaluate", "explain", "evaluate_seg", "register",
        "promote", "track",
    ]  # fmt: skip


def _instances(stage: str) -> list[dict]:
    body = DVC[stage]
    return [body["do"]] if "foreach" in body else [body]


def _stage_module(stage: str) -> Path:
    return PACKAGE / "stages" / f"{stage}.py"


@pytest.mark.parametrize("stage", _stage_names())
def test_a_stage_runs_the_command_named_after_it_in_the_module_named_after_it(stage: str) -> None:
    command = stage.replace("_", "-")
    assert command in cli.COMMANDS
    assert _stage_module(stage).is_file()
    module = importlib.import_module(f"bonedamage.stages.{stage}")
    assert callable(getattr(module, f"run_{stage}"))
    for body in _instances(stage):
        assert body["cmd"].split()[:2] == ["bonedamage", command]


@pytest.mark.parametrize("stage", _stage_names())
def test_dvc_yaml_code_deps_are_the_stage_modules_import_closure(stage: str) -> None:
    closure = {str(p.relative_to(REPO)) for p in import_closure(_stage_module(stage))}
    for body in _instances(stage):
        code = {d for d in body.get("deps", []) if str(d).endswith(".py")}
        assert code == closure, (
            f"{stage}: missing {sorted(closure - code)}, not imported {sorted(code - closure)}"
        )


# where runs are tracked (params mlflow, like MLFLOW_TRACKING_URI) changes no output: a
# stage that reads it does not rerun when it changes
NOT_AN_INPUT = {"mlflow"}


@pytest.mark.parametrize("stage", _stage_names())
def test_dvc_yaml_params_are_the_sections_the_stage_declares(stage: str) -> None:
    declared = set(importlib.import_module(f"bonedamage.stages.{stage}").PARAMS)
    for body in _instances(stage):
        listed = {str(p).split(".")[0] for p in body.get("params", [])}
        assert listed == declared - NOT_AN_INPUT


@pytest.mark.parametrize("stage", sorted(c.replace("-", "_") for c in cli.COMMANDS))
def test_a_stage_reads_every_params_section_it_declares(stage: str) -> None:
    """No section is declared (a params dep that reruns the stage) without being read;
    reading an undeclared one fails at run time (config.stage_params)."""
    module = importlib.import_module(f"bonedamage.stages.{stage}")
    read = {
        node.attr
        for node in ast.walk(ast.parse(_stage_module(stage).read_text()))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id == "cfg"
    }  # fmt: skip
    assert set(module.PARAMS) == read


def test_every_command_has_a_stage_module_and_every_stage_module_a_command() -> None:
    modules = {p.stem for p in (PACKAGE / "stages").glob("*.py") if p.stem != "__init__"}
    assert modules == {c.replace("-", "_") for c in cli.COMMANDS}


def test_package_init_files_hold_no_code() -> None:
    inits = sorted(PACKAGE.rglob("__init__.py"))
    assert PACKAGE / "__init__.py" in inits and len(inits) > 5
    for init in inits:
        body = ast.parse(init.read_text()).body
        code = [
            n
            for n in body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
            and not (isinstance(n, ast.Assign) and init.parent == PACKAGE)  # __version__
        ]
        assert not code, f"{init.relative_to(REPO)} runs code a stage's deps would not show"


def test_no_two_public_functions_or_classes_share_a_name() -> None:
    owners: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                owners.setdefault(node.name, []).append(str(path.relative_to(PACKAGE)))
    synth = {"data/synth/cortical.py", "data/synth/trabecular.py"}
    shared = {
        name: files
        for name, files in owners.items()
        if len(files) > 1 and not (name in TISSUE_INTERFACE and set(files) == synth)
    }
    assert not shared


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_option_of_a_command_is_a_parameter_of_its_stage_function(command: str) -> None:
    """The CLI passes every option on (dispatch never drops one) and gives no defaults of
    its own but the params file: those live in the stage function and params.yaml."""
    name = command.replace("-", "_")
    run = getattr(importlib.import_module(f"bonedamage.stages.{name}"), f"run_{name}")
    accepted = set(inspect.signature(run).parameters)
    parser = next(
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices[command]
    options = {a.dest for a in parser._actions} - {"help", "no_progress"}
    assert options <= accepted, f"{command}: {sorted(options - accepted)} would be dropped"
    defaults = {a.dest: a.default for a in parser._actions if a.dest in options - {"params"}}
    assert all(v in (None, False) for v in defaults.values()), defaults


def test_the_cli_only_parses_and_dispatches() -> None:
    source = (PACKAGE / "cli.py").read_text()
    assert len(source.splitlines()) <= 300
    imported = {p.relative_to(PACKAGE).as_posix() for p in _imports(PACKAGE / "cli.py")}
    assert imported <= {"__init__.py"}, "the CLI reaches stage code only through dispatch"


def test_the_closure_holds_the_model_code_mlflow_runs_by_path() -> None:
    closure = import_closure(PACKAGE / "stages" / "register.py")
    assert PACKAGE / "lifecycle" / "pyfunc_model.py" in closure


def test_the_import_closure_sees_lazy_imports_and_skips_type_checking_ones() -> None:
    closure = import_closure(PACKAGE / "stages" / "evaluate.py")
    # evaluate imports learn.comparison inside its function (after the input checks)
    assert PACKAGE / "learn" / "comparison.py" in closure
    # lifecycle.tracking names registry.Candidate for type checkers only
    assert PACKAGE / "lifecycle" / "registry.py" not in closure
