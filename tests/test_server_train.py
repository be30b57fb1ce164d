"""Training through a live MONAI Label server: checked requests, progress, clean stop and resume, publishing.

The server trains in its own subprocess, as in production; the runs are a few steps of the small preset.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from monailabel.client import MONAILabelClient

from support import copy_phantoms, running_server, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]

MODEL = "segany_pet"
FEW_STEPS = {"epochs": 2, "iterations_per_epoch": 3, "batch_size": 1, "val_cases": 1, "clicks_per_sample": 2,
             "val_clicks": 1}


@pytest.fixture(scope="module")
def datastore(cohort, tmp_path_factory) -> Path:
    """The cohort's three phantoms, no labels yet."""
    folder = tmp_path_factory.mktemp("train_datastore")
    copy_phantoms(cohort, folder)
    return folder


@pytest.fixture(scope="module")
def train_server(datastore, random_checkpoint, tmp_path_factory) -> str:
    """Auto-reloading, as MONAI Label is by default: the training subprocess writes labels to the datastore."""
    log_dir = tmp_path_factory.mktemp("train_server")
    with running_server(datastore, [("model", random_checkpoint)], log_dir, auto_reload=True) as url:
        yield url


def start(server, params) -> requests.Response:
    return requests.post(f"{server}/train/{MODEL}", json=params, timeout=30)


def train_stats(server) -> dict:
    return MONAILabelClient(server).info()["train_stats"][MODEL]


def click(server, image, client_id) -> requests.Response:
    params = {"foreground": [[60, 60, 120]], "client_id": client_id}
    return requests.post(f"{server}/infer/{MODEL}", params={"image": image, "output": "json"},
                         data={"params": json.dumps(params)}, timeout=120)


def current_job(server) -> dict:
    return requests.get(f"{server}/train/", timeout=10).json()


def job_finished(server) -> dict | None:
    job = current_job(server)
    return job if job["status"] not in ("SUBMITTED", "RUNNING") else None


def test_requests_are_checked_before_a_job_starts(train_server):
    no_labels = start(train_server, FEW_STEPS)
    assert no_labels.status_code == 422 and "no labeled images" in no_labels.json()["detail"]
    for params, words in (({"epochs": "many"}, "epochs must be an integer"),
                          ({"epochs": 0}, "epochs must be at least 1"),
                          ({"hot_spot_share": 1.5}, "hot_spot_share must lie in [0, 1]"),
                          ({"learning_rate": 0.1}, "unknown training option(s) learning_rate"),
                          ({"init": "imagenet"}, "init must be one of")):
        response = start(train_server, params)
        assert response.status_code == 422, response.text
        assert words in response.json()["detail"]
    assert requests.get(f"{train_server}/info/", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def labelled(train_server, cohort, datastore) -> list[str]:
    """The datastore's images with lesion labels saved through the server: two expert, one noisy tier."""
    client = MONAILabelClient(train_server)
    images = sorted(p.name[: -len(".nii.gz")] for p in datastore.glob("*.nii.gz"))
    for index, image in enumerate(images):
        lesions = nib.load(cohort / "truth" / f"{image}_lesions.nii.gz")
        label = datastore.parent / f"{image}_label.nii.gz"
        nib.save(nib.Nifti1Image((np.asarray(lesions.dataobj) > 0).astype(np.uint8), lesions.affine), label)
        client.save_label(image, str(label), params={"quality": "low" if index == 2 else "high"})
    return images


def test_training_on_saved_labels_reports_progress_and_publishes_the_model(train_server, datastore, labelled):
    client = MONAILabelClient(train_server)
    image = labelled[-1]
    before = click(train_server, image, "anna")
    assert before.status_code == 200 and before.json()["model"] == "random_small.pt"

    # From random weights a few steps may not beat the start on validation: publish whatever they give.
    assert start(train_server, {**FEW_STEPS, "validate_start_model": False}).status_code == 200
    job = wait_for(lambda: job_finished(train_server), what="the training job")
    assert job["status"] == "DONE", job
    assert any("progress: epoch 2/2, iteration 6/6" in line for line in job["details"]), job["details"]

    stats = train_stats(train_server)
    assert stats["status"] == "finished" and stats["epoch"] == 2 and stats["step"] == 6
    assert stats["best_metric"] is not None and stats["key_metric_name"] == "val_dice_1click"
    published = Path(stats["published"])
    assert published == datastore / ".segany_pet" / "models" / f"{MODEL}.pt" and published.exists()

    # The next click is answered by the published model, without a restart; anna's refinement starts over.
    after = click(train_server, image, "anna")
    assert after.status_code == 200, after.text
    assert after.json()["model"] == published.name
    assert any("served model changed" in note for note in after.json()["notes"])
    served = client.info()["models"][MODEL]["model"]
    assert served["file"] == str(published) and served["state"] == "ready"


def test_a_job_that_does_not_beat_the_served_model_keeps_it(train_server, datastore, labelled):
    published = datastore / ".segany_pet" / "models" / f"{MODEL}.pt"
    before = (published.read_bytes(), published.stat().st_mtime_ns)
    # A learning rate too small to move a weight: no epoch can beat the served model it starts from.
    assert start(train_server, {**FEW_STEPS, "lr": 1e-20}).status_code == 200
    job = wait_for(lambda: job_finished(train_server), what="the training job")
    assert job["status"] == "DONE", job
    assert any("kept the served model" in line for line in job["details"]), job["details"]

    stats = train_stats(train_server)
    assert stats["status"] == "finished" and stats["best_metric_epoch"] == 0
    assert stats["start_model"]["file"] == str(published)
    assert stats["best_metric"] == stats["start_model"]["val"]["val_dice_1click"] is not None
    assert (published.read_bytes(), published.stat().st_mtime_ns) == before
    bad = start(train_server, {**FEW_STEPS, "validate_start_model": "no"})
    assert bad.status_code == 422 and "validate_start_model must be true or false" in bad.json()["detail"]


def test_delete_stops_a_job_cleanly_and_the_next_post_continues_it(train_server, datastore, labelled):
    long_run = {**FEW_STEPS, "epochs": 40, "val_cases": 0}
    assert start(train_server, long_run).status_code == 200
    wait_for(lambda: any("progress:" in line for line in current_job(train_server).get("details", [])), what="progress")

    stopped = requests.delete(f"{train_server}/train/", timeout=90).json()
    assert stopped["status"] == "STOPPED"
    stats = train_stats(train_server)
    assert stats["status"] == "stopped" and stats["step"] >= 1
    run_dir = datastore / ".segany_pet" / "train" / MODEL
    assert (run_dir / "checkpoint_last.pt").exists() and not (run_dir / "STOP").exists()

    # The stopped job is not published over the finished one, and a new POST resumes it where it stopped.
    stopped_step = stats["step"]
    assert start(train_server, long_run).status_code == 200
    wait_for(lambda: train_stats(train_server).get("progress", {}).get("iteration", 0) > stopped_step,
             what="the resumed job's progress")
    resumed = next(line for line in current_job(train_server)["details"] if "resuming from" in line)
    assert f"step {stopped_step}" in resumed
    assert requests.delete(f"{train_server}/train/", timeout=90).json()["status"] == "STOPPED"


def test_cpcl_over_rest_saves_corrected_labels_beside_the_annotators(train_server, datastore, labelled):
    labels_before = {p.name: p.read_bytes() for p in (datastore / "labels" / "final").iterdir()}
    bad = requests.post(f"{train_server}/train/{MODEL}", json={"cpcl_cross_weight": 1.0}, timeout=30)
    assert bad.status_code == 422 and "cpcl_cross_weight" in bad.json()["detail"]  # a CPCL option, plain task

    response = requests.post(f"{train_server}/train/{MODEL}_cpcl", json={**FEW_STEPS, "cpcl_warmup_epochs": 1},
                             timeout=30)
    assert response.status_code == 200, response.text
    job = wait_for(lambda: job_finished(train_server), what="the CPCL job")
    assert job["status"] == "DONE", job["details"]

    stats = MONAILabelClient(train_server).info()["train_stats"][f"{MODEL}_cpcl"]
    assert stats["status"] == "finished" and "suspicious_labels" in stats["cpcl"], (stats, job["details"])
    suspicious = stats["cpcl"]["suspicious_labels"]

    def corrected_labels_listed():
        objects = MONAILabelClient(train_server).datastore()["objects"]
        return objects if any("cpcl_corrected" in record["labels"] for record in objects.values()) else None

    objects = wait_for(corrected_labels_listed, timeout=30, what="the server to list the corrected labels")
    low_tier = [image for image, record in objects.items()
                if record["labels"].get("final", {}).get("info", {}).get("quality") == "low"]
    assert [entry["id"] for entry in suspicious] == low_tier
    for image, entry in zip(low_tier, suspicious, strict=True):
        corrected = objects[image]["labels"]["cpcl_corrected"]
        assert corrected["info"]["noise_score"] == entry["noise_score"] and corrected["info"]["noise_rank"] >= 1
        saved = nib.load(next((datastore / "labels" / "cpcl_corrected").glob(f"{image}.nii*")))
        assert saved.shape == nib.load(datastore / f"{image}.nii.gz").shape
    labels_after = {p.name: p.read_bytes() for p in (datastore / "labels" / "final").iterdir()}
    assert labels_after == labels_before  # the annotators' labels are untouched


def test_fast_mode_trains_the_decoder_on_cached_embeddings_over_rest(train_server, datastore, labelled):
    for params, words in (({"fast": "yes"}, "fast must be true or false"),
                          ({"fast": True, "init": "random"}, "fast training needs an init_checkpoint"),
                          ({"fast": True, "fast_crops_per_object": 0}, "fast_crops_per_object must be at least 1"),
                          ({"fast": True, "cpcl_box_clicks": 1}, "unknown training option(s) cpcl_box_clicks")):
        response = start(train_server, params)
        assert response.status_code == 422 and words in response.json()["detail"], response.text
    served = Path(MONAILabelClient(train_server).info()["models"][MODEL]["model"]["file"])
    before = torch.load(served, map_location="cpu", weights_only=True)["model_state_dict"]
    fast = {**FEW_STEPS, "fast": True, "fast_crops_per_object": 1, "validate_start_model": False, "restart": True}
    assert start(train_server, fast).status_code == 200
    job = wait_for(lambda: job_finished(train_server), what="the fast training job")
    assert job["status"] == "DONE", job["details"]
    stats = train_stats(train_server)
    assert stats["status"] == "finished" and stats["fast"]["encoded_crops"] >= 3, stats
    after = torch.load(Path(stats["published"]), map_location="cpu", weights_only=True)["model_state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("image_encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("mask_decoder."))
