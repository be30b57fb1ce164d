"""Import the cases of several sources into one datastore: standardised, checked, tiered, never half-added.

Each case is read, converted to SUV where needed, checked and standardised in a worker process (`prepare_case`):
SUV float32 and a uint8 label of target values (`sources.TARGETS`) on the same grid, both turned to RAS
orientation, plus the QC numbers the report draws from. The main process adds finished cases in source
order, so which of two duplicates is kept never depends on worker timing.

Standing rules:
- A case that fails a check is not imported; the reason goes to ``problems.json`` (and the report). An empty
  label is a negative scan: imported with its (empty) label and a warning.
- Nothing half-imported: files are staged under ``.segany_pet/curate/staging``, then moved into the datastore
  in one datastore transaction, announced beforehand in ``journal.json``; a run that was killed mid-move is
  undone by the next one, which then imports those cases again.
- Re-running is idempotent: a case whose input files did not change since it was imported (same fingerprint:
  paths, sizes, modification times) is skipped without being read; a changed one is imported again.
- Duplicates (the same SUV content, or the same DICOM series UID, under another id) are skipped and reported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import repeat
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from segany_pet.curate.sources import NIFTI_ENDINGS, TARGETS, Case, Source, find_cases
from segany_pet.errors import UserInputError
from segany_pet.jsonfile import read_json, write_json
from segany_pet.pet import PETVolume, load_nifti, save_nifti
from segany_pet.pet.dicom_series import read_dicom_seg

log = logging.getLogger(__name__)

STATE = Path(".segany_pet") / "curate"  # under the datastore
QC_DIR, STAGING_DIR, JOURNAL, PROBLEMS = "qc", "staging", "journal.json", "problems.json"
LABEL_TAG = "final"

# Checks
MIN_WHOLE_BODY_SUV_MAX = 1.0  # a whole-body SUV image peaks far above this (brain, bladder, kidneys, lesions)
MAX_FOREGROUND_SHARE = 0.5  # a label covering more of the volume than this is a mask of the body, not targets
GRID_TOLERANCE_MM = 0.01
# QC numbers: SUV histogram bins (log-spaced, fixed so sources add up) over voxels above BODY_SUV.
BODY_SUV = 0.1
SUV_BINS = np.geomspace(BODY_SUV, 1000.0, 61)
COMMIT_EVERY_SECONDS = 5.0
COMMIT_EVERY_CASES = 50


class CurationProblem(UserInputError):
    """A case that cannot be imported as it is; the message says why and what to fix."""


# ----------------------------------------------------------------------------------------------
# The worker: one case


def prepare_case(case: Case, staging: Path) -> dict:
    """Read, convert, check and standardise one case into ``staging/<id>/``; never raises.

    Returns ``{"id", "source", "case", "status": "ready" | "error", "reason"?, "warnings", "image_info",
    "label_info", "content_hash", "series_uid"}``; the QC numbers are in ``staging/<id>/qc.json``.
    """
    started = time.perf_counter()
    result = {"id": case.id, "source": case.source.name, "case": case.name, "warnings": []}
    folder = staging / case.id
    try:
        volume, conversion = read_case_image(case)
        check_whole_body_suv(volume)
        suv, affine = reorient_to_ras(volume.suv, volume.affine)
        volume = dataclasses.replace(volume, suv=suv, affine=affine)
        label = read_case_label(case, volume) if case.label else None
        if label is not None and not label.any():
            result["warnings"].append("empty label: imported as a negative scan (no target)")
        result["warnings"] += volume.meta.get("warnings", [])
        folder.mkdir(parents=True, exist_ok=True)
        save_nifti(volume.suv, volume.affine, folder / "image.nii.gz")
        if label is not None:
            save_nifti(label, volume.affine, folder / "label.nii.gz")
        qc = case_qc(case, volume, label)
        (folder / "qc.json").write_text(json.dumps(qc))
        content_hash = content_digest(volume)
    except UserInputError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        return {**result, "status": "error", "reason": str(exc)}
    except Exception as exc:  # a damaged file can fail anywhere in a reader: report it, keep importing others
        shutil.rmtree(folder, ignore_errors=True)
        log.exception("case %s of %s", case.name, case.source.name)
        return {**result, "status": "error", "reason": f"unexpected {type(exc).__name__}: {exc}"}
    label_status = "unlabeled" if label is None else ("labeled" if label.any() else "negative")
    series_uid = (volume.meta.get("series") or {}).get("SeriesInstanceUID") or None
    provenance = {
        "source": case.source.name, "case": case.name, "layout": case.source.layout,
        "image_path": str(case.image), "label_path": str(case.label) if case.label else None,
        "note": case.source.note, "fingerprint": case.fingerprint(), "content_hash": content_hash,
        "conversion": conversion, "label_status": label_status, "series_uid": series_uid,
        "seconds": round(time.perf_counter() - started, 2),
    }
    image_info = {"tracer": case.source.tracer_of(case.name), "curation": provenance}
    label_info = None
    if label is not None:
        label_info = {"quality": case.source.tier, "source": case.source.name,
                      "targets": {name: TARGETS[name] for name in qc["targets"]}}
    return {**result, "status": "ready", "image_info": image_info, "label_info": label_info,
            "content_hash": content_hash, "series_uid": series_uid}


def read_case_image(case: Case) -> tuple[PETVolume, dict]:
    """The case's SUV volume (stored order) and how it was converted."""
    if case.kind == "dicom":
        from segany_pet.pet import read_pet_series

        volume = read_pet_series(case.image)
        conversion = {"from": "DICOM (QIBA rules)", "suv_factor": volume.meta["suv_factor"],
                      "suv_norm": volume.meta["suv_norm"], "inputs": volume.meta["suv_conversion"],
                      "series": volume.meta["series"]}
        return volume, conversion
    if case.kind == "bqml":
        return bqml_to_suv(case)
    return load_nifti(case.image), {"from": "SUV NIfTI"}


def bqml_to_suv(case: Case) -> tuple[PETVolume, dict]:
    """SUVbw of a Bq/mL NIfTI from its metadata row: Bq/mL x weight (g) / dose decayed to the scan start."""
    inputs = case.suv_inputs
    if not inputs:
        raise CurationProblem(f"{case.image.name} holds Bq/mL and the source's metadata CSV has no row for study "
                              f"{case.name!r}: add one (weight_kg, dose_bq, injection_to_scan_s) or give SUV.nii.gz")
    if min(inputs["weight_kg"], inputs["dose_bq"], inputs["half_life_s"]) <= 0 or inputs["injection_to_scan_s"] < 0:
        raise CurationProblem(f"study {case.name}: metadata row {inputs} has a non-positive weight, dose or half-life "
                              "or a negative injection-to-scan time")
    try:
        image = nib.load(case.image)
        activity = np.asarray(image.dataobj, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise CurationProblem(f"{case.image}: cannot be read as NIfTI ({exc})") from exc
    decayed_dose = inputs["dose_bq"] * 2.0 ** (-inputs["injection_to_scan_s"] / inputs["half_life_s"])
    factor = inputs["weight_kg"] * 1000.0 / decayed_dose
    suv = np.squeeze(activity * factor).astype(np.float32)
    if suv.ndim != 3:
        raise CurationProblem(f"{case.image}: expected a 3D volume, got shape {activity.shape}")
    if not np.isfinite(suv).all():
        raise CurationProblem(f"{case.image}: holds NaN or infinite values; re-export it")
    return (PETVolume(suv=suv, affine=np.asarray(image.affine, dtype=float), meta={"source": str(case.image)}),
            {"from": "Bq/mL NIfTI + metadata CSV (SUVbw)", "suv_factor": factor, "inputs": inputs})


def check_whole_body_suv(volume: PETVolume) -> None:
    peak = float(volume.suv.max())
    if peak < MIN_WHOLE_BODY_SUV_MAX:
        raise CurationProblem(f"SUV peaks at {peak:.3g}: implausibly low for a whole-body PET (brain, kidneys, "
                              "bladder and lesions reach several SUV); is the image rescaled or normalised?")


def read_case_label(case: Case, volume: PETVolume) -> np.ndarray:
    """The case's label on the (RAS) image's grid, its values mapped to the target vocabulary (uint8).

    Label and image are compared in RAS orientation: a label stored with other axis directions than its image
    (a DICOM series read head first, its label written feet first) still covers the same voxels.
    """
    if not case.label.name.endswith(NIFTI_ENDINGS):  # a DICOM-SEG, placed on the image's grid by its geometry
        data, affine = read_dicom_seg(case.label, volume), volume.affine
    else:
        try:
            image = nib.load(case.label)
            data = np.asanyarray(image.dataobj)
        except Exception as exc:  # nibabel raises many types for damaged files
            raise CurationProblem(f"label {case.label}: cannot be read as NIfTI ({exc})") from exc
        data = np.squeeze(data) if data.ndim > 3 else data
        if data.ndim != 3:
            raise CurationProblem(f"label {case.label.name}: expected a 3D label map, got shape {tuple(data.shape)}")
        data, affine = reorient_to_ras(data, np.asarray(image.affine, dtype=float))
    if data.shape != volume.shape:
        raise CurationProblem(f"label {case.label.name}: grid mismatch, shape {tuple(data.shape)} against the "
                              f"image's {volume.shape}; export the label on the PET grid")
    offset = np.abs(affine - volume.affine).max()
    if offset > GRID_TOLERANCE_MM:
        raise CurationProblem(f"label {case.label.name}: grid mismatch, its affine differs from the image's by up "
                              f"to {offset:.3g} mm; export the label on the PET grid")
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            raise CurationProblem(f"label {case.label.name}: holds non-integer values (a probability map?); give "
                                  "a label map of integer values")
        data = data.astype(np.int32)
    elif data.dtype.kind not in "ui":
        raise CurationProblem(f"label {case.label.name}: data type {data.dtype} is not a label map's")
    if data.min() < 0:
        raise CurationProblem(f"label {case.label.name}: holds negative values; give a label map of values >= 0")
    values = set(np.flatnonzero(np.bincount(data.ravel(order="K"))).tolist()) - {0}  # no sort of the volume
    unmapped = sorted(values - set(case.source.targets))
    if unmapped:
        raise CurationProblem(f"label {case.label.name}: values {unmapped} are not in the source's targets "
                              f"{dict(case.source.targets)}; map them (targets: {{value: name}}) or fix the label")
    share = float(np.count_nonzero(data)) / data.size
    if share > MAX_FOREGROUND_SHARE:
        raise CurationProblem(f"label {case.label.name}: {share:.0%} of the volume is foreground: a body mask or "
                              "an inverted label, not targets")
    lookup = np.zeros(max(values, default=0) + 1, dtype=np.uint8)
    for value, target in case.source.targets.items():
        if value < lookup.size:
            lookup[value] = TARGETS[target]
    return lookup[data]


def reorient_to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The array with its axes reordered and flipped to RAS+, and its affine (same world positions)."""
    orientation = nib.orientations.io_orientation(affine)
    if np.array_equal(orientation, [[0, 1], [1, 1], [2, 1]]):
        return array, affine
    # Fortran order, NIfTI's: writing the file is then a copy, not a transposition (3x faster, autoPET size).
    reoriented = np.asfortranarray(nib.orientations.apply_orientation(array, orientation))
    return reoriented, affine @ nib.orientations.inv_ornt_aff(orientation, array.shape)


def content_digest(volume: PETVolume) -> str:
    """The same scan from two sources (or twice in one) hashes the same: SUV values and grid."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(volume.shape, dtype=np.int64).tobytes())
    digest.update(np.round(volume.affine, 3).astype(np.float64).tobytes())
    digest.update(np.asfortranarray(volume.suv, dtype=np.float32).T)  # the transpose: C-contiguous, no copy
    return digest.hexdigest()


def case_qc(case: Case, volume: PETVolume, label: np.ndarray | None) -> dict:
    """The numbers the QC report aggregates: grid, SUV distribution, targets and their volumes.

    Computed on C-ordered views of the (Fortran-ordered) arrays: none of the numbers depends on the order, and
    numpy and scipy walk C order fastest."""
    suv = volume.suv.T if volume.suv.flags.f_contiguous else volume.suv
    label = None if label is None else (label.T if label.flags.f_contiguous else label)
    body = suv[suv > BODY_SUV]
    voxel_ml = volume.voxel_volume_ml
    qc = {
        "id": case.id, "source": case.source.name, "tracer": case.source.tracer_of(case.name),
        "tier": case.source.tier if label is not None else None,
        "shape": list(volume.shape), "spacing": [round(s, 4) for s in volume.spacing], "voxels": int(suv.size),
        "suv_max": round(float(suv.max()), 3), "suv_body_mean": round(float(body.mean()), 3) if body.size else 0.0,
        "suv_histogram": np.histogram(np.log10(np.clip(body, SUV_BINS[0], SUV_BINS[-1])), len(SUV_BINS) - 1,
                                      range=(np.log10(SUV_BINS[0]), np.log10(SUV_BINS[-1])))[0].tolist(),
        "label": None if label is None else ("labeled" if label.any() else "negative"),
        "targets": {}, "lesion_volumes_ml": [],
    }
    if label is not None and label.any():
        counts = np.bincount(label.reshape(-1), minlength=max(TARGETS.values()) + 1)
        qc["targets"] = {name: round(float(counts[value]) * voxel_ml, 3) for name, value in TARGETS.items()
                         if counts[value]}
        components, found = ndimage.label(label == TARGETS["lesion"], structure=np.ones((3, 3, 3)))
        if found:
            sizes = np.bincount(components.reshape(-1))[1:]
            qc["lesion_volumes_ml"] = [round(float(n) * voxel_ml, 4) for n in sizes]
    return qc


# ----------------------------------------------------------------------------------------------
# The main process: plan, run, commit


@dataclasses.dataclass
class CurationRun:
    """What one run did; ``problems`` are this run's (the report reads every run's from problems.json)."""

    sources: list[str]
    cases: int = 0
    imported: list[str] = dataclasses.field(default_factory=list)
    unchanged: int = 0
    problems: list[dict] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    recovered: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "imported": len(self.imported),
                "errors": sum(p["severity"] == "error" for p in self.problems),
                "warnings": sum(p["severity"] == "warning" for p in self.problems)}


def curate(sources: list[Source], datastore, workers: int | None = None,
           on_progress: Callable[[int, int], None] | None = None) -> CurationRun:
    """Import every new or changed case of ``sources`` into ``datastore`` (a PETDatastore); see the module
    docstring. ``on_progress(done, total)`` after each case read."""
    started = time.perf_counter()
    state = Path(datastore.folder) / STATE
    (state / QC_DIR).mkdir(parents=True, exist_ok=True)
    run = CurationRun(sources=[source.name for source in sources])
    run.recovered = recover_interrupted(datastore, state)
    shutil.rmtree(state / STAGING_DIR, ignore_errors=True)  # a killed run's leftovers: never moved, never listed
    cases = [case for source in sources for case in find_cases(source)]
    run.cases = len(cases)
    clashing = sorted(image_id for image_id, n in Counter(case.id for case in cases).items() if n > 1)
    if clashing:
        raise UserInputError(f"several cases map to the datastore id(s) {', '.join(clashing[:5])} (ids keep only "
                             "letters, digits, '.', '-' and '_'): rename those cases")
    existing = _curated(datastore)
    todo = []
    for case in cases:
        previous = existing.get(case.id)
        if previous and previous.get("fingerprint") == case.fingerprint():
            run.unchanged += 1
        else:
            todo.append(case)
    seen = {}  # content hash or series UID -> id, for duplicates
    for image_id, provenance in existing.items():
        for key in (provenance.get("content_hash"), provenance.get("series_uid")):
            if key:
                seen[key] = image_id
    problems = read_json(state / PROBLEMS, {})
    ids, names = {case.id for case in cases}, set(run.sources)
    problems = {image_id: entries for image_id, entries in problems.items()  # cases gone from their source
                if image_id in ids or entries[0]["source"] not in names}
    pending: list[dict] = []
    last_commit = time.monotonic()

    def commit() -> None:
        nonlocal pending, last_commit
        if pending:
            _commit(datastore, state, pending)
            run.imported += [result["id"] for result in pending]
        write_json(state / PROBLEMS, problems)
        pending, last_commit = [], time.monotonic()

    try:
        for done, result in enumerate(_prepared(todo, state / STAGING_DIR, workers), start=1):
            problems.pop(result["id"], None)
            found = []
            if result["status"] == "ready":
                twin = next((seen[k] for k in (result["content_hash"], result["series_uid"])
                             if k and seen.get(k) not in (None, result["id"])), None)
                if twin is not None:
                    found.append(("error", f"duplicate of {twin} (same SUV content or DICOM series): skipped"))
                    shutil.rmtree(state / STAGING_DIR / result["id"], ignore_errors=True)
                else:
                    for key in (result["content_hash"], result["series_uid"]):
                        if key:
                            seen[key] = result["id"]
                    pending.append(result)
                found += [("warning", text) for text in result["warnings"]]
            else:
                found.append(("error", result["reason"]))
            case = todo[done - 1]
            entries = [{"id": result["id"], "source": result["source"], "case": result["case"],
                        "path": str(case.image), "severity": severity, "reason": reason} for severity, reason in found]
            if entries:
                problems[result["id"]] = entries
                run.problems += entries
            if on_progress is not None:
                on_progress(done, len(todo))
            if len(pending) >= COMMIT_EVERY_CASES or time.monotonic() - last_commit > COMMIT_EVERY_SECONDS:
                commit()
    finally:
        commit()
        shutil.rmtree(state / STAGING_DIR, ignore_errors=True)
    run.seconds = round(time.perf_counter() - started, 2)
    return run


def _prepared(cases: list[Case], staging: Path, workers: int | None) -> Iterator[dict]:
    """`prepare_case` of each case, in the cases' order; over worker processes unless ``workers`` is 1."""
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(cases) < 2:
        for case in cases:
            yield prepare_case(case, staging)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(cases))) as pool:
        done = 0
        try:
            for result in pool.map(prepare_case, cases, repeat(staging)):
                done += 1
                yield result
        except BrokenProcessPool as exc:
            raise CurationProblem(
                f"a worker process died while reading case {cases[done].name} of {cases[done].source.name} (out of "
                "memory?); the cases before it are imported: run again to continue, with fewer --workers if memory "
                "is short") from exc


def _curated(datastore) -> dict[str, dict]:
    """Provenance of every curated image in the datastore, by id."""
    found = {}
    for image_id in datastore.list_images():
        info = datastore.get_image_info(image_id) or {}
        if isinstance(info.get("curation"), dict):
            found[image_id] = info["curation"]
    return found


def _commit(datastore, state: Path, results: list[dict]) -> None:
    """Move the staged files of ``results`` into the datastore and record them, in one transaction; announced in
    the journal first, so a kill in between is undone by `recover_interrupted`."""
    staging = state / STAGING_DIR
    journal = [result["id"] for result in results]
    write_json(state / JOURNAL, journal)
    entries = []
    for result in results:
        folder = staging / result["id"]
        label = folder / "label.nii.gz"
        entries.append((result["id"], folder / "image.nii.gz", result["image_info"],
                        label if label.exists() else None, result["label_info"]))
    datastore.add_images_with_labels(entries, LABEL_TAG)
    for result in results:
        os.replace(staging / result["id"] / "qc.json", state / QC_DIR / f"{result['id']}.json")
        shutil.rmtree(staging / result["id"], ignore_errors=True)
    (state / JOURNAL).unlink(missing_ok=True)


def recover_interrupted(datastore, state: Path) -> list[str]:
    """Undo the batch a killed run was moving in (its ids in the journal): files, records and QC; returns them.
    The cases are imported again by this run (their records are gone, so their fingerprints do not match)."""
    journal = read_json(state / JOURNAL, [])
    if journal:
        datastore.remove_images(journal)
        for image_id in journal:
            (state / QC_DIR / f"{image_id}.json").unlink(missing_ok=True)
        log.warning("undid %d cases a killed curation run left half-imported: %s", len(journal), ", ".join(journal))
    (state / JOURNAL).unlink(missing_ok=True)
    return journal
