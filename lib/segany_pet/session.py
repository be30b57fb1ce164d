"""One volume being annotated: the clicks so far, the crops that answer them, and the mask they give.

A click is answered by one crop centred on the prompts (`place_crop`); when the mask reaches a crop face
and the volume goes on, further crops shifted by half a crop follow it (`extension_windows`), up to
``max_windows``, and their logits are merged by maximum. A previous prediction is the mask prompt of the
next click, SAM-style, with all clicks so far. A `VolumeSession` comes from `Predictor.set_volume` and asks
its predictor for embeddings and decodes; it holds nothing else.
"""

from __future__ import annotations

import time
from collections import deque
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

    def __init__(self, predictor, volume: PETVolume, volume_id: str):
        # predictor: the `segany_pet.predictor.Predictor` that made it (not imported: it imports this module)
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
