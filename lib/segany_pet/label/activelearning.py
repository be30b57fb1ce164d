"""MONAI Label active learning: the ``cross_prompt`` scoring method and the strategies that read its scores.

- ``POST /scoring/cross_prompt`` scores every changed scan in a background subprocess (MONAI Label runs scoring
  methods that way); progress goes to the job's log (``GET /scoring/``) and to ``/info``; ``DELETE /scoring/``
  stops it, keeping every scan already written. Params: ``images`` (ids; default all), ``force`` (rescore
  unchanged scans), ``threads`` (torch threads, default 1: the server keeps a core for annotators).
- Strategies ``disagreement`` (unlabeled scans, most disputed first) and ``label_review`` (labeled scans,
  most suspicious label first) lease each scan they serve to the asking client (``client_id``) so two
  annotators never get the same scan while the lease lasts.

The models: the served model prompted by clicks, and the box replica a CPCL job published beside it
(``<name>_box.pt``) prompted by boxes; without one, the served model is prompted both ways.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from segany_pet.active.scoring import (
    annotation_priority,
    diverse_priority,
    models_key,
    progress_line,
    review_priority,
    score_datastore,
    scoring_predictor,
)
from segany_pet.errors import UserInputError
from segany_pet.jsonfile import read_json, write_json
from segany_pet.label.models import ServedModel
from segany_pet.model import load_checkpoint

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 5.0
FINAL = "final"
PARAMS = frozenset({"images", "force", "threads"})
SERVER_KEYS = frozenset({"method", "device", "model", "gpus"})  # what MONAI Label adds to a scoring request


def box_replica_path(served: ServedModel) -> Path | None:
    """The box replica published with the served model, if that model is served (not the configured file)."""
    box = served.published_box
    if box is None or not box.exists() or served.current_path() != served.published:
        return None
    return box


class CrossPromptScoring(ScoringMethod):
    """Cross-prompt disagreement and label-noise scores for every scan, written into the image's info."""

    def __init__(self, served: ServedModel, state_dir: str | os.PathLike):
        super().__init__("Cross-prompt disagreement: ranks unlabeled scans to annotate and labels to re-check")
        self.served = served
        self.progress_file = Path(state_dir) / "scoring" / "cross_prompt.json"

    def info(self) -> dict:
        record = {**super().info(), "params": {"images": [], "force": False, "threads": 1}}
        progress = read_json(self.progress_file)
        if progress is not None:
            record["progress"] = progress
        return record

    def check_request(self, request: dict, datastore) -> dict:
        """The request's options, checked; UserInputError says what to fix."""
        unknown = sorted(set(request) - PARAMS - SERVER_KEYS)
        if unknown:
            raise UserInputError(f"unknown scoring option(s) {', '.join(unknown)}; the options are "
                                 f"{', '.join(sorted(PARAMS))}")
        images = request.get("images") or None
        if images is not None:
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                raise UserInputError(f"images must be a list of image ids, not {images!r}")
            missing = sorted(set(images) - set(datastore.list_images()))
            if missing:
                raise UserInputError(f"image(s) not in the datastore: {', '.join(missing[:5])}")
        threads = request.get("threads", 1)
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise UserInputError(f"threads must be a positive integer, not {threads!r}")
        force = request.get("force", False)
        if not isinstance(force, bool):
            raise UserInputError(f"force must be true or false, not {force!r}")
        return {"images": images, "threads": threads, "force": force}

    def __call__(self, request: dict, datastore) -> dict:
        options = self.check_request(request, datastore)
        torch.set_num_threads(options["threads"])
        served, point_file = self.served.predictor_and_file()
        point = scoring_predictor(served.model)
        box_file = box_replica_path(self.served)
        box = point
        if box_file:
            box = scoring_predictor(load_checkpoint(box_file).to_inference_dtype(served.model.inference_dtype))
        logger.info("cross_prompt: clicks to %s, boxes to %s", point_file, box_file or point_file)
        writer = ProgressFile(self.progress_file)
        result = score_datastore(datastore, point, box, models_key(point_file, box_file), images=options["images"],
                                 force=options["force"], on_progress=writer)
        writer(result, final=True)
        return result


class ProgressFile:
    """Scoring progress as a log line and a JSON file (read by /info), at most every few seconds."""

    def __init__(self, path: Path):
        self.path = path
        self.written = 0.0

    def __call__(self, progress: dict, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.written < PROGRESS_INTERVAL_SECONDS and progress["done"] < progress["total"]:
            return
        self.written = now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {**progress, "state": "finished" if final else "running",
                  "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(self.path, record)
        logger.info(progress_line(progress))


class LeasedStrategy(Strategy):
    """Serves the datastore's best image by ``priority`` and leases it to the asking client.

    Needs the app's PETDatastore (its ``lease_best`` chooses and leases in one transaction).
    """

    def __init__(self, name: str, description: str, priority, ranked_by: str, lease_minutes: float = 30.0,
                 diverse: bool = False):
        super().__init__(description)
        self.name = name
        self.priority = priority
        self.ranked_by = ranked_by  # the info key(s) the order rests on, told to the client
        self.lease_seconds = 60.0 * lease_minutes
        # priority(info, labeled, taken): also ranks by the scans already labeled or leased (their features).
        self.diverse = diverse

    def __call__(self, request: dict, datastore) -> dict:
        if not hasattr(datastore, "lease_best"):
            raise UserInputError(f"strategy {self.name} needs the app's local datastore (PETDatastore)")
        client = str(request.get("client_id") or "anonymous")  # the server fills in the user's name
        taken = []

        def survey(records, now):
            taken.extend(self.taken_features(records, now, client))

        def rank(image_id, record):
            labeled = bool(record.labels.get(FINAL))
            return self.priority(record.image.info, labeled, taken) if self.diverse else self.priority(
                record.image.info, labeled)

        chosen = datastore.lease_best(rank, client, self.name, self.lease_seconds, survey if self.diverse else None)
        if chosen is None:
            return {}
        image_id, info = chosen
        return {"id": image_id, "strategy": self.name, "lease": info["lease"], "ranked_by": self.ranked_by,
                **{key: info[key] for key in ("cross_prompt_disagreement", "label_noise_score",
                                              "cross_prompt_worst", "label_noise_worst") if key in info}}

    def taken_features(self, records, now: float, client: str) -> list:
        """Descriptors of the scans labeled or under another client's lease (this client's own lease ends)."""
        features = []
        for _, record in records:
            info = record.image.info
            lease = info.get("lease") or {}
            leased = lease.get("until", 0) > now and lease.get("client_id") != client
            if (record.labels.get(FINAL) or leased) and info.get("cross_prompt_features") is not None:
                features.append(info["cross_prompt_features"])
        return features


def disagreement_strategy(lease_minutes: float) -> LeasedStrategy:
    return LeasedStrategy("disagreement", "Unlabeled scan where point- and box-prompted models disagree most",
                          annotation_priority, "cross_prompt_disagreement", lease_minutes)


def diverse_disagreement_strategy(lease_minutes: float) -> LeasedStrategy:
    return LeasedStrategy("disagreement_diverse", "Unlabeled scan of high disagreement, unlike the scans already "
                          "labeled or leased (score-weighted k-center)", diverse_priority,
                          "cross_prompt_disagreement x distance to the nearest labeled or leased cross_prompt_features",
                          lease_minutes, diverse=True)


def label_review_strategy(lease_minutes: float) -> LeasedStrategy:
    return LeasedStrategy("label_review", "Labeled scan whose label the models' consensus contradicts most",
                          review_priority, "label_noise_score", lease_minutes)
