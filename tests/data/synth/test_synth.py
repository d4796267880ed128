"""The phantom generator (data/synth/generate.py): files, determinism, masks, honesty."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bonedamage.atomic import MARKER, OutputError
from bonedamage.data import morphometry
from bonedamage.data.manifest import COLUMNS, read_manifest
from bonedamage.data.synth import generate
from bonedamage.data.synth.generate import SynthError, generate_dataset
from bonedamage.data.tiling import tiles_in_fov
from bonedamage.data.volume import open_volume, sha256_file
from conftest import REPO, small_synth


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def load(root: Path, rel: str) -> np.ndarray:
    with open_volume(root / rel) as vol:
        return np.stack(list(vol.iter_slices()))


# -- files and manifest -------------------------------------------------------------------
def test_manifest_describes_every_written_scan(small_dataset: Path) -> None:
    manifest = read_manifest(small_dataset)
    assert list(manifest.columns) == list(COLUMNS)
    assert len(manifest) == 2 * 3  # two specimens, three load steps
    for row in manifest.itertuples(index=False):
        path = small_dataset / row.path
        assert sha256_file(path) == row.sha256
        with open_volume(path) as vol:
            assert "x".join(map(str, vol.shape)) == row.shape
            assert str(vol.dtype) == row.dtype == "uint16"
            assert vol.voxel_size_um == pytest.approx(row.voxel_size_um)
        with open_volume(small_dataset / row.mask_path) as mask:
            assert mask.shape == vol.shape and mask.dtype == np.uint8
        assert row.source == "synth" and row.species == "bovine"
    states = manifest.groupby("specimen_id")["state"].apply(list).to_dict()
    assert all(s == ["pristine", "intermediate", "failed"] for s in states.values())
    failed = manifest[manifest.state == "failed"]
    assert (failed.applied_strain > 0).all()
    assert (manifest[manifest.state == "pristine"].applied_strain == 0).all()
    assert json.loads((small_dataset / generate.PHANTOMS_NAME).read_text()).keys() == set(
        manifest.specimen_id
    )


def test_same_params_and_seed_give_identical_bytes_whatever_the_workers(
    params: dict, tmp_path: Path
) -> None:
    cfg = small_synth(params)
    generate_dataset(cfg, tmp_path / "a", workers=1, progress=False)
    generate_dataset(cfg, tmp_path / "b", workers=2, progress=False)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert a == b and len(a) == 2 * 2 * 2 + 2 + 1  # scans, masks, manifest, phantoms, marker
    generate_dataset({**cfg, "seed": cfg["seed"] + 1}, tmp_path / "c", progress=False)
    c = tree_digest(tmp_path / "c")
    assert c["manifest.csv"] != a["manifest.csv"]
    # one tissue alone: the same bytes for its scans, nothing of the other
    generate_dataset(cfg, tmp_path / "d", progress=False, tissues=["trabecular"])
    d = tree_digest(tmp_path / "d")
    scans = {k: v for k, v in d.items() if k.endswith(".tif")}
    assert scans and all(k.startswith("trabecular") and a[k] == v for k, v in scans.items())
    assert set(read_manifest(tmp_path / "d").tissue) == {"trabecular"}
    with pytest.raises(SynthError, match="tissues"):
        generate_dataset(cfg, tmp_path / "e", progress=False, tissues=["femur"])


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_optional_output_dtypes(params: dict, tmp_path: Path, dtype: str) -> None:
    cfg = small_synth(params, dtype=dtype, load_steps=[0.0, 1.0])
    manifest = generate_dataset(cfg, tmp_path / "raw", progress=False)
    assert set(manifest.dtype) == {dtype}
    img = load(tmp_path / "raw", manifest.path.iloc[0])
    assert img.dtype == np.dtype(dtype) and np.isfinite(img).all() and img.std() > 0


# -- imaging model and honesty -------------------------------------------------------------
def test_field_of_view_is_a_disc_and_specimen_sits_inside(small_dataset: Path) -> None:
    manifest = read_manifest(small_dataset)
    img = load(small_dataset, manifest.path.iloc[0])
    yy, xx = np.meshgrid(np.arange(64) - 31.5, np.arange(64) - 31.5, indexing="ij")
    radius = np.hypot(yy, xx)
    outside = img[:, radius > 31.5]
    assert np.unique(outside).size == 1  # one fill value outside the reconstruction
    inside = img[:, radius < 25]
    assert (inside.std(axis=1) > 0).all() and (inside != outside.flat[0]).mean() > 0.99


def test_pristine_and_failed_scans_of_a_specimen_differ_by_a_rigid_pose(
    small_dataset: Path,
) -> None:
    meta = json.loads((small_dataset / generate.PHANTOMS_NAME).read_text())
    assert len(meta) == 2  # one specimen per tissue: the loop below checks both
    for specimen in meta.values():
        poses = [scan["pose"] for scan in specimen["scans"]]
        assert len(poses) == 3  # pristine, intermediate, failed
        assert poses[0] != poses[-1]
        assert all(abs(s) <= 3.0 for p in poses for s in p["shift_vox"])


def tile_features(root: Path, row: pd.Series, tile: int = 64, stride: int = 8) -> list[list[float]]:
    with open_volume(root / row.path) as vol:
        origins = tiles_in_fov(vol.shape[1:], tile, 0.8)
        feats = []
        for z in range(stride // 2, vol.shape[0], stride):
            sl = vol.slice(z).astype(np.float32)
            for y, x in origins:
                t = sl[y : y + tile, x : x + tile]
                feats.append([t.mean(), t.std(), *np.percentile(t, [5, 25, 50, 75, 95])])
    return feats


@pytest.mark.slow
@pytest.mark.parametrize("tissue", ["cortical", "trabecular"])
def test_global_intensity_statistics_do_not_reveal_the_state(
    default_dataset: Path, tissue: str
) -> None:
    """A histogram classifier on held-out specimens stays far from separating the states.

    Cracks add dark voxels, so the histogram shifts somewhat (as in real failed bone);
    the pristine porosity varies more than that shift, so it cannot decide alone."""
    manifest = read_manifest(default_dataset)
    X, y, groups = [], [], []
    for _, row in manifest[manifest.tissue == tissue].iterrows():
        feats = tile_features(default_dataset, row)
        X += feats
        y += [row.state == "failed"] * len(feats)
        groups += [row.specimen_id] * len(feats)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_score(clf, np.array(X), np.array(y), groups=groups, cv=GroupKFold(4))
    print(f"{tissue}: histogram baseline accuracy per held-out fold {scores.round(3)}")
    assert scores.mean() <= 0.80


# -- damage labels -------------------------------------------------------------------------
@pytest.mark.parametrize("tissue", ["cortical", "trabecular"])
def test_labels_on_disk_are_the_damage_of_the_truth_on_bone_only(
    params: dict, small_dataset: Path, tissue: str
) -> None:
    cfg = small_synth(params, load_steps=[0.0, 0.9, 1.0])
    phantom = generate.build_specimen(cfg, tissue, 0)
    manifest = read_manifest(small_dataset)
    rows = manifest[manifest.tissue == tissue].sort_values("load_step")
    # the loop below meets both branches: a pristine scan and two damaged ones
    assert list(rows.state) == ["pristine", "intermediate", "failed"]
    for k, row in enumerate(rows.itertuples(index=False)):
        truth = generate.scan_truth(cfg, tissue, phantom, k)
        labels = load(small_dataset, row.mask_path)
        assert labels.dtype == np.uint8
        assert np.array_equal(labels, truth["labels"])
        if row.state == "pristine":
            assert not labels.any()
            continue
        assert labels.any()
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
        assert not (labels[truth["inside"] < 0.5]).any()  # inside the specimen only
        if tissue == "trabecular":  # buckled and broken bone: damaged voxels are bone
            assert (truth["bone"][labels > 0] >= 0.5).mean() > 0.95
            assert set(np.unique(labels)) <= {0, 2, 3}


def test_damage_accumulates_with_load_step(small_dataset: Path) -> None:
    manifest = read_manifest(small_dataset)
    meta = json.loads((small_dataset / generate.PHANTOMS_NAME).read_text())
    assert manifest.specimen_id.nunique() == 2  # the loop below runs for both specimens
    for specimen, rows in manifest.groupby("specimen_id"):
        counts = [
            int((load(small_dataset, r) > 0).sum()) for r in rows.sort_values("load_step").mask_path
        ]
        assert counts[0] == 0 < counts[1] and counts[2] > 0
        scans = meta[specimen]["scans"]
        keys = ("buckled_struts", "broken_struts", "n_damage_features")
        for key in (k for k in keys if k in scans[0]):
            features = [scan[key] for scan in scans]
            assert features == sorted(features) and features[-1] > 0, key


def test_cortical_cracks_are_dark_thin_and_oblique(small_dataset: Path) -> None:
    manifest = read_manifest(small_dataset)
    row = manifest[(manifest.tissue == "cortical") & (manifest.state == "failed")].iloc[0]
    img = load(small_dataset, row.path).astype(np.float32)
    mask = load(small_dataset, row.mask_path).astype(bool)
    bone = img > np.percentile(img[img > 0], 50)  # the bright matrix
    assert img[mask].mean() < img[bone & ~mask].mean() - 0.2 * img[bone].std() * 10
    # thin: a few um across (distance to the crack faces), far longer than wide
    half_width = ndimage.distance_transform_edt(mask)[mask] * row.voxel_size_um
    assert np.percentile(half_width, 95) <= 3.5
    assert np.ptp(np.argwhere(mask), axis=0).max() * row.voxel_size_um > 30


def test_trabecular_damage_is_confined_to_the_collapse_band(params: dict, tmp_path: Path) -> None:
    # the default band spans the whole field of view; a narrow one shows the confinement
    cfg = small_synth(params, load_steps=[0.0, 1.0])
    cfg["trabecular"]["failure"]["band_height_frac"] = [0.4, 0.5]
    cfg["trabecular"]["shape"] = [80, 96, 96]  # a band taller than a strut, struts in view
    cfg["cortical"]["shape"] = [16, 16, 16]
    generate_dataset(cfg, tmp_path / "raw", progress=False)
    manifest = read_manifest(tmp_path / "raw")
    row = manifest[(manifest.tissue == "trabecular") & (manifest.state == "failed")].iloc[0]
    mask = load(tmp_path / "raw", row.mask_path)
    per_slice = mask.reshape(mask.shape[0], -1).mean(1)
    meta = json.loads((tmp_path / "raw" / generate.PHANTOMS_NAME).read_text())
    fail = meta[row.specimen_id]["failure"]
    mid, half = (
        (fail["b0"] + fail["b1"]) / 2,
        (fail["b1"] - fail["b0"]) / 2 * (1 - fail["band_strain"]),
    )
    z = np.arange(mask.shape[0]) - (mask.shape[0] - 1) / 2
    outside = (z < mid - half - 4) | (z > mid + half + 4)  # 4 voxels: pose shift and tilt
    assert outside.sum() >= 8
    assert per_slice[outside].sum() == 0
    assert per_slice[~outside].sum() > 0


# -- configuration errors -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"load_steps": [0.5, 1.0]}, "load_steps"),
        ({"load_steps": [0.0, 0.3]}, "load_steps"),
        ({"dtype": "int32"}, "dtype"),
        ({"specimens_per_tissue": 0}, "specimens_per_tissue"),
    ],
)
def test_bad_synth_config_is_refused(params: dict, tmp_path: Path, override, message) -> None:
    with pytest.raises(SynthError, match=message):
        generate_dataset(small_synth(params, **override), tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw").exists()


def test_synth_refuses_to_replace_ingested_scans(
    params: dict, small_dataset: Path, tmp_path
) -> None:
    root = tmp_path / "raw"
    shutil.copytree(small_dataset, root)
    manifest = (root / "manifest.csv").read_text().replace(",synth\n", ",ingest\n", 1)
    (root / "manifest.csv").write_text(manifest)
    before = tree_digest(root)
    with pytest.raises(SynthError, match="ingested"):
        generate_dataset(small_synth(params), root, progress=False)
    assert tree_digest(root) == before


def test_synth_replaces_only_its_own_data_root(params: dict, tmp_path: Path) -> None:
    root = tmp_path / "raw"
    root.mkdir()
    (root / "scan-from-the-beamline.tif").write_bytes(b"II*\x00 irreplaceable")
    before = tree_digest(root)
    with pytest.raises(OutputError, match=r"holds files that bonedamage did not write.*--force"):
        generate_dataset(small_synth(params), root, progress=False)
    assert tree_digest(root) == before and not list(tmp_path.glob(".*"))
    generate_dataset(small_synth(params), root, progress=False, force=True)
    assert not (root / "scan-from-the-beamline.tif").exists()
    first = tree_digest(root)
    generate_dataset(small_synth(params), root, progress=False)  # its own: replaced
    assert tree_digest(root) == first and MARKER in first
    (root / "cortical" / "notes.txt").write_text("added later")
    with pytest.raises(OutputError, match=r"did not write: cortical/notes\.txt"):
        generate_dataset(small_synth(params), root, progress=False)


@pytest.mark.parametrize("where", ["params-folder", "the-params-file"])
def test_synth_never_writes_over_its_params_even_with_force(
    where: str, params: dict, tmp_path: Path, capsys
) -> None:
    """`synth --out .` (or any folder holding the params) would have replaced it whole."""
    import yaml

    from bonedamage.cli import main

    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(dict(params, synth=small_synth(params))))
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path if where == "params-folder" else pfile
    before = tree_digest(tmp_path)
    for force in ((), ("--force",)):
        code = main(["synth", "--params", str(pfile), "--out", str(out), "--no-progress", *force])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: {out}: output folder "), err
        assert "input" in err
        assert tree_digest(tmp_path) == before


# -- the default dataset -------------------------------------------------------------------
@pytest.mark.slow
def test_default_synth_reproduces_the_version_in_data_dvc(default_dataset: Path, tmp_path) -> None:
    """`bonedamage synth` with the committed params rebuilds exactly what data.dvc records."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    shutil.copytree(default_dataset, repo / "data" / "raw")
    shutil.copy(REPO / "data.dvc", repo / "data.dvc")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=repo, check=True)
    shutil.copy(REPO / ".dvcignore", repo / ".dvcignore")  # as in the repo: no output marker
    assert (repo / "data" / "raw" / MARKER).is_file()

    def recorded_after_commit() -> str:
        """Hash the folder into DVC's cache, as run-pipeline.sh does; return data.dvc."""
        subprocess.run([*dvc, "commit", "--force", "-q", "data.dvc"], cwd=repo, check=True)
        return (repo / "data.dvc").read_text()

    committed = (REPO / "data.dvc").read_text()
    assert recorded_after_commit() == committed
    assert subprocess.run([*dvc, "status", "--quiet", "data.dvc"], cwd=repo).returncode == 0
    # and the check can fail: one changed byte is a different data version
    victim = next((repo / "data" / "raw" / "cortical").glob("*_labels.tif"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert subprocess.run([*dvc, "status", "--quiet", "data.dvc"], cwd=repo).returncode == 1
    assert recorded_after_commit() != committed


def test_central_box_fits_in_the_specimen() -> None:
    box = morphometry.central_box((20, 100, 100), 40.0)
    ys, xs = box[1], box[2]
    corner = np.hypot(ys.start - 49.5, xs.start - 49.5)
    assert corner <= 40.0 + 1
