"""The `bonedamage` command line (cli.py): help, exit codes and errors on real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from bonedamage.cli import build_parser, main
from conftest import REPO, small_synth, with_raw


def write_params(tmp_path: Path, params: dict, root: Path) -> Path:
    p = dict(
        params, pipeline=with_raw(params, root), synth=small_synth(params, load_steps=[0.0, 1.0])
    )
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
        pipeline=with_raw(params, root),
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


def test_every_user_error_class_exists() -> None:
    """_USER_ERRORS names real exception classes (a typo would let one escape as a crash)."""
    import importlib

    from bonedamage.cli import _USER_ERRORS, _user_errors

    for module, name in _USER_ERRORS:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, Exception) and cls.__name__ == name
    assert len(_user_errors()) == len(_USER_ERRORS)  # all loaded now: all reported


# -- `bonedamage ingest` on bad input: exit 2, the file/field and the problem, nothing written --
def _ingest_case(case: str, tmp: Path) -> tuple[list[str], list[str]]:
    """(arguments after `ingest`, fragments the error must hold) for one bad input."""
    fields = ["--specimen-id", "S2", "--tissue", "cortical", "--state", "failed"]
    vol = np.random.default_rng(0).integers(0, 60000, (4, 12, 16)).astype(np.uint16)
    good = tmp / "good.tif"
    tifffile.imwrite(good, vol, photometric="minisblack")
    if case == "rgb":
        tifffile.imwrite(tmp / "rgb.tif", np.repeat(vol[..., None] // 256, 3, -1).astype(np.uint8),
                         photometric="rgb")  # fmt: skip
        return [str(tmp / "rgb.tif"), *fields, "--voxel-size-um", "2"], ["rgb.tif", "RGB"]
    if case == "nan":
        bad = vol.astype(np.float32)
        bad[2, 5, 5] = np.nan
        tifffile.imwrite(tmp / "nan.tif", bad, photometric="minisblack")
        args = [str(tmp / "nan.tif"), *fields, "--voxel-size-um", "2"]
        return args, ["nan.tif", "slice 2", "NaN"]
    if case == "voxel-size-zero":
        return [str(good), *fields, "--voxel-size-um", "0"], ["voxel_size_um 0.0 is invalid"]
    if case == "mixed-slice-shapes":
        folder = tmp / "slices"
        folder.mkdir()
        for z in range(4):
            tifffile.imwrite(folder / f"s{z}.tif", vol[z] if z != 2 else vol[z, :, :-1])
        args = [str(folder), *fields, "--voxel-size-um", "2"]
        return args, ["slices", "s2.tif", "(12, 15)", "must match"]
    batch = tmp / "batch.csv"
    header = "specimen_id,tissue,state,path,voxel_size_um\n"
    if case == "batch-path-outside":
        batch.write_text(header + "S2,cortical,failed,../outside.tif,2\n")
        return ["--batch", str(batch)], ["batch.csv", "row 1", "'../outside.tif'", "escapes"]
    if case == "batch-duplicate-ids":
        batch.write_text(header + "S2,cortical,failed,good.tif,2\nS2,cortical,failed,good.tif,2\n")
        return ["--batch", str(batch)], ["batch.csv", "row 2", "'S2-failed'", "twice"]
    if case == "batch-empty":
        batch.write_text(header)
        return ["--batch", str(batch)], ["batch.csv", "no scans listed"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "rgb",
        "nan",
        "voxel-size-zero",
        "mixed-slice-shapes",
        "batch-path-outside",
        "batch-duplicate-ids",
        "batch-empty",
    ],
)
def test_ingest_command_refuses_bad_input(case: str, tmp_path: Path, params: dict, capsys) -> None:
    from bonedamage.data.ingestion import IngestRequest, ingest_scans

    root = tmp_path / "raw"
    first = tmp_path / "first.tif"
    tifffile.imwrite(first, np.ones((3, 8, 8), np.uint8), photometric="minisblack")
    ingest_scans([IngestRequest(first, "S1", "cortical", "pristine", 2.0)], root, progress=False)
    before = {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    args, fragments = _ingest_case(case, tmp_path)
    p = write_params(tmp_path, params, root)
    assert main(["ingest", *args, "--params", str(p), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:"), err
    for fragment in fragments:
        assert fragment in err, err
    after = {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert after == before and sorted(root.rglob(".*")) == []


def test_an_unknown_tissue_exits_2_naming_it_and_the_known_ones(tmp_path: Path, capsys) -> None:
    assert main(["ingest", str(tmp_path / "x.tif"), "--specimen-id", "S1", "--tissue", "bone",
                 "--state", "failed", "--params", str(REPO / "params.yaml")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "tissue 'bone' is unknown; allowed: cortical, trabecular" in err
    assert main(["search", "--tissue", "bone", "--params", str(REPO / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "tissue 'bone' is not one of params pipeline.tissues (cortical, trabecular)" in err


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_predict_batch_size_must_be_a_positive_integer(value: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["predict", "scan.tif", "--model", "models:/m@champion", "--out",
              str(tmp_path / "out"), "--batch-size", value])  # fmt: skip
    assert exc.value.code == 2
    assert "argument --batch-size:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- outputs: nothing a command did not write is deleted; modes follow the umask -----------
def test_a_file_output_is_never_the_tile_store_or_splits_a_command_reads(
    tmp_path: Path, cli_params: Path, capsys
) -> None:
    tiles, splits = tmp_path / "tiles", tmp_path / "splits.parquet"
    tiles.mkdir()
    pd.DataFrame({"tile_id": ["a"]}).to_parquet(tiles / "index.parquet")
    pd.DataFrame({"tile_id": ["a"]}).to_parquet(splits)
    before = splits.read_bytes()
    argv = ["search", "--tissue", "cortical", "--tiles", str(tiles), "--splits", str(splits),
            "--params", str(cli_params), "--out"]  # fmt: skip
    assert main([*argv, str(splits)]) == 2
    assert f"{splits}: output file is the input {splits}" in capsys.readouterr().err
    assert main([*argv, str(tiles / "index.parquet")]) == 2
    assert "output file lies inside the input" in capsys.readouterr().err
    assert splits.read_bytes() == before


def test_every_command_that_writes_a_folder_has_force() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in ("synth", "tile", "validate", "explain", "predict", "gate"):
        options = {o for a in sub.choices[command]._actions for o in a.option_strings}
        assert "--force" in options, command


def test_ingested_scans_and_the_manifest_get_the_umask_mode(tmp_path: Path, params: dict) -> None:
    import os

    from bonedamage.atomic import MARKER

    source = tmp_path / "scan.tif"
    tifffile.imwrite(source, np.ones((3, 8, 8), np.uint8), photometric="minisblack")
    root = tmp_path / "raw"
    p = write_params(tmp_path, params, root)
    before = os.umask(0o022)
    try:
        assert main(["ingest", str(source), "--specimen-id", "S1", "--tissue", "cortical",
                     "--state", "pristine", "--voxel-size-um", "2", "--params", str(p),
                     "--no-progress"]) == 0  # fmt: skip
    finally:
        os.umask(before)
    modes = {str(q.relative_to(root)): q.stat().st_mode & 0o777 for q in root.rglob("*")}
    assert modes == {"manifest.csv": 0o644, "cortical": 0o755, "cortical/S1-pristine.tif": 0o644}
    assert not (root / MARKER).exists()  # ingest adds to the data root, it does not own it


def _stack(path: Path, vol: np.ndarray, voxel_um: float = 20.0) -> Path:
    meta = {"spacing": voxel_um, "unit": "um"}
    tifffile.imwrite(path, vol, imagej=True, resolution=(1 / voxel_um, 1 / voxel_um),
                     metadata=meta)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def predict_inputs(params: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny registered-like model, a scan as one file and the same scan as a folder."""
    from conftest import save_tiny_pyfunc

    tmp = tmp_path_factory.mktemp("predict-out")
    vol = np.random.default_rng(1).integers(1000, 50000, (48, 48, 48)).astype(np.uint16)
    (tmp / "slices").mkdir()
    for z, plane in enumerate(vol):
        tifffile.imwrite(tmp / "slices" / f"s{z:03d}.tif", plane, photometric="minisblack")
    return {
        "model": save_tiny_pyfunc(tmp / "m", params, domain=True),
        "scan": _stack(tmp / "scan.tif", vol),
        "slices": tmp / "slices",
    }


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def _predict(inputs: dict[str, Path], scan: Path, out: Path, *extra: str) -> int:
    return main(["predict", str(scan), "--model", str(inputs["model"]), "--out", str(out),
                 "--params", str(inputs["params"]), "--voxel-size-um", "20", "--no-cam",
                 "--no-progress", *extra])  # fmt: skip


@pytest.mark.parametrize("case", ["scan-file", "scan-folder", "inside-scan-folder",
                                  "contains-the-scan"])  # fmt: skip
def test_predict_never_writes_over_or_around_its_scan_even_with_force(
    case: str, predict_inputs: dict[str, Path], cli_params: Path, tmp_path: Path, capsys
) -> None:
    """Once: OUT = the scan file moved it to a hidden .scan.tif.old, OUT = the folder of
    slices deleted every slice; both exited 0."""
    predict_inputs = dict(predict_inputs, params=cli_params)  # a scratch MLflow store
    work = tmp_path / "work"
    shutil.copytree(predict_inputs["scan"].parent, work, ignore=shutil.ignore_patterns("m"))
    scan, out = {
        "scan-file": (work / "scan.tif", work / "scan.tif"),
        "scan-folder": (work / "slices", work / "slices"),
        "inside-scan-folder": (work / "slices", work / "slices" / "pred"),
        "contains-the-scan": (work / "scan.tif", work),
    }[case]
    before = tree(tmp_path)
    for force in ((), ("--force",)):
        assert _predict(predict_inputs, scan, out, *force) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out}: output folder "), err
        assert "input" in err and "choose another output folder" in err, err
        assert tree(tmp_path) == before  # the scan as it was; nothing staged, nothing .old


def test_predict_replaces_only_its_own_output_folder(
    predict_inputs: dict[str, Path], cli_params: Path, tmp_path: Path, capsys
) -> None:
    import os

    from bonedamage.atomic import MARKER

    predict_inputs = dict(predict_inputs, params=cli_params)
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("my notes on this specimen")
    before = tree(tmp_path)
    assert _predict(predict_inputs, predict_inputs["scan"], out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: exists and holds files that bonedamage did not write")
    assert "--force" in err and tree(tmp_path) == before
    mask = os.umask(0o022)
    try:
        assert _predict(predict_inputs, predict_inputs["scan"], out, "--force") == 0
        assert _predict(predict_inputs, predict_inputs["scan"], out) == 0  # its own: replaced
    finally:
        os.umask(mask)
    names = sorted(p.name for p in out.iterdir())
    assert "notes.txt" not in names and {MARKER, "verdict.json", "probability.tif"} <= set(names)
    assert (out / "probability.tif").stat().st_mode & 0o777 == 0o644
    assert out.stat().st_mode & 0o777 == 0o755
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
