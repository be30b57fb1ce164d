"""The weights an app serves: one checkpoint file, loaded off the request path, reloaded when replaced.

State is reported in /info (``ServedModel.describe``) so a missing or broken file is visible to the
admin at once, never replaced by a silently random model.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from segany_pet.errors import CheckpointError, UserInputError
from segany_pet.model import load_checkpoint
from segany_pet.predictor import Predictor

logger = logging.getLogger(__name__)


class ModelUnavailableError(UserInputError):
    """The served checkpoint is missing, broken or still loading: the admin must act, or the client wait."""

    status_code = 503


class ServedModel:
    """A checkpoint file and its Predictor.

    ``start_loading`` reads the file in a background thread (server start stays fast). ``predictor``
    returns the ready Predictor, reloading first when the file's modification time changed (a newly
    published checkpoint), and raises ModelUnavailableError with the reason otherwise.
    """

    def __init__(self, path: str | os.PathLike, dtype: str | None = None, cache_size: int = 8):
        self.path = Path(path)
        self.dtype = dtype
        self.cache_size = cache_size
        self._predictor: Predictor | None = None
        self._loaded_mtime: int | None = None
        self._error: str | None = None
        self._loading = False
        self._lock = threading.Lock()

    def start_loading(self) -> None:
        threading.Thread(target=self._load_quietly, name=f"load {self.path.name}", daemon=True).start()

    def _load_quietly(self) -> None:
        try:
            self._load()
        except ModelUnavailableError:
            pass  # recorded in _error and logged

    def _load(self) -> Predictor:
        with self._lock:
            mtime = self._mtime()
            if self._predictor is not None and mtime == self._loaded_mtime:
                return self._predictor
            self._loading = True
            started = time.perf_counter()
            try:
                if mtime is None:
                    raise CheckpointError(
                        f"model file {self.path} does not exist; put a checkpoint there "
                        "(see model/README.md) or choose another with --conf model <file>"
                    )
                model = load_checkpoint(self.path)
            except CheckpointError as exc:
                self._error = str(exc)
                logger.error("model not served: %s", exc)
                raise ModelUnavailableError(f"model unavailable: {exc}") from exc
            finally:
                self._loading = False
            self._predictor = Predictor(model, dtype=self.dtype, cache_size=self.cache_size)
            self._loaded_mtime = mtime
            self._error = None
            seconds = time.perf_counter() - started
            logger.info("serving %s (preset %s), loaded in %.2f s", self.path, model.preset.name, seconds)
            return self._predictor

    def predictor(self) -> Predictor:
        return self._load()

    def _mtime(self) -> int | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return None

    def describe(self) -> dict:
        """For /info: which file, which preset, and whether it is ready, loading or broken (and why)."""
        predictor = self._predictor
        state = "loading" if self._loading else "error" if self._error else "ready" if predictor else "not loaded"
        record = {"file": str(self.path), "state": state}
        if self._error:
            record["error"] = self._error
        if predictor is not None:
            model = predictor.model
            record["preset"] = model.preset.name
            record["inference_dtype"] = model.inference_dtype
            if model.initialised_keys:
                record["initialised_keys"] = list(model.initialised_keys)
        return record
