"""Synthetic whole-body PET cases and cohorts: anatomy + tracer uptake + lesions + scanner.

A case is fully determined by (seed, tracer, grid, negative). Independent random streams feed the
anatomy, the uptake, the lesions, the scanner and the noise, so the body and its lesions do not
change with the grid and a tracer swap keeps the same body.

Cohort layout (``write_cohort``)::

    out_dir/images/<case>.nii.gz          SUV, float32 (the folder a MONAI Label server serves)
    out_dir/truth/<case>_lesions.nii.gz   lesion instances, int16 (0 background, lesion n = n)
    out_dir/truth/<case>_organs.nii.gz    organ labels, uint8 (see ORGAN_NAMES)
    out_dir/truth/<case>.json             the case's info plus organ_names
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from segany_pet.pet import save_nifti
from segany_pet.phantom.anatomy import (
    ORGAN_NAMES,
    TRACERS,
    Grid,
    build_anatomy,
    draw_uptake,
    organ_core,
    uptake_image,
)
from segany_pet.phantom.lesions import describe_lesions, draw_lesion_plans, place_lesions
from segany_pet.phantom.scanner import add_noise, blur, draw_scanner

# Share of cases without disease when not forced. autoPET's FDG cohort is about half negative;
# PSMA scans are mostly staging or restaging with a known or suspected recurrence (our estimate).
NEGATIVE_SHARE = {"fdg": 0.5, "psma": 0.25}
COHORT_TRACERS = (*TRACERS, "mixed")


@dataclass
class PhantomCase:
    suv: np.ndarray  # float32, stored order (i, j, k)
    affine: np.ndarray  # 4x4 voxel -> world mm, RAS+
    lesions: np.ndarray  # int16 instance map
    organs: np.ndarray  # uint8 label map
    organ_names: dict[int, str]
    info: dict  # JSON-serialisable description (see generate_case)


def _streams(seed: int) -> list[np.random.SeedSequence]:
    """Independent streams: anatomy, uptake, lesion plan, scanner, noise, negative, lesion shapes."""
    return np.random.SeedSequence(int(seed)).spawn(7)


def draws_negative(seed: int, tracer: str) -> bool:
    """Whether ``generate_case(seed, tracer)`` makes a disease-free case when not told."""
    return bool(np.random.default_rng(_streams(seed)[5]).random() < NEGATIVE_SHARE[tracer])


def generate_case(seed: int, tracer: str = "fdg", grid: str = "4mm", negative: bool | None = None) -> PhantomCase:
    """One synthetic whole-body PET study.

    ``negative=None`` draws it from the seed (NEGATIVE_SHARE per tracer). ``info`` holds tracer,
    seed, grid, spacing, shape, negative, the organ SUVs and scanner settings that were drawn,
    the liver noise measured, and per lesion: id, centre_voxel, centre_mm, volume_ml, suvmax and
    suvmean (measured in the final image), necrotic, site, touches (a hot organ it borders or
    null) and placed_against (the organ group it was deliberately put against, or null).
    """
    if tracer not in TRACERS:
        raise ValueError(f"unknown tracer {tracer!r}; choose one of {list(TRACERS)}")
    the_grid = Grid.named(grid)
    streams = _streams(seed)
    anatomy_rng, uptake_rng, plan_rng, scanner_rng, noise_rng = (np.random.default_rng(s) for s in streams[:5])
    if negative is None:
        negative = draws_negative(seed, tracer)

    anatomy = build_anatomy(the_grid, anatomy_rng)
    uptake = draw_uptake(tracer, uptake_rng)
    suv = uptake_image(anatomy, uptake)
    scanner = draw_scanner(tracer, scanner_rng)
    plans = [] if negative else draw_lesion_plans(tracer, plan_rng, streams[6])
    lesions, placed = place_lesions(anatomy, suv, plans, tracer, scanner.fwhm_mm)
    image = add_noise(
        blur(suv, the_grid.spacing, scanner.fwhm_mm), the_grid.spacing, scanner, uptake["liver"], noise_rng
    )
    del suv

    liver_cov = measure_liver_cov(image, anatomy.labels, lesions, the_grid.spacing)

    info = {
        "tracer": tracer,
        "seed": int(seed),
        "grid": grid,
        "spacing": [float(s) for s in the_grid.spacing],
        "shape": [int(n) for n in the_grid.shape],
        "negative": bool(negative),
        "organ_suv": uptake,
        "scanner": scanner.to_dict(),
        "liver_cov": round(liver_cov, 4),
        "body": anatomy.params,
        "lesions": describe_lesions(lesions, image, anatomy, placed),
    }
    return PhantomCase(image, the_grid.affine, lesions, anatomy.labels, dict(ORGAN_NAMES), info)


def measure_liver_cov(image: np.ndarray, organs: np.ndarray, lesions: np.ndarray, spacing) -> float:
    """Coefficient of variation of the image in the liver, 10 mm inside its edge and away from lesions."""
    liver = organ_core(organs, spacing, "liver", margin_mm=10.0)
    box = ndimage.find_objects(liver.astype(np.uint8))
    if not box or box[0] is None:
        return float("nan")
    box = tuple(slice(max(s.start - 3, 0), s.stop + 3) for s in box[0])
    keep = liver[box] & ~ndimage.binary_dilation(lesions[box] > 0, iterations=3)
    values = image[box][keep].astype(np.float64)
    return float(values.std() / values.mean()) if values.size else float("nan")


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` in a cohort drawn with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def cohort_tracer(tracer: str, seed: int, index: int) -> str:
    """The tracer of case ``index``; a "mixed" cohort draws FDG or PSMA per case."""
    if tracer != "mixed":
        return tracer
    coin = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 1])).random()
    return "fdg" if coin < 0.5 else "psma"


def write_cohort(
    out_dir: str | os.PathLike,
    n_cases: int,
    tracer: str = "fdg",
    grid: str = "4mm",
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """Write ``n_cases`` phantom studies (layout in the module docstring); returns the case ids.

    Case ``index`` is named ``<tracer>_<index:04d>`` and seeded by ``case_seed(seed, index)``,
    so a larger cohort with the same seed extends a smaller one.
    """
    if tracer not in COHORT_TRACERS:
        raise ValueError(f"unknown cohort tracer {tracer!r}; choose one of {list(COHORT_TRACERS)}")
    Grid.named(grid)  # fail before writing anything
    images = os.path.join(out_dir, "images")
    truth = os.path.join(out_dir, "truth")
    os.makedirs(images, exist_ok=True)
    os.makedirs(truth, exist_ok=True)
    case_ids = []
    for index in tqdm(range(n_cases), desc="phantom cohort", unit="case", disable=not progress):
        case_tracer = cohort_tracer(tracer, seed, index)
        case_id = f"{case_tracer}_{index:04d}"
        case = generate_case(case_seed(seed, index), case_tracer, grid)
        save_nifti(case.suv, case.affine, os.path.join(images, f"{case_id}.nii.gz"))
        save_nifti(case.lesions, case.affine, os.path.join(truth, f"{case_id}_lesions.nii.gz"))
        save_nifti(case.organs, case.affine, os.path.join(truth, f"{case_id}_organs.nii.gz"))
        record = {"case_id": case_id, **case.info, "organ_names": {str(k): v for k, v in case.organ_names.items()}}
        with open(os.path.join(truth, f"{case_id}.json"), "w") as f:
            json.dump(record, f, indent=1)
        case_ids.append(case_id)
    return case_ids
