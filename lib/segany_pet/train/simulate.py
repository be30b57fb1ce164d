"""SAM-style interactive simulation for training: prompts on a crop, corrective clicks, and the loss.

A training step is a short annotation session per crop. The image is encoded once; the decoder then runs
``iterations`` times: first with a prompt on the object (a click inside it, biased towards its interior, or
a jittered box, or both), then each time with one more click at the deepest voxel of the largest error of the
current mask (`corrective_click`: missed -> positive, leaked -> negative) plus ALL earlier prompts and the
previous low-res logits (detached) as the mask prompt, exactly what the `Predictor` feeds the model when an
annotator refines. Every iteration adds Dice + class-balanced BCE of its mask and the MSE of the IoU head to
the loss, the opening prompt's times ``first_weight`` (an annotator's first click is the one that matters most).

All coordinates here are crop indices (tensor axis order), the prompt encoder's frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from segany_pet.evaluate.interactive import corrective_click
from segany_pet.model import Sam3D

LOSS_RESOLUTIONS = ("crop", "low_res")
# A box corner moves by up to this share of the object's extent (at least BOX_JITTER_MIN voxels) on each axis:
# annotators draw loosely.
BOX_JITTER = 0.1
BOX_JITTER_MIN = 1.0


@dataclass
class Prompt:
    """The prompts of one crop so far: points (N, 3) float crop indices with labels 1/0, an optional box."""

    points: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: np.ndarray | None = None  # (6,): min corner then max corner, inclusive


def interior_click(target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A voxel of the object drawn with probability ~ depth^2 (distance to its surface), so clicks favour the
    interior as annotators' do, moved by up to half a voxel (a stored voxel's centre falls anywhere in a crop
    voxel)."""
    (box,) = ndimage.find_objects(target.astype(np.uint8))
    depth = ndimage.distance_transform_edt(np.pad(target[box], 1))[1:-1, 1:-1, 1:-1]
    voxels = np.argwhere(depth > 0)
    weights = depth[tuple(voxels.T)] ** 2
    chosen = voxels[rng.choice(len(voxels), p=weights / weights.sum())] + [s.start for s in box]
    return chosen + rng.uniform(-0.5, 0.5, 3)


def jittered_box(target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The object's bounding box (inclusive, crop indices) with each corner moved at random, inside the crop."""
    voxels = np.argwhere(target)
    low, high = voxels.min(axis=0).astype(float), voxels.max(axis=0).astype(float)
    jitter = np.maximum(BOX_JITTER * (high - low + 1), BOX_JITTER_MIN)
    low = low + rng.uniform(-1, 1, 3) * jitter
    high = high + rng.uniform(-1, 1, 3) * jitter
    low, high = np.minimum(low, high), np.maximum(low, high)
    last = target.shape[0] - 1
    return np.concatenate([np.clip(low, 0, last), np.clip(high, 0, last)])


def first_prompt(
    target: np.ndarray, rng: np.random.Generator, box_share: float, box_and_click_share: float,
    click_hint: np.ndarray | None = None,
) -> Prompt:
    """The opening prompt on a crop: a click (share 1 - box_share - box_and_click_share), a box, or both.

    A crop with a ``click_hint`` (a hot non-target structure) always opens with a positive click there.
    """
    if click_hint is not None or not target.any():
        where = click_hint if click_hint is not None else (np.asarray(target.shape) - 1) / 2
        return Prompt([np.asarray(where, dtype=float)], [1])
    draw = rng.random()
    prompt = Prompt()
    if draw < box_share + box_and_click_share:
        prompt.box = jittered_box(target, rng)
    if draw >= box_share:
        prompt.points.append(interior_click(target, rng))
        prompt.labels.append(1)
    return prompt


def add_corrective_click(prompt: Prompt, prediction: np.ndarray, target: np.ndarray) -> bool:
    """Append the simulated annotator's next click; False when the mask is already right."""
    last = np.asarray(target.shape) - 1
    taken = [tuple(np.clip(np.rint(p), 0, last).astype(int)) for p in prompt.points]
    correction = corrective_click(prediction, target, taken=taken)
    if correction is None:
        return False
    voxel, positive = correction
    prompt.points.append(np.asarray(voxel, dtype=float))
    prompt.labels.append(int(positive))
    return True


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, iou_estimate: torch.Tensor,
                      iou_weight: float = 1.0, bce_weight: float = 0.1,
                      weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice + class-balanced BCE of logits (B, 1, *grid) against a (possibly soft) target of the same grid, plus
    the IoU head's MSE against the IoU of the thresholded mask. Returns (loss, Dice of the thresholded masks (B,)).
    ``weight`` (same shape, optional): per-voxel weights of the BCE and soft Dice terms (CPCL down-weights
    voxels whose label it doubts).

    The BCE is the mean over object voxels plus the mean over background voxels, halved. Plain BCE is ~99.9%
    background here (a 2 mL lesion in a 64^3 crop): measured on segany_pet_small, it drives every logit to
    about -10 within 20 steps, before the decoder has learnt to localise a click, and the saturated sigmoid
    then starves the Dice term, so nothing is learnt (a fixed batch of 4 crops stays at Dice 0 after 80
    steps). Balanced, a uniform answer is worth nothing and the same batch reaches Dice 0.9 in 60 steps.
    Balancing also makes a leaked background voxel ~1000x cheaper than a missed object voxel, so at full
    weight the model learns click-centred blobs of one size; ``bce_weight`` 0.1 (TrainConfig) leaves the
    sizing to the Dice term while still preventing the collapse.
    """
    dims = tuple(range(1, logits.dim()))
    probability = torch.sigmoid(logits)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if weight is not None:
        cross_entropy = cross_entropy * weight
        probability, weighted_target = probability * weight, target * weight
    else:
        weighted_target = target
    on_object = (cross_entropy * target).sum(dims) / target.sum(dims).clamp_min(1)
    on_background = (cross_entropy * (1 - target)).sum(dims) / (1 - target).sum(dims).clamp_min(1)
    bce = 0.5 * (on_object + on_background).mean()
    overlap = (probability * target).sum(dims)
    soft_dice = 1 - (2 * overlap + 1) / (probability.sum(dims) + weighted_target.sum(dims) + 1)
    with torch.no_grad():
        hard, truth = logits > 0, target >= 0.5
        intersection = (hard & truth).sum(dims).float()
        union = (hard | truth).sum(dims).float()
        true_iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))
        total = hard.sum(dims) + truth.sum(dims)
        hard_dice = torch.where(total > 0, 2 * intersection / total.clamp_min(1), torch.ones_like(union))
    iou_loss = F.mse_loss(iou_estimate[:, 0], true_iou)
    return bce_weight * bce + soft_dice.mean() + iou_weight * iou_loss, hard_dice


class InteractiveStep(nn.Module):
    """One simulated annotation session per crop as a module (so DistributedDataParallel can wrap it).

    ``forward(images (B, 1, S, S, S), targets (N, S, S, S) bool, prompts, crop_of)`` -> (summed loss, info)
    where info holds the loss and mean Dice of each iteration. ``prompts`` (one `Prompt` per target) grow in
    place with the corrective clicks; ``crop_of`` (N,) says which crop each target is in (None: N = B, one
    target per crop). `session` is the part after the encoder, for callers (CPCL) that need the opening
    prompt's logits before they know the targets. ``loss_resolution``: "crop" compares the low-res logits
    upsampled (trilinear, as the predictor does) with the crop target; "low_res" compares the logits with
    the target averaged down to their grid (a soft target).
    """

    def __init__(self, model: Sam3D, iterations: int = 3, loss_resolution: str = "crop", iou_weight: float = 1.0,
                 bce_weight: float = 0.1, first_weight: float = 1.0):
        super().__init__()
        if loss_resolution not in LOSS_RESOLUTIONS:
            raise ValueError(f"loss_resolution must be one of {LOSS_RESOLUTIONS}, not {loss_resolution!r}")
        if iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {iterations}")
        self.model = model
        self.iterations = iterations
        self.loss_resolution = loss_resolution
        self.iou_weight = iou_weight
        self.bce_weight = bce_weight
        self.first_weight = first_weight

    def forward(self, images: torch.Tensor, targets: torch.Tensor, prompts: list[Prompt],
                crop_of: torch.Tensor | None = None):
        return self.session(self.embed(images, crop_of), targets, prompts)

    def embed(self, images: torch.Tensor, crop_of: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.model.embed(images)
        if crop_of is not None:  # several prompt sets (targets) per crop: each crop is encoded once
            embeddings = embeddings[crop_of]
        return embeddings

    def session(self, embeddings: torch.Tensor, targets: torch.Tensor, prompts: list[Prompt],
                weights: torch.Tensor | None = None, opening: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The clicks after the encoder. ``weights`` (N, S, S, S): per-voxel loss weights; ``opening``: the
        (logits, iou) of the opening prompts, when the caller has decoded them already."""
        size = targets.shape[-1]
        crop_targets = targets[:, None].float()
        crop_weights = None if weights is None else weights[:, None].float()
        targets_np = targets.cpu().numpy() >= 0.5
        low_res_targets = low_res_weights = None
        previous = None
        total = embeddings.new_zeros(())
        losses, dices = [], []
        for iteration in range(self.iterations):
            if iteration == 0 and opening is not None:
                logits, iou = opening
            else:
                logits, iou = self.decode(embeddings, prompts, previous)
            upsampled = F.interpolate(logits, size=(size,) * 3, mode="trilinear", align_corners=False)
            if self.loss_resolution == "crop":
                loss, hard_dice = segmentation_loss(upsampled, crop_targets, iou, self.iou_weight, self.bce_weight,
                                                    crop_weights)
            else:
                if low_res_targets is None:
                    factor = size // logits.shape[-1]
                    low_res_targets = F.avg_pool3d(crop_targets, factor)
                    low_res_weights = None if crop_weights is None else F.avg_pool3d(crop_weights, factor)
                loss, hard_dice = segmentation_loss(logits, low_res_targets, iou, self.iou_weight, self.bce_weight,
                                                    low_res_weights)
            total = total + (self.first_weight * loss if iteration == 0 else loss)
            losses.append(float(loss.detach()))
            dices.append(float(hard_dice.mean()))
            if iteration + 1 < self.iterations:
                masks = (upsampled.detach()[:, 0] > 0).cpu().numpy()
                for prompt, mask, target in zip(prompts, masks, targets_np, strict=True):
                    add_corrective_click(prompt, mask, target)
                previous = logits.detach()
        return total, {"iteration_loss": losses, "iteration_dice": dices}

    def decode(self, embeddings: torch.Tensor, prompts: list[Prompt], masks: torch.Tensor | None):
        """Decode a batch whose crops have different prompts: crops with and without a box go in separate
        calls (the prompt encoder takes boxes for all or none); shorter point lists are padded with label -1."""
        device = embeddings.device
        order, logits, ious = [], [], []
        for with_box in (False, True):
            members = [i for i, p in enumerate(prompts) if (p.box is not None) == with_box]
            if not members:
                continue
            count = max(len(prompts[i].labels) for i in members)
            points = None
            if count:
                coords = torch.zeros(len(members), count, 3, device=device)
                labels = torch.full((len(members), count), -1, dtype=torch.int64, device=device)
                for row, i in enumerate(members):
                    n = len(prompts[i].labels)
                    if n:
                        coords[row, :n] = torch.as_tensor(np.stack(prompts[i].points), dtype=torch.float32)
                        labels[row, :n] = torch.as_tensor(prompts[i].labels)
                points = (coords, labels)
            boxes = None
            if with_box:
                boxes = torch.as_tensor(np.stack([prompts[i].box for i in members]), dtype=torch.float32,
                                        device=device)
            index = torch.as_tensor(members, device=device)
            group_logits, group_iou = self.model.decode(
                embeddings[index], points=points, boxes=boxes, masks=None if masks is None else masks[index]
            )
            order += members
            logits.append(group_logits)
            ious.append(group_iou)
        inverse = torch.as_tensor(np.argsort(order), device=device)
        return torch.cat(logits)[inverse], torch.cat(ious)[inverse]
