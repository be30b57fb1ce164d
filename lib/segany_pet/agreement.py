"""Two prompts' answers on one object, compared: the shared ground of cross-prompt scoring and CPCL.

`prompt_pair` asks a point-prompted and a box-prompted model (or one model both ways) for the same object and
holds both probabilities on one region (`PromptPair`: their disagreement and entropy); `confidence_targets` is
CPCL's reading of two such probabilities against a label: the one definition of a noisy voxel, used by the
training (`segany_pet.train.cpcl`) and by the label-noise score (`segany_pet.active.cross_prompt`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import special

from segany_pet.crops import CropGeometry, paste_logits
from segany_pet.pet import PETVolume
from segany_pet.session import Prediction, VolumeSession

LN2 = math.log(2.0)


@dataclass
class PromptPair:
    """Both models' probabilities on a region of the stored grid (slices) holding both answers."""

    region: tuple[slice, slice, slice]
    point: np.ndarray
    box: np.ndarray
    geometry: CropGeometry | None = None  # the point prompt's crop (its embedding describes the target)

    def disagreement(self, threshold: float = 0.5) -> float:
        """1 - Dice of the two masks (0 when both are empty: they agree there is nothing)."""
        return 1.0 - dice(self.point > threshold, self.box > threshold)

    def entropy_bits(self, threshold: float = 0.5) -> float:
        """Mean binary entropy (bits) of the averaged probability over the voxels either model calls object."""
        where = (self.point > threshold) | (self.box > threshold)
        if not where.any():
            return 0.0
        mean = np.clip(0.5 * (self.point[where] + self.box[where]), 1e-6, 1 - 1e-6).astype(np.float64)
        return float(np.mean(-(mean * np.log(mean) + (1 - mean) * np.log(1 - mean))) / math.log(2.0))


def prompt_pair(point: VolumeSession, box: VolumeSession, click, corners, around=(), pad: int = 2) -> PromptPair:
    """Click ``point``'s model at ``click`` and give ``box``'s model the box ``corners`` (min, max inclusive);
    their probabilities on the region covering both answers and the boxes (slices) in ``around``."""
    predictions = (point.predict(foreground=[list(click)]), box.predict(box=corners))
    volume = point.volume
    placed = [_pasted(prediction, volume) for prediction in predictions]
    region = bounding_region([*around, *(item[0] for item in placed if item is not None)], volume.shape, pad)
    return PromptPair(region, *(probability_in(region, item) for item in placed), predictions[0].geometry)


def _pasted(prediction: Prediction, volume: PETVolume):
    return paste_logits(prediction.low_res_logits[0, 0], prediction.geometry, volume.affine, volume.shape)


def probability_in(region: tuple[slice, ...], placed) -> np.ndarray:
    """A model's probability on ``region`` from its pasted logits block (0 where the block does not reach)."""
    probability = np.zeros([s.stop - s.start for s in region], dtype=np.float32)
    if placed is not None:
        block_box, block = placed
        local = tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(block_box, region, strict=True))
        probability[local] = special.expit(np.asarray(block, dtype=np.float32))
    return probability


def bounding_region(boxes, shape, pad: int = 0) -> tuple[slice, ...]:
    """The smallest box holding all ``boxes`` (tuples of slices), padded and clipped to ``shape``."""
    starts = [max(min(b[a].start for b in boxes) - pad, 0) for a in range(3)]
    stops = [min(max(b[a].stop for b in boxes) + pad, shape[a]) for a in range(3)]
    return tuple(slice(lo, hi) for lo, hi in zip(starts, stops, strict=True))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


# ----------------------------------------------------------------------------------------------
# Targets without clicks


@dataclass
class Confidence:
    """Per-voxel outcome of comparing two replicas' predictions with a label (all the label's shape)."""

    label: torch.Tensor  # bool: the label as given
    target: torch.Tensor  # float: the label, with the consensus in self-corrected voxels
    weight: torch.Tensor  # float: loss weight per voxel
    noisy: torch.Tensor  # bool: the replicas agree with each other and disagree with the label
    corrected: torch.Tensor  # bool: noisy and certain, so the consensus replaced the label
    uncertainty: torch.Tensor  # float in [0, 1]: binary entropy of the averaged prediction, in bits
    consensus: torch.Tensor  # bool: the averaged prediction > agreement threshold

    def noise_score(self) -> float:
        """Noisy voxels over label-or-consensus voxels: 0 for a label both replicas reproduce, 1 for one they
        both contradict everywhere."""
        union = int((self.label | self.consensus).sum())
        return float(self.noisy.sum()) / union if union else 0.0


def confidence_targets(p_point, p_box, label, *, agreement_threshold: float = 0.5,
                       uncertainty_threshold: float = 0.5, uncertain_weight: float = 0.5,
                       self_correction: bool = True) -> Confidence:
    """CPCL's confidence map from the two replicas' probabilities and a (possibly noisy) binary label.

    Noisy voxels: both replicas on the same side of ``agreement_threshold`` and the label on the other. A noisy
    voxel whose averaged probability has entropy below ``uncertainty_threshold`` bits takes the consensus as
    target (with ``self_correction``); the other noisy voxels keep the label at weight ``uncertain_weight``.
    Without self-correction every noisy voxel is kept and down-weighted (the ablation "CPCL without
    self-correction"). Arrays or tensors of one shape; returns tensors.
    """
    p_point, p_box = torch.as_tensor(p_point, dtype=torch.float32), torch.as_tensor(p_box, dtype=torch.float32)
    label = torch.as_tensor(label).float() >= 0.5
    point_says, box_says = p_point > agreement_threshold, p_box > agreement_threshold
    mean = 0.5 * (p_point + p_box)
    consensus = mean > agreement_threshold
    agree = point_says == box_says
    noisy = agree & (point_says != label)
    clamped = mean.clamp(1e-6, 1 - 1e-6)
    uncertainty = -(clamped * clamped.log() + (1 - clamped) * (1 - clamped).log()) / LN2
    certain = uncertainty < uncertainty_threshold
    corrected = noisy & certain if self_correction else torch.zeros_like(noisy)
    target = torch.where(corrected, point_says, label).float()
    weight = torch.ones_like(p_point)
    weight[noisy & ~corrected] = uncertain_weight
    return Confidence(label, target, weight, noisy, corrected, uncertainty, consensus)
