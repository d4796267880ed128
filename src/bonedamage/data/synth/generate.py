"""The ``synth`` stage: write the phantom dataset (scans, damage labels, manifest).

For each tissue and specimen: build the pristine structure once, draw the failure it
will have, then for every load step sample the (damaged) structure through that step's
mechanics and a fresh rigid pose, image it, and write the scan and its ground-truth
damage label volume (:mod:`bonedamage.data.labels`). Specimens are independent (each has
its own seed sequence), so the output bytes do not depend on the number of worker
processes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from bonedamage.atomic import atomic_dir, check_output_dir, write_text_atomic
from bonedamage.data.manifest import (
    COLUMNS,
    TISSUES,
    ManifestError,
    format_shape,
    read_manifest,
    write_manifest,
)
from bonedamage.data.synth import cortical, imaging, trabecular
from bonedamage.data.synth.fields import (
    AxialDeformation,
    Pose,
    sample,
    scan_to_specimen,
    specimen_to_scan,
)
from bonedamage.data.volume import write_volume

PHANTOMS_NAME = "phantoms.json"
_LATERAL_MARGIN = 16
_Z_MARGIN = 8


class SynthError(ValueError):
    """The synth configuration or output location is unusable."""


def state_of(step: float) -> str:
    return "pristine" if step <= 0 else "failed" if step >= 1 else "intermediate"


def severity_of(step: float, yield_step: float) -> float:
    """Damage severity in [0, 1] at a load step: none before yield, full at failure."""
    return float(np.clip((step - yield_step) / (1.0 - yield_step), 0.0, 1.0))


def generate_dataset(
    cfg: dict[str, Any],
    out_root: Path,
    *,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
    inputs: Iterable[Path] = (),
    tissues: Iterable[str] = TISSUES,
    first_index: int = 0,
) -> pd.DataFrame:
    """Generate every specimen of ``cfg`` (the ``synth`` params) into ``out_root``.

    ``tissues``: those to generate (a specimen's bytes do not depend on the others).
    ``first_index``: the generator index of the first specimen of each tissue (its seed
    and number): specimens ``first_index`` to ``first_index + specimens_per_tissue - 1``.

    ``out_root`` is replaced as a whole, atomically. It refuses to replace a data root
    holding ingested (real) scans or anything else synth did not write unless ``force``
    (:func:`~bonedamage.atomic.atomic_dir`), and one that is, lies inside or contains one
    of ``inputs`` (the params file) always.
    """
    _check_config(cfg)
    check_output_dir(out_root, owner="synth", inputs=inputs, force=True)  # inputs: always
    kept = [] if force else _ingested(out_root)  # the clearer refusal of the most common case
    if kept:
        raise SynthError(
            f"{out_root}: holds ingested scans {kept[:3]}; synth replaces the whole folder. "
            "Use another --out, or --force to discard them."
        )
    wanted = set(tissues)
    if not wanted or wanted - set(TISSUES):
        raise SynthError(f"tissues {sorted(wanted)}: choose among {list(TISSUES)}")
    jobs = [
        (tissue, index)
        for tissue in TISSUES
        if tissue in wanted
        for index in range(first_index, first_index + cfg["specimens_per_tissue"])
    ]
    workers = workers or int(cfg["workers"])
    with atomic_dir(out_root, owner="synth", inputs=inputs, force=force) as staging:
        results = _run(jobs, cfg, staging, workers, progress)
        rows = [row for result in results for row in result["rows"]]
        manifest = pd.DataFrame(rows, columns=list(COLUMNS))
        write_manifest(manifest, staging)
        phantoms = {r["specimen_id"]: r["meta"] for r in results}
        write_text_atomic(
            staging / PHANTOMS_NAME,
            json.dumps(phantoms, indent=1, sort_keys=True, default=_json_default) + "\n",
        )
    return read_manifest(out_root)


def _ingested(out_root: Path) -> list[str]:
    """Scan ids of the ingested (real) scans in the manifest of ``out_root``, if it has one."""
    if not out_root.is_dir():
        return []
    try:
        existing = read_manifest(out_root, missing_ok=True)
    except ManifestError:  # unreadable: the output guard refuses the folder without --force
        return []
    return existing.loc[existing["source"] != "synth", "scan_id"].tolist()


def _run(
    jobs: list[tuple[str, int]], cfg: dict[str, Any], staging: Path, workers: int, progress: bool
) -> list[dict[str, Any]]:
    bar = tqdm(total=len(jobs), desc="synth specimens", unit="specimen", disable=not progress)
    results: list[dict[str, Any]] = []
    try:
        if workers <= 1:
            for job in jobs:
                results.append(generate_specimen(cfg, *job, staging))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(generate_specimen, cfg, *job, staging) for job in jobs]
                for fut in futures:
                    results.append(fut.result())
                    bar.update()
    finally:
        bar.close()
    return results


def specimen_seed(cfg: dict[str, Any], tissue: str, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(cfg["seed"]), TISSUES.index(tissue), index])


def child_seed(parent: np.random.SeedSequence, index: int) -> np.random.SeedSequence:
    """The ``index``-th child of ``parent``, the same however often it is asked for
    (``SeedSequence.spawn`` counts its calls)."""
    return np.random.SeedSequence(parent.entropy, spawn_key=(*parent.spawn_key, index))


def generate_specimen(cfg: dict[str, Any], tissue: str, index: int, root: Path) -> dict[str, Any]:
    """Write all load steps of one specimen under ``root/<tissue>/``; return rows and metadata."""
    specimen_id = f"{tissue}-{index + 1:02d}"
    phantom = build_specimen(cfg, tissue, index)
    tcfg = cfg[tissue]
    voxel = float(tcfg["voxel_size_um"])
    shape = tuple(int(s) for s in tcfg["shape"])
    rows, scans_meta = [], []
    folder = root / tissue
    folder.mkdir(parents=True, exist_ok=True)
    for k, step in enumerate(cfg["load_steps"]):
        scan = render_scan(cfg, tissue, phantom, k)
        state = state_of(step)
        scan_id = f"{specimen_id}-{k}-{state}"
        path = folder / f"{scan_id}.tif"
        mask_path = folder / f"{scan_id}_labels.tif"
        digest = write_volume(path, iter(scan["image"]), shape, scan["image"].dtype, voxel)
        write_volume(mask_path, iter(scan["labels"]), shape, np.uint8, voxel, compression="zlib")
        rows.append(
            {
                "scan_id": scan_id,
                "specimen_id": specimen_id,
                "tissue": tissue,
                "species": tcfg["species"],
                "state": state,
                "load_step": k,
                "applied_strain": round(step * float(tcfg["applied_strain_at_failure"]), 6),
                "voxel_size_um": voxel,
                "path": f"{tissue}/{path.name}",
                "mask_path": f"{tissue}/{mask_path.name}",
                "shape": format_shape(shape),
                "dtype": str(scan["image"].dtype),
                "sha256": digest,
                "source": "synth",
            }
        )
        scans_meta.append({"scan_id": scan_id, **scan["meta"]})
    meta = {
        "tissue": tissue,
        "params": phantom["params"],
        "instrument": phantom["instrument"],
        "specimen_radius_vox": phantom["radius"],
        "failure": phantom["failure_meta"],
        "scans": scans_meta,
    }
    return {"specimen_id": specimen_id, "rows": rows, "meta": meta}


def reference_geometry(
    tcfg: dict[str, Any], max_compaction_vox: float
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Reference-grid shape and the grid index of the scan centre."""
    nz, ny, nx = (int(s) for s in tcfg["shape"])
    z_margin = _Z_MARGIN + int(math.ceil(max_compaction_vox / 2 + tcfg["elastic_strain"] * nz))
    shape = (nz + 2 * z_margin, ny + 2 * _LATERAL_MARGIN, nx + 2 * _LATERAL_MARGIN)
    origin = np.array(
        [
            z_margin + (nz - 1) / 2.0,
            _LATERAL_MARGIN + (ny - 1) / 2.0,
            _LATERAL_MARGIN + (nx - 1) / 2.0,
        ]
    )
    return shape, origin


def build_specimen(cfg: dict[str, Any], tissue: str, index: int) -> dict[str, Any]:
    """Pristine structure, instrument and failure of one specimen (deterministic)."""
    tcfg = cfg[tissue]
    voxel = float(tcfg["voxel_size_um"])
    nz = int(tcfg["shape"][0])
    seq = specimen_seed(cfg, tissue, index)
    seed_struct, seed_fail, seed_inst, s_scans = seq.spawn(4)
    s_struct, s_fail, s_inst = (
        np.random.default_rng(s) for s in (seed_struct, seed_fail, seed_inst)
    )
    if tissue == "trabecular":
        fcfg = tcfg["failure"]
        max_h = fcfg["band_height_frac"][1] * nz
        max_compaction = max_h / (1 - fcfg["band_strain"][1]) * fcfg["band_strain"][1]
        ref_shape, origin = reference_geometry(tcfg, max_compaction)
        params = trabecular.draw_params(s_struct, tcfg["structure"])
        spec = trabecular.build(s_struct, params, ref_shape, voxel)
        failure = trabecular.draw_failure(s_fail, fcfg, nz, voxel, ref_shape[1:])
        failure_meta = {k: v for k, v in failure.items() if k != "buckle"}
    else:
        ref_shape, origin = reference_geometry(tcfg, 0.0)
        params = cortical.draw_params(s_struct, tcfg["structure"])
        spec = cortical.build(s_struct, params, ref_shape, voxel)
        failure = cortical.draw_failure(s_fail, tcfg["failure"], spec, ref_shape, voxel)
        failure_meta = cortical.failure_meta(failure)
    radius_frac = float(s_inst.uniform(*tcfg["specimen_radius_frac"]))
    instrument = imaging.draw_instrument(s_inst, tcfg["imaging"])
    return {
        "tissue": tissue,
        "spec": spec,
        "params": spec.params,
        "failure": failure,
        "failure_meta": failure_meta,
        "instrument": instrument,
        "ref_shape": ref_shape,
        "origin": origin,
        "radius": radius_frac * (min(tcfg["shape"][1:]) - 1) / 2.0,
        "scan_seeds": [child_seed(s_scans, k) for k in range(len(cfg["load_steps"]))],
    }


def _elastic_strain(cfg: dict[str, Any], tcfg: dict[str, Any], step: float) -> float:
    """Elastic strain at a load step: rises to the tissue's value at the yield step."""
    if cfg["yield_step"] <= 0:
        return float(tcfg["elastic_strain"])
    return float(tcfg["elastic_strain"]) * min(step / cfg["yield_step"], 1.0)


def scan_truth(cfg: dict[str, Any], tissue: str, phantom: dict[str, Any], k: int) -> dict[str, Any]:
    """Ground truth of load step ``k`` in the scan frame, before imaging.

    ``bone`` is the (damaged) bone fraction per voxel, ``inside`` the specimen's
    partial-volume mask and ``labels`` the damage labels (:mod:`bonedamage.data.labels`)
    inside the specimen and the field of view. Cortical cracks are cut in the reference
    frame and sampled through the step's compression; trabecular bone follows the collapse
    band's compaction except its buckled rods, placed rigidly in the deformed specimen.
    """
    tcfg = cfg[tissue]
    step = float(cfg["load_steps"][k])
    shape = tuple(int(s) for s in tcfg["shape"])
    voxel = float(tcfg["voxel_size_um"])
    pose = Pose.random(
        np.random.default_rng(child_seed(phantom["scan_seeds"][k], 0)), **cfg["pose"]
    )
    severity = severity_of(step, cfg["yield_step"])
    elastic = _elastic_strain(cfg, tcfg, step)
    spec, origin = phantom["spec"], phantom["origin"]
    spec_coords = scan_to_specimen(shape, pose)
    meta: dict[str, Any] = {"severity": severity, "elastic_strain": elastic}
    if tissue == "trabecular":
        failure, fcfg = phantom["failure"], tcfg["failure"]
        deform = trabecular.deformation(failure, severity, elastic)
        mech = trabecular.strut_mechanics(spec, failure, fcfg, severity, origin, elastic)
        compacted = trabecular.collapse(spec, mech, deform, origin)
        moves = trabecular.strut_moves(spec, failure, fcfg, mech, deform, origin)
        ref = deform.apply(spec_coords)
        bone = sample(compacted, spec_coords, origin)
        moved, labels = trabecular.render_moves(
            spec,
            moves,
            spec_coords,
            lambda points: specimen_to_scan(points, shape, pose),
            origin,
            fcfg["fracture_surface_um"] / voxel,
        )
        bone = np.maximum(bone, moved)
        meta.update(
            buckled_struts=int(mech["buckled"].sum()),
            broken_struts=int(mech["broken"].sum()),
            band_z_scan=_band_rows(deform, shape, pose) if severity > 0 else None,
        )
    else:
        deform = AxialDeformation(elastic=elastic)
        occ, labels_ref, n_cracks = cortical.crack(spec.occupancy, phantom["failure"], severity)
        ref = deform.apply(spec_coords)
        bone = sample(occ, ref, origin)
        labels = sample(labels_ref, ref, origin, order=0)
        meta.update(n_damage_features=n_cracks)
    mineral = sample(spec.mineral, ref, origin)
    radial = np.hypot(spec_coords[1], spec_coords[2])
    inside = np.clip(phantom["radius"] - radial + 0.5, 0.0, 1.0).astype(np.float32)
    seen = (inside >= 0.5) & imaging.fov_mask(shape[1:])[None]
    labels = np.where(seen, labels, 0).astype(np.uint8)
    meta.update(
        pose=pose.as_dict(),
        damaged_voxels=int((labels > 0).sum()),
        bone_fraction_in_specimen=float(((bone >= 0.5) & seen).sum() / max(float(seen.sum()), 1.0)),
    )
    return {"bone": bone, "mineral": mineral, "inside": inside, "labels": labels, "meta": meta}


def _band_rows(deform: AxialDeformation, shape: tuple[int, ...], pose: Pose) -> list[int]:
    """Scan rows ``[z0, z1]`` of the collapse band (clipped to the scan)."""
    lo, hi = deform.band_deformed
    z = specimen_to_scan(np.array([[lo, 0.0, 0.0], [hi, 0.0, 0.0]]), shape, pose)[:, 0]
    return [int(max(np.ceil(z.min()), 0)), int(min(np.floor(z.max()), shape[0] - 1))]


def render_scan(
    cfg: dict[str, Any], tissue: str, phantom: dict[str, Any], k: int
) -> dict[str, Any]:
    """Image (in the configured dtype) and damage labels (uint8) of load step ``k``."""
    truth = scan_truth(cfg, tissue, phantom, k)
    noise_seed = child_seed(phantom["scan_seeds"][k], 1)
    icfg = cfg[tissue]["imaging"]
    mu = imaging.attenuation(truth["bone"], truth["mineral"], truth["inside"], icfg)
    img = imaging.acquire(mu, phantom["instrument"], icfg, np.random.default_rng(noise_seed))
    out = imaging.quantise(img, cfg["dtype"], tuple(icfg["window"]))
    return {"image": out, "labels": truth["labels"], "meta": truth["meta"]}


def _check_config(cfg: dict[str, Any]) -> None:
    steps = cfg["load_steps"]
    if not steps or sorted(steps) != list(steps) or steps[0] != 0.0 or steps[-1] != 1.0:
        raise SynthError(f"synth.load_steps={steps}: must rise from 0.0 (pristine) to 1.0 (failed)")
    if cfg["dtype"] not in ("uint8", "uint16", "float32"):
        raise SynthError(f"synth.dtype={cfg['dtype']!r}: use uint8, uint16 or float32")
    if int(cfg["specimens_per_tissue"]) < 1:
        raise SynthError("synth.specimens_per_tissue must be >= 1")
    for tissue in TISSUES:
        voxel = cfg[tissue]["voxel_size_um"]
        if not voxel > 0:
            raise SynthError(f"synth.{tissue}.voxel_size_um={voxel}: must be > 0")
        if len(cfg[tissue]["shape"]) != 3 or min(cfg[tissue]["shape"]) < 16:
            raise SynthError(f"synth.{tissue}.shape={cfg[tissue]['shape']}: need 3 sizes >= 16")


def _json_default(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        return [round(float(v), 6) for v in obj.ravel()]
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj)}")
