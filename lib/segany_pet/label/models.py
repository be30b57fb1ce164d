"""The weights an app serves: a checkpoint file, loaded off the request path, reloaded when replaced.

A model published by training (``published``) takes the place of the configured file while it exists.

State is reported in /info (``ServedModel.describe``) so a missing or broken file is visible to the
admin at once, never replaced by a silently random model.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

from segany_pet.errors import CheckpointError, UserInputError
from segany_pet.model import load_checkpoint
from segany_pet.predictor import Predictor

logger = logging.getLogger(__name__)

MODEL_DIR = Path(__file__).resolve().parents[3] / "model"
DEFAULT_MODEL = "segany_pet_small.pt"
STATE_DIR = ".segany_pet"  # in a local datastore: the app's training runs, published models, scoring progress
PROMPTABLE = "segany_pet"
# Image embeddings kept in memory for clicks and warm-ups, all annotators together: 606 crops of the shipped
# model (3.375 MiB each), 2,730 of SAM-Med3D's (0.75 MiB).
DEFAULT_EMBEDDING_CACHE_MB = 2048


class ModelUnavailableError(UserInputError):
    """The served checkpoint is missing, broken or still loading: the admin must act, or the client wait."""

    status_code = 503


class ServedModel:
    """A checkpoint file and its Predictor.

    ``start_loading`` reads the file in a background thread (server start stays fast). ``predictor``
    returns the ready Predictor, reloading first when the file to serve or its modification time changed
    (a newly published checkpoint), and raises ModelUnavailableError with the reason otherwise.
    ``published``: where training publishes its model; served instead of ``path`` when it exists.
    ``published_box``: where a CPCL job publishes its box replica, beside it. ``cache_mb``: the memory of the
    Predictor's embedding cache (as many crops as fit, at least 8).
    """

    def __init__(self, path: str | os.PathLike, dtype: str | None = None,
                 cache_mb: float = DEFAULT_EMBEDDING_CACHE_MB, published: str | os.PathLike | None = None):
        self.path = Path(path)
        self.published = Path(published) if published else None
        self.published_box = self.published.with_name(self.published.stem + "_box.pt") if published else None
        self.dtype = dtype
        self.cache_mb = cache_mb
        self._predictor: Predictor | None = None
        self._loaded: tuple[Path, int] | None = None  # file and modification time of the served model
        self._error: str | None = None
        self._loading = False
        self._lock = threading.RLock()  # predictor_and_file holds it around _load

    def current_path(self) -> Path:
        """The file served: the published model when there is one, else the configured file."""
        if self.published is not None and self.published.exists():
            return self.published
        return self.path

    def start_loading(self) -> None:
        self._loading = True  # from now on, not after the thread is scheduled: /info may ask at once
        threading.Thread(target=self._load_quietly, name=f"load {self.path.name}", daemon=True).start()

    def _load_quietly(self) -> None:
        try:
            self._load()
        except ModelUnavailableError:
            pass  # recorded in _error and logged

    def _load(self) -> Predictor:
        with self._lock:
            path = self.current_path()
            mtime = _mtime(path)
            if self._predictor is not None and (path, mtime) == self._loaded:
                self._loading = False
                return self._predictor
            self._loading = True
            started = time.perf_counter()
            try:
                if mtime is None:
                    raise CheckpointError(
                        f"model file {path} does not exist; put a checkpoint there "
                        "(see model/README.md) or choose another with --conf model <file>"
                    )
                model = load_checkpoint(path)
                # Set before "loading" clears, so /info never sees a load that ended with nothing to show.
                cache_size = max(8, int(self.cache_mb * 2**20 // model.preset.embedding_bytes))
                self._predictor = Predictor(model, dtype=self.dtype, cache_size=cache_size)
                self._loaded = (path, mtime)
                self._error = None
            except CheckpointError as exc:
                self._error = str(exc)
                logger.error("model not served: %s", exc)
                raise ModelUnavailableError(f"model unavailable: {exc}") from exc
            finally:
                self._loading = False
            seconds = time.perf_counter() - started
            logger.info("serving %s (preset %s), loaded in %.2f s", path, model.preset.name, seconds)
            return self._predictor

    def predictor(self) -> Predictor:
        return self._load()

    def predictor_and_file(self) -> tuple[Predictor, Path]:
        """The ready Predictor and the file its weights came from."""
        with self._lock:
            predictor = self._load()
            return predictor, self._loaded[0]

    def publish(self, checkpoint: str | os.PathLike) -> None:
        """Serve ``checkpoint`` from the next click on (an admin's upload), as a training job publishes its model;
        a box replica published beside the old model goes, since it belongs to other weights."""
        copy_atomically(Path(checkpoint), self.published)
        self.published_box.unlink(missing_ok=True)

    def unpublish(self) -> bool:
        """Serve the configured file again; False when no model was published."""
        if self.published is None or not self.published.exists():
            return False
        self.published.unlink()
        self.published_box.unlink(missing_ok=True)
        return True

    def describe(self) -> dict:
        """For /info: which file, which preset, and whether it is ready, loading or broken (and why)."""
        predictor = self._predictor
        state = "loading" if self._loading else "error" if self._error else "ready" if predictor else "not loaded"
        record = {"file": str(self._loaded[0] if self._loaded else self.current_path()), "state": state}
        if self.published is not None:
            record["configured_file"] = str(self.path)
            record["published_file"] = str(self.published)
        if self._error:
            record["error"] = self._error
        if predictor is not None:
            model = predictor.model
            record["preset"] = model.preset.name
            record["crop_spacings_mm"] = list(predictor.spacings)
            record["inference_dtype"] = model.inference_dtype
            record["embedding_cache_crops"] = predictor.cache_size
            if model.initialised_keys:
                record["initialised_keys"] = list(model.initialised_keys)
        return record


def _mtime(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def served_model_for(state_dir: str | os.PathLike, model: str | os.PathLike | None = None,
                     dtype: str | None = None, cache_mb: float = DEFAULT_EMBEDDING_CACHE_MB) -> ServedModel:
    """What the app serves for a datastore: ``model`` (a file in model/ or a path; default the shipped
    model), replaced by the model a training job published under ``state_dir`` while that exists."""
    model_file = Path(model or DEFAULT_MODEL)
    return ServedModel(model_file if model_file.is_absolute() else MODEL_DIR / model_file, dtype=dtype,
                       cache_mb=cache_mb, published=Path(state_dir) / "models" / f"{PROMPTABLE}.pt")


def copy_atomically(source: Path, target: Path) -> None:
    """Copy through a partial file and a rename: a reader (the next click) never sees half a checkpoint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)
    logger.info("published %s as %s", source, target)
