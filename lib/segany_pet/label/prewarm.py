"""Warm a scan before its first click: encode the crops its annotator is likely to click in, in the background.

A click on a new lesion costs the image encoder (0.07 s a crop for the shipped model, 0.5 s for SAM-Med3D's,
two crops a click for the shipped model's two spacings), a refinement click only the decoder. The crop a click
is answered from depends only on where it lands (`place_crop`: centres on a lattice), so the crops of the places
annotators click can be encoded as soon as a client fetches the scan, and a click there finds them cached. The
answer is the one the click gets anyway: same crops, same embeddings (a crop placed off the click's own, tried
instead, cost one-click Dice 0.04 at 8 voxels off and 0.17 at 16: docs/benchmarks.md).

Where annotators click: on blobs of uptake. Blobs are the local maxima of a difference of Gaussians (4 and 8 mm,
each against 1.6 times its width) relative to the surround (above SUV 1; below it the excess itself), so a faint
lesion in fat counts as much as a hot one in the liver; highest contrast first. Each blob is prepared for a click
on it and at 4 mm either side along each axis (a click near a lattice boundary lands in the neighbouring crop).
Measured on 10 phantoms (41 lesions, scripts/benchmark_prewarm.py): the crops of 56% of the lesions' centre clicks
are among the first 120 of the plan (what 10 s encode); ranking by the excess over the square root of the surround
(Poisson-like noise), tried first, reached 41%.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
from scipy import ndimage

from segany_pet.crops import CropGeometry
from segany_pet.pet import PETVolume, VolumeCache
from segany_pet.pet.volume import BODY_SUV
from segany_pet.session import VolumeSession

logger = logging.getLogger(__name__)

BLOB_SIGMAS_MM = (4.0, 8.0)
BLOB_SURROUND = 1.6  # the difference of Gaussians' surround, in widths of its centre (a Laplacian's shape)
BLOB_CONTRAST_FLOOR_SUV = 1.0
# Blobs are found on a grid of at least this voxel size (an autoPET grid, 2 x 2 x 3 mm, at 4 x 4 x 3 mm).
BLOB_GRID_MM = 3.0
NEIGHBOUR_MM = 4.0
# At most this share of the embedding cache goes to one scan's warm-up: the rest keeps other scans' clicks.
CACHE_SHARE = 0.5
# Scans remembered as warmed (a later request for one is ignored, so each click does not plan anew).
WARMED_MEMORY = 64


def volume_id(image_path: str) -> str:
    """The embedding cache's name for a datastore image: its real path and modification time, so a replaced
    file is never answered from the old one's embeddings."""
    return f"{os.path.realpath(image_path)}@{os.stat(image_path).st_mtime_ns}"


def uptake_blobs(volume: PETVolume) -> np.ndarray:
    """Centres of the scan's blobs of uptake as stored voxel indices (N, 3), strongest first."""
    step = np.array([max(1, int(np.ceil(BLOB_GRID_MM / s - 1e-6))) for s in volume.spacing])
    coarse = volume.suv[:: step[0], :: step[1], :: step[2]].astype(np.float32)
    spacing = np.asarray(volume.spacing) * step
    response = None
    for sigma in BLOB_SIGMAS_MM:
        centre = ndimage.gaussian_filter(coarse, sigma / spacing)
        surround = ndimage.gaussian_filter(coarse, BLOB_SURROUND * sigma / spacing)
        contrast = (centre - surround) / np.maximum(surround, BLOB_CONTRAST_FLOOR_SUV)
        response = contrast if response is None else np.maximum(response, contrast)
    peaks = (response == ndimage.maximum_filter(response, 3)) & (coarse > BODY_SUV) & (response > 0)
    order = np.argsort(-response[peaks], kind="stable")
    return np.argwhere(peaks)[order] * step + step // 2


def warm_up_plan(session: VolumeSession, limit: int) -> list[CropGeometry]:
    """The crops to encode for a session's scan, at most ``limit``, those of the strongest blobs first."""
    volume = session.volume
    offsets = np.vstack([np.zeros(3), *(sign * np.eye(3)[a] for a in range(3) for sign in (1, -1))])
    offsets = np.round(offsets * NEIGHBOUR_MM / np.asarray(volume.spacing)).astype(int)
    plan: dict[CropGeometry, None] = {}
    for blob in uptake_blobs(volume):
        clicks = np.clip(blob + offsets, 0, np.asarray(volume.shape) - 1)
        plan.update(dict.fromkeys(session.click_crops(clicks.tolist())))
        if len(plan) >= limit:
            break
    return list(plan)[:limit]


class Prewarmer:
    """Encodes a served scan's likely click crops in one background thread, newest scan first.

    ``scan_served(path)`` is called when a client is handed a scan (an image download, a strategy's answer, a
    click): it returns at once, and does nothing for a file outside ``scans_root`` (the datastore's folder: an
    uploaded scan is read once and removed, and warming it would only evict other scans' crops). A newer scan
    takes the thread over from an older one (its client moved on; the crops already encoded stay cached, and the
    older scan is warmed again when it is served again). Clicks always go first (`Predictor.prefetch`).
    """

    def __init__(self, served, volumes: VolumeCache, scans_root: str | os.PathLike):
        self.served = served
        self.volumes = volumes
        self.scans_root = Path(scans_root).resolve()
        self._pending: str | None = None
        self._current: str | None = None
        self._warmed: OrderedDict[str, None] = OrderedDict()  # volume ids warmed to the end of their plan ...
        self._warmed_by = lambda: None  # ... by this Predictor (a weak reference: a replaced model is let go)
        self._last: dict = {}  # the latest warm-up, for /info
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def serves(self, image_path: str) -> bool:
        """Whether ``image_path`` is a datastore scan, so worth warming."""
        return Path(image_path).resolve().is_relative_to(self.scans_root)

    def scan_served(self, image_path: str) -> None:
        if not self.serves(image_path):
            return
        with self._wake:
            if image_path in (self._current, self._pending):
                return
            self._pending = image_path
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="prewarm", daemon=True)
                self._thread.start()
            self._wake.notify()

    def describe(self) -> dict:
        """For /info: the scan being warmed (or last warmed) and how far it got."""
        return {"state": "warming" if self._current else "idle", **self._last}

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._pending is None:
                    self._wake.wait()
                self._current, self._pending = self._pending, None
            try:
                self._warm(self._current)
            except Exception as exc:  # a broken file or an unloadable model: the click will say why
                logger.info("not warming %s: %s", self._current, exc)
            finally:
                self._current = None

    def _warm(self, image_path: str) -> None:
        started = time.perf_counter()
        predictor = self.served.predictor()
        if self._warmed_by() is not predictor:  # a newly published model: its cache starts empty
            self._warmed.clear()
            self._warmed_by = weakref.ref(predictor)
        key = volume_id(image_path)
        if key in self._warmed:
            return
        session = predictor.set_volume(self.volumes.load(image_path), key)
        plan = warm_up_plan(session, limit=int(predictor.cache_size * CACHE_SHARE))
        self._last = {"image": os.path.basename(image_path), "crops_planned": len(plan), "crops_encoded": 0,
                      "finished": False}
        cancelled = lambda: self._pending is not None  # noqa: E731
        encoded = predictor.prefetch(session, plan, cancelled)
        finished = not cancelled()
        if finished:
            with self._wake:
                self._warmed[key] = None
                while len(self._warmed) > WARMED_MEMORY:
                    self._warmed.popitem(last=False)
        seconds = time.perf_counter() - started
        self._last = {**self._last, "crops_encoded": encoded, "finished": finished, "seconds": round(seconds, 2)}
        logger.info("warmed %s: %d of %d crops encoded in %.1f s%s", self._last["image"], encoded, len(plan),
                    seconds, "" if finished else " (another scan was served)")
