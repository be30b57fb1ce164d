"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

from segany_pet.model import Preset

# A tiny 3D SAM with the published naming scheme: 32^3 crop at 6 mm (192 mm), 4^3 tokens, 16^3 low-res logits.
TINY = Preset(name="tiny", crop_size=32, spacing_mm=6.0, normalisation="log_suv", patch_size=8,
              encoder_dim=32, encoder_depth=2, encoder_heads=2, global_attn_indexes=(), window_size=0,
              prompt_dim=48, decoder_mlp_dim=64, iou_head_hidden=32)

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
