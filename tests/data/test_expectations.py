"""Tests of the validate stage's suites: valid tables pass, each kind of defect fails by name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bonedamage.data import expectations as validate
from bonedamage.data.expectations import Failure, ValidationReport, validate_tables
from bonedamage.data.manifest import COLUMNS
from conftest import REAL_STACK, with_raw

CFG = {"max_class_imbalance": 1.5, "min_tiles_per_class": 2}
TILES_PER_SCAN = 4
# Per tissue: specimens 1 and 2 train, 3 val, 4 test (grouped); specimen 1 also has an
# intermediate scan, whose tiles are indexed but not split.
GROUPED = {1: "train", 2: "train", 3: "val", 4: "test"}
Tables = tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]


def make_tables() -> Tables:
    """A small valid manifest, tile index and splits (2 tissues x 4 specimens)."""
    scans, tiles, splits = [], [], []
    rng = np.random.default_rng(0)
    for tissue, voxel in (("cortical", 1.6), ("trabecular", 20.0)):
        for n, grouped_split in GROUPED.items():
            specimen = f"{tissue}-{n:02d}"
            states = [("pristine", 0, 0), ("failed", 1, 2)]
            if n == 1:
                states.append(("intermediate", -1, 1))
            for state, label, step in states:
                scan = f"{specimen}-{step}-{state}"
                scans.append(
                    {
                        "scan_id": scan,
                        "specimen_id": specimen,
                        "tissue": tissue,
                        "species": "bovine",
                        "state": state,
                        "load_step": step,
                        "applied_strain": 0.01 * step,
                        "voxel_size_um": voxel,
                        "path": f"{tissue}/{scan}.tif",
                        "mask_path": f"{tissue}/{scan}_labels.tif",
                        "shape": "32x64x64",
                        "dtype": "uint16",
                        "sha256": f"{len(scans):064x}",
                        "source": "synth",
                    }
                )
                for k in range(TILES_PER_SCAN):
                    tile_id = f"{scan}-axial-{k}"
                    tiles.append(
                        {
                            "tile_id": tile_id,
                            "scan_id": scan,
                            "specimen_id": specimen,
                            "tissue": tissue,
                            "state": state,
                            "label": label,
                            "load_step": step,
                            "plane": "axial",
                            "z": 8 * k,
                            "y": 0,
                            "x": 32,
                            "voxel_size_um": voxel,
                            "tile_px": 32,
                            "norm_lo": 1000.0,
                            "norm_hi": 40000.0,
                            "fov_fraction": 1.0,
                            "bone_fraction": float(rng.uniform(0.2, 0.9)),
                            "mean": float(rng.uniform(1e3, 3e4)),
                            "std": float(rng.uniform(10, 500)),
                            "damage_fraction": float(rng.uniform(0, 0.1)) if label == 1 else 0.0,
                            "chunk": f"{tissue}/{scan}.npy",
                            "row": k,
                        }
                    )
                    if label >= 0:
                        leaky = ("train", "val", "test")[(len(tiles) + k) % 3]
                        for scheme, split in (("grouped", grouped_split), ("leaky", leaky)):
                            splits.append(
                                {
                                    "tile_id": tile_id,
                                    "specimen_id": specimen,
                                    "tissue": tissue,
                                    "label": label,
                                    "scheme": scheme,
                                    "split": split,
                                }
                            )
    manifest = pd.DataFrame(scans, columns=list(COLUMNS)).astype(
        {"load_step": "Int64", "applied_strain": "Float64"}
    )
    return manifest, pd.DataFrame(tiles), pd.DataFrame(splits)


def _set(df: pd.DataFrame, where: pd.Series | int, column: str, value: object) -> pd.DataFrame:
    df = df.copy()
    if isinstance(where, int):
        where = df.index == df.index[where]
    df.loc[where, column] = value
    return df


def _in(df: pd.DataFrame, **match: object) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for column, value in match.items():
        if column == "specimen_id" or not isinstance(value, str):
            mask &= df[column] == value
        else:
            mask &= df[column].astype(str).str.startswith(value)
    return mask


def null_specimen(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return m, _set(t, 3, "specimen_id", None), s


def bone_fraction_above_one(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return m, _set(t, 5, "bone_fraction", 1.2), s


def empty_intensity_range(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return m, _set(t, 3, "norm_hi", 1000.0), s


def zero_voxel_size(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return _set(m, 0, "voxel_size_um", 0.0), t, s


def unknown_tissue(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return _set(m, 2, "tissue", "cancellous"), t, s


def unknown_split(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return m, t, _set(s, _in(s, scheme="leaky").to_numpy().nonzero()[0][0].item(), "split", "dev")


def duplicate_tile_id(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return m, _set(t, 1, "tile_id", t["tile_id"].iloc[0]), s


def specimen_in_two_splits(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    # one tile of a train specimen moved to test, still both classes everywhere
    where = _in(s, scheme="grouped", specimen_id="cortical-01")
    return m, t, _set(s, where.to_numpy().nonzero()[0][0].item(), "split", "test")


def missing_class(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    drop = _in(s, scheme="grouped", specimen_id="trabecular-03", label=1)
    return m, t, s[~drop]


def imbalance_beyond_bound(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    # cortical/val: 4 pristine, 2 failed -> 2.0 > 1.5 (and 2 >= min_tiles_per_class)
    failed = _in(s, scheme="grouped", specimen_id="cortical-03", label=1)
    drop = failed & failed.cumsum().le(2)
    return m, t, s[~drop]


def nan_mean(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return m, _set(t, 4, "mean", float("nan")), s


def inf_std(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return m, _set(t, 6, "std", float("inf")), s


def scan_not_in_manifest(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return m[m["scan_id"] != t["scan_id"].iloc[-1]], t, s


def bad_sha256(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return _set(m, 1, "sha256", "not-a-digest"), t, s


def float_labels(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return m, t.astype({"label": float}), s


def missing_column(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return m, t.drop(columns=["chunk"]), s


def label_contradicts_state(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return m, _set(t, _in(t, state="failed").to_numpy().nonzero()[0][0].item(), "label", 0), s


def no_grouped_scheme(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return m, t, s[s["scheme"] == "leaky"]


def tile_twice_in_a_scheme(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    leaky = s[s["scheme"] == "leaky"]
    return m, t, pd.concat([s, leaky.iloc[:1].assign(split="test")], ignore_index=True)


def chunk_outside_data(m: pd.DataFrame, t: pd.DataFrame, s: pd.DataFrame) -> Tables:
    return m, _set(t, 0, "chunk", "../elsewhere.npy"), s


DEFECTS: list[tuple[Callable[..., Tables], str, str, str]] = [
    (null_specimen, "tiles", "expect_column_values_to_not_be_null", "specimen_id"),
    (bone_fraction_above_one, "tiles", "expect_column_values_to_be_between", "bone_fraction"),
    (
        empty_intensity_range,
        "tiles",
        "expect_column_pair_values_a_to_be_greater_than_b",
        "norm_hi,norm_lo",
    ),
    (zero_voxel_size, "manifest", "expect_column_values_to_be_between", "voxel_size_um"),
    (unknown_tissue, "manifest", "expect_column_values_to_be_in_set", "tissue"),
    (unknown_split, "splits", "expect_column_values_to_be_in_set", "split"),
    (duplicate_tile_id, "tiles", "expect_column_values_to_be_unique", "tile_id"),
    (specimen_in_two_splits, "grouped_specimens", "expect_column_values_to_be_in_set", "n_splits"),
    (missing_class, "grouped_class_balance", "expect_column_values_to_be_in_set", "n_classes"),
    (imbalance_beyond_bound, "grouped_class_balance", "expect_column_values_to_be_between",
     "imbalance"),
    (nan_mean, "tiles", "expect_column_values_to_not_be_null", "mean"),
    (inf_std, "tiles", "expect_column_values_to_be_between", "std"),
    (scan_not_in_manifest, "tiles", "expect_column_values_to_be_in_set", "scan_id"),
    (bad_sha256, "manifest", "expect_column_values_to_match_regex", "sha256"),
    (float_labels, "schema", "expect_column_values_to_be_in_set", "kind_ok"),
    (missing_column, "tiles", "expect_column_to_exist", "chunk"),
    (label_contradicts_state, "tiles", "expect_column_pair_values_to_be_in_set", "state,label"),
    (no_grouped_scheme, "splits", "expect_column_distinct_values_to_contain_set", "scheme"),
    (tile_twice_in_a_scheme, "splits", "expect_compound_columns_to_be_unique", "scheme,tile_id"),
    (chunk_outside_data, "tiles", "expect_column_values_to_not_match_regex", "chunk"),
]  # fmt: skip


@pytest.fixture(scope="module")
def tables() -> Tables:
    return make_tables()


@pytest.fixture(scope="module")
def valid_run(
    tables: Tables, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ValidationReport, Path]:
    docs = tmp_path_factory.mktemp("reports") / "data-docs"
    return validate_tables(*tables, CFG, docs_dir=docs), docs


def test_valid_tables_pass_and_build_docs(valid_run: tuple[ValidationReport, Path]) -> None:
    report, docs = valid_run
    assert report.success, report.summary()
    assert report.failures == []
    assert report.n_expectations > 80
    assert report.summary() == f"all {report.n_expectations} expectations passed"
    assert report.docs_index == docs / "index.html"
    assert report.docs_index.is_file()
    assert "<html" in report.docs_index.read_text(encoding="utf-8").lower()
    assert not [p for p in docs.parent.iterdir() if p.name.startswith(".")]  # no temp left
    assert json.loads(json.dumps(report.to_dict()))["docs_index"] == str(docs / "index.html")


def summary_rows(text: str) -> dict[str, list[list[str]]]:
    """The expectation rows of each suite's section of the offline summary, as cells."""
    rows: dict[str, list[list[str]]] = {}
    for section in text.split("\n## ")[1:]:
        name = section.split(":", 1)[0]
        rows[name] = [
            [cell.strip() for cell in line.strip("|").split(" | ")]
            for line in section.splitlines()
            if line.startswith(("| pass |", "| **FAIL** |"))
        ]
    return rows


def test_summary_lists_every_expectation_of_every_suite_with_its_status(
    tables: Tables, valid_run: tuple[ValidationReport, Path]
) -> None:
    report, docs = valid_run
    assert report.summary_file == docs / "summary.md"  # beside the Data Docs' index.html
    text = report.summary_file.read_text(encoding="utf-8")
    assert text.startswith(f"# Data validation: PASSED (all {report.n_expectations} ")
    rows = summary_rows(text)
    suites = validate._build_suites(*tables, CFG)
    assert list(rows) == [suite.name for suite in suites]
    for suite in suites:
        listed = [(cells[1].split(" (")[0], cells[2]) for cells in rows[suite.name]]
        wanted = [
            (e.configuration.type, validate._columns(e.configuration.kwargs))
            for e in suite.expectations
        ]
        assert sorted(listed) == sorted(wanted), suite.name  # in GX's order of results
        assert all(cells[0] == "pass" and cells[4] for cells in rows[suite.name])
    assert sum(len(r) for r in rows.values()) == report.n_expectations
    # observed values: counts of offending rows, ranges of checked numbers
    between = "expect_column_values_to_be_between"
    (voxel,) = [c for c in rows["manifest"] if c[1:3] == [between, "voxel_size_um"]]
    assert voxel[4] == "`0 unexpected of 18; values 1.6 to 20`"


def test_summary_marks_failures_with_what_was_observed(tables: Tables, tmp_path: Path) -> None:
    report = validate_tables(*specimen_in_two_splits(*tables), CFG, docs_dir=tmp_path / "docs")
    text = report.summary_file.read_text(encoding="utf-8")
    assert text.startswith(f"# Data validation: FAILED (1 of {report.n_expectations} ")
    rows = summary_rows(text)
    failed = [
        (name, cells) for name, suite in rows.items() for cells in suite if "FAIL" in cells[0]
    ]
    assert [(name, cells[2]) for name, cells in failed] == [("grouped_specimens", "n_splits")]
    assert "cortical-01 in test,train" in failed[0][1][4]
    assert sum(len(r) for r in rows.values()) == report.n_expectations  # the passed ones too


def test_summary_needs_nothing_from_the_network(valid_run: tuple[ValidationReport, Path]) -> None:
    """Offline, GX's Data Docs show an empty index (their scripts and icons come from CDNs);
    the summary references no remote (or any) asset and runs no script."""
    report, _ = valid_run
    text = report.summary_file.read_text(encoding="utf-8").lower()
    for remote in ("http://", "https://", "//cdn", "<script", "<link", "<img", "src=", "]("):
        assert remote not in text


def test_the_json_report_keeps_failures_only(valid_run: tuple[ValidationReport, Path]) -> None:
    """metrics/validation.json is committed: the passed expectations stay out of it."""
    report, _ = valid_run
    assert report.suites  # the summary's rows
    assert set(report.to_dict()) == {"success", "failures", "n_expectations", "docs_index"}


def test_input_tables_are_not_modified(tables: Tables, valid_run: object) -> None:
    fresh = make_tables()
    for got, want in zip(tables, fresh, strict=True):
        pd.testing.assert_frame_equal(got, want)


@pytest.mark.parametrize(
    ("defect", "suite", "expectation", "column"), DEFECTS, ids=[d[0].__name__ for d in DEFECTS]
)
def test_defect_fails_by_name(
    tables: Tables,
    defect: Callable[..., Tables],
    suite: str,
    expectation: str,
    column: str,
) -> None:
    report = validate_tables(*defect(*(df.copy() for df in tables)), CFG)
    assert not report.success
    assert report.docs_index is None
    hits = [f for f in report.failures if (f.suite, f.expectation, f.column) == (
        suite, expectation, column)]  # fmt: skip
    assert hits, report.summary()
    assert f"{suite}: {expectation}({column}): " in report.summary()
    assert all(isinstance(f, Failure) and f.details for f in report.failures)


def test_failure_details_name_what_failed(tables: Tables) -> None:
    m, t, s = specimen_in_two_splits(*tables)
    m = _set(m, 0, "voxel_size_um", -1.0)
    report = validate_tables(m, t, s, CFG)
    summary = report.summary()
    assert summary.startswith(f"{len(report.failures)} of {report.n_expectations} expectations")
    assert "manifest: expect_column_values_to_be_between(voxel_size_um): 1 unexpected" in summary
    assert "[-1.0]" in summary
    assert "cortical-01 in test,train" in summary  # the offending specimen and its splits
    assert json.loads(json.dumps(report.to_dict()))["success"] is False


def test_leaky_scheme_may_share_specimens(tables: Tables) -> None:
    m, t, s = tables
    leaky = s[s["scheme"] == "leaky"]
    assert (leaky.groupby("specimen_id")["split"].nunique() > 1).any()  # precondition
    report = validate_tables(m, t, s, CFG)
    assert report.success, report.summary()


def test_failing_validation_still_builds_docs(tables: Tables, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "stale").mkdir(parents=True)
    report = validate_tables(*bad_sha256(*tables), CFG, docs_dir=docs)
    assert not report.success
    assert (docs / "index.html").is_file()
    assert not (docs / "stale").exists()  # replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]


def test_crash_keeps_previous_docs(
    tables: Tables, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = tmp_path / "docs"
    (docs / "stale").mkdir(parents=True)

    def crash(suites: object, site_dir: Path) -> None:
        (site_dir / "index.html").write_text("half", encoding="utf-8")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(validate, "_run", crash)
    with pytest.raises(RuntimeError):
        validate_tables(*tables, CFG, docs_dir=docs)
    assert (docs / "stale").is_dir()
    assert not (docs / "index.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]


def test_missing_config_key_is_an_error(tables: Tables) -> None:
    with pytest.raises(KeyError, match="min_tiles_per_class"):
        validate_tables(*tables, {"max_class_imbalance": 1.5})


def test_manifest_schema_covers_manifest_columns() -> None:
    assert tuple(validate.MANIFEST_SCHEMA) == COLUMNS


@pytest.mark.skipif(not REAL_STACK.is_dir(), reason="../shared/real is absent")
def test_real_stack_with_phantoms_tiles_splits_and_validates(learn_params, tmp_path) -> None:
    """A user's real scan goes through the same tile -> split -> validate path."""
    from bonedamage.data.ingestion import IngestRequest, ingest_scans
    from bonedamage.data.manifest import read_manifest
    from bonedamage.data.splits import make_splits
    from bonedamage.data.synth.generate import generate_dataset
    from bonedamage.data.tiling import tile_dataset

    root = tmp_path / "raw"
    generate_dataset(learn_params["synth"], root, progress=False)
    ingest_scans(
        [
            IngestRequest(
                REAL_STACK,
                "lhdl-3155",
                "trabecular",
                "pristine",
                voxel_size_um=19.5,
                species="human",
            )
        ],
        root,
        progress=False,
    )
    index = tile_dataset(root, tmp_path / "tiles", learn_params["tile"], progress=False)
    assert index.loc[index.scan_id == "lhdl-3155-pristine", "damage_fraction"].isna().all()
    splits = make_splits(index, learn_params["split"])
    # one real pristine specimen among three phantom pairs unbalances its split on purpose
    cfg = {**learn_params["validate"], "max_class_imbalance": 1000.0}
    report = validate_tables(read_manifest(root), index, splits, cfg)
    assert report.success, report.summary()


# -- `bonedamage validate`: its inputs are named when bad; its docs folder is its own -------
@pytest.fixture
def on_disk(tables: Tables, tmp_path: Path) -> dict[str, Path]:
    """The valid tables as the command reads them, and a params file for it."""
    import yaml

    from bonedamage.data.manifest import write_manifest
    from conftest import REPO

    manifest, tiles, splits = tables
    root, store = tmp_path / "raw", tmp_path / "tiles"
    store.mkdir()
    write_manifest(manifest, root)
    tiles.to_parquet(store / "index.parquet", index=False)
    splits.to_parquet(tmp_path / "splits.parquet", index=False)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(dict(params, pipeline=with_raw(params, root), validate=CFG)))
    return {"root": root, "tiles": store, "splits": tmp_path / "splits.parquet", "params": pfile}


def _validate(paths: dict[str, Path], docs: Path, *extra: str) -> int:
    from bonedamage.cli import main

    return main(["validate", "--params", str(paths["params"]), "--tiles", str(paths["tiles"]),
                 "--splits", str(paths["splits"]), "--docs", str(docs), "--out",
                 str(docs.parent / "validation.json"), "--no-progress", *extra])  # fmt: skip


@pytest.mark.parametrize(
    ("case", "fragment"),
    [("missing", "no such file"), ("empty", "is empty"), ("csv", "not a Parquet table")],
)
def test_validate_names_a_bad_splits_file(case, fragment, on_disk, tmp_path, capsys) -> None:
    """Once: a missing splits file ended in a FileNotFoundError traceback."""
    splits = on_disk["splits"]
    if case == "missing":
        splits.unlink()
    else:
        splits.write_text("" if case == "empty" else "tile_id,split\nx,train\n")
    docs = tmp_path / "out" / "docs"
    assert _validate(on_disk, docs) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {splits}: {fragment} (splits table)"), err
    assert not (tmp_path / "out").exists()


def test_validate_replaces_only_its_own_docs(on_disk, tmp_path, capsys) -> None:
    docs = tmp_path / "site"
    docs.mkdir()
    (docs / "index.html").write_text("the lab's own web page")
    assert _validate(on_disk, docs) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {docs}: exists and holds files that bonedamage did not write")
    assert (docs / "index.html").read_text() == "the lab's own web page"
    assert not (tmp_path / "validation.json").exists()
    assert _validate(on_disk, docs, "--force") == 0
    assert "<html" in (docs / "index.html").read_text().lower()
    assert f"readable offline): {docs / 'summary.md'}" in capsys.readouterr().out
    assert (docs / "summary.md").read_text().startswith("# Data validation: PASSED")


@pytest.mark.parametrize("which", ["tiles", "root", "parent"])
def test_validate_docs_are_never_an_input_even_with_force(which, on_disk, tmp_path, capsys) -> None:
    docs = {"tiles": on_disk["tiles"], "root": on_disk["root"] / "docs", "parent": tmp_path}[which]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for force in ((), ("--force",)):
        assert _validate(on_disk, docs, *force) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "input" in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
