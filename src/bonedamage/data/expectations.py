"""Data validation: great-expectations suites for the scan manifest, tile index and splits.

The ``validate`` stage runs these suites before any model sees the data, so a broken
manifest, a tile index with impossible values or a split that leaks a specimen fails
``dvc repro`` with a readable summary (which expectation failed on which column and
why) instead of surfacing later as a silently optimistic score.

Checks that are not single-column checks (split integrity, class balance, consistency
between tables, column types) are computed here as small derived tables and validated
with ordinary expectations, so great-expectations reports them by a name that says what
failed (``grouped_specimens: expect_column_values_to_be_in_set(n_splits)``).

great-expectations runs offline and quietly: an ephemeral in-memory context, analytics
off, progress bars off. It is imported inside the functions (the import takes seconds).
Data Docs HTML is built into a temporary folder next to ``docs_dir`` and renamed into
place, so a failing validation leaves complete docs and a crash leaves none. Beside the
Data Docs (whose pages load their scripts, styles and status icons from CDNs, so offline
they show an empty index), ``summary.md`` lists every expectation of every suite with its
outcome and what was observed, self-contained: no remote asset, no script.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bonedamage.atomic import atomic_dir, check_output_dir
from bonedamage.data.manifest import DTYPES as MANIFEST_DTYPES
from bonedamage.data.manifest import STATES, TISSUES
from bonedamage.data.splits import SCHEMES, SPLITS
from bonedamage.data.tiling import INDEX_COLUMNS, LABELS, PLANES
from bonedamage.data.volume import SUPPORTED_DTYPES

SCAN_DTYPES = tuple(str(d) for d in SUPPORTED_DTYPES)
SOURCES = ("synth", "ingest")
BIG = sys.float_info.max  # "between -BIG and BIG" is "finite" (inf is out, NaN is a null)


def _kinds(dtypes: dict[str, str]) -> dict[str, str]:
    """Column kinds ("string", "integer" or "number") from the pandas dtypes a table is
    written with, so the expectations follow the writers' schemas."""

    def kind(dtype: str) -> str:
        if dtype == "string":
            return "string"
        return "integer" if dtype.lower().startswith("int") else "number"

    return {column: kind(dtype) for column, dtype in dtypes.items()}


MANIFEST_SCHEMA = _kinds(MANIFEST_DTYPES)
TILES_SCHEMA = _kinds(INDEX_COLUMNS)
SPLITS_SCHEMA: dict[str, str] = {
    "tile_id": "string",
    "specimen_id": "string",
    "tissue": "string",
    "label": "integer",
    "scheme": "string",
    "split": "string",
}
MANIFEST_NULLABLE = ("load_step", "applied_strain")
TILES_NULLABLE = ("damage_fraction",)  # real scans have no damage mask
UNSAFE_PATH = r"^/|(?:^|/)\.\.(?:/|$)"  # absolute, or stepping out with ".."
MAX_EXAMPLES = 5
SUMMARY_NAME = "summary.md"  # the offline summary, beside the Data Docs' index.html


@dataclass
class Failure:
    """One failed expectation: where, what, on which column(s), and what was seen."""

    suite: str
    expectation: str
    column: str | None
    details: str

    def line(self) -> str:
        column = f"({self.column})" if self.column else ""
        return f"{self.suite}: {self.expectation}{column}: {self.details}"


@dataclass
class Outcome:
    """One expectation's outcome, passed or failed, for the offline summary."""

    expectation: str
    column: str | None
    settings: str
    description: str | None
    success: bool
    observed: str


@dataclass
class SuiteOutcome:
    """A suite: its name, the rows of the table it validated, and each expectation's outcome."""

    name: str
    rows: int
    outcomes: list[Outcome]


@dataclass
class ValidationReport:
    """Outcome of :func:`validate_tables`. ``suites`` holds every expectation's outcome (for
    :meth:`markdown`); the JSON form (:meth:`to_dict`, metrics/validation.json) keeps the
    failures only."""

    success: bool
    failures: list[Failure]
    n_expectations: int
    docs_index: Path | None = None
    suites: list[SuiteOutcome] = field(default_factory=list)

    @property
    def summary_file(self) -> Path | None:
        """The offline summary beside the Data Docs, when they were built."""
        return None if self.docs_index is None else self.docs_index.parent / SUMMARY_NAME

    def summary(self) -> str:
        """One line per failure, or a single line saying that everything passed."""
        if self.success:
            return f"all {self.n_expectations} expectations passed"
        head = f"{len(self.failures)} of {self.n_expectations} expectations failed:"
        return "\n".join([head, *(f"  {f.line()}" for f in self.failures)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (paths as strings), without the passed expectations."""
        out = asdict(self)
        out.pop("suites")
        out["docs_index"] = str(self.docs_index) if self.docs_index is not None else None
        return out

    def markdown(self) -> str:
        """Every suite and expectation with its status and observed value, as a Markdown
        page that needs nothing but itself: no remote asset, no script, no link."""
        n_failed = len(self.failures)
        verdict = "PASSED" if self.success else "FAILED"
        head = (
            f"all {self.n_expectations} expectations passed"
            if self.success
            else f"{n_failed} of {self.n_expectations} expectations failed"
        )
        lines = [
            f"# Data validation: {verdict} ({head})",
            "",
            "Every great-expectations suite that `bonedamage validate` ran on the scan manifest,",
            "the tile index, the splits and the tables derived from them, with each expectation's",
            "outcome and what was observed. The Data Docs beside this file (`index.html`) hold the",
            "same results but load their scripts and icons from the web.",
            "",
            "| suite | rows | expectations | failed |",
            "| --- | ---: | ---: | ---: |",
        ]
        for suite in self.suites:
            failed = sum(not o.success for o in suite.outcomes)
            lines.append(f"| {suite.name} | {suite.rows} | {len(suite.outcomes)} | {failed} |")
        for suite in self.suites:
            failed = sum(not o.success for o in suite.outcomes)
            state = "all passed" if not failed else f"{failed} failed"
            rows = _count(suite.rows, "row")
            lines += [
                "",
                f"## {suite.name}: {_count(len(suite.outcomes), 'expectation')} on {rows}, {state}",
                "",
                "| status | expectation | column | settings | observed |",
                "| --- | --- | --- | --- | --- |",
            ]
            for o in suite.outcomes:
                name = o.expectation + (f" ({_cell(o.description)})" if o.description else "")
                cells = [
                    "pass" if o.success else "**FAIL**",
                    name,
                    _cell(o.column or ""),
                    _code(o.settings),
                    _code(o.observed),
                ]
                lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


@dataclass
class _Suite:
    """A table, its expectations and, for derived tables, how to name an offending row."""

    name: str
    df: pd.DataFrame
    expectations: list[Any]
    describe_row: Callable[[pd.Series], str] | None = None


# ----------------------------------------------------------------------------- helpers


def _kind(series: pd.Series) -> str:
    """Coarse kind of a column's dtype, independent of numpy/pandas dtype flavours."""
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "integer"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    if isinstance(dtype, np.dtype) and dtype.kind == "O":  # only str (and nulls) in it?
        inferred = pd.api.types.infer_dtype(series, skipna=True)
        return "string" if inferred in ("string", "empty") else "other"
    if pd.api.types.is_string_dtype(dtype):
        return "string"
    return "other"


def _kind_ok(actual: str, expected: str) -> bool:
    if expected == "number":
        return actual in ("integer", "float")
    return actual == expected


def _has(df: pd.DataFrame, columns: Sequence[str]) -> bool:
    return all(c in df.columns for c in columns)


def _schema_table(tables: dict[str, tuple[pd.DataFrame, dict[str, str]]]) -> pd.DataFrame:
    """One row per required column present in its table: its dtype and kind vs the expected."""
    rows = []
    for table, (df, schema) in tables.items():
        for column, expected in schema.items():
            if column in df.columns:
                kind = _kind(df[column])
                rows.append(
                    {
                        "table": table,
                        "column": column,
                        "dtype": str(df[column].dtype),
                        "expected_kind": expected,
                        "kind_ok": _kind_ok(kind, expected),
                    }
                )
    return pd.DataFrame(rows, columns=["table", "column", "dtype", "expected_kind", "kind_ok"])


def _tile_scans_table(tiles: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame | None:
    """Per scan with tiles: do its tiles agree with the manifest on specimen, tissue, state?"""
    keys = ["scan_id", "specimen_id", "tissue", "state"]
    if not (_has(tiles, keys) and _has(manifest, keys)):
        return None
    ref = manifest[keys].drop_duplicates("scan_id").astype(object)
    merged = tiles[keys].astype(object).merge(ref, on="scan_id", how="inner", suffixes=("", "_m"))
    matches = pd.DataFrame({"scan_id": merged["scan_id"]})
    for key in keys[1:]:
        matches[f"{key}_matches"] = (merged[key] == merged[f"{key}_m"]).to_numpy(dtype=bool)
    out = matches.groupby("scan_id", sort=True, dropna=False).all().reset_index()
    return out


def _split_tiles_table(splits: pd.DataFrame, tiles: pd.DataFrame) -> pd.DataFrame | None:
    """Per scheme: split rows whose tile is unknown or disagrees with the tile index."""
    keys = ["tile_id", "specimen_id", "tissue", "label"]
    if not (_has(splits, [*keys, "scheme"]) and _has(tiles, keys)):
        return None
    ref = tiles[keys].drop_duplicates("tile_id").astype(object)
    merged = (
        splits[[*keys, "scheme"]]
        .astype(object)
        .merge(ref, on="tile_id", how="left", suffixes=("", "_t"), indicator=True)
    )
    known = (merged["_merge"] == "both").to_numpy()
    table = pd.DataFrame({"scheme": merged["scheme"].astype(str), "n_unknown_tiles": ~known})
    for key in keys[1:]:
        table[f"n_{key}_mismatch"] = known & (merged[key] != merged[f"{key}_t"]).to_numpy(bool)
    return table.groupby("scheme", sort=True).sum().astype(int).reset_index()


def _grouped_specimens_table(splits: pd.DataFrame) -> pd.DataFrame | None:
    """Per specimen of the grouped scheme: how many splits hold its tiles (must be 1)."""
    if not _has(splits, ["scheme", "specimen_id", "split"]):
        return None
    grouped = splits[splits["scheme"] == "grouped"]
    groups = grouped.groupby(grouped["specimen_id"].astype(str), sort=True)["split"]
    return pd.DataFrame(
        {
            "n_splits": groups.nunique(dropna=False),
            "splits": groups.agg(lambda s: ",".join(sorted(s.dropna().astype(str).unique()))),
        }
    ).reset_index()


def _class_balance_table(splits: pd.DataFrame) -> pd.DataFrame | None:
    """Per tissue x split of the grouped scheme: tiles per class, classes present, imbalance."""
    if not _has(splits, ["scheme", "tissue", "split", "label"]):
        return None
    grouped = splits[splits["scheme"] == "grouped"]
    tissues = [t for t in TISSUES if t in set(grouped["tissue"])]
    names = [s for s in SPLITS if s in set(grouped["split"])]
    index = pd.MultiIndex.from_product([tissues, names], names=["tissue", "split"])
    label = pd.to_numeric(grouped["label"], errors="coerce")
    counts = pd.DataFrame(
        {
            "tissue": grouped["tissue"],
            "split": grouped["split"],
            "n_pristine": (label == 0).astype(int),
            "n_failed": (label == 1).astype(int),
        }
    )
    table = counts.groupby(["tissue", "split"]).sum().reindex(index, fill_value=0).reset_index()
    low = table[["n_pristine", "n_failed"]].min(axis=1)
    high = table[["n_pristine", "n_failed"]].max(axis=1)
    table["n_classes"] = (table[["n_pristine", "n_failed"]] > 0).sum(axis=1).astype(int)
    ratio = high.astype(float) / low.where(low > 0).astype(float)
    table["imbalance"] = ratio.fillna(np.inf).round(6)  # a missing class: infinitely imbalanced
    return table


def _manifest_specimens_table(manifest: pd.DataFrame) -> pd.DataFrame | None:
    """Per specimen of the manifest: how many tissues it is listed under (must be 1)."""
    if not _has(manifest, ["specimen_id", "tissue"]):
        return None
    groups = manifest.groupby(manifest["specimen_id"].astype(str), sort=True)["tissue"]
    return groups.nunique(dropna=False).rename("n_tissues").reset_index()


# ------------------------------------------------------------------------------ suites


def _build_suites(
    manifest: pd.DataFrame, tiles: pd.DataFrame, splits: pd.DataFrame, cfg: dict
) -> list[_Suite]:
    """All suites with their tables; expectations on columns a table lacks are left out
    (the missing column is reported once, by ``expect_column_to_exist``)."""
    import great_expectations.expectations as gxe

    max_imbalance = float(cfg["max_class_imbalance"])
    min_per_class = int(cfg["min_tiles_per_class"])

    def column_suite(
        name: str, df: pd.DataFrame, schema: dict[str, str], nullable: Sequence[str]
    ) -> tuple[_Suite, Callable[..., None]]:
        suite = _Suite(name, df, [gxe.ExpectColumnToExist(column=c) for c in schema])

        def add(cls: Any, *columns: str, **kwargs: Any) -> None:
            if not _has(df, columns):
                return
            if len(columns) == 1:
                suite.expectations.append(cls(column=columns[0], **kwargs))
            elif cls in (
                gxe.ExpectColumnPairValuesToBeInSet,
                gxe.ExpectColumnPairValuesAToBeGreaterThanB,
            ):
                suite.expectations.append(cls(column_A=columns[0], column_B=columns[1], **kwargs))
            else:
                suite.expectations.append(cls(column_list=list(columns), **kwargs))

        for column in schema:
            if column not in nullable:
                add(gxe.ExpectColumnValuesToNotBeNull, column)
        return suite, add

    between = gxe.ExpectColumnValuesToBeBetween
    in_set = gxe.ExpectColumnValuesToBeInSet

    # Scan manifest.
    manifest_suite, add = column_suite("manifest", manifest, MANIFEST_SCHEMA, MANIFEST_NULLABLE)
    add(gxe.ExpectColumnValuesToBeUnique, "scan_id")
    add(in_set, "tissue", value_set=list(TISSUES))
    add(in_set, "state", value_set=list(STATES))
    add(in_set, "dtype", value_set=list(SCAN_DTYPES))
    add(in_set, "source", value_set=list(SOURCES))
    add(between, "voxel_size_um", min_value=0, max_value=BIG, strict_min=True)
    add(between, "load_step", min_value=0)
    add(between, "applied_strain", min_value=-BIG, max_value=BIG)
    add(gxe.ExpectColumnValuesToMatchRegex, "sha256", regex=r"^[0-9a-f]{64}$")
    add(gxe.ExpectColumnValuesToMatchRegex, "shape", regex=r"^[1-9][0-9]*(?:x[1-9][0-9]*){2}$")
    add(gxe.ExpectColumnValuesToNotMatchRegex, "path", regex=UNSAFE_PATH)
    add(gxe.ExpectColumnValuesToNotMatchRegex, "mask_path", regex=UNSAFE_PATH)

    # Tile index.
    scan_ids = []
    if "scan_id" in manifest.columns:
        scan_ids = sorted(str(s) for s in manifest["scan_id"].dropna().unique())
    tiles_suite, add = column_suite("tiles", tiles, TILES_SCHEMA, TILES_NULLABLE)
    add(gxe.ExpectColumnValuesToBeUnique, "tile_id")
    add(gxe.ExpectCompoundColumnsToBeUnique, "chunk", "row")
    add(in_set, "scan_id", value_set=scan_ids, description="every tile's scan is in the manifest")
    add(in_set, "tissue", value_set=list(TISSUES))
    add(in_set, "state", value_set=list(STATES))
    add(in_set, "label", value_set=sorted(LABELS.values()))
    add(in_set, "plane", value_set=list(PLANES))
    add(
        gxe.ExpectColumnPairValuesToBeInSet,
        "state",
        "label",
        value_pairs_set=[(state, label) for state, label in LABELS.items()],
        description="label follows state: failed 1, pristine 0, intermediate -1",
    )
    for column in ("z", "y", "x", "row", "load_step"):
        add(between, column, min_value=0)
    add(between, "tile_px", min_value=1)
    add(between, "voxel_size_um", min_value=0, max_value=BIG, strict_min=True)
    add(between, "fov_fraction", min_value=0, max_value=1)
    add(between, "bone_fraction", min_value=0, max_value=1)
    add(between, "damage_fraction", min_value=0, max_value=1)
    add(between, "norm_lo", min_value=-BIG, max_value=BIG, description="finite normalisation")
    add(
        gxe.ExpectColumnPairValuesAToBeGreaterThanB,
        "norm_hi",
        "norm_lo",
        description="a usable intensity range: norm_hi > norm_lo",
    )
    add(between, "mean", min_value=-BIG, max_value=BIG, description="finite mean intensity")
    add(between, "std", min_value=0, max_value=BIG, description="finite, non-negative std")
    add(gxe.ExpectColumnValuesToNotMatchRegex, "chunk", regex=UNSAFE_PATH)

    # Splits.
    splits_suite, add = column_suite("splits", splits, SPLITS_SCHEMA, ())
    add(gxe.ExpectCompoundColumnsToBeUnique, "scheme", "tile_id")
    add(in_set, "tissue", value_set=list(TISSUES))
    add(in_set, "label", value_set=[0, 1], description="only labelled tiles are split")
    add(in_set, "scheme", value_set=list(SCHEMES))
    add(in_set, "split", value_set=list(SPLITS))
    add(
        gxe.ExpectColumnDistinctValuesToContainSet,
        "scheme",
        value_set=["grouped"],
        description="the grouped (by specimen) scheme is present",
    )

    suites = [manifest_suite, tiles_suite, splits_suite]

    # Derived tables.
    schema = _schema_table(
        {
            "manifest": (manifest, MANIFEST_SCHEMA),
            "tiles": (tiles, TILES_SCHEMA),
            "splits": (splits, SPLITS_SCHEMA),
        }
    )
    suites.append(
        _Suite(
            "schema",
            schema,
            [
                in_set(
                    column="kind_ok",
                    value_set=[True],
                    description="each column has its kind (string, integer, number)",
                )
            ],
            lambda r: f"{r['table']}.{r['column']} is {r['dtype']}, expected {r['expected_kind']}",
        )
    )
    table = _manifest_specimens_table(manifest)
    if table is not None:
        suites.append(
            _Suite(
                "manifest_specimens",
                table,
                [in_set(column="n_tissues", value_set=[1], description="one tissue per specimen")],
                lambda r: f"{r['specimen_id']} ({r['n_tissues']} tissues)",
            )
        )
    table = _tile_scans_table(tiles, manifest)
    if table is not None:
        suites.append(
            _Suite(
                "tile_scans",
                table,
                [
                    in_set(column=c, value_set=[True], description=f"tiles agree on {c[:-8]}")
                    for c in ("specimen_id_matches", "tissue_matches", "state_matches")
                ],
                lambda r: f"scan {r['scan_id']}",
            )
        )
    table = _split_tiles_table(splits, tiles)
    if table is not None:
        suites.append(
            _Suite(
                "split_tiles",
                table,
                [
                    in_set(column=c, value_set=[0], description="split rows match the tile index")
                    for c in table.columns[1:]
                ],
                lambda r: f"scheme {r['scheme']}",
            )
        )
    table = _grouped_specimens_table(splits)
    if table is not None:
        suites.append(
            _Suite(
                "grouped_specimens",
                table,
                [
                    in_set(
                        column="n_splits",
                        value_set=[1],
                        description="grouped scheme: every specimen in exactly one split",
                    )
                ],
                lambda r: f"{r['specimen_id']} in {r['splits']}",
            )
        )
    table = _class_balance_table(splits)
    if table is not None:
        suites.append(
            _Suite(
                "grouped_class_balance",
                table,
                [
                    in_set(
                        column="n_classes",
                        value_set=[2],
                        description="grouped scheme: both classes in every split of every tissue",
                    ),
                    between(column="n_pristine", min_value=min_per_class),
                    between(column="n_failed", min_value=min_per_class),
                    between(
                        column="imbalance",
                        min_value=1,
                        max_value=max_imbalance,
                        description="max/min tiles per class within the bound",
                    ),
                ],
                lambda r: (
                    f"{r['tissue']}/{r['split']} pristine={r['n_pristine']} "
                    f"failed={r['n_failed']} imbalance={r['imbalance']:g}"
                ),
            )
        )
    return suites


# ----------------------------------------------------------------------- running GX


def _import_gx() -> Any:
    """Import great-expectations with analytics off (the switch is read at import time too)."""
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    return gx


def _context(gx: Any, site_dir: Path | None) -> Any:
    """Ephemeral in-memory context: no analytics, no progress bars, docs only in ``site_dir``."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if site_dir is not None:
        sites["local_site"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(site_dir),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _plain(value: Any) -> Any:
    """numpy scalars (also inside tuples, lists, dicts) as plain Python values, for display."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | list):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _examples(values: Sequence[Any]) -> str:
    """The first few distinct values, shortened."""
    seen: dict[str, None] = {}
    for value in values:
        seen.setdefault(repr(_plain(value)), None)
        if len(seen) == MAX_EXAMPLES:
            break
    text = "[" + ", ".join(seen) + "]"
    return text if len(text) <= 300 else text[:297] + "..."


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _cell(text: str) -> str:
    """``text`` on one line of a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: str) -> str:
    """``text`` as inline code in a Markdown table cell (regexes and values show as typed)."""
    text = _cell(text)
    if not text:
        return ""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _setting(value: Any) -> str:
    """One setting of an expectation, shortened: long value sets show their first values."""
    value = _plain(value)
    if isinstance(value, float) and abs(value) == BIG:
        return "-max float" if value < 0 else "max float"
    if isinstance(value, list | tuple) and len(value) > MAX_EXAMPLES:
        shown = ", ".join(repr(v) for v in value[:MAX_EXAMPLES])
        return f"[{shown}, ... ({len(value)} values)]"
    text = f"'{value}'" if isinstance(value, str) else repr(value)  # a regex as written
    return text if len(text) <= 300 else text[:297] + "..."


_NOT_SETTINGS = {"batch_id", "column", "column_A", "column_B", "column_list", "result_format"}


def _columns(kwargs: dict[str, Any]) -> str | None:
    """The column(s) an expectation checks, as its failure names them."""
    if "column" in kwargs:
        return kwargs["column"]
    if "column_A" in kwargs:
        return f"{kwargs['column_A']},{kwargs['column_B']}"
    if "column_list" in kwargs:
        return ",".join(kwargs["column_list"])
    return None


def _outcome(suite: _Suite, result: Any) -> Outcome:
    """One expectation result, passed or failed, as a row of the offline summary."""
    config = result.expectation_config
    kwargs = dict(config.kwargs)
    settings = ", ".join(f"{k}={_setting(v)}" for k, v in kwargs.items() if k not in _NOT_SETTINGS)
    res = dict(result.result or {})
    if not result.success:
        observed = _details(suite, result)
    elif config.type == "expect_column_to_exist":
        observed = "present"
    elif "unexpected_count" in res:
        observed = f"{res['unexpected_count']} unexpected of {res.get('element_count')}"
    elif res.get("observed_value") is not None:
        observed = f"observed {_examples([res['observed_value']])[1:-1]}"
    elif "partial_missing_list" in res:
        observed = "none missing"
    else:
        observed = "passed"
    column = kwargs.get("column")
    if config.type == "expect_column_values_to_be_between" and column in suite.df.columns:
        values = pd.to_numeric(suite.df[column], errors="coerce").dropna()
        if len(values):
            observed += f"; values {values.min():g} to {values.max():g}"
    return Outcome(
        config.type, _columns(kwargs), settings, config.description, bool(result.success), observed
    )


def _failure(suite: _Suite, result: Any) -> Failure:
    """Turn one failed expectation result into a :class:`Failure` with readable details."""
    config = result.expectation_config
    details = _details(suite, result)
    if config.description:
        details = f"{details} [{config.description}]"
    return Failure(suite.name, config.type, _columns(config.kwargs), details)


def _details(suite: _Suite, result: Any) -> str:
    """What a failed expectation saw: the error, the missing column, or offending values."""
    config = result.expectation_config
    info = result.exception_info or {}
    res = dict(result.result or {})
    if info.get("raised_exception"):
        details = f"error: {info.get('exception_message')}"
    elif config.type == "expect_column_to_exist":
        details = "column missing"
    elif res.get("unexpected_count"):
        n = res["unexpected_count"]
        indices = res.get("partial_unexpected_index_list") or []
        if suite.describe_row is not None and indices:
            rows = [suite.describe_row(suite.df.loc[i]) for i in indices[:MAX_EXAMPLES]]
            details = f"{n} unexpected: " + "; ".join(rows)
        else:
            examples = _examples(res.get("partial_unexpected_list") or [])
            details = f"{n} unexpected values, e.g. {examples}"
    elif res.get("partial_missing_list"):
        details = f"missing {_examples(res['partial_missing_list'])}"
    elif "observed_value" in res:
        details = f"observed {_examples([res['observed_value']])[1:-1]}"
    else:
        details = "failed"
    return details


def _run(suites: list[_Suite], site_dir: Path | None) -> ValidationReport:
    """Validate every suite on its table in one ephemeral context; build docs if asked."""
    gx = _import_gx()
    context = _context(gx, site_dir)
    source = context.data_sources.add_pandas("bonedamage")
    run_id = gx.RunIdentifier(run_name="bonedamage-validate", run_time=datetime.now(UTC))
    failures: list[Failure] = []
    outcomes: list[SuiteOutcome] = []
    n_expectations = 0
    for suite in suites:
        batch = source.add_dataframe_asset(suite.name).add_batch_definition_whole_dataframe("all")
        gx_suite = context.suites.add(gx.ExpectationSuite(name=suite.name))
        for expectation in suite.expectations:
            gx_suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite.name, data=batch, suite=gx_suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=suite.name,
                validation_definitions=[definition],
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20},
            )
        )
        df = suite.df.reset_index(drop=True)
        suite.df = df
        result = checkpoint.run(batch_parameters={"dataframe": df}, run_id=run_id)
        done = SuiteOutcome(suite.name, len(df), [])
        for validation in result.run_results.values():
            for item in validation.results:
                n_expectations += 1
                done.outcomes.append(_outcome(suite, item))
                if not item.success:
                    failures.append(_failure(suite, item))
        outcomes.append(done)
    docs_index = None
    if site_dir is not None:
        context.build_data_docs()
        docs_index = site_dir / "index.html"
    return ValidationReport(not failures, failures, n_expectations, docs_index, outcomes)


def validate_tables(
    manifest: pd.DataFrame,
    tiles: pd.DataFrame,
    splits: pd.DataFrame,
    cfg: dict,
    docs_dir: Path | None = None,
    *,
    inputs: Sequence[Path] = (),
    force: bool = False,
) -> ValidationReport:
    """Validate the manifest, tile index and splits; build Data Docs and the offline
    summary (:data:`SUMMARY_NAME`) in ``docs_dir`` if given.

    ``cfg`` is the ``validate`` section of params.yaml (``max_class_imbalance``,
    ``min_tiles_per_class``). A failing validation is reported, not raised: the caller
    decides (the CLI exits non-zero with :meth:`ValidationReport.summary`). ``docs_dir``
    is replaced as a whole: it must be new, empty or earlier Data Docs (else ``force``),
    and never one of ``inputs`` (the files the tables came from), inside or around one.
    """
    if docs_dir is not None:  # before the seconds great-expectations takes to import
        check_output_dir(docs_dir, owner="validate", inputs=inputs, force=force)
    _import_gx()
    suites = _build_suites(manifest, tiles, splits, cfg)
    if docs_dir is None:
        return _run(suites, None)
    docs_dir = Path(docs_dir)
    with atomic_dir(docs_dir, owner="validate", inputs=inputs, force=force) as tmp:
        report = _run(suites, tmp.resolve())  # GX needs an absolute site folder
        (tmp / SUMMARY_NAME).write_text(report.markdown(), encoding="utf-8", newline="\n")
    return replace(report, docs_index=docs_dir / "index.html")
