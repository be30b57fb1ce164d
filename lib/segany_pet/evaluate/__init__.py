"""Scoring segmentations (Dice, FPV, FNV) and the interactive protocols that compare the model with the classical
threshold methods (those are `segany_pet.segment`)."""

from segany_pet.evaluate.metrics import dice, false_negative_volume, false_positive_volume, lesion_dice

__all__ = [
    "dice",
    "false_negative_volume",
    "false_positive_volume",
    "lesion_dice",
]
