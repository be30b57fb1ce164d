"""Uptake edges: a model's mask moved to the lesion's own PET boundary where the two agree.

The model answers *which* object a click means (the lesion, not the bladder it touches); where a lesion ends
on PET is what a threshold says, a fraction of its SUVmax. `snap_to_uptake` grows that threshold region from
the lesion clicks (the classical method of `segany_pet.evaluate.baselines`, background clicks included), cut
from any hotter neighbour at the saddle between them (``PEAK_PROMINENCE``), and takes it, holes filled (a
necrotic core is part of the lesion), only when it stays within the model's mask: at least ``INSIDE_SHARE`` of
it inside the mask grown by ``MARGIN_VOXELS``. A region that leaks into an organ with no saddle between them
fails that test and the model's own mask stands.

The methods: ``relative_41`` and ``relative_50``, the EANM guideline's 41% (or 50%) of the SUVmax; and
``adaptive_41``, 41% of the way from the local background to the SUVmax, the background being the median SUV
``BACKGROUND_SHELL_MM`` outside the model's mask. Without that correction a lesion only 2-4 times as hot as
the tissue around it has its threshold near the tissue's own SUV, and the region floods it.

Measured on 12 synthetic tuning phantoms (seed 1, separate from the training and test cohorts;
model/README.md), mean Dice after one click: with v1, the edge 0.610 -> 0.694 (touching an organ 0.572 ->
0.599); with v4, the saddle cut 0.731 -> 0.740 (touching 0.638 -> 0.650). The margin, share and prominence
were chosen there, never on the test cohort.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from segany_pet.evaluate.baselines import regions_from_clicks

# Edge method: (the threshold rule of `segany_pet.evaluate.baselines`, whether it is measured from the background).
EDGE_METHODS = {"adaptive_41": ("relative_41", True), "relative_41": ("relative_41", False),
                "relative_50": ("relative_50", False)}
MARGIN_VOXELS = 2
INSIDE_SHARE = 0.8
# The region is cut from peaks rising this share of the lesion's SUVmax above the saddle to it (a hot organ,
# another lesion); lower, a peak is the lesion's own texture or noise. Chosen on the tuning phantoms with v4:
# in a one-click sweep 0.2-0.5 within 0.003 of each other, 0.1 lower.
PEAK_PROMINENCE = 0.3
# The background of ``adaptive_41``: the shell from 8 mm (clear of the scanner's blur of the lesion, 5-8.5 mm
# FWHM) to 20 mm outside the model's mask.
BACKGROUND_SHELL_MM = (8.0, 20.0)
_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def snap_to_uptake(
    suv: np.ndarray,
    spacing,
    mask: np.ndarray,
    region: tuple[slice, slice, slice] | None,
    foreground,
    background=(),
    method: str = "adaptive_41",
) -> tuple[tuple[slice, slice, slice] | None, bool]:
    """Replace ``mask`` (in place) by the uptake region of the lesion clicks where it agrees with the mask.

    ``region``: a box holding every voxel of ``mask`` (None: the mask is empty). Returns the box holding
    every voxel of the mask afterwards and whether the mask was replaced. Without lesion clicks (a box
    prompt alone) or with an empty mask nothing changes.
    """
    if method not in EDGE_METHODS:
        raise ValueError(f"edge method {method!r} is not one of {', '.join(EDGE_METHODS)}")
    if region is None or not foreground or not mask[region].any():
        return region, False
    rule, from_background = EDGE_METHODS[method]
    background_suv = background_around(suv, spacing, mask, region) if from_background else 0.0
    grown = regions_from_clicks(suv, spacing, foreground, background, rule, peak_prominence=PEAK_PROMINENCE,
                                background_suv=background_suv)
    boxes = [click_region.box for click_region in grown] + [region]
    work = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))
    uptake = np.zeros([s.stop - s.start for s in work], dtype=bool)
    for click_region in grown:
        local = tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(click_region.box, work, strict=True))
        uptake[local] |= click_region.mask
    model_mask = mask[work] != 0
    if not uptake.any():
        return region, False
    (model_box,) = ndimage.find_objects(model_mask.astype(np.uint8))
    model_box = tuple(slice(max(s.start - MARGIN_VOXELS, 0), s.stop + MARGIN_VOXELS) for s in model_box)
    near_model = np.zeros_like(model_mask)
    near_model[model_box] = ndimage.binary_dilation(model_mask[model_box], _FACE_NEIGHBOURS, iterations=MARGIN_VOXELS)
    if np.count_nonzero(uptake & near_model) < INSIDE_SHARE * np.count_nonzero(uptake):
        return region, False
    lesion = ndimage.binary_fill_holes(uptake)
    mask[work] = lesion
    (tight,) = ndimage.find_objects(lesion.astype(np.uint8))
    return tuple(slice(w.start + t.start, w.start + t.stop) for w, t in zip(work, tight, strict=True)), True


def background_around(suv: np.ndarray, spacing, mask: np.ndarray, region: tuple[slice, slice, slice]) -> float:
    """Median SUV in the shell ``BACKGROUND_SHELL_MM`` outside ``mask`` (whose voxels all lie in ``region``);
    0 when the shell holds no voxel of the volume."""
    inner_mm, outer_mm = BACKGROUND_SHELL_MM
    reach = [int(np.ceil(outer_mm / s)) for s in spacing]
    box = tuple(slice(max(r.start - n, 0), min(r.stop + n, size))
                for r, n, size in zip(region, reach, suv.shape, strict=True))
    distance = ndimage.distance_transform_edt(mask[box] == 0, sampling=spacing)
    shell = (distance > inner_mm) & (distance <= outer_mm)
    if not shell.any():
        return 0.0
    return max(float(np.median(suv[box][shell])), 0.0)
