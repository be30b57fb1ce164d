"""Segmentation scores as the autoPET challenges compute them: Dice, false-positive and false-negative volume.

Masks are arrays of one shape; any non-zero voxel is foreground. FPV and FNV split masks into
18-connected components (voxels sharing a face or an edge, not only a corner), as autoPET's
evaluation code does, so a component here can differ from a 26-connected lesion of ``quantify``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

COMPONENT_CONNECTIVITY = ndimage.generate_binary_structure(3, 2)  # 18-connectivity, as autoPET


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2 |P and T| / (|P| + |T|); two empty masks agree perfectly (1.0)."""
    pred, truth = _binary_pair(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def false_positive_volume(pred: np.ndarray, truth: np.ndarray, voxel_volume_ml: float) -> float:
    """mL of the predicted components that touch no ground-truth voxel."""
    pred, truth = _binary_pair(pred, truth)
    return _untouched_voxels(pred, truth) * float(voxel_volume_ml)


def false_negative_volume(pred: np.ndarray, truth: np.ndarray, voxel_volume_ml: float) -> float:
    """mL of the ground-truth components that no predicted voxel touches."""
    pred, truth = _binary_pair(pred, truth)
    return _untouched_voxels(truth, pred) * float(voxel_volume_ml)


def lesion_dice(pred: np.ndarray, truth_instances: np.ndarray, lesion_id: int, margin: int = 5) -> float:
    """Dice of ``pred`` against one lesion of a labelled ground truth, judged near that lesion only.

    The comparison is restricted to the lesion's bounding box grown by ``margin`` voxels, and voxels of
    other ground-truth lesions in that box are ignored: predicting a neighbour correctly is neither a
    hit nor a false positive for this lesion. ``truth_instances`` holds 0 for background and one id per
    lesion (e.g. from :func:`segany_pet.pet.quantify.label_lesions`).
    """
    pred = np.asarray(pred) != 0
    truth_instances = np.asarray(truth_instances)
    if pred.shape != truth_instances.shape:
        raise ValueError(
            f"prediction of shape {pred.shape} and truth of shape {truth_instances.shape} differ"
        )
    lesion = truth_instances == lesion_id
    if lesion_id == 0 or not lesion.any():
        raise ValueError(f"lesion id {lesion_id} does not occur in the ground truth")
    (box,) = ndimage.find_objects(lesion.astype(np.uint8))
    box = tuple(
        slice(max(s.start - margin, 0), min(s.stop + margin, n))
        for s, n in zip(box, lesion.shape, strict=True)
    )
    others = (truth_instances[box] != 0) & ~lesion[box]
    return dice(pred[box] & ~others, lesion[box])


def _untouched_voxels(mask: np.ndarray, other: np.ndarray) -> int:
    """Voxels of the components of ``mask`` that share no voxel with ``other``."""
    labels, count = ndimage.label(mask, structure=COMPONENT_CONNECTIVITY)
    if count == 0:
        return 0
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    touched = np.zeros(count + 1, dtype=bool)
    touched[np.unique(labels[other])] = True
    touched[0] = True  # background is not a component
    return int(sizes[~touched].sum())


def _binary_pair(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred) != 0
    truth = np.asarray(truth) != 0
    if pred.shape != truth.shape:
        raise ValueError(f"prediction of shape {pred.shape} and truth of shape {truth.shape} differ")
    return pred, truth
