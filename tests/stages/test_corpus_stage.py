"""The corpus stage (stages/corpus.py): phantoms of other specimens than the dataset's,
generated and tiled the same way every time, written atomically."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bonedamage.atomic import OutputError
from bonedamage.config import ConfigError
from bonedamage.data.corpus import RAW_DIR, TILES_DIR
from bonedamage.data.manifest import read_manifest
from bonedamage.stages.corpus import run_corpus
from conftest import write_params


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its relative path, with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus_params(learn_params: dict[str, Any], tmp_path_factory) -> tuple[Path, dict]:
    """The learning tests' params, a corpus of other shapes than the dataset's scans."""
    pretrain = copy.deepcopy(learn_params["pretrain"])
    pretrain["corpus"]["shape"]["cortical"] = [24, 48, 48]
    tmp = tmp_path_factory.mktemp("corpus")
    params = {**learn_params, "pretrain": pretrain}
    return write_params(tmp / "params.yaml", params), params


@pytest.fixture(scope="module")
def corpus(corpus_params: tuple[Path, dict]) -> Path:
    path, _ = corpus_params
    out = path.parent / "corpus"
    assert run_corpus(path, out=out, workers=1, progress=False) == 0
    return out


def test_the_corpus_is_the_same_every_time_whatever_the_workers(
    corpus: Path, corpus_params: tuple[Path, dict]
) -> None:
    path, _ = corpus_params
    again = path.parent / "again"
    assert run_corpus(path, out=again, workers=2, progress=False) == 0
    first, second = tree(corpus), tree(again)
    assert f"{TILES_DIR}/index.parquet" in first and f"{RAW_DIR}/manifest.csv" in first
    tiffs = [name for name in first if name.endswith(".tif")]
    assert len(tiffs) == 2 * 2 * 2 * 2  # tissues x specimens x load steps x (image, labels)
    assert first.keys() == second.keys()
    assert [n for n in first if first[n] != second[n]] == []  # byte for byte


def test_the_corpus_holds_other_specimens_than_the_dataset(
    corpus: Path, corpus_params: tuple[Path, dict], learn_data: tuple[Path, Path]
) -> None:
    """The dataset: generate_dataset's default indices, of the same synth params."""
    manifest = read_manifest(corpus / RAW_DIR)
    ids = sorted(set(manifest["specimen_id"]))
    assert ids == ["cortical-101", "cortical-102", "trabecular-101", "trabecular-102"]
    dataset = read_manifest(learn_data[0].parent / "raw")
    assert len(set(dataset["specimen_id"])) == 6  # 3 a tissue
    assert not set(ids) & set(dataset["specimen_id"])
    assert not set(manifest["sha256"]) & set(dataset["sha256"])
    shapes = manifest.groupby("tissue")["shape"].unique().to_dict()
    assert list(shapes["cortical"]) == ["24x48x48"]  # the corpus' shapes, not synth's
    trabecular = "x".join(
        str(v) for v in corpus_params[1]["pretrain"]["corpus"]["shape"]["trabecular"]
    )
    assert list(shapes["trabecular"]) == [trabecular]
    index = pd.read_parquet(corpus / TILES_DIR / "index.parquet")
    assert len(index) and set(index["specimen_id"]) == set(ids)
    assert set(index["scan_id"]) == set(manifest["scan_id"])  # every scan is a class


def test_a_folder_the_corpus_did_not_write_is_kept_unless_forced(
    corpus_params: tuple[Path, dict], tmp_path: Path
) -> None:
    path, _ = corpus_params
    out = tmp_path / "corpus"
    (out / "tiles").mkdir(parents=True)
    (out / "notes.txt").write_text("mine\n")
    (out / "tiles" / "index.parquet").write_bytes(b"not the corpus'")
    before = tree(out)
    with pytest.raises(OutputError, match=r"bonedamage corpus` replaces its output folder"):
        run_corpus(path, out=out, workers=1, progress=False)
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]  # no staging folder left
    assert run_corpus(path, out=out, workers=1, progress=False, force=True) == 0
    assert not (out / "notes.txt").exists()
    assert (out / TILES_DIR / "index.parquet").read_bytes() != b"not the corpus'"
    assert run_corpus(path, out=out, workers=1, progress=False) == 0  # its own: replaced


def test_a_corpus_of_the_datasets_specimens_is_refused_before_writing(
    corpus_params: tuple[Path, dict], tmp_path: Path
) -> None:
    _, params = corpus_params
    pretrain = copy.deepcopy(params["pretrain"])
    pretrain["corpus"]["first_specimen"] = params["synth"]["specimens_per_tissue"] - 1
    path = write_params(tmp_path / "params.yaml", params, pretrain=pretrain)
    with pytest.raises(ConfigError, match=r"pretrain\.corpus\.first_specimen 2: must be"):
        run_corpus(path, out=tmp_path / "corpus", progress=False)
    assert not (tmp_path / "corpus").exists()
