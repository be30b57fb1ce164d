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
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time

import nibabel as nib
import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel

from segany_pet.errors import InvalidImageError, UnknownImageError, UserInputError
from segany_pet.pet import load_nifti, save_nifti

logger = logging.getLogger(__name__)

# What a client may call an image, a label tag or an uploaded file: one file-name piece. No separators, no
# control characters, no "..", no leading "." (nothing absolute, hidden or a parent), so a name resolved inside
# the datastore's folder stays inside it. Spaces and other punctuation stay: a lab's files carry them.
SAFE_NAME = re.compile(r"[^./\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]{0,199}")
IMAGE_EXTENSIONS = (".nii.gz", ".nii")
# Values a client's label may hold: background and the app's classes (segany_pet.label.infer.LESION_LABELS).
LABEL_VALUES = (0, 1)
AFFINE_TOLERANCE_MM = 1e-3


def checked_name(value, what: str) -> str:
    """``value`` if it is a safe name (SAFE_NAME, no ".."), else a UserInputError saying what a name may hold."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        raise UserInputError(
            f"{what} {value!r} is not a valid name: one file-name piece of up to 200 characters, without '/', "
            "'\\', control characters or '..', not starting with '.'; GET /datastore/?output=all lists the image ids"
        )
    return value


def image_extension(filename: str) -> str:
    """The NIfTI extension of an uploaded file's name; UserInputError for anything else."""
    for extension in IMAGE_EXTENSIONS:
        if filename.lower().endswith(extension):
            return extension
    raise UserInputError(f"upload {os.path.basename(filename)!r} is not a NIfTI file: send an SUV image as "
                         f"{' or '.join(IMAGE_EXTENSIONS)}")


def check_label_file(label_filename: str, image_filename: str, image_id: str, values=None) -> None:
    """A label must be a readable NIfTI on its image's grid holding whole class ids (only ``values`` when given:
    LABEL_VALUES for an annotator's); UserInputError if not."""
    try:
        label = nib.load(label_filename)
        image = nib.load(image_filename)
        if label.shape[:3] != image.shape[:3] or len(label.shape) > 3 and math.prod(label.shape[3:]) != 1:
            raise UserInputError(
                f"label shape {tuple(label.shape)} differs from image {image_id}'s {tuple(image.shape[:3])}: "
                "save a label drawn on this image"
            )
        data = np.asanyarray(label.dataobj)
    except UserInputError:
        raise
    except Exception as exc:  # nibabel raises many types for damaged files
        reason = str(exc).replace(label_filename, os.path.basename(label_filename))
        raise UserInputError(f"the label cannot be read as NIfTI ({reason}); send a .nii.gz label") from exc
    if not np.allclose(label.affine, image.affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        raise UserInputError(
            f"label affine differs from image {image_id}'s by up to {np.abs(label.affine - image.affine).max():.4g}"
            " mm: save the label on the image's own grid"
        )
    found = np.unique(data).tolist()
    if values is None and any(v < 0 or v != int(v) for v in found):
        raise UserInputError(f"label holds values {found[:5]}; save class ids as whole numbers from 0")
    unknown = [v for v in found if values is not None and v not in values]
    if unknown:
        raise UserInputError(f"label holds values {unknown[:5]}; a label may hold only {list(values)} "
                             "(0 background, 1 lesion)")


class PETDatastore(LocalDatastore):
    """LocalDatastore whose changes never overwrite another process's (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        self._thread_lock = threading.RLock()
        self._stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the file as this process last saw it
        self._holding_file_lock = False  # within _reconcile_datastore, whose writes must not lock again
        super().__init__(*args, **kwargs)
        if getattr(self, "_handler", None) is not None:  # auto_reload: files are replaced, not modified, here
            self._handler.on_moved = self._on_replaced_event

    @property
    def folder(self) -> str:
        """The datastore's folder: images, ``labels/``, and this project's ``.segany_pet/`` state."""
        return self._datastore_path

    def _on_replaced_event(self, event):
        """A process replaced the datastore file (see _update_datastore_file): reload it unless it was this one."""
        if getattr(event, "dest_path", None) != self._datastore_config_path:
            return
        if self._ignore_event_config:
            self._ignore_event_config = False
            return
        self._init_from_datastore_file()

    @contextlib.contextmanager
    def _transaction(self):
        with self._thread_lock, FileLock(self._lock_file):
            self._reload_if_changed()
            yield
            self._update_datastore_file(lock=False)

    def _reconcile_datastore(self):
        """MONAI Label's reconcile (files on disk -> records), under the file lock: run when files appear, it
        must not read the datastore file while another process is between moving files in and recording them
        (it would add them with empty info and then write that over the other process's records)."""
        with self._thread_lock, FileLock(self._lock_file):
            self._holding_file_lock = True
            try:
                super()._reconcile_datastore()
            finally:
                self._holding_file_lock = False

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
        """Write the datastore file whole or not at all (a killed scoring job must not leave half a file), with
        pydantic's serialiser: 25 ms at 6,000 images instead of 370 ms with MONAI Label's indented json
        (scripts/benchmark_active.py)."""
        with FileLock(self._lock_file) if lock and not self._holding_file_lock else contextlib.nullcontext():
            self._ignore_event_config = True
            partial = f"{self._datastore_config_path}.{os.getpid()}.partial"
            with open(partial, "w") as file:
                file.write(self._datastore.model_dump_json(exclude={"base_path"}))
            os.replace(partial, self._datastore_config_path)
            stat = os.stat(self._datastore_config_path)
            self._stamp = (stat.st_mtime_ns, stat.st_size)
            self._config_ts = stat.st_mtime

    def _init_from_datastore_file(self, throw_exception=False):
        if self._holding_file_lock:  # within _reconcile_datastore: the parent would lock again (a deadlock)
            try:
                self._reload_if_changed()
            except ValueError:
                if throw_exception:
                    raise
                logger.exception("cannot read %s", self._datastore_config_path)
            return
        super()._init_from_datastore_file(throw_exception)
        self._stamp = None  # the parent compares seconds only: let the next transaction check for itself

    # ------------------------------------------------------------------------------------------------------
    # Changes

    def add_image(self, image_id: str, image_filename: str, image_info: dict) -> str:
        """Store an upload: a safe id, a NIfTI file that loads as a 3D SUV volume (`load_nifti`'s checks)."""
        extension = image_extension(image_filename)
        image_id = checked_name(image_id or os.path.basename(image_filename)[: -len(extension)], "image id")
        try:
            load_nifti(image_filename)
        except InvalidImageError as exc:
            raise InvalidImageError(f"image {image_id}: {exc}") from None
        name = self._filename(image_id, extension)
        with self._transaction():
            shutil.copy(image_filename, os.path.realpath(os.path.join(self._datastore.image_path(), name)))
            info = {**(image_info or {}), "ts": int(time.time()), "name": name}
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=extension))
        return image_id

    @contextlib.contextmanager
    def label_as_file(self, image_id: str, label_filename: str):
        """The label file to store: as given, or for OHIF's ``label.bin`` (its MONAI Label client's format:
        the image's voxels as uint8, first axis fastest) a NIfTI on the image's grid, removed afterwards."""
        if not label_filename.endswith(".bin"):
            yield label_filename
            return
        image_file = self.get_image_uri(image_id)
        if not image_file:
            raise self._unknown(image_id)
        image = nib.load(image_file)
        shape = image.shape[:3]
        voxels = np.fromfile(label_filename, dtype=np.uint8)
        if voxels.size != math.prod(shape):
            raise UserInputError(
                f"label.bin holds {voxels.size} voxels; image {image_id} has {math.prod(shape)} "
                f"({'x'.join(map(str, shape))}): save a label drawn on this image"
            )
        handle, converted = tempfile.mkstemp(suffix=".nii.gz", prefix="segany_pet_label_")
        os.close(handle)
        try:
            save_nifti(voxels.reshape(shape, order="F"), image.affine, converted)
            yield converted
        finally:
            os.unlink(converted)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict,
                   label_values=None) -> str:
        """Store a label of a stored image under a safe tag, once it is checked against the image
        (`check_label_file`; ``label_values``: the values it may hold, LABEL_VALUES for a client's)."""
        checked_name(label_tag, "label tag")
        image_file = self.get_image_uri(image_id)
        if not image_file:
            raise self._unknown(image_id)
        with self.label_as_file(image_id, label_filename) as label_file:
            check_label_file(label_file, image_file, image_id, label_values)
            return self._store_label(image_id, label_file, label_tag, label_info)

    def _store_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        _, extension = self._to_id(os.path.basename(label_filename))
        name = self._filename(image_id, extension)
        with self._transaction():
            record = self._datastore.objects.get(image_id)
            if record is None:
                raise self._unknown(image_id)
            folder = self._datastore.label_path(label_tag)
            os.makedirs(folder, exist_ok=True)
            # Through a partial file and a rename: a scoring or training job reading it never sees half a label.
            partial = os.path.join(folder, f".{name}.{os.getpid()}.partial")
            shutil.copyfile(label_filename, partial)
            os.replace(partial, os.path.join(folder, name))
            info = {**(label_info or {}), "ts": int(time.time()), "name": name}
            record.labels[label_tag] = DataModel(info=info, ext=extension)
        return image_id

    def add_images_with_labels(self, entries, label_tag: str) -> None:
        """Several images, each with its label or None, moved in (``os.replace``: the files must be on the
        datastore's file system) and recorded in one transaction. An image already present is replaced and its
        info updated; its ``label_tag`` label is replaced only when a new one comes.

        ``entries``: (image_id, image_file, image_info, label_file | None, label_info) tuples, NIfTI files.
        """
        extension = ".nii.gz"
        with self._transaction():
            label_folder = self._datastore.label_path(label_tag)
            os.makedirs(label_folder, exist_ok=True)
            now = int(time.time())
            for image_id, image_file, image_info, label_file, label_info in entries:
                name = self._filename(image_id, extension)
                os.replace(image_file, os.path.join(self._datastore.image_path(), name))
                record = self._datastore.objects.get(image_id)
                info = {**(record.image.info if record else {}), **image_info, "ts": now, "name": name}
                if record is None:
                    record = self._datastore.objects[image_id] = ImageLabelModel(
                        image=DataModel(info=info, ext=extension))
                else:
                    record.image = DataModel(info=info, ext=extension)
                if label_file is not None:
                    os.replace(label_file, os.path.join(label_folder, name))
                    record.labels[label_tag] = DataModel(info={**(label_info or {}), "ts": now, "name": name},
                                                         ext=extension)

    def remove_images(self, image_ids) -> None:
        """Remove images with all their labels, in one transaction; also the files of an id without a record
        (moved in by a process killed before it recorded them)."""
        with self._transaction():
            for image_id in image_ids:
                self._datastore.objects.pop(image_id, None)
                labels = self._datastore.label_path(None)
                tags = os.listdir(labels) if os.path.isdir(labels) else []
                for folder in [self._datastore.image_path(), *(os.path.join(labels, tag) for tag in tags)]:
                    for extension in (".nii.gz", ".nii"):
                        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                            os.remove(os.path.join(folder, self._filename(image_id, extension)))

    def remove_image(self, image_id: str) -> None:
        checked_name(image_id, "image id")
        if image_id not in self._datastore.objects:
            raise self._unknown(image_id)
        self.remove_images([image_id])

    def remove_label(self, label_id: str, label_tag: str) -> None:
        with self._transaction():
            label = self._checked_label(label_id, label_tag)
            os.remove(os.path.join(self._datastore.label_path(label_tag), label.info["name"]))
            self._datastore.objects[label_id].labels.pop(label_tag)

    def update_image_info(self, image_id: str, info: dict) -> None:
        checked_name(image_id, "image id")
        if not isinstance(info, dict):
            raise UserInputError(f"image info must be a JSON object, not {type(info).__name__}")
        with self._transaction():
            record = self._datastore.objects.get(image_id)
            if record is None:
                raise self._unknown(image_id)
            record.image.info.update(info)

    def update_image_infos(self, infos: dict[str, dict]) -> None:
        """Several images' info in one transaction (one file write instead of one per image)."""
        with self._transaction():
            missing = sorted(set(infos) - set(self._datastore.objects))
            if missing:
                raise UnknownImageError(f"images {', '.join(missing[:5])} are not in the datastore")
            for image_id, info in infos.items():
                self._datastore.objects[image_id].image.info.update(info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict) -> None:
        if not isinstance(info, dict):
            raise UserInputError(f"label info must be a JSON object, not {type(info).__name__}")
        with self._transaction():
            self._checked_label(label_id, label_tag).info.update(info)

    # ------------------------------------------------------------------------------------------------------
    # Reads of what a client names: checked names, unknown ones a 404

    def get_image_uri(self, image_id: str) -> str:
        return super().get_image_uri(checked_name(image_id, "image id"))

    def get_image_info(self, image_id: str) -> dict:
        checked_name(image_id, "image id")
        if image_id not in self._datastore.objects and image_id not in self.list_images():  # a PACS series, too
            raise self._unknown(image_id)
        return super().get_image_info(image_id)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return super().get_label_uri(checked_name(label_id, "image id"), checked_name(label_tag, "label tag"))

    def get_label_info(self, label_id: str, label_tag: str) -> dict:
        return dict(self._checked_label(label_id, label_tag).info)

    def _checked_label(self, label_id: str, label_tag: str) -> DataModel:
        checked_name(label_id, "image id")
        checked_name(label_tag, "label tag")
        label = self._datastore.label(label_id, label_tag)
        if label is None:
            raise UnknownImageError(f"image {label_id!r} has no {label_tag!r} label; GET /datastore/?output=all "
                                    "lists the images and their label tags")
        return label

    @staticmethod
    def _unknown(image_id: str) -> UnknownImageError:
        return UnknownImageError(f"image {image_id!r} is not in the datastore; GET /datastore/?output=all lists "
                                 "the image ids")

    def lease_best(self, rank, client_id: str, strategy: str, lease_seconds: float,
                   survey=None) -> tuple[str, dict] | None:
        """Choose and lease an image in one transaction, so two annotators asking at once get different ones.

        ``rank(image_id, record)`` -> a sort key (higher first) for images the strategy may serve, None for
        the others. Images under another client's unexpired lease are skipped; this client's own earlier lease
        under ``strategy`` ends (asking for the next image means leaving that one), and that image is not
        served again at once. The new lease (``client_id``, ``strategy``, ``until`` = now + ``lease_seconds``) is
        kept in the image's info. ``survey(records, now)``, if given, sees every (image id, record) first, inside
        the same transaction, for ranks that depend on the other images (a diverse batch). Returns (image id, its
        info) or None when no image qualifies.
        """
        now = time.time()
        with self._transaction():
            if survey is not None:
                survey(list(self._datastore.objects.items()), now)
            previous = None
            candidates = []
            for image_id, record in self._datastore.objects.items():
                lease = record.image.info.get("lease")
                if lease and lease.get("until", 0) > now:
                    if lease.get("client_id") != client_id:
                        continue
                    if lease.get("strategy") == strategy:
                        previous = image_id
                        record.image.info.pop("lease")
                        continue
                key = rank(image_id, record)
                if key is not None:
                    candidates.append((key, image_id))
            if not candidates:
                return None
            _, chosen = max(candidates)
            info = self._datastore.objects[chosen].image.info
            info["lease"] = {"client_id": client_id, "strategy": strategy, "until": now + lease_seconds,
                             "since": now, "previous": previous}
            return chosen, dict(info)
