"""MONAI Label infer tasks: thin adapters from a REST request to the library and back.

Every coordinate a client sends here (OHIF, Slicer, the Python client) is a voxel index of the
stored image, ``[i, j, k]``; the reply is a label on that same grid.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from segany_pet.errors import PromptError, SessionNotFoundError
from segany_pet.label.models import ServedModel
from segany_pet.label.prewarm import Prewarmer, volume_id
from segany_pet.pet import VolumeCache, mask_nrrd, mask_nrrd_box, quantify, save_mask
from segany_pet.segment.edge import EDGE_METHODS, PEAK_PROMINENCE
from segany_pet.segment.threshold import METHODS, segment_from_clicks
from segany_pet.session import Prediction, VolumeSession

logger = logging.getLogger(__name__)

LESION_LABELS = {"lesion": 1}
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
# Where a mask's boundary comes from (segany_pet.segment.edge): the model's own, or the lesion's uptake where they
# agree.
MODEL_EDGE = "model"
EDGES = (MODEL_EDGE, *EDGE_METHODS)
DEFAULT_EDGE = "sized_41"
# What OHIF v3's MONAI Label panel adds to every point-prompt request (its wire format, for clients and tests).
OHIF_RESULT_PARAMS = {
    "result_extension": ".nrrd",
    "result_dtype": "uint8",
    "result_compress": False,
    "restore_label_idx": False,
}


def parse_roi(roi: Any, shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """Slicer's ROI ``[x0, x1, y0, y1, z0, z1]`` (voxel indices, inclusive) as slices."""
    if not isinstance(roi, list | tuple) or len(roi) != 6 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in roi):
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


def result_format(request: dict) -> tuple[str, bool]:
    """(file extension, compressed) of the reply the client asked for (OHIF: uncompressed NRRD)."""
    extension = request.get("result_extension") or ".nii.gz"
    if extension not in RESULT_EXTENSIONS:
        raise PromptError(f"result_extension {extension!r} is not supported; use one of {RESULT_EXTENSIONS}")
    return extension, request.get("result_compress", True) not in (False, "false", "False", 0)


def flag(request: dict, name: str, default: bool) -> bool:
    """A yes/no param: a JSON boolean, or the string "true" / "false" in any case."""
    value = request.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise PromptError(f"{name} must be true or false, got {value!r}")


def result_path(request: dict) -> tuple[str, bool]:
    """A temporary file for the reply in the format the client asked for, and whether to compress it."""
    extension, compress = result_format(request)
    handle, path = tempfile.mkstemp(suffix=extension, prefix="segany_pet_")
    os.close(handle)
    return path, compress


def write_reply(
    volume, mask: np.ndarray, request: dict, params: dict, latencies: dict, region=None
) -> tuple[str, dict]:
    """Quantify a mask on its SUV image and write it in the client's format: (file, reply params).

    ``latencies`` (seconds spent so far, by stage) gains ``quantify``, ``write`` and ``total``; ``region``: a
    box known to hold the whole mask, see `quantify`.
    """
    reply, latencies = _quantified(volume, mask, params, latencies, region)
    started = time.perf_counter()
    path, compress = result_path(request)
    save_mask(mask, volume.affine, path, compress=compress)
    return path, _timed(reply, {**latencies, "write": time.perf_counter() - started})


def nrrd_reply(volume, mask: np.ndarray, params: dict, latencies: dict, region=None,
               label_box: bool = False) -> tuple[list, dict, str | None]:
    """`write_reply` for an uncompressed NRRD kept in memory: (the file's parts, see `mask_nrrd`; reply params;
    None), or with ``label_box`` the header and the voxels of the mask's box alone and the box (`mask_nrrd_box`).

    The server sends it without the round trip through a file (an autoPET-sized label is 52 MB)."""
    reply, latencies = _quantified(volume, mask, params, latencies, region)
    started = time.perf_counter()
    if label_box:
        parts, box = mask_nrrd_box(mask, volume.affine, region)
    else:
        parts, box = mask_nrrd(mask, volume.affine, nonzero_box=region), None
    return parts, _timed(reply, {**latencies, "write": time.perf_counter() - started}), box


def _quantified(volume, mask, params, latencies, region) -> tuple[dict, dict]:
    started = time.perf_counter()
    numbers = quantify(volume.suv, mask, volume.spacing, region=region)
    reply = {"label_names": LESION_LABELS, **params, "quantification": numbers}
    return reply, {**latencies, "quantify": time.perf_counter() - started}


def _timed(reply: dict, latencies: dict) -> dict:
    latencies["total"] = sum(latencies.values())
    return {**reply, "latencies": {stage: round(seconds, 4) for stage, seconds in latencies.items()}}


def summary(params: dict) -> str:
    total = params["quantification"]["total"]
    return f"{total['count']} lesion(s), MTV {total['mtv_ml']:.2f} mL, {params['latencies']['total']:.3f} s"


class SUVThresholdInfer(InferTask):
    """Seeded SUV threshold segmentation from clicks: the classical baseline annotators know.

    A click grows the region above 41% (or 50%) of the local SUVmax (``sized_41``: raised for lesions under
    4 mL), or above a fixed SUV, connected to the click; background clicks cut neighbouring hot spots away.
    ``saddle_cut: true`` also cuts the region from a neighbouring peak (the bladder, a kidney, another
    lesion) at the SUV's saddle between them, as the uptake edge of ``segany_pet`` does; off by default, so
    the answer is the guideline's method as published.
    """

    def __init__(self, default_method: str = "relative_41", volumes: VolumeCache | None = None):
        if default_method not in METHODS:
            raise ValueError(f"unknown threshold method {default_method!r}; choose one of {list(METHODS)}")
        super().__init__(
            type=InferType.DEEPGROW,
            labels=LESION_LABELS,
            dimension=3,
            description="Seeded SUV threshold from clicks (41%/50% of local SUVmax, or SUV 2.5/4.0)",
            config={"method": [default_method, *[m for m in METHODS if m != default_method]], "saddle_cut": False},
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
        saddle_cut = flag(request, "saddle_cut", default=False)

        volume = self.volumes.load(request["image"])
        latencies = {"load": time.perf_counter() - started}
        mask = segment_from_clicks(
            volume.suv,
            volume.spacing,
            foreground=request.get("foreground") or [],
            background=request.get("background") or [],
            method=method,
            peak_prominence=PEAK_PROMINENCE if saddle_cut else None,
        )
        if request.get("roi"):
            inside = np.zeros_like(mask)
            region = parse_roi(request["roi"], volume.shape)
            inside[region] = mask[region]
            mask = inside
        latencies["segment"] = time.perf_counter() - started - latencies["load"]

        path, params = write_reply(volume, mask, request, {"method": method, "saddle_cut": saddle_cut}, latencies)
        logger.info("suv_threshold %s: %s", method, summary(params))
        return path, params


def roi_to_box(roi: Any, shape: tuple[int, int, int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Slicer's ROI ``[x0, x1, y0, y1, z0, z1]`` as the predictor's box: (min corner, max corner)."""
    region = parse_roi(roi, shape)
    return tuple(s.start for s in region), tuple(s.stop - 1 for s in region)


def clicks_from_request(request: dict) -> tuple[list, list]:
    """Foreground and background clicks in either wire format.

    deepgrow (OHIF, Slicer): ``foreground`` / ``background``; vista3d (OHIF): ``points`` with
    ``point_labels`` (1 foreground, 0 background).
    """
    if "points" not in request:
        return request.get("foreground") or [], request.get("background") or []
    points, labels = request.get("points") or [], request.get("point_labels")
    if not isinstance(points, list) or not isinstance(labels, list) or len(labels) != len(points):
        raise PromptError("points need point_labels: one label (1 foreground, 0 background) per point")
    if any(label not in (0, 1) for label in labels):
        raise PromptError(f"point_labels must be 1 (foreground) or 0 (background), got {labels!r}")
    return (
        [point for point, label in zip(points, labels, strict=True) if label == 1],
        [point for point, label in zip(points, labels, strict=True) if label == 0],
    )


@dataclass
class AnnotationState:
    """One annotator on one scan: the predictor session and the last result, the next click's mask prompt."""

    session: VolumeSession
    last: Prediction | None = None
    touched: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class AnnotationSessions:
    """Refinement state per (client id, image), so annotators never see each other's masks.

    Bounded: the least recently used states beyond ``capacity`` and any idle past ``ttl_s`` are dropped.
    """

    def __init__(self, capacity: int = 64, ttl_s: float = 3600.0):
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._states: OrderedDict[tuple[str, str], AnnotationState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> AnnotationState | None:
        with self._lock:
            self._expire()
            state = self._states.get(key)
            if state is not None:
                self._states.move_to_end(key)
                state.touched = time.monotonic()
            return state

    def put(self, key: tuple[str, str], state: AnnotationState) -> None:
        with self._lock:
            self._states[key] = state
            self._states.move_to_end(key)
            while len(self._states) > self.capacity:
                self._states.popitem(last=False)

    def drop(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._states.pop(key, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [key for key, state in self._states.items() if now - state.touched > self.ttl_s]:
            del self._states[key]


class PromptableSegmentationInfer(InferTask):
    """The 3D SAM from clicks and boxes, refined click by click, with the PET numbers of its mask.

    Params: ``foreground`` / ``background`` clicks (or vista3d's ``points`` + ``point_labels``), a box as
    Slicer's ``roi`` ``[x0, x1, y0, y1, z0, z1]`` or ``box`` ``[[i0, j0, k0], [i1, j1, k1]]`` (voxel
    indices of the stored image), ``client_id``. With a client id, the previous mask of the same client on
    the same image is the mask prompt of the next click (``reset: true`` starts over; ``refine: true``
    insists on a previous result and fails if there is none). Without a client id every request stands
    alone, so anonymous annotators never share state. ``edge``: where the mask's boundary comes from,
    ``sized_41`` (default: the lesion's 41% SUVmax uptake, raised for small lesions, where it agrees with the
    model, `segany_pet.segment.edge`), ``relative_41``, ``relative_50``, or ``model`` (the model's mask as it is); the
    reply's ``edge`` says which one was used. With a ``prewarmer``, a click on a scan not warmed yet starts
    warming its other likely click sites (`segany_pet.label.prewarm`).
    """

    def __init__(
        self,
        served: ServedModel,
        volumes: VolumeCache,
        sessions: AnnotationSessions,
        infer_type: str = InferType.DEEPGROW,
        description: str = "SegAnyPET 3D SAM: lesion or organ from clicks and boxes",
        edge: str = DEFAULT_EDGE,
        prewarmer: Prewarmer | None = None,
    ):
        if edge not in EDGES:
            raise ValueError(f"edge {edge!r} is not one of {', '.join(EDGES)}")
        super().__init__(type=infer_type, labels=LESION_LABELS, dimension=3, description=description,
                         config={"edge": [edge, *[e for e in EDGES if e != edge]]})
        self.edge = edge
        self.served = served
        self.volumes = volumes
        self.sessions = sessions
        self.prewarmer = prewarmer

    def is_valid(self) -> bool:
        return True  # listed even when its weights are missing: /info then says why it cannot answer

    def info(self) -> dict:
        return {**super().info(), "model": self.served.describe()}

    def __call__(self, request: dict) -> tuple[str, dict]:
        volume, prediction, params, latencies = self._predict(request)
        path, reply = write_reply(volume, prediction.mask, request, params, latencies, prediction.region)
        logger.info("%s for %s: %s", reply["model"], request.get("client_id") or "anonymous", summary(reply))
        return path, reply

    def nrrd_reply(self, request: dict, label_box: bool = False) -> tuple[list, dict, str | None]:
        """The answer as an uncompressed NRRD in memory (`nrrd_reply`), for the server to send directly."""
        volume, prediction, params, latencies = self._predict(request)
        parts, reply, box = nrrd_reply(volume, prediction.mask, params, latencies, prediction.region, label_box)
        logger.info("%s for %s: %s", reply["model"], request.get("client_id") or "anonymous", summary(reply))
        return parts, reply, box

    def _predict(self, request: dict) -> tuple[Any, Prediction, dict, dict]:
        started = time.perf_counter()
        edge = request.get("edge") or self.edge
        if isinstance(edge, list):  # the /info config lists choices; a client may echo the list back
            edge = edge[0]
        if edge not in EDGES:
            raise PromptError(f"edge {edge!r} is unknown; choose one of {list(EDGES)}")
        predictor, predictor_file = self.served.predictor_and_file()
        volume = self.volumes.load(request["image"])
        latencies = {"load": time.perf_counter() - started}

        foreground, background = clicks_from_request(request)
        box = request.get("box")
        if request.get("roi"):
            box = roi_to_box(request["roi"], volume.shape)
        client = request.get("client_id")
        key = (str(client), os.path.realpath(request["image"]))
        if client and request.get("reset"):
            self.sessions.drop(key)
        state = self.sessions.get(key) if client else None
        notes = []
        if state is not None and state.session.predictor is not predictor:
            # A newly published model: the old mask prompt means nothing to it.
            self.sessions.drop(key)
            state = None
            notes.append("the served model changed since this client's last click; refinement started over")
        if request.get("refine") and state is None:
            raise SessionNotFoundError(
                f"no earlier result for client {client!r} on this image to refine: send the clicks without "
                "refine (and with a client_id to keep refining)"
            )
        if state is None:
            state = AnnotationState(predictor.set_volume(volume, volume_id(request["image"])))
            if client:
                self.sessions.put(key, state)

        with state.lock:
            prediction = state.session.predict(foreground, background, box, previous=state.last,
                                               edge=None if edge == MODEL_EDGE else edge)
            state.last = prediction
        if self.prewarmer is not None:  # after the click: warming must not slow down the click that asked for it
            self.prewarmer.scan_served(request["image"])
        for stage in ("crop", "encode", "decode", "paste", "edge"):
            latencies[stage] = prediction.latencies[stage]
        params = {
            "iou": round(prediction.iou, 4),
            "windows": prediction.windows,
            "cache_hit": prediction.cache_hit,
            "clicks": {"foreground": len(prediction.foreground), "background": len(prediction.background)},
            "model": predictor_file.name,
            "edge": prediction.edge,
            "notes": notes + list(prediction.notes),
        }
        return volume, prediction, params, latencies
