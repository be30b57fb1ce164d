"""Active learning by cross-prompt disagreement: targets without clicks, scan scores, leases, the score command."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from segany_pet.active.cross_prompt import (
    dilated_label,
    hot_spot_threshold,
    hot_spots,
    liver_reference,
    scan_targets,
    score_scan,
)
from segany_pet.active.organs import LESION_PROBABILITY, describe_hot_spots, shipped_classifier
from segany_pet.active.scoring import (
    annotation_priority,
    coverage_distance,
    diverse_priority,
    models_key,
    review_priority,
    score_datastore,
    scoring_predictor,
)
from segany_pet.agreement import PromptPair
from segany_pet.label.activelearning import disagreement_strategy, diverse_disagreement_strategy
from segany_pet.label.datastore import PETDatastore
from segany_pet.model import load_checkpoint
from segany_pet.pet import PETVolume, save_nifti
from segany_pet.phantom import generate_case
from support import REPO, free_port, small_scan

DEFAULT_MODEL = REPO / "model" / "segany_pet_small.pt"


@pytest.fixture(scope="module")
def predictor():
    return scoring_predictor(load_checkpoint(DEFAULT_MODEL))


# ----------------------------------------------------------------------------------------------
# Targets and pair statistics


@pytest.mark.parametrize("tracer", ["fdg", "psma"])
def test_liver_reference_finds_the_liver_uptake_of_whole_body_phantoms(tracer):
    for seed in (0, 1):
        case = generate_case(seed, tracer, "4mm", negative=False)
        liver = liver_reference(PETVolume(case.suv, case.affine))
        truth = case.info["organ_suv"]["liver"]
        assert liver is not None and abs(liver["mean"] - truth) < 0.1 * truth, (liver, truth)
        assert liver["ml"] >= 100


def test_hot_spots_are_one_per_region_hottest_first_outside_the_excluded_voxels():
    suv = np.full((40, 40, 40), 1.0, np.float32)
    suv[5:15, 5:15, 5:15] = 6.0  # a large hot organ with a noisy top
    suv[7, 8, 9] = 9.0
    suv[10, 11, 12] = 8.5
    suv[30, 30, 30] = 12.0  # a small lesion
    suv[25, 5, 30] = 4.0  # below the threshold
    volume = PETVolume(suv, np.diag([4.0, 4.0, 4.0, 1.0]))
    assert hot_spots(volume, threshold=5.0) == [[30, 30, 30], [7, 8, 9]]
    lesion = np.zeros(suv.shape, bool)
    lesion[29:32, 29:32, 29:32] = True
    assert hot_spots(volume, threshold=5.0, exclude=lesion) == [[7, 8, 9]]
    assert hot_spots(volume, threshold=5.0, limit=1) == [[30, 30, 30]]


def test_threshold_follows_percist_or_falls_back_to_the_body_median():
    volume = PETVolume(np.full((8, 8, 8), 1.0, np.float32), np.eye(4))
    assert hot_spot_threshold(volume, {"mean": 2.0, "sd": 0.3}) == pytest.approx(1.5 * 2.0 + 2 * 0.3)
    assert hot_spot_threshold(volume, None) == pytest.approx(4.0)


def test_pair_disagreement_and_entropy_on_known_probabilities():
    point = np.zeros((4, 4, 4), np.float32)
    box = np.zeros((4, 4, 4), np.float32)
    region = (slice(0, 4),) * 3
    assert PromptPair(region, point, box).disagreement() == 0.0  # both empty: they agree
    assert PromptPair(region, point, box).entropy_bits() == 0.0
    point[:2] = 1.0
    box[:2] = 1.0
    assert PromptPair(region, point, box).disagreement() == pytest.approx(0.0)
    assert PromptPair(region, point, box).entropy_bits() < 1e-3  # certain and agreeing
    box[1] = 0.0  # the box model keeps half of it
    assert PromptPair(region, point, box).disagreement() == pytest.approx(1 - 2 * 16 / (32 + 16))
    assert PromptPair(region, point, box).entropy_bits() == pytest.approx(0.5, abs=1e-3)  # p = 0.5 on half


# ----------------------------------------------------------------------------------------------
# A scan's scores with the shipped model


def test_a_corrupted_label_scores_noisier_than_the_true_one(predictor):
    volume, lesions, _ = small_scan(1, "fdg")
    true_label = (lesions > 0).astype(np.uint8)
    wrong_label = true_label.copy()
    wrong_label[true_label > 0] = 0
    spared = lesions == np.bincount(lesions[lesions > 0]).argmax()  # one lesion kept, the others erased
    wrong_label[spared] = 1
    wrong_label[2:8, 2:8, 2:8] = 1  # and a "lesion" drawn in background
    scores = {}
    for name, label in (("true", true_label), ("wrong", wrong_label)):
        session = predictor.set_volume(volume, f"noise-{name}")
        consensus = np.zeros(volume.shape, bool)
        scores[name] = score_scan(session, session, label=label, consensus=consensus, max_hot_spots=4)
        assert consensus.any()
    print({name: score["label_noise_score"] for name, score in scores.items()})
    # Clean labels score 0.2-0.4 here too: a click on a hot organ is consensus the label lacks (docs).
    assert scores["wrong"]["label_noise_score"] > scores["true"]["label_noise_score"] + 0.02
    # The most suspicious target is where the label is wrong: the drawn "lesion" or an erased one.
    worst = scores["wrong"]["label_noise_worst"][0]
    on_error = np.all(np.subtract(worst["voxel"], 2) >= 0) and np.all(np.subtract(worst["voxel"], 8) < 0)
    assert worst["noise_score"] > 0.5 and (on_error or (lesions[tuple(worst["voxel"])] > 0 and not spared[
        tuple(worst["voxel"])]))
    session = predictor.set_volume(volume, "unlabeled")
    unlabeled = score_scan(session, session, max_hot_spots=4)
    assert "label_noise_score" not in unlabeled and unlabeled["targets"]["hot_spot"] >= 1
    assert 0.0 <= unlabeled["cross_prompt_disagreement"] <= 1.0
    features = np.asarray(unlabeled["cross_prompt_features"])
    assert features.shape == (16,) and abs(np.linalg.norm(features) - 1) < 1e-3
    json.dumps(unlabeled)  # goes into the datastore as is


# ----------------------------------------------------------------------------------------------
# Datastore: scoring into it, leases


def write_datastore(folder: Path, scans: int, labeled: int = 0) -> Path:
    """``scans`` small phantoms in ``folder`` (a datastore), the first ``labeled`` with their lesions as label."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(scans):
        volume, lesions, _ = small_scan(index, "fdg" if index % 2 == 0 else "psma")
        save_nifti(volume.suv, volume.affine, folder / f"scan{index}.nii.gz")
        if index < labeled:
            save_nifti((lesions > 0).astype(np.uint8), volume.affine, folder.parent / f"label{index}.nii.gz")
    datastore = PETDatastore(str(folder), extensions=("scan*.nii.gz",))
    for index in range(labeled):
        datastore.save_label(f"scan{index}", str(folder.parent / f"label{index}.nii.gz"), "final", {})
    return folder


@pytest.mark.slow
def test_scoring_writes_scores_and_skips_unchanged_scans(tmp_path, predictor):
    folder = write_datastore(tmp_path / "studies", scans=3, labeled=1)
    datastore = PETDatastore(str(folder), extensions=("scan*.nii.gz",))
    key = models_key(DEFAULT_MODEL, None)
    first = score_datastore(datastore, predictor, predictor, key)
    assert (first["scored"], first["unchanged"], first["failed"]) == (3, 0, 0)
    infos = {image: datastore.get_image_info(image) for image in datastore.list_images()}
    assert "label_noise_score" in infos["scan0"] and "label_noise_score" not in infos["scan1"]
    assert all(0 <= info["cross_prompt_disagreement"] <= 1 for info in infos.values())
    again = score_datastore(datastore, predictor, predictor, key)
    assert (again["scored"], again["unchanged"]) == (0, 3)
    os.utime(folder / "scan2.nii.gz")  # a replaced image is rescored, and so is everything for a new model
    assert score_datastore(datastore, predictor, predictor, key)["scored"] == 1
    assert score_datastore(datastore, predictor, predictor, key + "-new")["scored"] == 3
    (folder / "scan1.nii.gz").write_bytes(b"not a nifti")  # a broken scan is reported, not fatal
    broken = score_datastore(datastore, predictor, predictor, key)
    assert broken["failed"] == 1
    assert "cannot be read" in datastore.get_image_info("scan1")["cross_prompt_error"]
    assert datastore.get_image_info("scan1")["cross_prompt_disagreement"] is None  # no stale score stays


def scored_datastore(folder: Path, images: int) -> PETDatastore:
    for index in range(images):
        save_nifti(np.ones((4, 4, 4), np.float32), np.eye(4), folder / f"scan{index}.nii.gz")
    datastore = PETDatastore(str(folder), extensions=("scan*.nii.gz",))
    for index in range(images):
        datastore.update_image_info(f"scan{index}", {"cross_prompt_disagreement": index / images})
    return datastore


def rank_for_annotation(image_id, record):
    return annotation_priority(record.image.info, bool(record.labels.get("final")))


def test_leases_serve_the_most_disputed_scan_once_per_lease(tmp_path):
    datastore = scored_datastore(tmp_path, 4)
    first, _ = datastore.lease_best(rank_for_annotation, "ann", "disagreement", 60)
    second, _ = datastore.lease_best(rank_for_annotation, "bob", "disagreement", 60)
    assert (first, second) == ("scan3", "scan2")
    # Asking again means leaving the scan: Ann gets the next one, and her last one returns to the pool.
    third, info = datastore.lease_best(rank_for_annotation, "ann", "disagreement", 60)
    assert third == "scan1" and info["lease"]["previous"] == "scan3"
    fourth, _ = datastore.lease_best(rank_for_annotation, "carl", "disagreement", 60)
    assert fourth == "scan3"
    # An expired lease frees its scan.
    short, _ = datastore.lease_best(rank_for_annotation, "dora", "disagreement", 0.2)
    assert short == "scan0"
    time.sleep(0.3)
    assert datastore.lease_best(rank_for_annotation, "eve", "disagreement", 60)[0] == "scan0"
    assert datastore.lease_best(rank_for_annotation, "fred", "disagreement", 60) is None


def test_a_diverse_batch_spreads_over_the_feature_space(tmp_path):
    """Scans 0-2 are near-copies (one direction of feature space), scan 3 lies elsewhere: after the most disputed
    copy, the diverse strategy serves the distant scan before the next copy; plain disagreement does not."""
    datastore = scored_datastore(tmp_path, 4)
    near, far = [1.0, 0.0], [0.0, 1.0]
    for index, (disagreement, features) in enumerate([(0.9, near), (0.8, near), (0.7, near), (0.5, far)]):
        datastore.update_image_info(f"scan{index}", {"cross_prompt_disagreement": disagreement,
                                                     "cross_prompt_features": features})
    diverse, plain = diverse_disagreement_strategy(60), disagreement_strategy(60)
    served = [diverse({"client_id": client}, datastore)["id"] for client in ("ann", "bob", "carl")]
    assert served == ["scan0", "scan3", "scan1"]
    for client in ("ann", "bob", "carl"):  # leave them (a lease is the strategy's and the client's)
        datastore.update_image_info({"ann": "scan0", "bob": "scan3", "carl": "scan1"}[client], {"lease": None})
    assert [plain({"client_id": c}, datastore)["id"] for c in ("dora", "eve")] == ["scan0", "scan1"]
    # A labeled scan counts as taken: with scan 3 labeled, its neighbourhood is covered.
    assert coverage_distance(near, [far]) == pytest.approx(2 ** 0.5)
    assert coverage_distance(None, [far]) == 1.0 and coverage_distance(near, []) == 1.0
    copy = {"cross_prompt_disagreement": 0.4, "cross_prompt_features": near}
    assert diverse_priority(copy, False, [near]) == (1, 0, 0.4)
    assert diverse_priority({"cross_prompt_disagreement": 0.4}, True, []) is None


def test_strategy_orders():
    assert annotation_priority({"cross_prompt_disagreement": 0.1}, labeled=False) > annotation_priority({}, False)
    assert annotation_priority({"cross_prompt_disagreement": 0.9}, labeled=True) is None
    assert review_priority({"label_noise_score": 0.4}, labeled=True) == (0.4,)
    assert review_priority({"label_noise_score": None}, labeled=True) is None
    assert review_priority({"label_noise_score": 0.4}, labeled=False) is None


def lease_in_process(folder: str, client: str, start, results) -> None:
    datastore = PETDatastore(folder, extensions=("scan*.nii.gz",))
    start.wait(timeout=60)
    for _ in range(3):
        chosen = datastore.lease_best(rank_for_annotation, client, "disagreement", 600)
        results.put((client, chosen[0] if chosen else None))


@pytest.mark.slow
def test_concurrent_annotators_in_separate_processes_never_share_a_scan(tmp_path):
    scored_datastore(tmp_path, 12)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(3), context.Queue()
    processes = [context.Process(target=lease_in_process, args=(str(tmp_path), f"client{i}", start, results))
                 for i in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    served = [results.get(timeout=5) for _ in range(9)]
    leased = json.loads((tmp_path / "datastore_v2.json").read_text())["objects"]
    holders = {image: record["image"]["info"]["lease"]["client_id"]
               for image, record in leased.items() if "lease" in record["image"]["info"]}
    # Each client holds exactly its last scan (asking again left the previous one) and no scan has two holders.
    last = {}
    for client, image in served:
        last[client] = image
    assert sorted(holders.values()) == sorted(last)
    assert all(holders[image] == client for client, image in last.items())


def test_a_killed_writer_never_leaves_a_broken_datastore_file(tmp_path):
    scored_datastore(tmp_path, 20)
    script = (
        "import sys\nfrom segany_pet.label.datastore import PETDatastore\n"
        "d = PETDatastore(sys.argv[1], extensions=('scan*.nii.gz',))\n"
        "print('ready', flush=True)\n"
        "i = 0\nwhile True:\n    d.update_image_info(f'scan{i % 20}', {'n': i, 'pad': 'x' * 5000})\n    i += 1\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    objects = json.loads((tmp_path / "datastore_v2.json").read_text())["objects"]
    assert len(objects) == 20 and any("n" in record["image"]["info"] for record in objects.values())


def test_a_server_datastore_sees_another_process_write(tmp_path):
    datastore = scored_datastore(tmp_path, 2)
    watching = PETDatastore(str(tmp_path), extensions=("scan*.nii.gz",), auto_reload=True)
    try:
        datastore.update_image_info("scan1", {"label_noise_score": 0.7})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "label_noise_score" not in watching.get_image_info("scan1"):
            time.sleep(0.1)
        assert watching.get_image_info("scan1").get("label_noise_score") == 0.7
    finally:
        watching._observer.stop()


@pytest.mark.slow
def test_score_and_audit_commands_write_scores_and_the_report(tmp_path):
    folder = write_datastore(tmp_path / "studies", scans=1, labeled=1)
    command = [sys.executable, "-m", "segany_pet.cli", "score", str(folder), "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 scored" in done.stdout
    info = PETDatastore(str(folder), extensions=("scan*.nii.gz",)).get_image_info("scan0")
    assert "segany_pet_small.pt" in info["cross_prompt_key"] and "label_noise_score" in info
    audit = [sys.executable, "-m", "segany_pet.cli", "audit", str(folder), "--out", str(tmp_path / "audit")]
    done = subprocess.run(audit, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "audit" / "suspicious_labels.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(row["image_id"], row["status"]) for row in rows] == [("scan0", "scored")]
    assert list((tmp_path / "audit" / "img").glob("*.png"))


@pytest.mark.slow
def test_scoring_shards_over_torchrun_ranks(tmp_path):
    folder = write_datastore(tmp_path / "studies", scans=2)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "segany_pet.cli", "score", str(folder),
               "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ,
                                                                                   "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("1/1 scans (1 scored") == 2  # one scan per rank
    datastore = PETDatastore(str(folder), extensions=("scan*.nii.gz",))
    assert all("cross_prompt_disagreement" in datastore.get_image_info(f"scan{i}") for i in range(2))


@pytest.mark.slow
def test_score_command_reports_bad_input(tmp_path):
    folder = write_datastore(tmp_path / "studies", scans=1)
    command = [sys.executable, "-m", "segany_pet.cli", "score", str(folder), "--threads", "1"]
    missing = subprocess.run([*command[:4], str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
    no_model = subprocess.run([*command, "--model", str(tmp_path / "none.pt")], capture_output=True, text=True,
                              timeout=120)
    assert no_model.returncode == 2 and "does not exist" in no_model.stderr


def test_threads_in_one_process_lease_each_scan_once(tmp_path):
    datastore = scored_datastore(tmp_path, 8)
    served = []

    def ask(client):
        chosen = datastore.lease_best(rank_for_annotation, client, "disagreement", 600)
        served.append(chosen[0])

    threads = [threading.Thread(target=ask, args=(f"c{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(served) == sorted(f"scan{i}" for i in range(8))


def test_label_file_on_another_grid_is_reported(tmp_path, predictor):
    folder = write_datastore(tmp_path / "studies", scans=1)
    datastore = PETDatastore(str(folder), extensions=("scan*.nii.gz",))
    image = nib.load(datastore.get_image_uri("scan0"))
    save_nifti(np.zeros(image.shape, np.uint8), image.affine, tmp_path / "label.nii.gz")
    datastore.save_label("scan0", str(tmp_path / "label.nii.gz"), "final", {})
    # Replaced on disk behind the server's back (saving it through the datastore is refused).
    save_nifti(np.zeros((5, 5, 5), np.uint8), np.eye(4), datastore.get_label_uri("scan0", "final"))
    result = score_datastore(datastore, predictor, predictor, "key")
    assert result["failed"] == 1
    assert "image's grid" in datastore.get_image_info("scan0")["cross_prompt_error"]
    assert nib.load(datastore.get_image_uri("scan0")).shape == (56, 56, 72)  # the image untouched


def test_the_shipped_hot_spot_classifier_tells_organs_from_lesions_on_unseen_phantoms():
    """Phantoms of both tracers from seeds the classifier was not fitted on: physiological uptake (bladder,
    kidneys, brain, heart, salivary glands) is left out of the targets, most lesions are kept."""
    organ_kept, lesion_kept = [], []
    for index, tracer in enumerate(("fdg", "psma", "fdg", "psma")):
        case = generate_case(7000 + index, tracer, "4mm", negative=False)
        volume = PETVolume(case.suv, case.affine)
        liver = liver_reference(volume)
        threshold = hot_spot_threshold(volume, liver)
        spots = hot_spots(volume, threshold, limit=48)
        features, _ = describe_hot_spots(volume, spots, threshold, liver)
        kept = shipped_classifier().lesion_probability(features) >= LESION_PROBABILITY
        for spot, keep in zip(spots, kept, strict=True):
            (lesion_kept if case.lesions[tuple(spot)] else organ_kept).append(bool(keep))
        plan = scan_targets(volume, liver=liver)
        assert plan.organ_spots == int((~kept).sum()) and all(t.kind == "hot_spot" for t in plan.targets)
    assert len(organ_kept) >= 40 and np.mean(organ_kept) <= 0.1, np.mean(organ_kept)
    assert len(lesion_kept) >= 5 and np.mean(lesion_kept) >= 0.6, np.mean(lesion_kept)


def test_a_label_dilated_within_its_box_equals_the_whole_grid_dilated():
    label = np.zeros((30, 40, 20), dtype=np.uint8)
    label[0:3, 10:14, 5:9] = 1  # on the grid's face
    label[20:22, 30:31, 17:20] = 2  # and its far corner
    np.testing.assert_array_equal(dilated_label(label), ndimage.binary_dilation(label > 0, iterations=2))
    assert not dilated_label(np.zeros_like(label)).any()
