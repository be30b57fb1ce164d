"""The interactive predictor: set a PET volume once, then predict a mask from clicks, a box or a previous mask.

    predictor = Predictor(model)                          # one per model, shared by every annotator
    session = predictor.set_volume(volume, "case_0042")   # cheap: nothing is encoded yet
    first = session.predict(foreground=[[210, 188, 140]])
    better = session.predict(background=[[214, 190, 141]], previous=first)
    better.mask                                           # uint8, on the volume's own stored grid

Where crops go and how they map to the volume (three coordinate frames, separable resampling, pasting
back) is `segany_pet.crops`.

A click is answered by one crop centred on the prompts (`place_crop`); when the mask reaches a crop face
and the volume goes on, further crops shifted by half a crop follow it (`extension_windows`), up to
``max_windows``, and their logits are merged by maximum. A previous prediction is the mask prompt of the
next click, SAM-style, with all clicks so far.

"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from segany_pet.crops import (
    CropGeometry,
    axis_coordinates,
    crop_volume,
    extension_windows,
    invert_affine,
    normalise,
    paste_mask,
    place_crop,
    resample,
)
from segany_pet.errors import PromptError
from segany_pet.pet.volume import PETVolume
from segany_pet.prompts import parse_clicks
from segany_pet.segment.edge import EDGE_METHODS, snap_to_uptake

# A previous mask that has to be resampled into a new crop becomes logits of +-8: confident, not saturated.
MASK_PROMPT_LOGIT = 8.0
DEFAULT_MAX_WINDOWS = 6
# A prefetch encodes only when no click has been answered for this long (a server still quantifies, encodes and
# sends the reply after the predictor is done, and an annotator's next click often follows within it); it looks
# again every PREFETCH_POLL_S.
PREFETCH_QUIET_S = 0.5
PREFETCH_POLL_S = 0.01
LATENCY_KEYS = ("crop", "encode", "decode", "paste", "plan", "edge")


# ----------------------------------------------------------------------------------------------
# Prompts


def parse_box(box, shape) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """A box ``((i0, j0, k0), (i1, j1, k1))``: inclusive min and max corners in stored voxel indices."""
    if box is None:
        return None
    if isinstance(box, np.ndarray):
        box = box.tolist()
    if (
        isinstance(box, str | bytes)
        or not isinstance(box, list | tuple)
        or len(box) != 2
        or not all(isinstance(corner, list | tuple | np.ndarray) for corner in box)
    ):
        raise PromptError(f"box must be two corners ((i0, j0, k0), (i1, j1, k1)) in voxel indices, got {box!r}")
    low, high = parse_clicks(list(box), shape, "box corner")
    flipped = [axis for axis in range(3) if low[axis] > high[axis]]
    if flipped:
        raise PromptError(
            f"box min corner {low} is beyond max corner {high} on axis {flipped}: send the minimum corner first"
        )
    return low, high


def _accumulate(old: tuple, new: list, other_new: list) -> tuple:
    """Old clicks then new ones, each once; an old click re-clicked with the other label is dropped."""
    kept = [click for click in old if click not in other_new]
    kept += [click for click in new if click not in kept]
    return tuple(dict.fromkeys(kept))


def volume_fingerprint(volume: PETVolume) -> str:
    """A content hash of SUV and affine (SHA-1: about 0.1 s for a 400x400x326 volume)."""
    digest = hashlib.sha1()
    digest.update(repr((volume.shape, str(volume.suv.dtype))).encode())
    digest.update(np.ascontiguousarray(volume.affine, dtype=np.float64).tobytes())
    digest.update(memoryview(np.ascontiguousarray(volume.suv)).cast("B"))
    return "sha1:" + digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class WindowResult:
    """One crop the model looked at: its geometry, low-res logits (1, 1, L, L, L) and IoU estimate."""

    geometry: CropGeometry
    low_res_logits: torch.Tensor = field(repr=False)
    iou: float
    cache_hit: bool


@dataclass
class Prediction:
    """A mask and what is needed to refine it with the next click.

    ``low_res_logits`` and ``geometry`` are those of the first window (centred on the prompts, at the
    preset's ``spacing_mm``); ``iou`` (the model's estimate) is that window's, averaged with the first windows
    of a scale ensemble's other spacings; ``window_results`` holds every window. ``foreground``,
    ``background`` and ``box`` are all prompts so far (stored voxel indices). ``cache_hit`` is True when no
    window needed the image encoder. ``latencies`` (s) sums crop, encode, decode, paste and plan (choosing and
    seeding extra windows) over windows, plus total.
    """

    mask: np.ndarray = field(repr=False)
    region: tuple[slice, slice, slice] | None  # holds every voxel of the mask: measure there, not everywhere
    low_res_logits: torch.Tensor = field(repr=False)
    geometry: CropGeometry
    iou: float
    windows: int
    cache_hit: bool
    latencies: dict[str, float]
    edge: str  # where the mask's boundary came from: "model", or the uptake threshold it was snapped to
    foreground: tuple[tuple[int, int, int], ...]
    background: tuple[tuple[int, int, int], ...]
    box: tuple[tuple[int, int, int], tuple[int, int, int]] | None
    volume_id: str
    window_results: tuple[WindowResult, ...] = field(repr=False)
    notes: tuple[str, ...] = ()


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


def _left_out_clicks(mask: np.ndarray, region, foreground) -> list[str]:
    """A note for the annotator when foreground clicks fall outside the mask: the model says "no lesion here"."""
    missed = [list(click) for click in foreground if not mask[tuple(click)]]
    if not missed:
        return []
    if region is None or not mask[region].any():
        return [f"no lesion found at the foreground click(s) {missed}: the model reads the uptake there as "
                "physiological or background. Click the lesion's hottest voxel, draw a box around it, or use "
                "suv_threshold"]
    return [f"the mask leaves out the foreground click(s) {missed}: the model does not see them as part of the "
            "object; a click beside them or a box around the object asks again"]


class VolumeSession:
    """One volume being annotated with a `Predictor`: holds the volume and its id, nothing else.

    Cheap to create; safe to use from several threads (each click's state travels in its `Prediction`).
    """

    def __init__(self, predictor: Predictor, volume: PETVolume, volume_id: str):
        self.predictor = predictor
        self.volume = volume
        self.volume_id = volume_id

    def predict(self, foreground=(), background=(), box=None, previous: Prediction | None = None,
                edge: str | None = None) -> Prediction:
        """A mask from prompts in stored voxel indices.

        ``foreground`` / ``background``: lists of ``[i, j, k]``; ``box``: ``((i0, j0, k0), (i1, j1, k1))``,
        inclusive corners. ``previous``: the Prediction of the last click on this volume. Its prompts are
        kept (send only the new clicks, or all of them: repeats count once) and its logits become the mask
        prompt, as SAM refines. The mask is the maximum of the logits of every window at each crop spacing,
        averaged over the spacings of a scale ensemble that found something and thresholded at 0 (`paste_mask`).
        ``edge``: None keeps that mask; a method of `segany_pet.segment.edge` snaps it to the lesion's uptake where the
        two agree (the mask prompt of the next click stays the model's own logits).
        """
        if edge is not None and edge not in EDGE_METHODS:
            raise PromptError(f"edge must be one of {', '.join(EDGE_METHODS)} (or none), got {edge!r}")
        with self.predictor.answering():
            return self._predict(foreground, background, box, previous, edge)

    def click_crops(self, clicks) -> list[CropGeometry]:
        """The first crops that single clicks at ``clicks`` (stored voxel indices) would be answered from, at
        every spacing the predictor reads, each once, in the order of the clicks: what to `prefetch` for them."""
        preset, affine, shape = self.predictor.preset, self.volume.affine, self.volume.shape
        crops = {}
        for click in clicks:
            for spacing in self.predictor.spacings:
                crops.setdefault(place_crop(affine, shape, [click], preset.crop_size, spacing)[0])
        return list(crops)

    def _predict(self, foreground, background, box, previous, edge) -> Prediction:
        started = time.perf_counter()
        foreground, background, box = self._prompts_so_far(foreground, background, box, previous)
        latencies = dict.fromkeys(LATENCY_KEYS, 0.0)
        results, voting, firsts, notes = [], [], [], []
        for spacing in self.predictor.spacings:
            scale_results, scale_notes = self._follow_object(spacing, foreground, background, box, previous, latencies)
            results += scale_results
            firsts.append(scale_results[0])
            notes += [note for note in scale_notes if note not in notes]
            # A spacing that finds nothing abstains rather than outvoting one that found the object (the shipped
            # model reads a 15 mL demo lesion as background at 1.25 mm); when none finds anything, the mask is empty.
            if any(bool((result.low_res_logits > 0).any()) for result in scale_results):
                voting += scale_results
        mask, region = self._paste(voting or results, latencies)
        if edge is not None:
            snapping = time.perf_counter()
            region, snapped = snap_to_uptake(self.volume.suv, self.volume.spacing, mask, region, foreground,
                                             background, edge)
            edge = edge if snapped else None
            latencies["edge"] = time.perf_counter() - snapping
        notes += _left_out_clicks(mask, region, foreground)
        latencies["total"] = time.perf_counter() - started
        first = results[0]
        return Prediction(
            mask=mask,
            region=region,
            low_res_logits=first.low_res_logits,
            geometry=first.geometry,
            iou=float(np.mean([result.iou for result in firsts])),
            windows=len(results),
            cache_hit=all(result.cache_hit for result in results),
            latencies=latencies,
            edge=edge or "model",
            foreground=foreground,
            background=background,
            box=box,
            volume_id=self.volume_id,
            window_results=tuple(results),
            notes=tuple(notes),
        )

    def _prompts_so_far(self, foreground, background, box, previous):
        """Validated prompts (stored voxel indices), with those of the previous prediction."""
        shape = self.volume.shape
        new_foreground = parse_clicks(foreground, shape, "foreground")
        new_background = parse_clicks(background, shape, "background")
        box = parse_box(box, shape)
        if previous is not None:
            self._check_previous(previous)
            foreground = _accumulate(previous.foreground, new_foreground, new_background)
            background = _accumulate(previous.background, new_background, new_foreground)
            box = box if box is not None else previous.box
        else:
            foreground, background = tuple(dict.fromkeys(new_foreground)), tuple(dict.fromkeys(new_background))
        if not foreground and box is None:
            raise PromptError("no prompt on the object: click at least once on the object or draw a box")
        return foreground, background, box

    def _follow_object(self, spacing, foreground, background, box, previous,
                       latencies) -> tuple[list[WindowResult], list]:
        """At one crop spacing: the first window, centred on the prompts, then windows past every face the
        object leaves through (breadth first, so it grows evenly in all directions) until it stops or
        ``max_windows`` is reached."""
        preset, affine, shape = self.predictor.preset, self.volume.affine, self.volume.shape
        notes = []
        placement = list(foreground)
        if box is not None:  # the box centre first: the anchor when the prompts do not fit one crop
            placement = [tuple(np.add(box[0], box[1]) / 2), *box, *placement]
        geometry, fits = place_crop(affine, shape, placement, preset.crop_size, spacing)
        if not fits:
            anchor = "box centre" if box is not None else "first foreground click"
            notes.append(
                f"the prompts span more than one crop: the first crop is centred on the {anchor}; "
                "prompts outside it count only in extra windows that contain them"
            )
        mask_prompt = self._mask_prompt(geometry, previous, latencies)
        results = [self._window(geometry, foreground, background, box, [], mask_prompt, latencies)]
        seen = {geometry}
        queue = deque(results)
        capped = False
        while queue:
            parent = queue.popleft()
            started = time.perf_counter()
            candidates = extension_windows(parent.low_res_logits[0, 0] > 0, parent.geometry, affine, shape)
            latencies["plan"] += time.perf_counter() - started
            for candidate in candidates:
                if candidate in seen:
                    continue
                if len(results) >= self.predictor.max_windows:
                    capped = True
                    break
                seen.add(candidate)
                result = self._extension(parent, candidate, foreground, background, box, previous, latencies)
                if result is not None:
                    results.append(result)
                    queue.append(result)
        if capped:
            notes.append(
                f"the object reaches past {self.predictor.max_windows} windows (max_windows): "
                "it may continue beyond the mask"
            )
        return results, notes

    def _check_previous(self, previous: Prediction) -> None:
        if previous.volume_id != self.volume_id or previous.mask.shape != self.volume.shape:
            raise PromptError(
                f"previous prediction belongs to volume {previous.volume_id!r}, not {self.volume_id!r}: "
                "pass the Prediction of the last click on this volume"
            )

    def _window(self, geometry, foreground, background, box, seeds, mask_prompt, latencies) -> WindowResult:
        """Encode (or reuse) one crop and decode the prompts that fall inside it, plus seed points (crop index)."""
        embedding, hit = self.predictor.embedding(self, geometry, latencies)
        started = time.perf_counter()
        affine, size = self.volume.affine, geometry.size
        points, labels = [], []
        for clicks, label in ((foreground, 1), (background, 0)):
            if clicks:
                crop = geometry.stored_to_crop(affine, clicks)
                inside = crop[np.all((crop >= -0.5) & (crop <= size - 0.5), axis=1)]
                points += inside.tolist()
                labels += [label] * len(inside)
        points += [list(seed) for seed in seeds]
        labels += [1] * len(seeds)
        box_crop = None
        if box is not None:
            corners = geometry.stored_to_crop(affine, box)
            low = np.clip(corners.min(axis=0), 0, size - 1)
            high = np.clip(corners.max(axis=0), 0, size - 1)
            if np.all(corners.max(axis=0) >= 0) and np.all(corners.min(axis=0) <= size - 1):
                box_crop = np.concatenate([low, high])
        logits, iou = self.predictor.decode(embedding, points, labels, box_crop, mask_prompt)
        latencies["decode"] += time.perf_counter() - started
        return WindowResult(geometry, logits, iou, hit)

    def _mask_prompt(self, geometry: CropGeometry, previous: Prediction | None, latencies) -> torch.Tensor | None:
        """The previous prediction as low-res logits of this crop: its own logits if it looked here too,
        else its pasted mask resampled into the crop, averaged to the low-res grid and scaled to +-8."""
        if previous is None:
            return None
        for window in previous.window_results:
            if window.geometry == geometry:
                return window.low_res_logits[0, 0]
        started = time.perf_counter()
        fraction = crop_volume(previous.mask, self.volume.affine, geometry)
        factor = geometry.size // self.predictor.preset.low_res_size
        fraction = F.avg_pool3d(fraction[None, None], factor)[0, 0]
        latencies["crop"] += time.perf_counter() - started
        return (2 * fraction - 1) * MASK_PROMPT_LOGIT

    def _extension(self, parent, geometry, foreground, background, box, previous, latencies) -> WindowResult | None:
        """A window continuing ``parent``: prompted with the user's prompts inside it, a positive point at the
        deepest voxel of the parent's mask in the overlap, and a mask prompt that is the parent's logits in the
        overlap and elsewhere the previous prediction, or 0 (undecided: a negative prior would tell the model
        the object stops at the old crop face). None if the parent's mask does not reach into the window."""
        started = time.perf_counter()
        low_res = parent.low_res_logits.shape[-1]
        factor = geometry.size / low_res
        # low-res voxel l is crop voxel factor * l + (factor - 1) / 2 (centre of the voxels it upsamples to)
        low_res_to_crop = np.diag([factor, factor, factor, 1.0])
        low_res_to_crop[:3, 3] = (factor - 1) / 2
        to_parent = invert_affine(parent.geometry.affine) @ geometry.affine @ low_res_to_crop
        carried = resample(
            parent.low_res_logits[0, 0], to_parent, (low_res,) * 3, outside="border", upsample_to=geometry.size
        )
        carried = torch.from_numpy(carried)
        _, coords = axis_coordinates(to_parent, (low_res,) * 3)
        inside = [torch.from_numpy((c >= -0.5) & (c <= geometry.size - 0.5)) for c in coords]
        overlap = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        prior = self._mask_prompt(geometry, previous, latencies)
        prior = torch.zeros_like(carried) if prior is None else prior.clone()
        prior[overlap] = carried[overlap]
        carried_mask = ((carried > 0) & overlap).numpy()
        seeds = []
        if carried_mask.any():
            depth = ndimage.distance_transform_edt(carried_mask)
            deepest = np.unravel_index(int(np.argmax(depth)), depth.shape)
            seeds.append([factor * index + (factor - 1) / 2 for index in deepest])
        latencies["plan"] += time.perf_counter() - started
        if not seeds:  # nothing of the object reaches into this window
            return None
        return self._window(geometry, foreground, background, box, seeds, prior, latencies)

    def _paste(self, results: list[WindowResult], latencies):
        started = time.perf_counter()
        windows = [(result.geometry, result.low_res_logits[0, 0]) for result in results]
        pasted = paste_mask(windows, self.volume.affine, self.volume.shape)
        latencies["paste"] += time.perf_counter() - started
        return pasted
