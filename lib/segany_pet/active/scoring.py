"""Scoring a datastore by cross-prompt disagreement, and the orders the active-learning strategies serve in.

`score_datastore` runs `cross_prompt.score_scan` over every image of a MONAI Label datastore and writes the
result into the image's info (the keys of `score_scan` plus ``cross_prompt_key``, ``cross_prompt_ts``), one
transaction per scan, so a stopped or killed job keeps what it finished. Incremental: ``cross_prompt_key``
fingerprints the image file, its ``final`` label file and the models; a scan is rescored only when one of
them changed. Under torchrun each rank scores its share of the images (``rank::world_size``) and writes
through the datastore's file lock.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from segany_pet.active.cross_prompt import score_scan
from segany_pet.errors import UserInputError
from segany_pet.pet import load_nifti
from segany_pet.predictor import Predictor

log = logging.getLogger(__name__)

FINAL = "final"
SCORE_KEYS = ("cross_prompt_disagreement", "cross_prompt_entropy", "cross_prompt_worst", "cross_prompt_features",
              "hot_spot_threshold",
              "liver_reference", "targets", "label_noise_score", "label_noise_worst", "cross_prompt_error")


# Embeddings a scoring Predictor keeps: every crop of one scan's targets (up to 16 hot spots and the label's
# components, prompted two ways), so the scan's descriptor and a point and a box prompt in the same crop reuse them
# (217 MB of the shipped model's).
SCORING_CACHE = 64


def scoring_predictor(model) -> Predictor:
    """A Predictor for scoring: one window per prompt (a target larger than a crop is rare, and a ranking
    signal need not follow it: 1.5-4x faster per target), an embedding cache for one scan at a time, and
    the preset's spacing alone (a scale ensemble would double the cost of a ranking)."""
    return Predictor(model, max_windows=1, cache_size=SCORING_CACHE, scale_ensemble=False)


def file_stamp(path: str | os.PathLike | None) -> str:
    """Size and modification time of a file: what changes when it is replaced."""
    if not path:
        return "-"
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def models_key(point_file: Path, box_file: Path | None) -> str:
    """Which weights scored: the point model's and the box model's file names and stamps."""
    parts = [f"{point_file.name}@{file_stamp(point_file)}"]
    if box_file is not None:
        parts.append(f"{box_file.name}@{file_stamp(box_file)}")
    return "+".join(parts)


def score_datastore(datastore, point: Predictor, box: Predictor, model_key: str, *, images: list[str] | None = None,
                    force: bool = False, rank: int = 0, world_size: int = 1,
                    on_progress: Callable[[dict], None] | None = None) -> dict:
    """Score the datastore's images (or ``images``), skipping those already scored with the same key.

    ``point`` and ``box`` (each a `scoring_predictor`) may be one Predictor: a single model prompted both ways.
    Returns counts and the time taken; ``on_progress`` receives the same record after every image.
    """
    all_images = sorted(datastore.list_images())
    missing = sorted(set(images or []) - set(all_images))
    if missing:
        raise UserInputError(f"image(s) not in the datastore: {', '.join(missing[:5])}")
    mine = (all_images if images is None else images)[rank::world_size]
    started = time.perf_counter()
    progress = {"total": len(mine), "done": 0, "scored": 0, "unchanged": 0, "failed": 0, "rank": rank,
                "world_size": world_size}
    to_score = []
    for image_id in mine:
        image_path = datastore.get_image_uri(image_id)
        label_id = datastore.get_label_by_image_id(image_id, FINAL)
        label_path = datastore.get_label_uri(label_id, FINAL) if label_id else None
        key = f"{file_stamp(image_path)}|{file_stamp(label_path)}|{model_key}"
        if not force and (datastore.get_image_info(image_id) or {}).get("cross_prompt_key") == key:
            progress["unchanged"] += 1
            _advance(progress, started, on_progress)
        else:
            to_score.append((image_id, image_path, label_path, key))
    # The next scan is read (decompressed) in a second thread while this one is scored: reading holds the GIL
    # little, and scoring's own numpy work runs on one core.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="scan reader") as reader:
        reading = [reader.submit(read_scan, *job[:3]) for job in to_score[:1]]
        for index, (image_id, _, _, key) in enumerate(to_score):
            if index + 1 < len(to_score):
                reading.append(reader.submit(read_scan, *to_score[index + 1][:3]))
            try:
                result = score_volume(point, box, image_id, *reading[index].result())
                progress["scored"] += 1
            except UserInputError as exc:
                result = {"cross_prompt_error": str(exc)}
                progress["failed"] += 1
                log.warning("cross_prompt: %s not scored: %s", image_id, exc)
            reading[index] = None  # its volume goes
            info = datastore.get_image_info(image_id) or {}
            stale = {k: None for k in SCORE_KEYS if k in info and k not in result}  # e.g. a label was removed
            datastore.update_image_info(image_id, {**stale, **result, "cross_prompt_key": key,
                                                   "cross_prompt_ts": int(time.time())})
            _advance(progress, started, on_progress)
    return progress


def _advance(progress: dict, started: float, on_progress) -> None:
    progress["done"] += 1
    elapsed = time.perf_counter() - started
    rate = progress["scored"] / elapsed if progress["scored"] else 0.0
    remaining = progress["total"] - progress["done"]
    progress.update(seconds=round(elapsed, 1), scans_per_minute=round(60 * rate, 2),
                    eta_seconds=round(remaining / rate) if rate else None)
    if on_progress is not None:
        on_progress(dict(progress))


def score_image(point: Predictor, box: Predictor, image_id: str, image_path: str,
                label_path: str | None) -> dict:
    """`score_scan` of one stored image (and its final label), embeddings dropped afterwards."""
    return score_volume(point, box, image_id, *read_scan(image_id, image_path, label_path))


def read_scan(image_id: str, image_path: str, label_path: str | None) -> tuple:
    """(the image as a PETVolume, its label array or None), or a UserInputError that says what to fix."""
    volume = load_nifti(image_path)
    label = None
    if label_path:
        try:
            label = np.asarray(nib.load(label_path).dataobj)
        except Exception as exc:  # nibabel raises many types for damaged files
            raise UserInputError(f"label of {image_id} cannot be read ({exc}); save it again") from exc
        if label.shape != volume.shape:
            raise UserInputError(
                f"label of {image_id} has shape {label.shape}, its image {volume.shape}: labels must be on the "
                "image's grid"
            )
    return volume, label


def score_volume(point: Predictor, box: Predictor, image_id: str, volume, label: np.ndarray | None) -> dict:
    """`score_scan` of a scan read by `read_scan`, embeddings dropped afterwards."""
    try:
        sessions = (point.set_volume(volume, f"score:{image_id}"), box.set_volume(volume, f"score:{image_id}"))
        return score_scan(*sessions, label=label, liver=None)
    finally:
        point.clear_cache()
        box.clear_cache()


def progress_line(progress: dict) -> str:
    eta = progress.get("eta_seconds")
    return (f"cross_prompt: {progress['done']}/{progress['total']} scans ({progress['scored']} scored, "
            f"{progress['unchanged']} unchanged, {progress['failed']} failed), "
            f"{progress['scans_per_minute']} scans/min, ETA {datetime.timedelta(seconds=eta) if eta else '-'}")


# ----------------------------------------------------------------------------------------------
# Orders of the strategies (higher first; None: not served)


def annotation_priority(info: dict, labeled: bool):
    """``disagreement``: unlabeled scans, the most disputed first; unscored ones after every scored one."""
    if labeled:
        return None
    score = info.get("cross_prompt_disagreement")
    return (1, score) if score is not None else (0, 0.0)


def review_priority(info: dict, labeled: bool):
    """``label_review``: labeled, scored scans, the most suspicious label first."""
    score = info.get("label_noise_score")
    if not labeled or score is None:
        return None
    return (score,)


def coverage_distance(features, taken: list) -> float:
    """Euclidean distance from a scan's ``cross_prompt_features`` (a unit vector) to the nearest of ``taken``
    (0-2); 1.0 when nothing is taken or the scan has no features."""
    if not taken or features is None:
        return 1.0
    return float(np.min(np.linalg.norm(np.asarray(taken, dtype=float) - np.asarray(features, dtype=float), axis=1)))


def diverse_priority(info: dict, labeled: bool, taken: list):
    """``disagreement_diverse``: the disagreement times the distance to the nearest scan already labeled or
    leased (`coverage_distance`), so a batch spreads over the encoder's feature space instead of taking k
    near-copies of the most disputed scan (a greedy, score-weighted k-center choice); ties go to the more
    disputed scan."""
    base = annotation_priority(info, labeled)
    if base is None or base[0] == 0:
        return base
    return (1, base[1] * coverage_distance(info.get("cross_prompt_features"), taken), base[1])
