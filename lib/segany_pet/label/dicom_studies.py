"""DICOM PET series as studies of the local datastore: each series converted to SUV once, then served as NIfTI.

A studies folder may hold folders of DICOM PET series, at any depth, beside NIfTI images. Every folder with
DICOM files directly in it is one series. `import_dicom_series` converts each with the QIBA rules
(`segany_pet.pet.read_pet_series`) and adds the result to the datastore as ``<id>.nii.gz``, where the id is the
folder's path under the studies folder with ``__`` between its parts (``patient01/PET_WB`` ->
``patient01__PET_WB``), and the conversion record (factor, header inputs, warnings, series UIDs) in the image's
info. Raw Bq/mL never reaches a model.

Converted once: ``.segany_pet/dicom_import.json`` records per folder the stamp of its files (count, newest
modification) and the outcome; a series is converted again only when its files change. A series that cannot be
converted (no decay correction, a missing slice, not PET, ...) is listed there with the reason and logged; it is
never half-added (the NIfTI is written aside, then added in one datastore transaction).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from segany_pet.errors import UserInputError
from segany_pet.jsonfile import read_json, write_json
from segany_pet.label.datastore import PETDatastore
from segany_pet.pet import read_pet_series, save_nifti
from segany_pet.pet.dicom_files import series_folders, series_id

logger = logging.getLogger(__name__)

REPORT = "dicom_import.json"


def folder_stamp(folder: Path) -> str:
    """What changes when a series' files change: their count and newest modification time."""
    stats = [entry.stat() for entry in os.scandir(folder) if entry.is_file()]
    return f"{len(stats)}:{max((s.st_mtime_ns for s in stats), default=0)}"


def import_dicom_series(datastore, studies: str | os.PathLike, state_dir: str | os.PathLike,
                        on_progress: Callable[[dict], None] | None = None) -> dict:
    """Convert every new or changed DICOM PET series under ``studies`` and add it to ``datastore`` (a
    PETDatastore of that folder). Returns the report: ``{folder: {"id", "stamp", "status", ...}}``."""
    studies, state_dir = Path(studies), Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    report_path = state_dir / REPORT
    with FileLock(str(report_path) + ".lock"):  # one converting process at a time (server, jobs, a second server)
        report = read_json(report_path, {})
        folders = series_folders(studies)
        for done, folder in enumerate(folders, start=1):
            key = str(folder.relative_to(studies))
            image_id, stamp = series_id(folder, studies), folder_stamp(folder)
            previous = report.get(key, {})
            if previous.get("stamp") == stamp and (previous.get("status") == "error"
                                                   or datastore.get_image_uri(image_id)):
                continue
            report[key] = _convert(datastore, folder, image_id, stamp)
            write_json(report_path, report)
            if on_progress is not None:
                on_progress({"done": done, "total": len(folders), "folder": key, **report[key]})
    return report


def _convert(datastore, folder: Path, image_id: str, stamp: str) -> dict:
    record = {"id": image_id, "stamp": stamp}
    try:
        volume = read_pet_series(folder)
    except UserInputError as exc:
        logger.warning("DICOM series %s not added: %s", folder, exc)
        return {**record, "status": "error", "message": str(exc)}
    add_converted_series(datastore, image_id, volume, {"source": "dicom", "dicom_folder": str(folder)})
    logger.info("DICOM series %s added as %s (SUV factor %.6g)", folder, image_id, volume.meta["suv_factor"])
    return {**record, "status": "converted", "series_uid": volume.meta["series"]["SeriesInstanceUID"],
            "suv_factor": volume.meta["suv_factor"], "warnings": volume.meta["warnings"]}


def add_converted_series(datastore, image_id: str, volume, info: dict) -> None:
    """Add a series converted to SUV as ``<image_id>.nii.gz`` with its conversion record in the image's info,
    in one datastore transaction (written aside first: never half-added); its warnings go to the log."""
    record = {**info, **{key: volume.meta[key] for key in ("series", "suv_norm", "suv_factor", "suv_conversion",
                                                            "warnings")}}
    with tempfile.TemporaryDirectory() as scratch:
        converted = Path(scratch) / f"{image_id}.nii.gz"
        save_nifti(volume.suv, volume.affine, converted)
        PETDatastore.add_image(datastore, image_id, str(converted), record)
    for warning in volume.meta["warnings"]:
        logger.warning("series %s (%s): %s", image_id, info.get("source"), warning)


def summary(state_dir: str | os.PathLike) -> dict:
    """For /info: counts of converted and refused series, and why each refused one was."""
    report = read_json(Path(state_dir) / REPORT, {})
    errors = {folder: record["message"] for folder, record in report.items() if record.get("status") == "error"}
    return {"converted": sum(record.get("status") == "converted" for record in report.values()),
            "refused": errors}
