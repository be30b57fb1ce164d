"""A lab's busy hour against one real server: eight annotators clicking at once while labels are saved and a
cross-prompt scoring job runs. Every request must succeed, every mask come back on its image's grid and
every acknowledged label be stored as sent.

The server serves the shipped model (model/segany_pet_small.pt), as a lab would: with random weights the
masks sprawl over a dozen crops and every click re-encodes them (about 1.1 s a click on 2 cores, 400 clicks
in 13 minutes), which measures nothing a lab sees."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from segany_pet.label.infer import OHIF_RESULT_PARAMS
from support import case_truth, copy_phantoms, distinct_label, read_nrrd, running_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

MODEL = "segany_pet"
ANNOTATORS, CLICKS = 8, 50
CLICKS_PER_LESION = 5  # one fresh click, then refinements of that client's mask
SAVE_PAUSE_S = 0.25  # between label saves: a team saving often, not a loop that takes a core from the clicks


@pytest.fixture(scope="module")
def datastore(cohort, tmp_path_factory) -> Path:
    """A throw-away copy of the cohort's three phantoms: the saves below must not touch the shared cohort."""
    folder = tmp_path_factory.mktemp("load_datastore")
    copy_phantoms(cohort, folder)
    return folder


@pytest.fixture(scope="module")
def load_server(datastore, tmp_path_factory) -> str:
    """The shipped model (no model conf), auto-reloading as MONAI Label is by default: the scoring subprocess
    writes into the same datastore."""
    with running_server(datastore, [], tmp_path_factory.mktemp("load_server"), auto_reload=True) as url:
        yield url


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def lesion_clicks(cohort: Path, case: str, rng: np.random.Generator, count: int) -> list[dict]:
    """``count`` click requests on the case's lesions as an annotator makes them: a fresh foreground click on a
    lesion's centre, then refinements with another voxel of the lesion or a background voxel beside it."""
    info, instances = case_truth(cohort, case)
    requests_ = []
    for n in range(count):
        lesion = info["lesions"][(n // CLICKS_PER_LESION) % len(info["lesions"])]
        centre = [int(c) for c in lesion["centre_voxel"]]
        if n % CLICKS_PER_LESION == 0:
            requests_.append({"foreground": [centre], "background": [], "reset": True})
            continue
        inside = np.argwhere(instances == lesion["id"])
        if n % 2:
            requests_.append({"foreground": [inside[rng.integers(len(inside))].tolist()], "background": [],
                              "refine": True})
        else:
            # A voxel just past the lesion's extent along one axis, outside every lesion.
            axis = int(rng.integers(3))
            beyond = centre.copy()
            beyond[axis] = int(min(inside[:, axis].max() + 2, instances.shape[axis] - 1))
            if instances[tuple(beyond)] != 0:
                beyond = centre.copy()
                beyond[axis] = int(max(inside[:, axis].min() - 2, 0))
            requests_.append({"foreground": [], "background": [beyond], "refine": True})
    return requests_


def test_eight_annotators_saves_and_scoring_at_once_all_succeed(load_server, datastore, cohort):
    cases = sorted(p.name[: -len(".nii.gz")] for p in datastore.glob("*.nii.gz"))
    images = {case: nib.load(datastore / f"{case}.nii.gz") for case in cases}
    latencies: list[float] = []
    errors: list[str] = []
    acknowledged: dict[str, bytes] = {}  # image -> the last label the server acknowledged for it
    saves = {"acknowledged": 0}
    clicking = threading.Event()
    clicking.set()
    lock = threading.Lock()

    def annotate(index: int) -> None:
        case = cases[index % len(cases)]
        client_id = f"annotator-{index}"
        session = requests.Session()
        for params in lesion_clicks(cohort, case, np.random.default_rng(index), CLICKS):
            body = {**params, "client_id": client_id, **OHIF_RESULT_PARAMS}
            started = time.perf_counter()
            try:
                response = session.post(f"{load_server}/infer/{MODEL}", params={"image": case, "output": "image"},
                                        data={"params": json.dumps(body)}, timeout=180)
            except requests.RequestException as exc:
                errors.append(f"{client_id}: {exc!r}")
                continue
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                errors.append(f"{client_id} {params}: {response.status_code} {response.text[:300]}")
                continue
            header, mask = read_nrrd(response.content)
            image = images[case]
            if (mask.shape != image.shape or mask.dtype != np.uint8
                    or not np.allclose(header["space origin"], image.affine[:3, 3], atol=1e-4)):
                errors.append(f"{client_id}: mask {mask.shape} {mask.dtype} at {header['space origin']} on image "
                              f"{image.shape} at {image.affine[:3, 3]}")
            with lock:
                latencies.append(elapsed)

    def save_labels() -> None:
        session = requests.Session()
        truths = {case: nib.load(cohort / "truth" / f"{case}_lesions.nii.gz") for case in cases}
        n = 0
        while clicking.is_set():
            time.sleep(SAVE_PAUSE_S)
            case = cases[n % len(cases)]
            content = distinct_label(truths[case], images[case].affine, n)
            response = session.put(f"{load_server}/datastore/label", params={"image": case, "tag": "final"},
                                   files={"label": (f"{case}.nii.gz", content)},
                                   data={"params": json.dumps({"client_id": "saver", "n": n})}, timeout=120)
            n += 1
            if response.status_code != 200:
                errors.append(f"save {n} of {case}: {response.status_code} {response.text[:300]}")
                continue
            acknowledged[case] = content
            saves["acknowledged"] += 1
            # Read back at once: the only writer of this image's label is this thread.
            stored = session.get(f"{load_server}/datastore/label", params={"label": case, "tag": "final"}, timeout=60)
            if stored.status_code != 200 or stored.content != content:
                errors.append(f"save {n} of {case} read back as {stored.status_code}, {len(stored.content)} bytes "
                              f"(sent {len(content)})")

    scoring = requests.post(f"{load_server}/scoring/cross_prompt", json={"threads": 1}, timeout=30)
    assert scoring.status_code == 200, scoring.text

    started = time.perf_counter()
    annotators = [threading.Thread(target=annotate, args=(index,)) for index in range(ANNOTATORS)]
    saver = threading.Thread(target=save_labels)
    for thread in [*annotators, saver]:
        thread.start()
    for thread in annotators:
        thread.join(timeout=600)
    clicking.clear()
    saver.join(timeout=180)
    wall = time.perf_counter() - started
    job = requests.get(f"{load_server}/scoring/", timeout=10).json()

    print(f"\n{len(latencies)} clicks by {ANNOTATORS} annotators in {wall:.1f} s: median "
          f"{percentile(latencies, 50):.3f} s, p95 {percentile(latencies, 95):.3f} s, "
          f"max {max(latencies, default=float('nan')):.3f} s; {saves['acknowledged']} labels saved; "
          f"scoring {job['status']}; {len(errors)} errors")
    assert not any(thread.is_alive() for thread in [*annotators, saver]), "a client thread hung"
    assert errors == [], errors[:10]
    assert len(latencies) == ANNOTATORS * CLICKS
    assert saves["acknowledged"] >= len(cases)  # every image got a label while the annotators clicked

    # After the load: each image's last acknowledged label is the stored one, byte for byte, on disk and over REST.
    for case, content in acknowledged.items():
        stored = requests.get(f"{load_server}/datastore/label", params={"label": case, "tag": "final"}, timeout=60)
        assert stored.status_code == 200 and stored.content == content, case
        assert (datastore / "labels" / "final" / f"{case}.nii.gz").read_bytes() == content
    objects = json.loads((datastore / "datastore_v2.json").read_text())["objects"]
    assert all("final" in objects[case]["labels"] for case in acknowledged)  # the scoring job's writes kept them

    # The scoring job, which shared the two cores, ended cleanly or is still running; never an error. Done, its
    # scores are in the file: the label saves' transactions did not write over them.
    assert job["status"] in ("SUBMITTED", "RUNNING", "DONE"), job
    if job["status"] == "DONE":
        assert any(f"cross_prompt: {len(cases)}/{len(cases)} scans" in line for line in job["details"]), job["details"]
        progress = requests.get(f"{load_server}/info/", timeout=10).json()["scoring"]["cross_prompt"]["progress"]
        errors = {case: objects[case]["image"]["info"].get("cross_prompt_error") for case in cases}
        assert (progress["state"], progress["failed"]) == ("finished", 0), (progress, errors)
        assert all("cross_prompt_key" in objects[case]["image"]["info"] for case in cases)
    else:
        requests.delete(f"{load_server}/scoring/", timeout=60)
    assert requests.get(f"{load_server}/info/", timeout=10).status_code == 200
