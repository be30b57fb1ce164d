"""The app's local datastore: MONAI Label's, with writes that several processes can make at once.

MONAI Label's LocalDatastore keeps the whole datastore (images, labels, their info) in memory and rewrites
``datastore_v2.json`` from that copy on every change. The server, its training jobs and its scoring jobs are
separate processes, each with its own copy: a process writing from a stale copy silently drops what another
wrote since (a CPCL job's corrected labels, a score, an annotator's label). Here every change is a
transaction under the datastore's file lock: re-read the file if another process changed it, apply the
change, write. Reads stay in memory (with ``auto_reload``, MONAI Label's default, the server re-reads the
file when another process writes it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException


class PETDatastore(LocalDatastore):
    """LocalDatastore whose changes never overwrite another process's (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        self._thread_lock = threading.RLock()
        self._stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the file as this process last saw it
        super().__init__(*args, **kwargs)

    @contextlib.contextmanager
    def _transaction(self):
        with self._thread_lock, FileLock(self._lock_file):
            self._reload_if_changed()
            yield
            self._update_datastore_file(lock=False)

    def _reload_if_changed(self) -> None:
        try:
            stat = os.stat(self._datastore_config_path)
        except FileNotFoundError:
            return
        if (stat.st_mtime_ns, stat.st_size) == self._stamp:
            return
        with open(self._datastore_config_path) as file:
            self._datastore = LocalDatastoreModel.model_validate_json(file.read())
        self._datastore.base_path = self._datastore_path
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        self._config_ts = stat.st_mtime

    def _update_datastore_file(self, lock=True):
        super()._update_datastore_file(lock=lock)
        stat = os.stat(self._datastore_config_path)
        self._stamp = (stat.st_mtime_ns, stat.st_size)

    def _init_from_datastore_file(self, throw_exception=False):
        super()._init_from_datastore_file(throw_exception)
        self._stamp = None  # the parent compares seconds only: let the next transaction check for itself

    # ------------------------------------------------------------------------------------------------------
    # Changes

    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        default_id, extension = self._to_id(os.path.basename(image_filename))
        image_id = image_id or default_id
        name = self._filename(image_id, extension)
        with self._transaction():
            shutil.copy(image_filename, os.path.realpath(os.path.join(self._datastore.image_path(), name)))
            info = {**(image_info or {}), "ts": int(time.time()), "name": name}
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=extension))
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        _, extension = self._to_id(os.path.basename(label_filename))
        name = self._filename(image_id, extension)
        with self._transaction():
            record = self._datastore.objects.get(image_id)
            if record is None:
                raise ImageNotFoundException(f"Image {image_id} not found")
            folder = self._datastore.label_path(label_tag)
            os.makedirs(folder, exist_ok=True)
            shutil.copy(label_filename, os.path.join(folder, name))
            info = {**(label_info or {}), "ts": int(time.time()), "name": name}
            record.labels[label_tag] = DataModel(info=info, ext=extension)
        return image_id

    def update_image_info(self, image_id: str, info: dict) -> None:
        with self._transaction():
            record = self._datastore.objects.get(image_id)
            if record is None:
                raise ImageNotFoundException(f"Image {image_id} not found")
            record.image.info.update(info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict) -> None:
        with self._transaction():
            label = self._datastore.label(label_id, label_tag)
            if label is None:
                raise LabelNotFoundException(f"Label: {label_id} Tag: {label_tag} not found")
            label.info.update(info)
