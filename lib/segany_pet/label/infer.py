"""MONAI Label infer tasks: thin adapters from a REST request to the library and back.

Every coordinate a client sends here (OHIF, Slicer, the Python client) is a voxel index of the
stored image, ``[i, j, k]``; the reply is a label on that same grid.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from segany_pet.errors import PromptError
from segany_pet.evaluate.baselines import METHODS, segment_from_clicks
from segany_pet.pet import VolumeCache, quantify, save_mask

logger = logging.getLogger(__name__)

LESION_LABELS = {"lesion": 1}
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
# What OHIF v3's MONAI Label panel adds to every point-prompt request (its wire format, for clients and tests).
OHIF_RESULT_PARAMS = {
    "result_extension": ".nrrd",
    "result_dtype": "uint8",
    "result_compress": False,
    "restore_label_idx": False,
}


def parse_roi(roi: Any, shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """Slicer's ROI ``[x0, x1, y0, y1, z0, z1]`` (voxel indices, inclusive) as slices."""
    if not isinstance(roi, list | tuple) or len(roi) != 6 or not all(isinstance(v, int | float) for v in roi):
        raise PromptError(f"roi must be 6 voxel indices [x0, x1, y0, y1, z0, z1], got {roi!r}")
    slices = []
    for axis, (low, high) in enumerate(zip(roi[0::2], roi[1::2], strict=True)):
        low, high = int(round(low)), int(round(high))
        if low > high:
            raise PromptError(f"roi axis {axis}: start {low} is after end {high}; send [min, max] per axis")
        if high < 0 or low >= shape[axis]:
            raise PromptError(f"roi axis {axis}: [{low}, {high}] lies outside the volume of shape {shape}")
        slices.append(slice(max(low, 0), min(high, shape[axis] - 1) + 1))
    return tuple(slices)


def result_path(request: dict) -> tuple[str, bool]:
    """A temporary file for the reply in the format the client asked for (OHIF asks for NRRD)."""
    extension = request.get("result_extension") or ".nii.gz"
    if extension not in RESULT_EXTENSIONS:
        raise PromptError(f"result_extension {extension!r} is not supported; use one of {RESULT_EXTENSIONS}")
    compress = request.get("result_compress", True) not in (False, "false", "False", 0)
    handle, path = tempfile.mkstemp(suffix=extension, prefix="segany_pet_")
    os.close(handle)
    return path, compress


class SUVThresholdInfer(InferTask):
    """Seeded SUV threshold segmentation from clicks: the classical baseline annotators know.

    A click grows the region above 41% (or 50%) of the local SUVmax, or above a fixed SUV,
    connected to the click; background clicks cut neighbouring hot spots away.
    """

    def __init__(self, default_method: str = "relative_41", volumes: VolumeCache | None = None):
        if default_method not in METHODS:
            raise ValueError(f"unknown threshold method {default_method!r}; choose one of {list(METHODS)}")
        super().__init__(
            type=InferType.DEEPGROW,
            labels=LESION_LABELS,
            dimension=3,
            description="Seeded SUV threshold from clicks (41%/50% of local SUVmax, or SUV 2.5/4.0)",
            config={"method": [default_method, *[m for m in METHODS if m != default_method]]},
        )
        self.default_method = default_method
        self.volumes = volumes or VolumeCache()

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict) -> tuple[str, dict]:
        started = time.perf_counter()
        method = request.get("method") or self.default_method
        if isinstance(method, list):  # the /info config lists choices; a client may echo the list back
            method = method[0]
        if method not in METHODS:
            raise PromptError(f"method {method!r} is unknown; choose one of {list(METHODS)}")

        volume = self.volumes.load(request["image"])
        loaded = time.perf_counter()

        mask = segment_from_clicks(
            volume.suv,
            volume.spacing,
            foreground=request.get("foreground") or [],
            background=request.get("background") or [],
            method=method,
        )
        if request.get("roi"):
            inside = np.zeros_like(mask)
            region = parse_roi(request["roi"], volume.shape)
            inside[region] = mask[region]
            mask = inside
        segmented = time.perf_counter()

        numbers = quantify(volume.suv, mask, volume.spacing)
        quantified = time.perf_counter()

        path, compress = result_path(request)
        save_mask(mask.astype(np.uint8), volume.affine, path, compress=compress)
        written = time.perf_counter()

        params = {
            "label_names": LESION_LABELS,
            "method": method,
            "quantification": numbers,
            "latencies": {
                "load": round(loaded - started, 4),
                "segment": round(segmented - loaded, 4),
                "quantify": round(quantified - segmented, 4),
                "write": round(written - quantified, 4),
                "total": round(written - started, 4),
            },
        }
        logger.info(
            "suv_threshold %s: %d lesion(s), MTV %.2f mL, %.3f s",
            method,
            numbers["total"]["count"],
            numbers["total"]["mtv_ml"],
            written - started,
        )
        return path, params
