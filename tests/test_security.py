"""Security checks of the source tree: safe deserialisation only, servers on localhost.

The scans parse ``src/`` with :mod:`ast` (not grep), resolving import aliases, so a call
split over lines, a comment that mentions ``weights_only=True`` or ``from torch import
load as L`` cannot fool them; each rule is also run on snippets it must flag.

Related checks live with their modules: a weights file holding a pickled callable is
refused unrun (test_models.py::test_weights_files_that_are_not_state_dicts_are_refused,
test_pyfunc.py, test_predict.py), and manifest paths stay inside the data root
(test_manifest.py::test_read_rejects_bad_rows, test_tiling.py).
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bonedamage.cli import build_parser
from conftest import REPO

SRC = REPO / "src" / "bonedamage"

TORCH_LOADS = {"torch.load", "torch.serialization.load"}
# callables that unpickle (or otherwise run code from) the file or bytes they are given
UNSAFE = {
    *(
        f"{m}.{f}"
        for m in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
        for f in ("load", "loads", "Unpickler")
    ),
    "joblib.load",
    "pandas.read_pickle",
    "shelve.open",
    "marshal.load",
    "marshal.loads",
    "yaml.unsafe_load",
    "yaml.full_load",
    "torch.jit.load",
    "mlflow.pytorch.load_model",
    "mlflow.sklearn.load_model",
}
UNSAFE_MODULES = {"dill", "cloudpickle", "joblib", "shelve", "marshal"}
SAFE_PICKLE_NAMES = {"PickleError", "PicklingError", "UnpicklingError"}  # for except clauses


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``a.b.c`` of a Name/Attribute chain, its root mapped through the import aliases."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    root = aliases.get(node.id, node.id)
    return ".".join([root, *reversed(parts)])


def _aliases(tree: ast.AST) -> dict[str, str]:
    aliases: dict[str, str] = {"pd": "pandas", "np": "numpy"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    aliases.setdefault(a.name.split(".")[0], a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _unsafe(name: str) -> bool:
    """A known unpickling callable, or any pickle-module name but its exception classes."""
    module, _, attr = name.partition(".")
    return name in UNSAFE or (
        module in ("pickle", "_pickle") and attr not in {"", *SAFE_PICKLE_NAMES}
    )


def findings(source: str, where: str = "<snippet>") -> tuple[list[str], int]:
    """(problems, number of torch.load calls) of one Python source."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    problems: list[str] = []
    torch_calls: set[int] = set()
    n_torch = 0
    for node in ast.walk(tree):
        at = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names]
            bad = sorted({n.split(".")[0] for n in names} & UNSAFE_MODULES)
            if bad:
                problems.append(f"{at}: imports {bad}")
        if isinstance(node, ast.Call):
            name = _dotted(node.func, aliases)
            if name in TORCH_LOADS:
                n_torch += 1
                torch_calls.add(id(node.func))
                if any(k.arg is None for k in node.keywords):
                    problems.append(f"{at}: {name}(**kwargs) hides weights_only")
                elif not _is_const(_kw(node, "weights_only"), True):
                    problems.append(f"{at}: {name} without weights_only=True")
            elif name == "numpy.load":
                allow = _kw(node, "allow_pickle")
                if allow is not None and not _is_const(allow, False):
                    problems.append(f"{at}: numpy.load with allow_pickle")
            elif name == "yaml.load":
                loader = _dotted(_kw(node, "Loader") or ast.Constant(None), aliases) or ""
                if not loader.endswith(("SafeLoader", "CSafeLoader")):
                    problems.append(f"{at}: yaml.load without SafeLoader")
        if isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Load):
            name = _dotted(node, aliases)
            if name and _unsafe(name):
                problems.append(f"{at}: uses {name}")
    for node in ast.walk(tree):  # torch.load passed around instead of called here
        if (
            isinstance(node, ast.Name | ast.Attribute)
            and isinstance(node.ctx, ast.Load)
            and _dotted(node, aliases) in TORCH_LOADS
            and id(node) not in torch_calls
        ):
            problems.append(f"{where}:{node.lineno}: torch.load referenced, not called")
    return sorted(set(problems)), n_torch


def src_files() -> Iterator[Path]:
    yield from sorted(SRC.rglob("*.py"))


def test_src_loads_nothing_unsafely() -> None:
    """(a) every torch.load passes weights_only=True; (b) no pickle/joblib/cloudpickle
    loader, numpy allow_pickle or unsafe YAML anywhere in src/."""
    problems, n_torch = [], 0
    for path in src_files():
        found, n = findings(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
        problems += found
        n_torch += n
    assert problems == []
    assert n_torch >= 1  # the weights loader is there: the scan is not vacuous


FLAGGED = {
    "no-weights-only": "import torch\nstate = torch.load(path)\n",
    "weights-only-false": "import torch\ntorch.load(path, weights_only=False)\n",
    "weights-only-variable": "import torch\nsafe = True\ntorch.load(path, weights_only=safe)\n",
    "comment-is-not-an-argument": "import torch\ntorch.load(path)  # weights_only=True\n",
    "kwargs-may-hide-it": "import torch\ntorch.load(path, **options)\n",
    "alias": "import torch as T\nT.load(\n    path,\n    map_location='cpu',\n)\n",
    "from-import-alias": "from torch import load as restore\nrestore(path)\n",
    "serialization-module": "import torch\ntorch.serialization.load(path)\n",
    "passed-as-callable": "import torch\nloader = torch.load\n",
    "pickle-load": "import pickle\nwith open(p, 'rb') as f:\n    obj = pickle.load(f)\n",
    "pickle-from-import": "from pickle import loads as l\nobj = l(data)\n",
    "pickle-unpickler": "import pickle\npickle.Unpickler(f).load()\n",
    "joblib": "import joblib\nclf = joblib.load(path)\n",
    "cloudpickle": "import cloudpickle\ncloudpickle.loads(data)\n",
    "pandas-read-pickle": "import pandas as pd\npd.read_pickle(path)\n",
    "numpy-allow-pickle": "import numpy as np\nnp.load(path, allow_pickle=True)\n",
    "yaml-load": "import yaml\nyaml.load(text, Loader=yaml.Loader)\n",
    "yaml-unsafe-load": "import yaml\nyaml.unsafe_load(text)\n",
    "mlflow-sklearn": "import mlflow\nmlflow.sklearn.load_model(uri)\n",
}
ALLOWED = {
    "weights-only-true": "import torch\ntorch.load(\n    path,\n    map_location='cpu',\n"
    "    weights_only=True,\n)\n",
    "pickle-error-class": "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n"
    "    pass\n",
    "numpy-memmap": "import numpy as np\nnp.load(path, mmap_mode='r')\n",
    "yaml-safe": "import yaml\nyaml.safe_load(text)\nyaml.load(text, Loader=yaml.SafeLoader)\n",
    "other-load": "import json\njson.load(f)\nmodel.load_state_dict(state)\n",
}


@pytest.mark.parametrize("case", list(FLAGGED))
def test_the_scan_flags_unsafe_loads(case: str) -> None:
    assert findings(FLAGGED[case])[0], f"{case} was not flagged"


@pytest.mark.parametrize("case", list(ALLOWED))
def test_the_scan_allows_safe_loads(case: str) -> None:
    assert findings(ALLOWED[case])[0] == []


# -- (d) servers bind 127.0.0.1 ------------------------------------------------------------
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# words of a long option that picks where a server listens: --host, --bind-address, --port
NETWORK_WORDS = {"host", "bind", "listen", "address", "addr", "interface", "port"}
HOST_WORDS = NETWORK_WORDS - {"port"}


def _option_words(option: str) -> set[str]:
    """The words of a long option (``--bind-address``: bind, address); none of a short one."""
    if not option.startswith("--"):
        return set()
    return set(option[2:].replace("_", "-").split("-"))


def _commands_of(
    parser: argparse.ArgumentParser, path: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(command path, parser) of ``parser`` and of every subcommand under it, at any depth."""
    yield path or "<top level>", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands_of(sub, f"{path} {name}".strip())


def network_options(parser: argparse.ArgumentParser) -> dict[str, dict[str, object]]:
    """{command: {option: default}} of every option that says where a server listens."""
    found: dict[str, dict[str, object]] = {}
    for command, sub in _commands_of(parser):
        for action in sub._actions:
            for option in action.option_strings:
                if _option_words(option) & NETWORK_WORDS:
                    found.setdefault(command, {})[option] = action.default
    return found


def public_binds(parser: argparse.ArgumentParser) -> list[str]:
    """Host options whose default is not the loopback interface (no default counts: the
    server library would pick one, often 0.0.0.0)."""
    return sorted(
        f"{command} {option}={default!r}"
        for command, options in network_options(parser).items()
        for option, default in options.items()
        if _option_words(option) & HOST_WORDS and default not in LOOPBACK
    )


def test_the_cli_starts_no_server_on_other_interfaces() -> None:
    """No bonedamage command serves: none has a host or port option (a new one would have
    to default to 127.0.0.1, and this test be updated to list it)."""
    parser = build_parser()
    assert len(dict(_commands_of(parser))) > 10  # every subcommand was looked at
    assert network_options(parser) == {}
    assert public_binds(parser) == []


def _serving_parser(*options: tuple[str, object], nested: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tool")
    commands = parser.add_subparsers(dest="command")
    if nested:
        commands = commands.add_parser("model").add_subparsers(dest="action")
    serve = commands.add_parser("serve")
    for option, default in options:
        serve.add_argument(option, default=default)
    return parser


# id -> (parser, what public_binds must report)
BAD_PARSERS: dict[str, tuple[argparse.ArgumentParser, list[str]]] = {
    "host-all-interfaces": (
        _serving_parser(("--host", "0.0.0.0"), ("--port", 8000)),
        ["serve --host='0.0.0.0'"],
    ),
    "host-all-ipv6-interfaces": (_serving_parser(("--host", "::")), ["serve --host='::'"]),
    "host-without-default": (_serving_parser(("--host", None)), ["serve --host=None"]),
    "bind-address-public-ip": (
        _serving_parser(("--bind-address", "192.168.1.5")),
        ["serve --bind-address='192.168.1.5'"],
    ),
    "listen-in-a-nested-command": (
        _serving_parser(("--listen", "0.0.0.0"), nested=True),
        ["model serve --listen='0.0.0.0'"],
    ),
}


@pytest.mark.parametrize(("parser", "flagged"), list(BAD_PARSERS.values()), ids=list(BAD_PARSERS))
def test_the_cli_check_flags_a_server_on_other_interfaces(
    parser: argparse.ArgumentParser, flagged: list[str]
) -> None:
    assert network_options(parser) != {}
    assert public_binds(parser) == flagged


def test_the_cli_check_sees_a_localhost_server_and_lets_it_pass() -> None:
    parser = _serving_parser(("--host", "127.0.0.1"), ("--port", 5000), ("--reports", "r"))
    assert network_options(parser) == {"serve": {"--host": "127.0.0.1", "--port": 5000}}
    assert public_binds(parser) == []


# the commands a user runs to start a server (uvicorn: only as `mlflow models serve` starts
# it, named in prose), and the option that sets its interface
SERVER_COMMAND = re.compile(
    r"(mlflow (?:ui|server|models serve)|optuna-dashboard|tensorboard|gunicorn"
    r"|jupyter (?:lab|notebook)|python -m http\.server)\b([^`\n]*)"
)
HOST_ARGUMENT = re.compile(r"(?:--host|--bind|-h|-b)[ =]([^\s`'\"-]\S*)")


def server_lines(text: str) -> list[tuple[str, str]]:
    """(command, its arguments up to the line's or code span's end) of each server start."""
    return [(m[1], m[2]) for m in SERVER_COMMAND.finditer(text)]


def bad_server_lines(text: str) -> list[str]:
    """Server commands in ``text`` that bind another interface than the loopback one."""
    return [
        f"{command}{arguments}"
        for command, arguments in server_lines(text)
        if "0.0.0.0" in arguments
        or any(host not in LOOPBACK for host in HOST_ARGUMENT.findall(arguments))
    ]


def _documented_files() -> list[Path]:
    docs, scripts = (REPO / "docs").glob("*.md"), (REPO / "scripts").glob("*.sh")
    return sorted([REPO / "README.md", REPO / "MLproject", *docs, *scripts])


def test_documented_server_commands_bind_localhost() -> None:
    """The `mlflow models serve` / `mlflow server` / `mlflow ui` lines users copy from
    README.md, docs/, MLproject and scripts/ give no host (127.0.0.1 by default, see
    test_mlflow_servers_default_to_localhost) or 127.0.0.1."""
    found: dict[str, list[str]] = {}
    bad: list[str] = []
    for path in _documented_files():
        text = path.read_text(encoding="utf-8")
        where = str(path.relative_to(REPO))
        found[where] = [command for command, _ in server_lines(text)]
        bad += [f"{where}: {line}" for line in bad_server_lines(text)]
    assert bad == []
    commands = {c for cs in found.values() for c in cs}
    # what exists today: the scan is not vacuous (and a new kind of server gets looked at)
    assert commands == {"mlflow models serve", "mlflow server", "mlflow ui", "optuna-dashboard"}, (
        found
    )


@pytest.mark.parametrize(
    "line",
    [
        "mlflow ui --host 0.0.0.0",
        "`mlflow models serve -m models:/x@champion -h 0.0.0.0 -p 5000`",
        "mlflow server --host=:: --port 5000",
        "mlflow server --backend-store-uri sqlite:///m.db --host 192.168.1.5",
        "optuna-dashboard sqlite:///optuna.db --host 0.0.0.0",
        "python -m http.server --bind 0.0.0.0 8000",
        "gunicorn -b [::]:8000 app:app",
    ],
)
def test_the_docs_check_flags_server_commands_on_other_interfaces(line: str) -> None:
    assert bad_server_lines(f"Run\n\n    {line}\n\nto serve.") != []


@pytest.mark.parametrize(
    "line",
    [
        "mlflow models serve -m models:/x@champion --env-manager local -p 5000",
        "`mlflow server --host 127.0.0.1 --backend-store-uri postgresql://...`",
        "mlflow ui --backend-store-uri sqlite:///mlflow.db",
        "mlflow models serve -h 127.0.0.1 -p 5000",
    ],
)
def test_the_docs_check_allows_server_commands_on_localhost(line: str) -> None:
    assert server_lines(line) != []
    assert bad_server_lines(line) == []


def _commands() -> Iterator[tuple[str, str]]:
    for entry, spec in yaml.safe_load((REPO / "MLproject").read_text())["entry_points"].items():
        yield f"MLproject {entry}", spec["command"]
    for stage, spec in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        yield f"dvc.yaml {stage}", spec.get("do", spec)["cmd"]


def test_pipeline_commands_bind_no_public_interface() -> None:
    commands = dict(_commands())
    assert len(commands) > 10
    for where, cmd in commands.items():
        assert "0.0.0.0" not in cmd and "[::]" not in cmd, where
        if "mlflow server" in cmd or "models serve" in cmd or "mlflow ui" in cmd:
            assert "--host 127.0.0.1" in cmd or "--host" not in cmd, where


def test_optuna_dashboard_defaults_to_localhost() -> None:
    """The docs' `optuna-dashboard reports/search/<tissue>/study.journal` relies on this."""
    script = Path(sys.executable).with_name("optuna-dashboard")
    shown = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert "hostname (default: 127.0.0.1)" in " ".join(shown.stdout.split())


def test_mlflow_servers_default_to_localhost() -> None:
    """The README's `mlflow models serve` / `mlflow server` commands rely on this default."""
    import mlflow.cli
    from mlflow.models import cli as models_cli

    for command in (mlflow.cli.cli.commands["server"], models_cli.commands.commands["serve"]):
        host = next(p for p in command.params if p.name == "host")
        default = host.default() if callable(host.default) else host.default
        assert default == "127.0.0.1", command.name
