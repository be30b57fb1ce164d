"""Simulated prompts: where an annotator (or the autoPET IV protocol) clicks on a known object.

Clicks are voxel indices ``[i, j, k]`` of the stored image, the frame clients send.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from scipy import ndimage

from segany_pet.errors import PromptError


def centre_click(object_mask: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> list[int]:
    """The voxel deepest inside the object (maximum of its distance transform), as autoPET IV clicks.

    Unlike the centroid, this voxel always lies inside the object, however irregular its shape.
    """
    boxes = ndimage.find_objects((np.asarray(object_mask) != 0).astype(np.uint8))
    if not boxes:
        raise ValueError("cannot click on an empty object mask")
    (box,) = boxes
    # A background rim all round, so an object cut by the array's edge still has a boundary there.
    inside = np.pad(np.asarray(object_mask)[box] != 0, 1)
    depth = ndimage.distance_transform_edt(inside, sampling=spacing)[1:-1, 1:-1, 1:-1]
    deepest = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return [int(index + s.start) for index, s in zip(deepest, box, strict=True)]


def parse_clicks(clicks, shape: tuple[int, ...], kind: str) -> list[tuple[int, int, int]]:
    """Check clicks are ``[[i, j, k], ...]`` voxel indices inside ``shape``; PromptError says what's wrong."""
    if clicks is None:
        return []
    if isinstance(clicks, np.ndarray):
        clicks = clicks.tolist()
    extent = ", ".join(f"0..{n - 1}" for n in shape)
    where = f"the volume has shape {tuple(shape)}, so indices run {extent}"
    if isinstance(clicks, str | bytes) or not hasattr(clicks, "__iter__"):
        raise PromptError(f"{kind} clicks must be a list of [i, j, k] voxel indices, got {clicks!r}")
    clicks = list(clicks)
    if clicks and all(_is_number(value) for value in clicks):
        raise PromptError(
            f"{kind} clicks {clicks!r} look like a single click: send a list of clicks, e.g. [{clicks!r}]"
        )
    parsed = []
    for number, click in enumerate(clicks, start=1):
        label = f"{kind} click #{number} {click!r}"
        if isinstance(click, np.ndarray):
            click = click.tolist()
        if isinstance(click, str | bytes) or not isinstance(click, list | tuple) or len(click) != 3:
            raise PromptError(f"{label} must be three voxel indices [i, j, k]")
        index = []
        for value in click:
            if not _is_whole(value):
                raise PromptError(f"{label}: {value!r} is not a whole voxel index; send integer [i, j, k]")
            index.append(int(value))
        if any(i < 0 or i >= n for i, n in zip(index, shape, strict=True)):
            raise PromptError(
                f"{label} is outside the volume: {where} (clicks are voxel indices, not millimetres)"
            )
        parsed.append(tuple(index))
    return parsed


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _is_whole(value) -> bool:
    """A whole number: an integer of any size (a huge one is then outside the volume), or a finite whole float."""
    if not _is_number(value):
        return False
    return isinstance(value, numbers.Integral) or math.isfinite(value) and float(value).is_integer()
