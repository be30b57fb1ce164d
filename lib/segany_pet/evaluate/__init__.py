"""Scoring segmentations (Dice, FPV, FNV) and the classical threshold baselines they are compared with."""

from segany_pet.evaluate.baselines import METHODS, ClickRegion, regions_from_clicks, segment_from_clicks
from segany_pet.evaluate.metrics import dice, false_negative_volume, false_positive_volume, lesion_dice

__all__ = [
    "METHODS",
    "ClickRegion",
    "dice",
    "false_negative_volume",
    "false_positive_volume",
    "lesion_dice",
    "regions_from_clicks",
    "segment_from_clicks",
]
