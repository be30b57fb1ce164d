"""Finding DICOM series in folders: every folder with DICOM Part 10 files directly in it is one series, named by
its path under the folder searched (``patient01/PET_WB`` -> ``patient01__PET_WB``). Shared by the local
datastore's DICOM import (`segany_pet.label.dicom_studies`) and cohort curation (`segany_pet.curate.sources`)."""

from __future__ import annotations

import os
from pathlib import Path

ID_SEPARATOR = "__"
DICOM_PREAMBLE = 128  # bytes before the "DICM" prefix of a DICOM Part 10 file
SKIPPED_FOLDERS = {"labels", "logs"}  # MONAI Label's own folders inside a local datastore


def is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            file.seek(DICOM_PREAMBLE)
            return file.read(4) == b"DICM"
    except OSError:
        return False


def series_folders(studies: Path) -> list[Path]:
    """Folders under ``studies`` holding DICOM files directly (hidden folders and MONAI Label's own skipped)."""
    found = []
    for folder, subfolders, files in os.walk(studies):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in SKIPPED_FOLDERS)
        if Path(folder) != studies and any(is_dicom_file(Path(folder) / name) for name in files):
            found.append(Path(folder))
    return found


def series_id(folder: Path, studies: Path) -> str:
    return ID_SEPARATOR.join(folder.relative_to(studies).parts)
