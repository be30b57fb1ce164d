"""A real server SIGKILLed (a power cut of the process, an OOM kill) in the middle of writes: what it
acknowledged survives, no half-written file is left where a restarted server would read it, and the restarted
server carries on (it serves the labels, a training job continues from its last checkpoint)."""

from __future__ import annotations

import functools
import json
import random
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch

from support import copy_phantoms, distinct_label, kill_group, killable_server, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]

MODEL = "segany_pet"
KILL_ROUNDS = 3  # kill, check, restart: each round kills at another moment
# One step an epoch, so checkpoint_last.pt is rewritten every step; far more epochs than the test lets run.
EVERY_STEP_CHECKPOINTED = {"epochs": 500, "iterations_per_epoch": 1, "batch_size": 1, "val_cases": 0,
                           "clicks_per_sample": 2, "val_clicks": 1}


def put_label(url: str, case: str, content: bytes, session=requests) -> requests.Response:
    return session.put(f"{url}/datastore/label", params={"image": case, "tag": "final"},
                       files={"label": (f"{case}.nii.gz", content)}, data={"params": json.dumps({"client_id": "ann"})},
                       timeout=60)


def get_label(url: str, case: str) -> requests.Response:
    return requests.get(f"{url}/datastore/label", params={"label": case, "tag": "final"}, timeout=60)


class LabelSaver(threading.Thread):
    """An annotator saving a new label of the next image, over and over, until the server dies; it records the
    last label acknowledged (200) per image and the one sent and never answered."""

    def __init__(self, url: str, labels, acknowledged: dict, n: int):
        super().__init__()
        self.url, self.labels, self.acknowledged, self.n = url, labels, acknowledged, n
        self.in_flight: dict[str, bytes] = {}
        self.durations: list[float] = []
        self.errors: list[str] = []
        self.sending, self.warmed_up = threading.Event(), threading.Event()

    def run(self) -> None:
        session = requests.Session()
        cases = sorted(self.labels)
        while True:
            case = cases[self.n % len(cases)]
            content = self.labels[case](self.n)
            self.n += 1
            self.in_flight[case] = content
            self.sending.set()
            started = time.perf_counter()
            try:
                response = put_label(self.url, case, content, session)
            except requests.ConnectionError:
                return  # the server is dead: this save was never acknowledged
            self.sending.clear()
            if response.status_code != 200:
                self.errors.append(f"save {self.n} of {case}: {response.status_code} {response.text[:300]}")
                return
            self.durations.append(time.perf_counter() - started)
            self.acknowledged[case] = self.in_flight.pop(case)
            if len(self.durations) >= 2 * len(cases):
                self.warmed_up.set()


def test_a_server_killed_during_label_saves_keeps_every_acknowledged_label(cohort, tmp_path):
    studies = tmp_path / "studies"
    cases = copy_phantoms(cohort, studies)
    labels = {case: functools.partial(distinct_label, nib.load(cohort / "truth" / f"{case}_lesions.nii.gz"),
                                      nib.load(studies / f"{case}.nii.gz").affine) for case in cases}
    acknowledged: dict[str, bytes] = {}  # image -> the last label the server answered 200 for
    rng = random.Random(7)
    saver = None

    def check_files_after_the_kill(in_flight: dict) -> None:
        objects = json.loads((studies / "datastore_v2.json").read_text())["objects"]  # whole, parseable
        assert set(objects) == set(cases)
        for case, content in acknowledged.items():
            assert "final" in objects[case]["labels"], f"the acknowledged label of {case} is not recorded"
            stored = (studies / "labels" / "final" / f"{case}.nii.gz").read_bytes()
            # The save the kill interrupted may have landed whole; never half of it, never an older label.
            assert stored in (content, in_flight.get(case)), f"{case}: {len(stored)} bytes stored"
        for path in (studies / "labels" / "final").iterdir():
            # A restart records every label file it finds: none may be half written, acknowledged or not.
            assert np.asarray(nib.load(path).dataobj).shape == nib.load(studies / path.name).shape, path.name

    for round_ in range(KILL_ROUNDS):
        with killable_server(studies, [], tmp_path / f"server{round_}.log") as (process, url):
            for case in acknowledged:  # the restarted server serves what the killed one stored
                served = get_label(url, case)
                assert served.status_code == 200, served.text
                assert served.content == (studies / "labels" / "final" / f"{case}.nii.gz").read_bytes()
            saver = LabelSaver(url, labels, acknowledged, saver.n if saver else 0)
            saver.start()
            assert saver.warmed_up.wait(120), saver.errors or "saves too slow"
            # Kill somewhere inside one save: after its request went out, within a typical save's duration.
            saver.sending.wait(30)
            time.sleep(rng.uniform(0, float(np.median(saver.durations))))
            kill_group(process)
            saver.join(timeout=60)
        print(f"round {round_}: killed after {len(saver.durations)} acknowledged saves "
              f"(median {np.median(saver.durations):.3f} s), {len(saver.in_flight)} in flight")
        assert not saver.is_alive() and saver.errors == [], saver.errors
        check_files_after_the_kill(saver.in_flight)

    with killable_server(studies, [], tmp_path / "server_last.log") as (_, url):
        assert requests.get(f"{url}/info/", timeout=10).status_code == 200
        listed = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=10).json()
        assert set(listed["objects"]) == set(cases)  # no leftover .partial file taken for an image
        for case in acknowledged:
            served = get_label(url, case)
            assert served.status_code == 200
            assert served.content in (acknowledged[case], saver.in_flight.get(case))


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def current_job(url: str) -> dict:
    return requests.get(f"{url}/train/", timeout=10).json()


def test_a_training_job_killed_while_writing_its_checkpoint_continues_from_the_last_whole_one(
        cohort, random_checkpoint, tmp_path):
    studies = tmp_path / "studies"
    cases = copy_phantoms(cohort, studies)
    run_dir = studies / ".segany_pet" / "train" / MODEL
    last, partial = run_dir / "checkpoint_last.pt", run_dir / "checkpoint_last.pt.partial"
    conf = [("model", random_checkpoint)]
    saved = None

    # Kill the server and its training subprocess (one process group) the moment a checkpoint is being written,
    # after a whole one exists: polled every few ms, a write of the ~100 MB checkpoint takes far longer. Each
    # round restarts the server, whose POST continues the job; rounds end once a kill cut a write in half.
    for round_ in range(KILL_ROUNDS):
        with killable_server(studies, conf, tmp_path / f"server{round_}.log", auto_reload=True) as (process, url):
            if round_ == 0:
                for case in cases:
                    label = distinct_label(nib.load(cohort / "truth" / f"{case}_lesions.nii.gz"),
                                           nib.load(studies / f"{case}.nii.gz").affine, 0)
                    assert put_label(url, case, label).status_code == 200
            response = requests.post(f"{url}/train/{MODEL}", json=EVERY_STEP_CHECKPOINTED, timeout=30)
            assert response.status_code == 200, response.text
            wait_for(lambda: last.exists() and not partial.exists(), timeout=300, what="a whole checkpoint")
            deadline = time.monotonic() + 120
            while not partial.exists() and time.monotonic() < deadline:
                time.sleep(0.003)
            assert partial.exists(), "no checkpoint write seen within 120 s"
            kill_group(process)
        killed_mid_write = partial.exists()
        saved = checkpoint(last)  # the last whole checkpoint loads: os.replace put it there complete
        assert saved["epoch"] >= 1
        assert saved["step"] == saved["epoch"] * EVERY_STEP_CHECKPOINTED["iterations_per_epoch"]
        print(f"round {round_}: killed {'during' if killed_mid_write else 'just after'} a checkpoint write; last "
              f"whole checkpoint: epoch {saved['epoch']}, step {saved['step']}")
        if killed_mid_write:
            break
    assert killed_mid_write, f"no kill in {KILL_ROUNDS} rounds landed inside a checkpoint write"

    # The half-written .partial is still there; the restarted server's job resumes from the whole checkpoint.
    log = tmp_path / "server_last.log"
    with killable_server(studies, conf, log, auto_reload=True) as (_, url):
        response = requests.post(f"{url}/train/{MODEL}", json=EVERY_STEP_CHECKPOINTED, timeout=30)
        assert response.status_code == 200, response.text
        resumed = wait_for(lambda: next((line for line in log.read_text().splitlines() if "resuming from" in line),
                                        None), timeout=300, what="the resumed job")
        assert f"at epoch {saved['epoch']}, step {saved['step']}" in resumed, resumed

        # It trains on from there: a later, whole checkpoint replaces the one it resumed from.
        def newer_checkpoint():
            try:
                record = checkpoint(last)
            except (RuntimeError, OSError, EOFError):
                return None  # replaced while being read
            return record if record["epoch"] > saved["epoch"] else None

        newer = wait_for(newer_checkpoint, timeout=300, what="a checkpoint after the resumed one")
        assert newer["step"] > saved["step"]
        assert len(newer["history"]) == newer["epoch"]  # the resumed epochs follow the saved ones, none lost
        assert current_job(url)["status"] == "RUNNING"
        stopped = requests.delete(f"{url}/train/", timeout=90).json()
        assert stopped["status"] == "STOPPED"
