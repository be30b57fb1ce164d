"""Shared fixtures: a small synthetic cohort with deliberately bad files, and a real server on it."""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads of one process starve the others (pytest, the server subprocess) on
# 2 cores: measured 15-20x slower model calls under contention. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segany_pet.model import build_model, save_checkpoint
from segany_pet.phantom import write_cohort
from support import LARGE_SCAN, running_server


def _write_bad_images(folder: Path) -> None:
    (folder / "corrupt_file.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file" + bytes(range(256)))
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    dynamic = np.ones((16, 16, 16, 3), dtype=np.float32)
    nib.save(nib.Nifti1Image(dynamic, affine), folder / "dynamic_4d.nii.gz")
    nan_filled = np.full((16, 16, 16), np.nan, dtype=np.float32)
    nib.save(nib.Nifti1Image(nan_filled, affine), folder / "nan_filled.nii.gz")
    raw = np.full((16, 16, 16), 12000.0, dtype=np.float32)
    nib.save(nib.Nifti1Image(raw, affine), folder / "raw_bq_per_ml.nii.gz")


def _write_large_scan(folder: Path) -> None:
    """A scan on the autoPET grid (400 x 400 x 326 at 2.036 x 2.036 x 3 mm): one hot 20 mm sphere at its centre."""
    shape = (400, 400, 326)
    suv = np.ones(shape, dtype=np.float32)
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    suv[((i - 200) * 2.036) ** 2 + ((j - 200) * 2.036) ** 2 + ((k - 163) * 3.0) ** 2 < 20.0**2] = 8.0
    nib.save(nib.Nifti1Image(suv, np.diag([-2.036, -2.036, 3.0, 1.0])), folder / f"{LARGE_SCAN}.nii.gz")


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """Three FDG and PSMA 4 mm phantoms (ground truth in truth/), the bad files and an autoPET-sized scan in
    images/."""
    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root, 3, tracer="mixed", grid="4mm", seed=7, progress=False)
    _write_bad_images(root / "images")
    _write_large_scan(root / "images")
    return root


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """A small-preset 3D SAM with random weights: exercises the serving path, not segmentation quality."""
    torch.manual_seed(0)
    return save_checkpoint(build_model("segany_pet_small"), tmp_path_factory.mktemp("model") / "random_small.pt")


@pytest.fixture(scope="session")
def server(cohort, random_checkpoint, tmp_path_factory) -> str:
    """A real MONAI Label server subprocess on 127.0.0.1 serving the cohort; yields its URL."""
    with running_server(cohort / "images", [("model", random_checkpoint)], tmp_path_factory.mktemp("server")) as url:
        yield url
