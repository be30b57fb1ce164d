"""Snapping a model's mask to the lesion's uptake (segany_pet.segment.edge): when it is taken and when the mask
stands."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from segany_pet.segment.edge import snap_to_uptake

SPACING = (4.0, 4.0, 4.0)


def ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def blurred(*objects):
    """SUV image: background 1, each (mask, SUV) object, blurred like a PET scanner."""
    suv = np.ones((40, 40, 40), np.float32)
    for mask, value in objects:
        suv[mask] = value
    return ndimage.gaussian_filter(suv, 1.0)


def model_mask(mask):
    out = np.zeros(mask.shape, np.uint8, order="F")
    out[mask] = 1
    return out, tuple(slice(0, n) for n in mask.shape)


def test_an_isolated_lesion_takes_its_uptake_boundary():
    lesion = ball((40, 40, 40), (20, 20, 20), 5)
    suv = blurred((lesion, 10.0))
    mask, region = model_mask(ball((40, 40, 40), (20, 20, 20), 3.5))  # the model under-segments
    region, snapped = snap_to_uptake(suv, SPACING, mask, region, [(20, 20, 20)])
    assert snapped
    snapped_mask = mask != 0
    assert snapped_mask[region].sum() == snapped_mask.sum()  # the box returned holds the whole mask
    assert snapped_mask.sum() > lesion.sum() * 0.7 and not (snapped_mask & ~ball((40, 40, 40), (20, 20, 20), 7)).any()


def test_a_lesion_touching_a_hotter_organ_keeps_the_model_mask():
    lesion = ball((40, 40, 40), (20, 20, 14), 4)
    organ = ball((40, 40, 40), (20, 20, 25), 7)
    suv = blurred((organ, 20.0), (lesion, 8.0))
    drawn = lesion.copy()
    mask, region = model_mask(drawn)
    _, snapped = snap_to_uptake(suv, SPACING, mask, region, [(20, 20, 14)])
    assert not snapped  # 41% of the organ-side SUVmax floods the organ: that is not the lesion's edge
    np.testing.assert_array_equal(mask != 0, drawn)


def test_a_lesion_against_a_hotter_organ_takes_its_side_of_the_saddle():
    lesion = ball((40, 40, 40), (20, 20, 12), 4)
    organ = ball((40, 40, 40), (20, 20, 23), 6)
    suv = blurred((organ, 12.0), (lesion, 10.0))  # the saddle between them lies above 41% of either
    mask, region = model_mask(ball((40, 40, 40), (20, 20, 12), 5))
    region, snapped = snap_to_uptake(suv, SPACING, mask, region, [(20, 20, 12)])
    assert snapped
    snapped_mask = mask != 0
    assert snapped_mask[lesion].all() and not (snapped_mask & organ).any()


def test_a_necrotic_core_is_part_of_the_lesion():
    lesion = ball((40, 40, 40), (20, 20, 20), 7)
    core = ball((40, 40, 40), (20, 20, 20), 3)
    suv = blurred((lesion, 10.0), (core, 1.0))
    mask, region = model_mask(lesion & ~ball((40, 40, 40), (20, 20, 20), 4))
    region, snapped = snap_to_uptake(suv, SPACING, mask, region, [(20, 20, 25)])
    assert snapped and (mask[core] != 0).all()


@pytest.mark.parametrize("case", ["box only", "empty mask"])
def test_nothing_to_snap_leaves_the_mask(case):
    lesion = ball((40, 40, 40), (20, 20, 20), 5)
    suv = blurred((lesion, 10.0))
    mask, region = model_mask(lesion if case == "box only" else np.zeros_like(lesion))
    if case == "empty mask":
        region = None
    before = mask.copy()
    foreground = [] if case == "box only" else [(20, 20, 20)]
    assert snap_to_uptake(suv, SPACING, mask, region, foreground) == (region, False)
    np.testing.assert_array_equal(mask, before)


def test_a_background_click_on_the_uptake_cuts_it():
    first = ball((40, 40, 40), (20, 20, 15), 4)
    second = ball((40, 40, 40), (20, 20, 24), 4)
    suv = blurred((first, 10.0), (second, 9.0))
    mask, region = model_mask(first | second)
    region, snapped = snap_to_uptake(suv, SPACING, mask, region, [(20, 20, 15)], [(20, 20, 24)])
    assert snapped and mask[20, 20, 15] and not mask[20, 20, 24]


def test_unknown_method_is_refused():
    mask, region = model_mask(np.zeros((4, 4, 4), bool))
    with pytest.raises(ValueError, match="edge method"):
        snap_to_uptake(np.ones((4, 4, 4)), SPACING, mask, region, [(1, 1, 1)], method="fixed_2.5")
