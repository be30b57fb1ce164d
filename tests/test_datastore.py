"""The app's datastore: writers in several processes (server, training and scoring jobs) lose nothing."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from segany_pet.label.datastore import PETDatastore
from segany_pet.pet import save_nifti

IMAGES = 4
WRITES = 25


def make_studies(folder: Path) -> Path:
    for index in range(IMAGES):
        save_nifti(np.ones((4, 4, 4), np.float32), np.eye(4), folder / f"scan{index}.nii.gz")
    save_nifti(np.ones((4, 4, 4), np.uint8), np.eye(4), folder / "label.nii.gz")
    return folder


def writer(kind: str, folder: str, name: str, start) -> None:
    """One process's stream of changes: image infos and labels, each under its own keys."""
    datastore = {"pet": PETDatastore, "monai": LocalDatastore}[kind](folder, extensions=("scan*.nii.gz",))
    start.wait(timeout=60)  # all writers at once
    for step in range(WRITES):
        image = f"scan{step % IMAGES}"
        datastore.update_image_info(image, {f"{name}_{step}": step})
        if step % 5 == 0:
            datastore.save_label(image, str(Path(folder) / "label.nii.gz"), f"tag_{name}", {"by": name})


def run_writers(kind: str, folder: Path, names=("server", "training", "scoring")) -> dict:
    LocalDatastore(str(folder), extensions=("scan*.nii.gz",))  # writes the initial datastore_v2.json
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(len(names))
    processes = [context.Process(target=writer, args=(kind, str(folder), name, start)) for name in names]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    return json.loads((folder / "datastore_v2.json").read_text())["objects"]


def lost(objects: dict, names=("server", "training", "scoring")) -> int:
    expected = {f"{name}_{step}" for name in names for step in range(WRITES)}
    found = {key for record in objects.values() for key in record["image"]["info"]}
    tags = {tag for record in objects.values() for tag in record["labels"]}
    return len(expected - found) + len({f"tag_{name}" for name in names} - tags)


def test_concurrent_writers_in_three_processes_lose_nothing(tmp_path):
    objects = run_writers("pet", make_studies(tmp_path))
    assert lost(objects) == 0
    for index in range(IMAGES):  # steps 0, 5, 10, 15 of each writer saved a label on scan0..scan3
        labels = objects[f"scan{index}"]["labels"]
        for name in ("server", "training", "scoring"):
            assert labels[f"tag_{name}"]["info"]["by"] == name


@pytest.mark.slow
def test_monai_labels_own_datastore_loses_updates_under_the_same_load(tmp_path):
    """The reason for PETDatastore: the same writers through LocalDatastore lose updates (measured: 52 of the
    78 keys and tags; PETDatastore 0). If this ever fails, MONAI Label fixed it and PETDatastore can go."""
    objects = run_writers("monai", make_studies(tmp_path))
    assert lost(objects) > 0


def test_a_reconcile_waits_for_another_process_moving_images_in(tmp_path):
    """The server's file watcher reconciles when image files appear; another process (segany-pet curate) moves
    files in and records them under the file lock. The reconcile waits for the record instead of adding the
    files with empty info and writing that over it. (The whole reconcile runs under the lock, which also
    closes the window between its reads and its write; that interleaving is not reproduced here.)"""
    folder = make_studies(tmp_path)
    server = PETDatastore(str(folder), extensions=("scan*.nii.gz",), auto_reload=False)
    curator = PETDatastore(str(folder), extensions=("scan*.nii.gz",), auto_reload=False)
    staged = tmp_path / "staged.nii.gz"
    save_nifti(np.full((4, 4, 4), 2.0, np.float32), np.eye(4), staged)
    with FileLock(curator._lock_file):  # the curator's transaction, half done: the file is in, unrecorded
        os.replace(staged, folder / "scan_new.nii.gz")
        reconcile = threading.Thread(target=server.refresh)
        reconcile.start()
        reconcile.join(timeout=1.0)
        assert reconcile.is_alive()  # waiting for the lock
        curator._reload_if_changed()
        curator._datastore.objects["scan_new"] = ImageLabelModel(
            image=DataModel(info={"name": "scan_new.nii.gz", "curation": {"source": "site"}}, ext=".nii.gz"))
        curator._update_datastore_file(lock=False)
    reconcile.join(timeout=30)
    assert not reconcile.is_alive()
    reread = PETDatastore(str(folder), extensions=("scan*.nii.gz",), auto_reload=False)
    assert reread.get_image_info("scan_new")["curation"] == {"source": "site"}
    assert server.get_image_info("scan_new")["curation"] == {"source": "site"}
