"""The interactive predictor: set a PET volume once, then predict a mask from clicks, a box or a previous mask.

    predictor = Predictor(model)                          # one per model, shared by every annotator
    session = predictor.set_volume(volume, "case_0042")   # cheap: nothing is encoded yet
    first = session.predict(foreground=[[210, 188, 140]])
    better = session.predict(background=[[214, 190, 141]], previous=first)
    better.mask                                           # uint8, on the volume's own stored grid

Where crops go and how they map to the volume (three coordinate frames, separable resampling, pasting
back) is `segany_pet.crops`.

The Predictor holds what every annotator shares (the model, the embedding cache, the turns at the model);
what happens to one volume's clicks is `segany_pet.session`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np
import torch

from segany_pet.crops import CropGeometry, crop_volume, normalise
from segany_pet.pet.volume import PETVolume
from segany_pet.session import LATENCY_KEYS, Prediction, VolumeSession

DEFAULT_MAX_WINDOWS = 6
# A prefetch encodes only when no click has been answered for this long (a server still quantifies, encodes and
# sends the reply after the predictor is done, and an annotator's next click often follows within it); it looks
# again every PREFETCH_POLL_S.
PREFETCH_QUIET_S = 0.5
PREFETCH_POLL_S = 0.01


def volume_fingerprint(volume: PETVolume) -> str:
    """A content hash of SUV and affine (SHA-1: about 0.1 s for a 400x400x326 volume)."""
    digest = hashlib.sha1()
    digest.update(repr((volume.shape, str(volume.suv.dtype))).encode())
    digest.update(np.ascontiguousarray(volume.affine, dtype=np.float64).tobytes())
    digest.update(memoryview(np.ascontiguousarray(volume.suv)).cast("B"))
    return "sha1:" + digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# The predictor


class Predictor:
    """A 3D SAM ready for interactive use: set a volume, then predict from prompts.

    Design for several annotators at once: the Predictor holds only what is shared, the model (read-only
    in eval mode) and an LRU cache of image embeddings behind a lock. Everything about one volume lives in
    the `VolumeSession` that `set_volume` returns, and everything about one click in the `Prediction` it
    gives back. So a server keeps one Predictor per model and calls ``set_volume(...).predict(...)`` per
    request from any thread. ``Predictor.predict`` is a single-user shortcut for the last volume set.

    The cache key is (volume id, crop geometry, preset name, encoder dtype): the next click in the same
    region (crop centres are snapped, see `place_crop`) skips the encoder, which is almost all of the cost.
    Two threads missing the same key at once both encode; the result is the same.

    Model calls take turns (a second lock); cropping, pasting and planning run in parallel. One forward
    pass already uses every core torch is given, and two at once oversubscribe them: on the 2-core
    machines, a 11 ms decode took 0.1-0.7 s while another thread was busy with torch.

    `prefetch` encodes crops before anyone clicks (a server warming a scan its client just fetched) at low
    priority: one crop at a time, and only once no click has been answered for ``PREFETCH_QUIET_S``, so a click
    waits for at most the one crop being encoded.

    ``dtype`` ("bfloat16" or "float32") sets how the image encoder computes (``Sam3D.to_inference_dtype``);
    None keeps the model as it is. ``max_windows`` caps the crops spent on one object at each spacing.
    ``scale_ensemble``: read each object at every spacing of the preset (`Preset.ensemble_spacings_mm`), or
    at ``spacing_mm`` alone (False: ranking and training loops, where the ensemble's cost buys little).
    """

    def __init__(self, model, device="cpu", cache_size: int = 8, dtype=None, max_windows: int = DEFAULT_MAX_WINDOWS,
                 scale_ensemble: bool = True):
        if max_windows < 1:
            raise ValueError(f"max_windows must be at least 1, got {max_windows}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if dtype is not None:
            self.model.to_inference_dtype(dtype)
        self.preset = model.preset
        self.spacings = (self.preset.spacing_mm, *(self.preset.ensemble_spacings_mm if scale_ensemble else ()))
        self.cache_size = cache_size
        self.max_windows = max_windows
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # the cache
        self._model_lock = threading.Lock()
        self._answering = 0  # clicks being answered now (under _lock): prefetch waits while there are any ...
        self._answered_at = -math.inf  # ... and for PREFETCH_QUIET_S after the last (time.monotonic)
        self._last_session: VolumeSession | None = None

    def set_volume(self, volume: PETVolume, volume_id: str | None = None) -> VolumeSession:
        """Start annotating a volume; cheap (nothing is encoded until a prompt needs a crop).

        ``volume_id`` names the volume in the embedding cache: pass a stable id (the datastore's image id).
        Without one it is a content hash of SUV and affine (`volume_fingerprint`), so the same scan loaded
        twice shares cached embeddings and a changed array never hits a stale one.
        """
        if volume.suv.ndim != 3:
            raise ValueError(f"volume must be 3D, got shape {volume.suv.shape}")
        session = VolumeSession(self, volume, volume_id if volume_id is not None else volume_fingerprint(volume))
        self._last_session = session
        return session

    def predict(self, foreground=(), background=(), box=None, previous: Prediction | None = None,
                edge: str | None = None) -> Prediction:
        """`VolumeSession.predict` on the volume of the last `set_volume` (single-user scripts)."""
        if self._last_session is None:
            raise RuntimeError("no volume set: call predictor.set_volume(volume) before predict")
        return self._last_session.predict(foreground, background, box, previous, edge)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def _cache_key(self, session: VolumeSession, geometry: CropGeometry) -> tuple:
        return session.volume_id, geometry, self.preset.name, self.model.inference_dtype

    def is_cached(self, session: VolumeSession, geometry: CropGeometry) -> bool:
        with self._lock:
            return self._cache_key(session, geometry) in self._cache

    @contextlib.contextmanager
    def answering(self):
        """Marks a click in progress: `prefetch` encodes nothing until it is answered (and a while after)."""
        with self._lock:
            self._answering += 1
        try:
            yield
        finally:
            with self._lock:
                self._answering -= 1
                self._answered_at = time.monotonic()

    def _clicks_recent(self) -> bool:
        return bool(self._answering) or time.monotonic() - self._answered_at < PREFETCH_QUIET_S

    def prefetch(self, session: VolumeSession, geometries: Iterable[CropGeometry],
                 cancelled: Callable[[], bool] = lambda: False) -> int:
        """Encode the crops not yet cached, in order, after clicks (see the class); stops early once ``cancelled()``.

        Returns how many crops it encoded. Crops beyond the cache's capacity would only evict each other:
        the caller keeps the list within ``cache_size``.
        """
        encoded = 0
        for geometry in geometries:
            while self._clicks_recent() and not cancelled():
                time.sleep(PREFETCH_POLL_S)
            if cancelled():
                break
            if not self.is_cached(session, geometry):
                self.embedding(session, geometry)
                encoded += 1
        return encoded

    def embedding(
        self, session: VolumeSession, geometry: CropGeometry, latencies: dict | None = None
    ) -> tuple[torch.Tensor, bool]:
        """The image embedding of one crop of a session's volume (cached) and whether it came from the cache.

        Adds the seconds spent to ``latencies["crop"]`` and ``["encode"]`` when given.
        """
        latencies = latencies if latencies is not None else dict.fromkeys(LATENCY_KEYS, 0.0)
        key = self._cache_key(session, geometry)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key], True
        started = time.perf_counter()
        crop = crop_volume(session.volume.suv, session.volume.affine, geometry)
        image = normalise(crop, self.preset.normalisation)
        encoding = time.perf_counter()
        with self._model_lock, torch.no_grad():
            embedding = self.model.embed(image[None, None].to(self.device)).float()
        latencies["crop"] += encoding - started
        latencies["encode"] += time.perf_counter() - encoding
        with self._lock:
            self._cache[key] = embedding
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedding, False

    def decode(self, embedding, points, labels, box, mask_prompt) -> tuple[torch.Tensor, float]:
        """Prompts in crop indices -> (low-res logits (1, 1, L, L, L) on the CPU, IoU estimate).

        ``points`` (N, 3) with ``labels`` (N,) 1/0, ``box`` (6,) min then max corner or None,
        ``mask_prompt`` (L, L, L) logits or None.
        """
        device = self.device
        with self._model_lock, torch.no_grad():
            point_prompt = None
            if len(points):
                point_prompt = (
                    torch.as_tensor(np.asarray(points), dtype=torch.float32, device=device)[None],
                    torch.as_tensor(np.asarray(labels), dtype=torch.int64, device=device)[None],
                )
            boxes = None if box is None else torch.as_tensor(box, dtype=torch.float32, device=device)[None]
            masks = None if mask_prompt is None else mask_prompt[None, None].to(device, torch.float32)
            prompt_encoder = self.model.prompt_encoder
            sparse, dense = prompt_encoder(points=point_prompt, boxes=boxes, masks=masks)
            logits, iou = self.model.mask_decoder(
                embedding, prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False
            )
        return logits.float().cpu(), float(iou[0, 0])
