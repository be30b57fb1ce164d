"""The classical seeded threshold methods annotators compare a model against.

From each lesion click a region grows as the 26-connected part of ``SUV >= threshold`` that holds the
click, with the threshold either fixed (SUV 2.5, 4.0) or relative to the lesion's SUVmax (41 % as in
the EANM guideline, or 50 %). Clicks are voxel indices ``[i, j, k]`` of the stored image.

Choices, each a compromise a human annotator makes too:
- Local SUVmax: the maximum within ``search_radius_mm`` (10 mm) of the click, so a click near but not
  on the hottest voxel works. For relative thresholds it is then refined: if the grown region holds a
  hotter voxel, the threshold is recomputed from that (the EANM threshold refers to the whole lesion's
  SUVmax), as long as the click's seed stays above it, so leaking into a hot organ does not make the
  lesion vanish.
- Seed: the click, or the local-max voxel when the click itself is below the threshold. A fixed
  threshold above the local SUVmax gives an empty region for that click, with a note saying why.
- Small lesions (``sized_41``): blurred by the scanner, a lesion narrower than a few PSF widths spreads its
  uptake beyond its edge, so its 41% region is too large (the partial-volume effect behind volume-dependent
  threshold curves calibrated on sphere phantoms). The fraction rises with each halving of the 41% region's
  volume below ``SIZED_FULL_ML``; it never rises above the clicked voxel's own SUV, so a click on a lesion's
  faint rim stays in its region.
- Background clicks: while a region holds one, its threshold rises in steps of 1 % of the local SUVmax
  (the lowest such step that excludes it, found by bisection since a higher threshold only shrinks the
  region); if only the local SUVmax itself would exclude it, the region is left empty.
- Neighbours (optional, ``peak_prominence``; the app's uptake edge uses it): a region holding another
  prominent peak (a hot organ, a second lesion: its top at least that share of the SUVmax above the saddle
  between them) is cut at the SUV's watershed lines, keeping the clicked peak's side, before the SUVmax is
  refined, so the neighbour sets neither the region nor its threshold.
- Size guard: growth is confined to a box of ``max_extent_mm`` (150 mm) centred on the click, so a
  fixed 2.5 threshold touching the liver cannot flood the body; a region cut by that box says so in its
  note. Working in that box also keeps each click fast on a whole-body grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.morphology import local_maxima, reconstruction
from skimage.segmentation import watershed

from segany_pet.errors import PromptError, UserInputError
from segany_pet.pet.quantify import LESION_CONNECTIVITY, sphere_kernel
from segany_pet.prompts import parse_clicks

log = logging.getLogger(__name__)

METHODS = {
    "relative_41": "41% of the lesion SUVmax (EANM guideline)",
    "relative_50": "50% of the lesion SUVmax",
    "sized_41": "41% of the lesion SUVmax, raised for small regions (partial volume)",
    "fixed_2.5": "fixed threshold SUV >= 2.5",
    "fixed_4.0": "fixed threshold SUV >= 4.0",
}
_RULES = {
    "relative_41": ("relative", 0.41),
    "relative_50": ("relative", 0.50),
    "sized_41": ("sized", 0.41),
    "fixed_2.5": ("fixed", 2.5),
    "fixed_4.0": ("fixed", 4.0),
}
SEARCH_RADIUS_MM = 10.0
MAX_EXTENT_MM = 150.0
THRESHOLD_STEP = 0.01  # background-click threshold increments, as a fraction of the local SUVmax
_MAX_REFINEMENTS = 10
# sized_41: below SIZED_FULL_ML the threshold fraction rises by SIZED_STEP per halving of the 41% region's
# volume, up to SIZED_MAX_FRACTION (0.51 at 1 mL). Chosen on the tuning phantoms (one click, the app's edge; its
# neighbours on the grid swept within 0.01 of it): docs/model_history.md, "The sized uptake edge".
SIZED_FULL_ML = 4.0
SIZED_STEP = 0.05
SIZED_MAX_FRACTION = 0.6


@dataclass
class ClickRegion:
    """The region grown from one lesion click, stored as a mask over ``box`` of the volume."""

    click: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    mask: np.ndarray  # bool, shape of the box
    suvmax: float  # the local SUVmax the threshold refers to
    threshold: float
    note: str = ""  # why the region is empty or cut off; empty when all went as expected

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())


def segment_from_clicks(suv: np.ndarray, spacing, foreground, background=(), method: str = "relative_41",
                        **options) -> np.ndarray:
    """Union of the regions grown from each lesion click: a uint8 mask (0/1) on the SUV grid. Arguments and
    ``options`` as `regions_from_clicks` takes them."""
    regions = regions_from_clicks(suv, spacing, foreground, background, method, **options)
    mask = np.zeros(np.shape(suv), dtype=np.uint8)
    for region in regions:
        mask[region.box][region.mask] = 1
        if region.note:
            log.info("%s click %s: %s", method, list(region.click), region.note)
    return mask


def regions_from_clicks(
    suv: np.ndarray,
    spacing: tuple[float, float, float],
    foreground,
    background=(),
    method: str = "relative_41",
    *,
    search_radius_mm: float = SEARCH_RADIUS_MM,
    max_extent_mm: float = MAX_EXTENT_MM,
    peak_prominence: float | None = None,
) -> list[ClickRegion]:
    """One :class:`ClickRegion` per lesion click, with the threshold used and a note when it failed.

    ``peak_prominence`` (a share of the SUVmax): cut each region from neighbouring peaks at least that prominent
    (the module's notes); None grows the classical region."""
    suv = np.asarray(suv)
    if suv.ndim != 3:
        raise UserInputError(f"SUV image must be 3D, got shape {suv.shape}")
    if method not in _RULES:
        raise UserInputError(f"unknown threshold method {method!r}; choose one of {', '.join(METHODS)}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise UserInputError(f"voxel spacing {spacing!r} must be three positive sizes in mm")
    lesion_clicks = parse_clicks(foreground, suv.shape, "lesion")
    background_clicks = parse_clicks(background, suv.shape, "background")
    if not lesion_clicks:
        raise PromptError("no lesion click given: click at least once on the lesion")
    both = set(lesion_clicks) & set(background_clicks)
    if both:
        raise PromptError(
            f"click {list(min(both))} is both a lesion and a background click; remove one of them"
        )
    return [
        _grow(suv, spacing, click, background_clicks, _RULES[method], search_radius_mm, max_extent_mm, peak_prominence)
        for click in lesion_clicks
    ]


def _grow(suv, spacing, click, background, rule, search_radius_mm, max_extent_mm, peak_prominence) -> ClickRegion:
    box = _box_around(click, suv.shape, spacing, max_extent_mm)
    origin = np.array([s.start for s in box])
    crop = suv[box]
    seed_click = tuple(int(x) for x in np.subtract(click, origin))
    blockers = [
        tuple(int(x) for x in b - origin)
        for b in np.array(background, dtype=int).reshape(-1, 3)
        if all(0 <= x < n for x, n in zip(b - origin, crop.shape, strict=True))
    ]
    peak_voxel, peak = _local_max(crop, seed_click, spacing, search_radius_mm)
    kind, value = rule
    relative = kind in ("relative", "sized")
    threshold = value * peak if relative else value

    def result(mask, note=""):
        return ClickRegion(click, box, mask, peak, threshold, note)

    empty = np.zeros(crop.shape, dtype=bool)
    if peak <= 0:
        return result(empty, f"no uptake within {search_radius_mm:g} mm of the click: nothing to segment")
    if peak < threshold:
        return result(
            empty,
            f"the highest SUV within {search_radius_mm:g} mm of the click is {peak:.2f}, below the "
            f"threshold {threshold:g}: nothing to segment here",
        )

    def seed_at(t):
        return seed_click if crop[seed_click] >= t else peak_voxel

    region = _component(crop, seed_at(threshold), threshold)

    if blockers and _holds_any(region, blockers):
        step = THRESHOLD_STEP * peak
        candidates = threshold + step * np.arange(1, int(np.ceil((peak - threshold) / step)))
        candidates = candidates[candidates < peak]
        lo, hi = -1, len(candidates)  # candidates[lo] still holds a background click; hi = give up
        best = None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = _component(crop, seed_at(candidates[mid]), candidates[mid], within=region)
            if _holds_any(trial, blockers):
                lo = mid
            else:
                hi, best = mid, trial
        if best is None:
            return result(
                empty,
                f"a background click cannot be separated from the lesion below its SUVmax {peak:.2f}; "
                "move the background click off the lesion",
            )
        threshold, region = float(candidates[hi]), best

    if peak_prominence is not None:
        region = _peak_basin(crop, region, seed_at(threshold), peak_prominence * peak)

    if relative:
        for _ in range(_MAX_REFINEMENTS):
            hottest = float(crop[region].max())
            refined = value * hottest
            seed = seed_at(threshold)
            if hottest <= peak or refined <= threshold:
                break
            if crop[seed] < refined:
                break  # the click would drop out: the region leaks into something hotter; keep it
            peak, threshold = hottest, refined
            region = _component(crop, seed, threshold, within=region) & region

    if kind == "sized" and region.any():
        raised = sized_fraction(np.count_nonzero(region) * float(np.prod(spacing)) / 1000.0) * peak
        if region[seed_click]:
            # A click on a lesion's faint rim (a correction) stays in its own region.
            raised = min(raised, float(crop[seed_click]))
        if raised > threshold:
            threshold = raised
            seed = seed_click if region[seed_click] else _hottest(crop, region)
            region = _component(crop, seed, threshold, within=region) & region

    note = ""
    if _cut_by_box(region, box, suv.shape):
        note = (
            f"the region reached the {max_extent_mm:g} mm growth limit around the click and is cut "
            "there: it probably leaks into an organ; add a background click or use a relative threshold"
        )
    return result(region, note)


def sized_fraction(volume_ml: float) -> float:
    """The share of SUVmax that ``sized_41`` thresholds a region at, from the volume of the region it grew at 41%
    (after the saddle cut and any background click)."""
    if volume_ml >= SIZED_FULL_ML:
        return 0.41
    halvings = np.log2(SIZED_FULL_ML / max(volume_ml, 1e-6))
    return float(min(0.41 + SIZED_STEP * halvings, SIZED_MAX_FRACTION))


def _hottest(crop, region) -> tuple[int, int, int]:
    values = np.where(region, crop, -np.inf)
    return tuple(int(x) for x in np.unravel_index(int(np.argmax(values)), crop.shape))


def _box_around(click, shape, spacing, extent_mm) -> tuple[slice, slice, slice]:
    half = [max(int(round(extent_mm / 2 / s)), 1) for s in spacing]
    return tuple(slice(max(c - h, 0), min(c + h + 1, n)) for c, h, n in zip(click, half, shape, strict=True))


def _local_max(crop, centre, spacing, radius_mm) -> tuple[tuple[int, int, int], float]:
    """Hottest voxel within the radius of ``centre``; among equals, the one closest to it."""
    ball = sphere_kernel(spacing, radius_mm)
    half = [n // 2 for n in ball.shape]
    lo = [max(c - h, 0) for c, h in zip(centre, half, strict=True)]
    hi = [min(c + h + 1, n) for c, h, n in zip(centre, half, crop.shape, strict=True)]
    ball = ball[tuple(slice(a - c + h, b - c + h) for a, b, c, h in zip(lo, hi, centre, half, strict=True))]
    values = np.where(ball, crop[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))], -np.inf)
    peak = float(values.max())
    candidates = np.argwhere(values == peak) + lo
    distance = (((candidates - centre) * spacing) ** 2).sum(axis=1)
    return tuple(int(x) for x in candidates[int(np.argmin(distance))]), peak


def _component(crop, seed, threshold, within=None) -> np.ndarray:
    """The 26-connected part of ``crop >= threshold`` holding ``seed``.

    ``within`` is a region known to contain the answer (the same seed at a lower threshold), so only
    its bounding box needs labelling.
    """
    if within is not None and within[seed]:
        (sub,) = ndimage.find_objects(within.astype(np.uint8))
    else:
        sub = tuple(slice(0, n) for n in crop.shape)
    region = np.zeros(crop.shape, dtype=bool)
    if crop[seed] < threshold:
        return region
    labels, _ = ndimage.label(crop[sub] >= threshold, structure=LESION_CONNECTIVITY)
    local_seed = tuple(c - s.start for c, s in zip(seed, sub, strict=True))
    region[sub] = labels == labels[local_seed]
    return region


def _peak_basin(crop, region, seed, prominence: float) -> np.ndarray:
    """The part of ``region`` that drains to ``seed``'s peak: ``region`` cut along the watershed lines of the SUV
    between the peaks rising at least ``prominence`` (SUV) above their saddles."""
    (sub,) = ndimage.find_objects(region.astype(np.uint8))
    inside = region[sub]
    values = np.asarray(crop[sub], dtype=np.float32)
    # Regional maxima after lowering every peak by the prominence (the h-maxima transform): one plateau per
    # prominent peak, however flat or ring-shaped its top.
    domes = reconstruction(values - prominence, values)
    peaks, count = ndimage.label(
        local_maxima(domes, connectivity=3, allow_borders=True) & inside, structure=LESION_CONNECTIVITY
    )
    if count < 2:
        return region
    basins = watershed(-values, peaks, mask=inside, connectivity=1)
    local_seed = tuple(c - s.start for c, s in zip(seed, sub, strict=True))
    if basins[local_seed] == 0:
        return region
    basin = np.zeros_like(region)
    basin[sub] = basins == basins[local_seed]
    return basin


def _holds_any(region, voxels) -> bool:
    return any(region[v] for v in voxels)


def _cut_by_box(region, box, shape) -> bool:
    """True when the region touches a face of the growth box that is not the volume's own edge."""
    for axis, (s, n) in enumerate(zip(box, shape, strict=True)):
        face = [slice(None)] * 3
        if s.start > 0:
            face[axis] = 0
            if region[tuple(face)].any():
                return True
        if s.stop < n:
            face[axis] = -1
            if region[tuple(face)].any():
                return True
    return False
