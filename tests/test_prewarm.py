"""Warming a scan for its clicks (segany_pet.label.prewarm): where it expects clicks, and what it encodes."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from segany_pet.label.prewarm import Prewarmer, uptake_blobs, warm_up_plan
from segany_pet.model import PRESETS, build_model
from segany_pet.pet.volume import PETVolume, VolumeCache
from segany_pet.predictor import Predictor

SMALL = dataclasses.replace(PRESETS["segany_pet_small"], spacing_mm=3.0)


def lesions_in_noise(seed=0) -> tuple[PETVolume, list[np.ndarray]]:
    """A 4 mm body of noisy SUV ~1 with three lesions: hot and big, faint and small, mid."""
    rng = np.random.default_rng(seed)
    shape = (60, 50, 90)
    suv = rng.gamma(16.0, 1 / 16, size=shape).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    centres = [np.array(c) for c in ((15, 20, 20), (40, 30, 50), (30, 12, 75))]
    for centre, radius, uptake in zip(centres, (4.0, 2.0, 3.0), (8.0, 2.0, 4.0), strict=True):
        suv[np.linalg.norm(grid - centre, axis=-1) <= radius] += uptake
    return PETVolume(suv, np.diag([4.0, 4.0, 4.0, 1.0])), centres


def test_blobs_rank_every_lesion_before_the_noise_hot_lesion_first():
    volume, centres = lesions_in_noise()
    blobs = uptake_blobs(volume)
    nearest = [int(np.argmin(np.linalg.norm(blobs - centre, axis=1))) for centre in centres]
    distances = [np.linalg.norm(blobs[i] - centre) for i, centre in zip(nearest, centres, strict=True)]
    assert max(distances) <= 1, distances  # voxels of 4 mm
    assert nearest[0] == 0 and sorted(nearest) == [0, 1, 2]


def test_the_plan_holds_a_click_at_each_lesion_within_its_limit():
    volume, centres = lesions_in_noise()
    torch.manual_seed(0)
    session = Predictor(build_model(SMALL)).set_volume(volume, "lesions")
    plan = warm_up_plan(session, limit=200)
    for centre in centres:
        assert set(session.click_crops([centre.tolist()])) <= set(plan)
    assert len(plan) == len(set(plan))
    assert warm_up_plan(session, limit=3) == plan[:3]


def test_only_the_datastores_scans_are_warmed(tmp_path):
    studies = tmp_path / "studies"
    (studies / "nested").mkdir(parents=True)
    prewarmer = Prewarmer(served=None, volumes=VolumeCache(), scans_root=studies)
    assert prewarmer.serves(str(studies / "case.nii.gz")) and prewarmer.serves(str(studies / "nested" / "a.nii"))
    assert not prewarmer.serves(str(tmp_path / "upload.nii.gz"))
    assert not prewarmer.serves(str(studies / ".." / "upload.nii.gz"))
    prewarmer.scan_served(str(tmp_path / "upload.nii.gz"))  # an upload: nothing starts
    assert prewarmer.describe() == {"state": "idle"}
