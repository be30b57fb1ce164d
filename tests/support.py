"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

# Files a careless export puts in a studies folder; each must get a 4xx, not a crash.
BAD_IMAGES = ("corrupt_file", "dynamic_4d", "nan_filled", "raw_bq_per_ml")


def case_truth(cohort: Path, case: str) -> tuple[dict, np.ndarray]:
    """A phantom case's JSON record and its lesion instance map."""
    info = json.loads((cohort / "truth" / f"{case}.json").read_text())
    lesions = np.asanyarray(nib.load(cohort / "truth" / f"{case}_lesions.nii.gz").dataobj)
    return info, lesions


def read_nrrd(content: bytes) -> tuple[dict, np.ndarray]:
    """Header and array (stored index order) of an NRRD reply body."""
    stream = io.BytesIO(content)
    header = nrrd.read_header(stream)
    return header, nrrd.read_data(header, stream, index_order="F")
