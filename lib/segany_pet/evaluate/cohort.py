"""The interactive benchmark over a whole folder of cases: what `segany-pet evaluate` and the default-model
script run.

A cohort folder holds ``images/<case>.nii.gz`` (SUV) and ground truth in ``truth/`` as `segany-pet phantom`
writes it (``<case>_lesions.nii.gz`` lesion instances, optionally ``<case>_organs.nii.gz`` and ``<case>.json``
with the phantom's record). Labels from elsewhere work too: ``truth/<case>.nii.gz`` (or ``--labels DIR``), a
lesion mask whose 26-connected components are the lesions. Which lesions touch a hot organ comes from the
record (``lesions[].touches``) or the organ map; without either, lesions are not grouped.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from segany_pet.errors import UserInputError
from segany_pet.evaluate.interactive import evaluate_autopet_iv, evaluate_baselines, evaluate_case, touches_from_organs
from segany_pet.evaluate.report import summarise
from segany_pet.pet import load_nifti
from segany_pet.pet.organs import ORGAN_NAMES
from segany_pet.pet.quantify import label_lesions
from segany_pet.predictor import Predictor

NIFTI = ".nii.gz"


def _case_id(path: Path) -> str:
    return path.name[: -len(NIFTI)]


def _truth_instances(truth_dir: Path, case_id: str, shape) -> np.ndarray:
    instances = truth_dir / f"{case_id}_lesions{NIFTI}"
    if instances.exists():
        truth = np.asarray(nib.load(instances).dataobj).astype(np.int32)
    else:
        mask = truth_dir / f"{case_id}{NIFTI}"
        if not mask.exists():
            raise UserInputError(f"case {case_id}: no {instances.name} or {mask.name} in {truth_dir}")
        truth, _ = label_lesions(np.asarray(nib.load(mask).dataobj) > 0)
    if truth.shape != tuple(shape):
        raise UserInputError(f"case {case_id}: truth of shape {truth.shape} is not on the image's grid {tuple(shape)}")
    return truth


def _touches(truth_dir: Path, case_id: str, truth: np.ndarray) -> dict | None:
    record = truth_dir / f"{case_id}.json"
    if record.exists():
        lesions = json.loads(record.read_text()).get("lesions")
        if lesions and all("touches" in lesion for lesion in lesions):
            return {int(lesion["id"]): lesion["touches"] for lesion in lesions}
    organs = truth_dir / f"{case_id}_organs{NIFTI}"
    if organs.exists():
        return touches_from_organs(truth, np.asarray(nib.load(organs).dataobj), ORGAN_NAMES)
    return None


def evaluate_cohort(
    model,
    images: str | Path,
    truth: str | Path,
    *,
    clicks: int = 5,
    baselines: bool = True,
    autopet: bool = True,
    edge: str | None = None,
) -> tuple[dict, dict]:
    """(summary, details) of the interactive protocol, the classical baselines from the same first clicks and
    (optionally) the autoPET IV protocol on every case in ``images`` with a positive ``truth``.

    Cases without any lesion are skipped (their per-lesion Dice is undefined; autoPET IV needs a lesion too).
    """
    images, truth = Path(images), Path(truth)
    paths = sorted(images.glob(f"*{NIFTI}"))
    if not paths:
        raise UserInputError(f"no {NIFTI} images in {images}")
    predictor = Predictor(model, cache_size=64)
    model_cases, baseline_rows, autopet_cases, skipped = [], [], [], []
    for path in tqdm(paths, desc="evaluate", unit="case"):
        case_id = _case_id(path)
        volume = load_nifti(path)
        instances = _truth_instances(truth, case_id, volume.shape)
        if not instances.any():
            skipped.append(case_id)
            continue
        touches = _touches(truth, case_id, instances)
        model_cases.append(evaluate_case(predictor, volume, instances, clicks, touches=touches, volume_id=case_id,
                                         edge=edge))
        if baselines:
            baseline_rows += evaluate_baselines(volume, instances, touches=touches, case_id=case_id)
        if autopet:
            autopet_cases.append(evaluate_autopet_iv(predictor, volume, instances, volume_id=case_id, edge=edge))
        predictor.clear_cache()
    if not model_cases:
        raise UserInputError(f"none of the {len(paths)} cases in {images} has a lesion in {truth}")
    summary = summarise(model_cases, baseline_rows, autopet_cases)
    summary["skipped_without_lesions"] = skipped
    return summary, {"cases": model_cases, "baselines": baseline_rows, "autopet_iv": autopet_cases}
