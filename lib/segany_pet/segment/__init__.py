"""Seeded PET segmentation without a model: the classical threshold methods annotators use (`threshold`) and the
uptake edge that moves a model's mask to the lesion's own PET boundary (`edge`). Below the predictor: the server,
the predictor, scoring and the evaluation all take them from here."""

from segany_pet.segment.edge import EDGE_METHODS, PEAK_PROMINENCE, snap_to_uptake
from segany_pet.segment.threshold import METHODS, ClickRegion, regions_from_clicks, segment_from_clicks

__all__ = [
    "EDGE_METHODS",
    "METHODS",
    "PEAK_PROMINENCE",
    "ClickRegion",
    "regions_from_clicks",
    "segment_from_clicks",
    "snap_to_uptake",
]
