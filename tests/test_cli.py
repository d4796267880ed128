"""The `bonedamage` command line (cli.py): help, exit codes and errors on real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from bonedamage.cli import build_parser, main
from conftest import REPO, small_synth


def write_params(tmp_path: Path, params: dict, root: Path) -> Path:
    p = dict(params, data={"root": str(root)}, synth=small_synth(params, load_steps=[0.0, 1.0]))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "bonedamage"  # the venv's console script
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("bonedamage ")


def test_every_subcommand_has_complete_help(capsys) -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"synth", "ingest", "tile", "search", "evaluate", "gate"} <= set(sub.choices)
    for command in sub.choices:
        check_help(command, capsys)


def check_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--params" in text and "--no-progress" in text
    assert text.count("--") >= 4


def test_synth_then_describe(tmp_path: Path, params: dict, capsys) -> None:
    root = tmp_path / "raw"
    p = write_params(tmp_path, params, root)
    assert main(["synth", "--params", str(p), "--no-progress"]) == 0
    assert "wrote 4 scans of 2 specimens" in capsys.readouterr().out
    out = tmp_path / "metrics" / "data.json"
    assert main(["describe", "--params", str(p), "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["dataset"]["scans"] == 4
    assert set(metrics["trabecular"]) == {"pristine", "failed"}


def test_missing_params_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["synth", "--params", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(missing) in err and "not found" in err


def test_ingest_from_the_command_line(tmp_path: Path, params: dict, capsys) -> None:
    root = tmp_path / "raw"
    p = write_params(tmp_path, params, root)
    stack = np.arange(5 * 12 * 16, dtype=np.uint16).reshape(5, 12, 16)
    scan = tmp_path / "scan.tif"
    tifffile.imwrite(
        scan,
        stack,
        imagej=True,
        resolution=(1 / 2.5, 1 / 2.5),
        metadata={"spacing": 2.5, "unit": "um"},
    )
    args = [
        "ingest",
        str(scan),
        "--specimen-id",
        "S1",
        "--tissue",
        "cortical",
        "--state",
        "pristine",
        "--params",
        str(p),
        "--no-progress",
    ]
    assert main(args) == 0
    assert "added S1-pristine" in capsys.readouterr().out
    assert (root / "cortical" / "S1-pristine.tif").is_file()
    # the same scan again: duplicate id, exit 2, nothing changed
    before = sorted(p.name for p in root.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "'S1-pristine' is already in" in err
    assert sorted(p.name for p in root.rglob("*")) == before


def test_ingest_of_a_corrupt_file_exits_2_naming_it(tmp_path: Path, params: dict, capsys) -> None:
    p = write_params(tmp_path, params, tmp_path / "raw")
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00garbage" * 10)
    code = main(
        [
            "ingest",
            str(bad),
            "--specimen-id",
            "S1",
            "--tissue",
            "cortical",
            "--state",
            "failed",
            "--voxel-size-um",
            "2",
            "--params",
            str(p),
        ]
    )
    assert code == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").rglob("*.tif"))


def test_ingest_needs_source_or_batch(tmp_path: Path, params: dict, capsys) -> None:
    p = write_params(tmp_path, params, tmp_path / "raw")
    assert main(["ingest", "--params", str(p)]) == 2
    assert "SOURCE" in capsys.readouterr().err


def test_repo_params_are_what_dvc_and_the_cli_read() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():
        stage = stage.get("do", stage)  # foreach stages (one per tissue) keep theirs in "do"
        assert stage["cmd"].startswith("bonedamage ")
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):  # "tile.tile_um" names a nested key
                assert part in node, f"dvc.yaml param {key} is not in params.yaml"
                node = node[part]
    assert (Path(sys.executable).parent / "dvc").is_file()  # dvc.yaml's runner is installed


def test_tile_split_validate_and_a_leaking_split_fails(
    tmp_path: Path, params: dict, capsys
) -> None:
    root = tmp_path / "raw"
    p = dict(
        params,
        data={"root": str(root)},
        synth=small_synth(params, specimens_per_tissue=3, load_steps=[0.0, 1.0]),
        tile=dict(params["tile"], tile_um={"cortical": 25.6, "trabecular": 320.0}),
        validate=dict(params["validate"], min_tiles_per_class=1),
    )
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(p))
    common = ["--params", str(pfile), "--no-progress"]
    tiles, splits = tmp_path / "tiles", tmp_path / "splits.parquet"
    out = {"docs": tmp_path / "docs", "summary": tmp_path / "validation.json"}
    assert main(["synth", *common]) == 0
    assert main(["tile", *common, "--out", str(tiles)]) == 0
    assert (
        main(
            [
                "split",
                *common,
                "--tiles",
                str(tiles),
                "--out",
                str(splits),
                "--metrics",
                str(tmp_path / "splits.json"),
            ]
        )
        == 0
    )
    validate = [
        "validate",
        *common,
        "--tiles",
        str(tiles),
        "--splits",
        str(splits),
        "--docs",
        str(out["docs"]),
        "--out",
        str(out["summary"]),
    ]
    assert main(validate) == 0
    assert "expectations passed" in capsys.readouterr().out
    assert (out["docs"] / "index.html").is_file()
    # move one tile of a grouped specimen into another split: a leak the stage must catch
    table = pd.read_parquet(splits)
    first = table.index[table.scheme == "grouped"][0]
    table.loc[first, "split"] = "test" if table.loc[first, "split"] != "test" else "train"
    table.to_parquet(splits, index=False)
    assert main(validate) == 1
    text = capsys.readouterr().out
    assert "grouped_specimens" in text and "n_splits" in text
    assert json.loads(out["summary"].read_text())["success"] is False
    assert (out["docs"] / "index.html").is_file()  # docs published for the failing run too
