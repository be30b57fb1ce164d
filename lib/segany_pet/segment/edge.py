"""Uptake edges: a model's mask moved to the lesion's own PET boundary where the two agree.

The model answers *which* object a click means (the lesion, not the bladder it touches); where a lesion ends
on PET is what the EANM guideline's threshold says, a fraction of its SUVmax. `snap_to_uptake` grows that
threshold region from the lesion clicks (the classical methods of `segany_pet.segment.threshold`, background
clicks included), cut from any hotter neighbour at the saddle between them (``PEAK_PROMINENCE``), and takes
it, holes filled (a necrotic core is part of the lesion), only when it stays within the model's mask: at least
``INSIDE_SHARE`` of it inside the mask grown by ``MARGIN_VOXELS``. A region that leaks into an organ with no
saddle between them fails that test and the model's own mask stands. The app's default, ``sized_41``, raises
the 41% for regions under 4 mL (the scanner's blur spreads a small lesion's uptake beyond it), never above a
lesion click's own SUV.

Measured on synthetic tuning phantoms (test splits of seeds 1-3, separate from the training and test cohorts;
model/README.md), mean Dice after one click: with v1, the edge 0.610 -> 0.694 (seed 1; touching an organ
0.572 -> 0.599); with v4, the saddle cut 0.731 -> 0.740 (seed 1; touching 0.638 -> 0.650); as served (scale
ensemble), ``sized_41`` against ``relative_41`` 0.756 -> 0.772 (206 lesions). The margin, share, prominence
and the sized curve were chosen there, never on the test cohort.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from segany_pet.segment.threshold import regions_from_clicks

EDGE_METHODS = ("relative_41", "relative_50", "sized_41")
MARGIN_VOXELS = 2
INSIDE_SHARE = 0.8
# The region is cut from peaks rising this share of the lesion's SUVmax above the saddle to it (a hot organ,
# another lesion); lower, a peak is the lesion's own texture or noise. Chosen on the tuning phantoms with v4:
# in a one-click sweep 0.2-0.5 within 0.003 of each other, 0.1 lower.
PEAK_PROMINENCE = 0.3
_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def snap_to_uptake(
    suv: np.ndarray,
    spacing,
    mask: np.ndarray,
    region: tuple[slice, slice, slice] | None,
    foreground,
    background=(),
    method: str = "relative_41",
) -> tuple[tuple[slice, slice, slice] | None, bool]:
    """Replace ``mask`` (in place) by the uptake region of the lesion clicks where it agrees with the mask.

    ``region``: a box holding every voxel of ``mask`` (None: the mask is empty). Returns the box holding
    every voxel of the mask afterwards and whether the mask was replaced. Without lesion clicks (a box
    prompt alone) or with an empty mask nothing changes.
    """
    if method not in EDGE_METHODS:
        raise ValueError(f"edge method {method!r} is not one of {', '.join(EDGE_METHODS)}")
    if region is None or not foreground:
        return region, False
    grown = regions_from_clicks(suv, spacing, foreground, background, method, peak_prominence=PEAK_PROMINENCE)
    boxes = [click_region.box for click_region in grown] + [region]
    work = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))
    uptake = np.zeros([s.stop - s.start for s in work], dtype=bool)
    for click_region in grown:
        local = tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(click_region.box, work, strict=True))
        uptake[local] |= click_region.mask
    model_mask = mask[work] != 0
    if not uptake.any() or not model_mask.any():
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
