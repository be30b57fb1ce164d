"""Simulated clicks and click validation."""

from __future__ import annotations

import numpy as np
import pytest

from segany_pet.errors import PromptError
from segany_pet.prompts import centre_click, parse_clicks


def test_centre_click_lands_inside_a_curved_object_where_the_centroid_does_not():
    mask = np.zeros((20, 20, 5), np.uint8)
    mask[2:18, 2:6, :] = 1  # an L: the centroid falls in the empty corner
    mask[2:6, 2:18, :] = 1
    centroid = np.argwhere(mask).mean(axis=0).round().astype(int)
    assert not mask[tuple(centroid)]
    click = centre_click(mask)
    assert mask[tuple(click)]
    assert click == [3, 3, 2] or click == [4, 4, 2]  # the corner block is the thickest part


def test_centre_click_treats_the_array_edge_as_boundary():
    assert centre_click(np.ones((5, 5, 5), np.uint8)) == [2, 2, 2]  # the array's faces count as boundary
    with pytest.raises(ValueError, match="empty"):
        centre_click(np.zeros((3, 3, 3)))


def test_parse_clicks_accepts_lists_and_arrays_and_names_the_bad_click():
    assert parse_clicks([[1, 2, 3], (0, 0, 0)], (4, 4, 4), "lesion") == [(1, 2, 3), (0, 0, 0)]
    assert parse_clicks(np.array([[1, 2, 3]]), (4, 4, 4), "lesion") == [(1, 2, 3)]
    assert parse_clicks(None, (4, 4, 4), "background") == []
    with pytest.raises(PromptError, match=r"background click #2 \[4, 0, 0\] is outside the volume"):
        parse_clicks([[0, 0, 0], [4, 0, 0]], (4, 4, 4), "background")
    with pytest.raises(PromptError, match="single click"):
        parse_clicks([1, 2, 3], (4, 4, 4), "lesion")
