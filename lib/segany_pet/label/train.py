"""MONAI Label train task: the project's trainer on the datastore's labels, with progress, stop and publishing.

MONAI Label runs ``__call__`` in a subprocess that rebuilds the app; the server process uses the same object
for ``/info`` (``config``, ``stats``), to check a request before a subprocess is started (``training_config``)
and to ask a running job to stop (``request_stop``). Files, under ``state_dir``:

- ``train/<name>/``: the trainer's ``checkpoint_last.pt``, ``model_best.pt``, ``train_stats.json``, ``STOP``,
  plus ``progress.json`` (epoch, iteration, loss, validation Dice, ETA; rewritten every few seconds);
- ``models/<name>.pt``: the published model, which the server serves in place of its configured checkpoint
  from the next click on (``ServedModel.published``).

A job that finished is published if it beat the weights it started from on its validation cases (the trainer
validates them first: ``validate_start_model``), so retraining never replaces the served model with a worse
one; a stopped job is not published, and the next ``POST /train/<name>`` continues it (``restart: true``
starts anew). A new job starts from the served weights: fine-tuning, not training from
scratch, unless ``init: "random"``.

With ``method: "cpcl"`` (the app's ``segany_pet_cpcl`` task) the job is Cross-Prompt Confidence Learning:
when it finishes, every low-tier label's corrected version is saved in the datastore under the label tag
``cpcl_corrected`` (the annotator's ``final`` label is never touched), with its noise score in the label's
info, and the ranked list of suspicious labels is in the stats.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from pathlib import Path

from monailabel.interfaces.tasks.train import TrainTask

from segany_pet.errors import UserInputError
from segany_pet.jsonfile import read_json, write_json
from segany_pet.label.models import ServedModel, copy_atomically
from segany_pet.train import MODEL_BEST, TrainConfig, make_trainer, records_from_datastore
from segany_pet.train.cpcl import MODEL_BOX, NOISE_REPORT
from segany_pet.train.trainer import CHECKPOINT_LAST, STOP_FILE, TRAIN_STATS

logger = logging.getLogger(__name__)

PROGRESS = "progress.json"
PROGRESS_INTERVAL_SECONDS = 5.0
# Keys MONAI Label itself adds to a train request.
SERVER_KEYS = frozenset({"model", "gpus", "local_rank", "device", "multi_gpu"})
# TrainConfig fields an admin may set over REST; the rest (paths, label names) belong to the app.
REQUEST_FIELDS = {
    "epochs": int, "iterations_per_epoch": int, "batch_size": int, "lr": float, "warmup_iterations": int,
    "clicks_per_sample": int, "first_click_weight": float, "val_cases": int, "val_clicks": int,
    "low_tier_weight": float, "touching_weight": float, "hot_spot_share": float, "seed": int, "threads": int,
    "cpcl_warmup_epochs": int,
    "cpcl_agreement_threshold": float, "cpcl_uncertainty_threshold": float, "cpcl_uncertain_weight": float,
    "cpcl_cross_weight": float, "cpcl_cross_confidence": float, "cpcl_box_clicks": int, "validate_start_model": bool,
    "fast": bool, "fast_crops_per_object": int,
}
CORRECTED_TAG = "cpcl_corrected"
DESCRIPTIONS = {
    "plain": "Interactive 3D SAM training on the datastore's labels (fine-tunes the served model)",
    "cpcl": "Cross-Prompt Confidence Learning on expert and noisy labels: a better model and the suspicious labels",
}
INITS = ("served", "random")


class PromptableTrainTask(TrainTask):
    """Trains the promptable model on every image with a ``final`` label (tier from the label's ``quality``)."""

    def __init__(self, name: str, served: ServedModel, state_dir: str | os.PathLike, defaults: dict | None = None,
                 method: str = "plain"):
        super().__init__(DESCRIPTIONS[method])
        self.name = name
        self.method = method
        self.served = served
        self.output_dir = Path(state_dir) / "train" / name
        # Cheap defaults for a 2-core server that keeps serving: one torch thread leaves a core to annotators.
        self.defaults = {"epochs": 10, "iterations_per_epoch": 100, "batch_size": 2, "lr": 2e-4,
                         "val_cases": 1, "threads": 1, **(defaults or {})}

    def config(self) -> dict:
        return {**self.defaults, "method": self.method, "init": INITS[0], "restart": False}

    # ------------------------------------------------------------------------------------------------------
    # Requests

    def training_config(self, request: dict) -> tuple[TrainConfig, bool]:
        """The TrainConfig a request asks for and whether it asks for a fresh start; UserInputError if invalid."""
        fields = [key for key in REQUEST_FIELDS if self.method == "cpcl" or not key.startswith("cpcl_")]
        unknown = sorted(set(request) - SERVER_KEYS - set(fields) - {"init", "restart"})
        if unknown:
            raise UserInputError(
                f"unknown training option(s) {', '.join(unknown)} for {self.name}; the options are "
                f"{', '.join(fields)}, init and restart"
            )
        init = request.get("init", INITS[0])
        if init not in INITS:
            raise UserInputError(f"init must be one of {', '.join(INITS)}, not {init!r}")
        restart = request.get("restart", False)
        if not isinstance(restart, bool):
            raise UserInputError(f"restart must be true or false, not {restart!r}")
        options = {**self.defaults, **{key: typed(key, request[key]) for key in REQUEST_FIELDS if key in request}}
        start = self.served.current_path() if init == "served" else None
        if start is not None and not start.exists():
            start = None  # nothing served yet: train the default preset from random weights
        try:
            config = TrainConfig.from_dict({
                **options, "output_dir": str(self.output_dir), "init_checkpoint": str(start) if start else None,
                "progress_bar": False, "method": self.method,
            })
        except (TypeError, ValueError) as exc:
            raise UserInputError(f"invalid training options: {exc}") from exc
        return config, restart

    def check_request(self, request: dict, datastore) -> tuple[TrainConfig, bool, list[dict]]:
        """`training_config` plus the datastore's records, checked for what the method needs."""
        config, restart = self.training_config(request)
        records = records_from_datastore(datastore)
        if config.method == "cpcl" and config.cpcl_warmup_epochs and not any(r["tier"] == "high" for r in records):
            raise UserInputError(
                "CPCL warms up on expert labels and every label here is low-tier: save some labels with "
                "quality 'high', or set cpcl_warmup_epochs to 0"
            )
        return config, restart, records

    def __call__(self, request: dict, datastore) -> dict:
        config, restart, records = self.check_request(request, datastore)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if restart or self._last_job_finished():
            self._clear_job()
        logger.info("training %s on %d labeled images (%s)", self.name, len(records),
                    ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items() if k in REQUEST_FIELDS))
        stats = make_trainer(config, records, on_progress=ProgressWriter(self.output_dir / PROGRESS)).run()
        if stats.get("status") == "finished":
            if (self.output_dir / MODEL_BEST).exists():
                self.publish()
            else:
                logger.info("kept the served model: no epoch beat its validation Dice (%s)", stats.get("best_metric"))
            if self.method == "cpcl":
                self.save_corrected_labels(datastore)
        return {key: stats.get(key) for key in ("status", "epoch", "step", "best_metric", "best_metric_epoch")}

    def save_corrected_labels(self, datastore) -> int:
        """Each low-tier label's CPCL-corrected version as the image's ``cpcl_corrected`` label."""
        report = read_json(self.output_dir / NOISE_REPORT) or {"cases": []}
        for rank, case in enumerate(report["cases"], start=1):
            info = {"noise_score": case["noise_score"], "noisy_voxels": case["noisy_voxels"],
                    "corrected_voxels": case["corrected_voxels"], "noise_rank": rank,
                    "worst_objects": case["worst_objects"], "source": f"CPCL job in {self.output_dir}"}
            datastore.save_label(case["id"], case["corrected_label"], CORRECTED_TAG, info)
        logger.info("saved %d CPCL-corrected labels as %r", len(report["cases"]), CORRECTED_TAG)
        return len(report["cases"])

    def _last_job_finished(self) -> bool:
        stats = read_json(self.output_dir / TRAIN_STATS)
        return bool(stats) and stats.get("status") == "finished"

    def _clear_job(self) -> None:
        for name in (CHECKPOINT_LAST, MODEL_BEST, TRAIN_STATS, PROGRESS, NOISE_REPORT, MODEL_BOX):
            (self.output_dir / name).unlink(missing_ok=True)

    def publish(self) -> Path:
        """Publish the best model where the server serves it from, and a CPCL job's box replica beside it (the
        cross-prompt scoring's box model); any other job removes an older box replica, which belonged to the
        model it replaces."""
        copy_atomically(self.output_dir / MODEL_BEST, self.served.published)
        if self.method == "cpcl" and (self.output_dir / MODEL_BOX).exists():
            copy_atomically(self.output_dir / MODEL_BOX, self.served.published_box)
        else:
            self.served.published_box.unlink(missing_ok=True)
        return self.served.published

    def request_stop(self) -> None:
        """Ask a running job to save and stop after its current step (the trainer polls this file); a job still
        starting up stops at its first step."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / STOP_FILE).touch()

    def clear_stop_request(self) -> None:
        """Forget a stop that came after the last job ended (called before a new job is started)."""
        (self.output_dir / STOP_FILE).unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------------
    # Reporting

    def stats(self) -> dict:
        """train_stats.json with the latest progress while a job runs, and where the model was published."""
        stats = read_json(self.output_dir / TRAIN_STATS) or {}
        progress = read_json(self.output_dir / PROGRESS)
        if progress and progress.get("iteration", 0) >= stats.get("step", 0):
            stats["progress"] = progress
        if stats and self.served.published.exists():
            stats["published"] = str(self.served.published)
        return stats


class ProgressWriter:
    """The trainer's progress callback: a log line (MONAI Label shows the job's last lines in GET /train/) and
    progress.json, both at most every PROGRESS_INTERVAL_SECONDS and at the end of each epoch."""

    def __init__(self, path: Path):
        self.path = path
        self.last_written = 0.0

    def __call__(self, progress: dict) -> None:
        now = time.monotonic()
        epoch_end = progress["iteration"] % max(progress["iterations"] // progress["epochs"], 1) == 0
        if now - self.last_written < PROGRESS_INTERVAL_SECONDS and not epoch_end:
            return
        self.last_written = now
        record = {**progress, "loss": round(progress["loss"], 5), "eta_seconds": round(progress["eta_seconds"]),
                  "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(self.path, record)
        val = progress["val_dice"]
        logger.info("progress: epoch %d/%d, iteration %d/%d, loss %.4f, val Dice (1 click) %s, ETA %s",
                    progress["epoch"], progress["epochs"], progress["iteration"], progress["iterations"],
                    progress["loss"], f"{val:.3f}" if val is not None else "-",
                    datetime.timedelta(seconds=round(progress["eta_seconds"])))


def typed(key: str, value):
    """A request value as its TrainConfig type: JSON numbers only (2.0 is an int, 2.5 and "2" are not), JSON
    true/false for switches."""
    kind = REQUEST_FIELDS[key]
    if kind is bool:
        if not isinstance(value, bool):
            raise UserInputError(f"{key} must be true or false, not {value!r}")
        return value
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or (kind is int and not float(value).is_integer()):
        raise UserInputError(f"{key} must be {'an integer' if kind is int else 'a number'}, not {value!r}")
    return kind(value)
