"""Active learning through a live server: cross-prompt scoring in the background, then the strategies serve
the most disputed unlabeled scans and the most suspicious labels, each to one annotator at a time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from segany_pet.pet import save_nifti
from support import running_server, small_scan, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]

SCANS, LABELED = 4, 2


@pytest.fixture(scope="module")
def datastore(tmp_path_factory) -> Path:
    """Four small phantoms; scans 0 and 1 labeled through the server below, scan 1's label missing a lesion."""
    folder = tmp_path_factory.mktemp("active_datastore")
    labels = folder.parent / f"{folder.name}_labels"
    labels.mkdir()
    for index in range(SCANS):
        volume, lesions, _ = small_scan(index + 2, "fdg" if index % 2 == 0 else "psma")
        save_nifti(volume.suv, volume.affine, folder / f"scan{index}.nii.gz")
        if index < LABELED:
            label = (lesions > 0).astype(np.uint8)
            if index == 1:
                label[lesions == lesions.max()] = 0
            save_nifti(label, volume.affine, labels / f"scan{index}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def server(datastore, tmp_path_factory) -> str:
    """Auto-reloading (MONAI Label's default): the scoring subprocess writes the scores into the datastore."""
    log_dir = tmp_path_factory.mktemp("active_server")
    with running_server(datastore, [("lease_minutes", 10)], log_dir, auto_reload=True) as url:
        client = MONAILabelClient(url)
        for index in range(LABELED):
            label = datastore.parent / f"{datastore.name}_labels" / f"scan{index}.nii.gz"
            client.save_label(f"scan{index}", str(label), params={"quality": "low" if index == 1 else "high"})
        yield url


def scoring_done(server) -> dict | None:
    job = requests.get(f"{server}/scoring/", timeout=10).json()
    return job if job["status"] not in ("SUBMITTED", "RUNNING") else None


def infos(server) -> dict:
    objects = MONAILabelClient(server).datastore()["objects"]
    return {image: record["image"]["info"] for image, record in objects.items()}


def test_bad_scoring_requests_get_a_4xx_before_any_job(server):
    for params, words in (({"images": "scan0"}, "images must be a list"),
                          ({"images": ["scan9"]}, "not in the datastore: scan9"),
                          ({"threads": 0}, "threads must be a positive integer"),
                          ({"quick": True}, "unknown scoring option(s) quick")):
        response = requests.post(f"{server}/scoring/cross_prompt", json=params, timeout=30)
        assert response.status_code == 422, response.text
        assert words in response.json()["detail"]


def test_scoring_then_strategies_serve_disputed_scans_and_suspicious_labels(server):
    response = requests.post(f"{server}/scoring/cross_prompt", json={}, timeout=30)
    assert response.status_code == 200, response.text
    assert requests.get(f"{server}/info/", timeout=10).status_code == 200  # the server answers meanwhile
    job = wait_for(lambda: scoring_done(server), what="the scoring job")
    assert job["status"] == "DONE", job
    assert any("cross_prompt: 4/4 scans (4 scored" in line for line in job.get("details", [])), job["details"][-5:]
    progress = MONAILabelClient(server).info()["scoring"]["cross_prompt"]["progress"]
    assert (progress["state"], progress["scored"], progress["failed"]) == ("finished", SCANS, 0)

    scores = wait_for(lambda: (lambda i: i if all("cross_prompt_key" in v for v in i.values()) else None)(
        infos(server)), timeout=30, what="the server to see the scores")
    print({image: (info["cross_prompt_disagreement"], info.get("label_noise_score")) for image, info in scores.items()})
    unlabeled = sorted((f"scan{i}" for i in range(LABELED, SCANS)),
                       key=lambda image: scores[image]["cross_prompt_disagreement"], reverse=True)

    def next_sample(strategy, client_id):
        return MONAILabelClient(server, client_id=client_id).next_sample(strategy, {})

    first, second = next_sample("disagreement", "ann"), next_sample("disagreement", "bob")
    assert [first["id"], second["id"]] == unlabeled  # the most disputed first, never the same to two clients
    assert first["lease"]["client_id"] == "ann" and first["path"].endswith(f"{first['id']}.nii.gz")
    assert "cross_prompt_worst" in first and first["ranked_by"] == "cross_prompt_disagreement"
    assert next_sample("disagreement", "carl") == {}  # both leased for 10 minutes
    anonymous = requests.post(f"{server}/activelearning/disagreement", json={}, timeout=30)
    assert anonymous.status_code == 200 and anonymous.json() == {}

    labeled = sorted((f"scan{i}" for i in range(LABELED)), key=lambda image: scores[image]["label_noise_score"],
                     reverse=True)
    review = next_sample("label_review", "dora")
    assert review["id"] == labeled[0] and review["label_noise_score"] == scores[labeled[0]]["label_noise_score"]
    assert review["ranked_by"] == "label_noise_score"
    # Both unlabeled scans are leased: the diverse strategy has nothing left either.
    assert next_sample("disagreement_diverse", "erin") == {}

    again = requests.post(f"{server}/scoring/cross_prompt", json={}, timeout=30)
    assert again.status_code == 200
    job = wait_for(lambda: scoring_done(server), what="the second scoring job")
    assert any("(0 scored, 4 unchanged" in line for line in job.get("details", [])), job["details"][-5:]


def test_a_stopped_scoring_job_leaves_the_datastore_readable(server, datastore):
    response = requests.post(f"{server}/scoring/cross_prompt", json={"force": True}, timeout=30)
    assert response.status_code == 200, response.text
    time.sleep(3)
    requests.delete(f"{server}/scoring/", timeout=60)
    wait_for(lambda: scoring_done(server), timeout=60, what="the job to stop")
    objects = json.loads((datastore / "datastore_v2.json").read_text())["objects"]
    assert len(objects) == SCANS
    assert requests.get(f"{server}/info/", timeout=10).status_code == 200
