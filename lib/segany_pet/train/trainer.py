"""The trainer: simulated interactive sessions on sampled crops, AdamW with warm-up + cosine, checkpoints that
resume, validation with the interactive protocol, and progress for MONAI Label and the command line.

    trainer = Trainer(TrainConfig(output_dir="runs/a", epochs=20), records_from_folder("images", "labels"))
    stats = trainer.run()          # also under torchrun: one process per device, see distributed.py

Files in ``output_dir``:
- ``checkpoint_last.pt``: everything needed to continue (model, optimizer, scheduler, epoch, step, every
  rank's random state and partial epoch loss, history, config), written at the end of every epoch and when a
  stop is requested. With ``resume`` (default) a run finding it continues from it: the same samples, the same
  updates, so a stopped-and-resumed run ends with the weights of an uninterrupted one (bit for bit on the CPU
  with the same thread count and number of ranks; GPU kernels and different thread counts may differ in the
  last bits). Loaded with ``weights_only=True``: it holds tensors and plain values only.
- ``model_best.pt``: the model with the best validation Dice after one click, written by `save_checkpoint`
  (so `load_checkpoint` reads it with its preset); without validation cases, the last epoch's model.
- ``train_stats.json``: MONAI Label's train stats keys (start_ts, epoch, total_time, best_metric, train, eval)
  plus per-epoch history, seconds per iteration and crops drawn per case.
- ``STOP`` (the default ``stop_file``): create it to stop cooperatively; the trainer saves, deletes it, exits.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from segany_pet.errors import UserInputError
from segany_pet.evaluate.interactive import REPORT_CLICKS, evaluate_case
from segany_pet.evaluate.report import summarise
from segany_pet.jsonfile import write_json
from segany_pet.model import PRESETS, Preset, Sam3D, build_model, load_checkpoint, save_checkpoint
from segany_pet.predictor import Predictor
from segany_pet.train.data import (
    DEFAULT_LABEL_NAMES,
    DEFAULT_SPLIT_CLASSES,
    CropSampler,
    TrainingCase,
    TrainingDataError,
    check_records,
    load_cases,
)
from segany_pet.train.distributed import DistributedContext, start_distributed
from segany_pet.train.simulate import LOSS_RESOLUTIONS, InteractiveStep, first_prompt

log = logging.getLogger(__name__)

CHECKPOINT_LAST = "checkpoint_last.pt"
MODEL_BEST = "model_best.pt"
TRAIN_STATS = "train_stats.json"
STOP_FILE = "STOP"
CHECKPOINT_FORMAT = "segany_pet_training"
KEY_METRIC = "val_dice_1click"
TRAINING_METHODS = ("plain", "cpcl")
DEFAULT_PRESET = "segany_pet_small"
# Per-epoch sums of every step's loss (per decoder iteration) and Dice of the first and last decoder iteration.
RUNNING_MEANS = ("loss", "dice_first", "dice_last")
RUNNING_START = {**dict.fromkeys(RUNNING_MEANS, 0.0), "steps": 0}
# Parameters that are positions, tokens or embeddings: weight decay would pull them to zero for no gain.
NO_DECAY = ("pos_embed", "rel_pos", "point_embeddings", "not_a_point_embed", "no_mask_embed", "iou_token",
            "mask_tokens")


@dataclass
class TrainConfig:
    """What to train and how. Plain values only, so it round-trips through JSON and checkpoints."""

    # Where checkpoint_last.pt, model_best.pt and train_stats.json go.
    output_dir: str = "train_output"
    # Architecture + preprocessing: a name in PRESETS or a Preset.to_dict() record; None: "segany_pet_small",
    # or with init_checkpoint the checkpoint's own preset (given as well, it must match the checkpoint's).
    preset: str | dict | None = None
    # Start from these weights (own or published SAM-Med3D / SegAnyPET file) instead of random ones.
    init_checkpoint: str | None = None
    # Label value of each target class; label files may only hold these values and 0.
    label_names: dict = field(default_factory=lambda: dict(DEFAULT_LABEL_NAMES))
    # Classes whose 26-connected components are separate objects (one click, one lesion); others are whole.
    split_classes: list = field(default_factory=lambda: list(DEFAULT_SPLIT_CLASSES))
    # Epochs, each of this many optimizer steps; a step sees batch_size crops on every rank.
    epochs: int = 10
    iterations_per_epoch: int = 100
    batch_size: int = 4
    # AdamW: peak learning rate, reached linearly over warmup_iterations, then cosine down to lr * min_lr_ratio.
    lr: float = 4e-4
    min_lr_ratio: float = 0.02
    warmup_iterations: int = 50
    weight_decay: float = 0.05
    # Fine-tuning: parameters the init checkpoint lacks (a grafted or widened detail encoder, a published file's box
    # corners) learn at lr times this, so they catch up while the loaded ones move gently.
    fresh_lr_factor: float = 1.0
    # Gradients are clipped to this global norm (0: no clipping).
    grad_clip: float = 1.0
    # Decoder iterations per crop: the opening prompt, then clicks_per_sample - 1 corrective clicks.
    clicks_per_sample: int = 3
    # Loss weight of the opening prompt's iteration relative to the corrective ones (one click is what counts).
    first_click_weight: float = 1.0
    # Share of crops opened with a box only, and with a box plus a click (the rest: a click).
    box_share: float = 0.15
    box_and_click_share: float = 0.1
    # Other objects in a crop that get their own prompts too (one encoder pass, more decoder supervision).
    neighbours_per_crop: int = 0
    # Share of crops centred on hot non-target uptake, clicked, with an empty target (see data.py).
    hot_spot_share: float = 0.1
    # The object's centre moves up to this share of the crop from the crop centre along each axis (the
    # Predictor centres its crop on the clicks to within 1/8 of the crop: snapping).
    position_jitter: float = 0.125
    # SUV scaled by exp(U(-s, s)) per crop (0: off).
    intensity_scale: float = 0.15
    # Sampling weight of objects from "low" tier labels relative to "high" (0 ignores them).
    low_tier_weight: float = 1.0
    # Sampling weight of lesions beside uptake a threshold would leak into (an organ), relative to others.
    touching_weight: float = 1.0
    # Loss on the logits upsampled to the crop ("crop") or on the target averaged to the logits' grid.
    loss_resolution: str = "crop"
    # Weights of the class-balanced BCE and of the IoU head's MSE next to the Dice loss (see simulate.py).
    # Measured (segany_pet_small at 1.5 mm, 300 steps, 24 phantoms): validation Dice after one click 0.46
    # with 0.1, 0.37 with 1.0; with 0 (Dice alone) every logit collapses to background.
    bce_weight: float = 0.1
    iou_loss_weight: float = 1.0
    # "plain", or "cpcl": Cross-Prompt Confidence Learning with a point- and a box-prompted replica (cpcl.py).
    method: str = "plain"
    # CPCL: epochs of warm-up on high-tier labels only, before low-tier labels join.
    cpcl_warmup_epochs: int = 1
    # CPCL: a replica "says object" where its probability exceeds this; both saying the same against the
    # label marks a voxel noisy.
    cpcl_agreement_threshold: float = 0.5
    # CPCL: noisy voxels whose averaged probability has a binary entropy below this (bits; 0.5 bits is a
    # probability beyond 0.11 / 0.89) take the replicas' consensus as target (self-correction) ...
    cpcl_uncertainty_threshold: float = 0.5
    # ... the other noisy voxels keep the label with this loss weight.
    cpcl_uncertain_weight: float = 0.5
    # CPCL: replace labels in certain noisy voxels (False: only down-weight them; the ablation).
    cpcl_self_correction: bool = True
    # CPCL: weight of each replica's loss against the other's confident voxels on low-tier crops, and the
    # probability (or 1 - probability) above which a voxel counts as confident.
    cpcl_cross_weight: float = 0.5
    cpcl_cross_confidence: float = 0.9
    # CPCL: prompts per crop for the box replica, its box and corrective clicks after it. It serves boxes alone
    # (noise report, cross-prompt scoring), so by default it trains on the box alone: a cheaper step.
    cpcl_box_clicks: int = 1
    # CPCL: the box replica's start weights (None: init_checkpoint, or a fresh model with the seed + 1).
    cpcl_box_checkpoint: str | None = None
    # The fast loop (fast.py): the image encoder frozen, fast_crops_per_object crops of every object encoded once,
    # the prompt encoder and mask decoder trained on the cached embeddings (CPCL: both replicas'). Needs
    # init_checkpoint.
    fast: bool = False
    fast_crops_per_object: int = 4
    # Seeds the model initialisation, the validation split and (with the rank) the crop sampling.
    seed: int = 0
    # Held-out records for validation: a number (drawn with the seed) or a list of record ids.
    val_cases: int | list = 0
    # Validation: clicks per lesion (Dice is reported after 1, 3 and 5 of them, as far as they go), lesions per
    # case at most (drawn with the seed), the class scored and the predictor's max_windows (2 bounds the time
    # an untrained model spends following blobs).
    val_clicks: int = 3
    val_max_lesions: int = 10
    val_class: str = "lesion"
    val_max_windows: int = 2
    # Fine-tuning (init_checkpoint) with validation cases: validate the start weights first, so only an epoch
    # that beats them becomes model_best.pt; a job that never does writes none (the served model stays).
    validate_start_model: bool = True
    # Continue from output_dir/checkpoint_last.pt when it exists.
    resume: bool = True
    # A file whose existence requests a stop (checked every step); None: output_dir/STOP.
    stop_file: str | None = None
    # torch threads per process (None: leave torch's default).
    threads: int | None = None
    # "cpu", "cuda" or None (a GPU per rank if available).
    device: str | None = None
    # A tqdm progress bar on rank 0.
    progress_bar: bool = True

    def __post_init__(self):
        problems = []
        for name in ("epochs", "iterations_per_epoch", "batch_size", "clicks_per_sample", "val_clicks",
                     "cpcl_box_clicks"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("box_share", "box_and_click_share", "hot_spot_share", "position_jitter", "min_lr_ratio"):
            if not 0 <= float(getattr(self, name)) <= 1:
                problems.append(f"{name} must lie in [0, 1]")
        if self.box_share + self.box_and_click_share > 1:
            problems.append("box_share + box_and_click_share must not exceed 1")
        if self.lr <= 0 or self.fresh_lr_factor <= 0:
            problems.append("lr and fresh_lr_factor must be positive")
        if self.method not in TRAINING_METHODS:
            problems.append(f"method must be one of {', '.join(TRAINING_METHODS)}, not {self.method!r}")
        for name in ("cpcl_agreement_threshold", "cpcl_uncertainty_threshold", "cpcl_uncertain_weight",
                     "cpcl_cross_confidence"):
            if not 0 <= float(getattr(self, name)) <= 1:
                problems.append(f"{name} must lie in [0, 1]")
        if self.fast and not self.init_checkpoint:
            problems.append("fast training needs an init_checkpoint (its encoder stays as it is)")
        if self.cpcl_box_checkpoint and self.method != "cpcl":
            problems.append("cpcl_box_checkpoint is the start of CPCL's box replica: it needs method cpcl")
        if int(self.fast_crops_per_object) < 1:
            problems.append("fast_crops_per_object must be at least 1")
        if self.touching_weight <= 0:
            problems.append("touching_weight must be positive")
        if self.first_click_weight <= 0:
            problems.append("first_click_weight must be positive")
        if self.cpcl_warmup_epochs < 0 or self.cpcl_cross_weight < 0:
            problems.append("cpcl_warmup_epochs and cpcl_cross_weight must not be negative")
        if self.loss_resolution not in LOSS_RESOLUTIONS:
            problems.append(f"loss_resolution must be one of {LOSS_RESOLUTIONS}")
        if isinstance(self.preset, str) and self.preset not in PRESETS:
            problems.append(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if problems:
            raise UserInputError("invalid training configuration: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, record: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise UserInputError(f"unknown training options: {', '.join(unknown)}")
        return cls(**record)

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch

    def resolved_preset(self) -> Preset:
        """The preset asked for (the default when none is)."""
        if self.preset is None:
            return PRESETS[DEFAULT_PRESET]
        return PRESETS[self.preset] if isinstance(self.preset, str) else Preset.from_dict(self.preset)


def learning_rate_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step``: linear warm-up, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def split_records(records: list[dict], val_cases, seed: int) -> tuple[list[dict], list[dict]]:
    """(training, validation) records: ``val_cases`` ids, or that many drawn with ``seed``."""
    if isinstance(val_cases, list | tuple):
        ids = {str(v) for v in val_cases}
        unknown = sorted(ids - {str(r["id"]) for r in records})
        if unknown:
            raise TrainingDataError(f"validation cases {unknown} are not among the records")
    else:
        count = int(val_cases or 0)
        if count >= len(records):
            raise TrainingDataError(f"{count} validation cases leave none of the {len(records)} records to train on")
        order = sorted(str(r["id"]) for r in records)
        ids = {order[i] for i in np.random.default_rng(seed).permutation(len(order))[:count]}
    return [r for r in records if str(r["id"]) not in ids], [r for r in records if str(r["id"]) in ids]


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class Trainer:
    """Trains a 3D SAM on records (see data.py) as TrainConfig says.

    ``val_records`` overrides ``config.val_cases``. ``on_progress(dict(epoch, epochs, iteration, iterations,
    loss, val_dice, eta_seconds))`` is called on rank 0 after every step (epoch 1-based, iteration = steps
    done). ``should_stop()`` is asked every step; True (on any rank) saves checkpoint_last.pt and returns.
    """

    def __init__(
        self,
        config: TrainConfig | dict,
        records,
        val_records=None,
        *,
        on_progress: Callable[[dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        self.records = check_records(records)
        self.val_records = None if val_records is None else check_records(val_records)
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.output_dir = Path(self.config.output_dir)
        self.stop_file = Path(self.config.stop_file) if self.config.stop_file else self.output_dir / STOP_FILE
        self.model: Sam3D | None = None
        self.sampler: CropSampler | None = None
        self.context: DistributedContext | None = None

    # ------------------------------------------------------------------------------------------
    # Set-up

    def _build_model(self) -> Sam3D:
        config = self.config
        torch.manual_seed(config.seed)
        if config.init_checkpoint:
            # A detail encoder asked for but absent from the file starts at zero output (the file's answers).
            detail_width = config.resolved_preset().detail_width if config.preset is not None else 0
            model = load_checkpoint(config.init_checkpoint, detail_width=detail_width)
            if config.preset is not None:
                model.preset = self._fine_tuning_preset(model.preset, config.resolved_preset())
            if model.initialised_keys:
                log.info("fine-tuning %s: %s start from the initialisation (absent from the checkpoint)",
                         config.init_checkpoint, ", ".join(model.initialised_keys))
            return model
        return build_model(config.resolved_preset())

    def _fine_tuning_preset(self, loaded: Preset, wanted: Preset) -> Preset:
        """The preset to fine-tune a loaded model with: the configuration's, when it differs from the file's at
        most in the crop's voxel sizes (the same weights trained on crops of another scale, or served with
        another scale ensemble)."""
        differing = [f.name for f in dataclasses.fields(Preset) if getattr(loaded, f.name) != getattr(wanted, f.name)]
        if set(differing) - {"spacing_mm", "ensemble_spacings_mm"}:
            raise UserInputError(
                f"init_checkpoint {self.config.init_checkpoint} is preset {loaded.name!r}, but the configuration "
                f"asks for {wanted.name!r} (differing in {', '.join(differing)}); drop 'preset' or choose a "
                "matching checkpoint"
            )
        if "spacing_mm" in differing:
            log.info("fine-tuning %s on crops of %g mm (the file's preset: %g mm)", self.config.init_checkpoint,
                     wanted.spacing_mm, loaded.spacing_mm)
        return wanted

    def _step_module(self) -> torch.nn.Module:
        """The module a training step runs (wrapped by DistributedDataParallel under torchrun)."""
        config = self.config
        return InteractiveStep(self.model, config.clicks_per_sample, config.loss_resolution,
                               config.iou_loss_weight, config.bce_weight, config.first_click_weight)

    # Hooks for trainers that train more than one model (cpcl.py); the plain trainer has nothing to add.
    def _extra_checkpoint_state(self) -> dict:
        return {}

    def _load_extra_checkpoint_state(self, record: dict) -> None:
        pass

    def _on_epoch_start(self, epoch: int) -> None:
        pass

    def _after_training(self) -> None:
        pass

    def _extra_stats(self) -> dict:
        return {}

    def _optimizer(self, module: torch.nn.Module) -> torch.optim.Optimizer:
        config = self.config
        fresh_keys = set(self.model.initialised_keys)
        fresh = {id(p) for name, p in self.model.named_parameters() if name in fresh_keys}
        groups = {}
        for name, parameter in module.named_parameters():
            if not parameter.requires_grad:  # frozen (the fast loop's encoder)
                continue
            decays = parameter.ndim > 1 and not any(key in name for key in NO_DECAY)
            groups.setdefault((decays, id(parameter) in fresh), []).append(parameter)
        return torch.optim.AdamW(
            [{"params": groups[decays, is_fresh], "weight_decay": config.weight_decay if decays else 0.0,
              "lr": config.lr * (config.fresh_lr_factor if is_fresh else 1.0)}
             for decays in (True, False) for is_fresh in (False, True) if (decays, is_fresh) in groups],
            lr=config.lr, betas=(0.9, 0.999),
        )

    def _scheduler(self, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        config = self.config
        warmup = min(config.warmup_iterations, config.total_iterations)

        def factor(step: int) -> float:
            return learning_rate_factor(step, warmup, config.total_iterations, config.min_lr_ratio)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def _rank_state(self, running: dict) -> dict:
        return {
            "numpy": self.sampler.rng.bit_generator.state,
            "torch": torch.get_rng_state(),
            "running": dict(running),
            "drawn": dict(self.sampler.drawn),
        }

    def _save_last(self, state: dict, rank_states: list[dict]) -> None:
        record = {
            "format": CHECKPOINT_FORMAT,
            "preset": self.model.preset.to_dict(),
            "model_state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            **self._extra_checkpoint_state(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.scheduler.state_dict(),
            "ranks": rank_states,
            "config": self.config.to_dict(),
            **state,
        }
        path = self.output_dir / CHECKPOINT_LAST
        partial = path.with_name(path.name + ".partial")
        torch.save(record, partial)
        os.replace(partial, path)

    def _load_last(self, path: Path) -> dict:
        record = torch.load(path, map_location="cpu", weights_only=True)
        if record.get("format") != CHECKPOINT_FORMAT:
            raise UserInputError(f"{path} is not a training checkpoint of this project; move it away to start anew")
        if Preset.from_dict(record["preset"]) != self.model.preset:
            raise UserInputError(
                f"{path} was written for preset {record['preset']['name']!r}, not {self.model.preset.name!r}: "
                "use another output_dir or resume=False"
            )
        if len(record["ranks"]) != self.context.world_size:
            raise UserInputError(
                f"{path} was written by {len(record['ranks'])} process(es); resume with the same number "
                f"(now {self.context.world_size}) so the sampling continues unchanged"
            )
        self.model.load_state_dict(record["model_state_dict"])
        self._load_extra_checkpoint_state(record)
        self.optimizer.load_state_dict(record["optimizer_state_dict"])
        self.scheduler.load_state_dict(record["scheduler_state_dict"])
        mine = record["ranks"][self.context.rank]
        self.sampler.rng.bit_generator.state = mine["numpy"]
        torch.set_rng_state(mine["torch"])
        self.sampler.drawn = Counter(mine["drawn"])
        return record

    # ------------------------------------------------------------------------------------------
    # Validation

    def validate(self, cases: list[TrainingCase]) -> dict:
        """Interactive metrics on held-out cases through a fresh Predictor (the real inference path, at the
        spacing the crops are trained at: a preset's scale ensemble is judged by `segany-pet evaluate`)."""
        config = self.config
        started = time.perf_counter()
        predictor = Predictor(self.model, device=self.context.device, cache_size=64,
                              max_windows=config.val_max_windows, scale_ensemble=False)
        rng = np.random.default_rng(config.seed)
        results = []
        try:
            for case in cases:
                truth = case.class_instances(config.val_class)
                ids = [int(v) for v in np.unique(truth) if v]
                if not ids:
                    continue
                if len(ids) > config.val_max_lesions:
                    ids = sorted(int(v) for v in rng.choice(ids, config.val_max_lesions, replace=False))
                results.append(evaluate_case(predictor, case.volume, truth, config.val_clicks,
                                             volume_id=f"val:{case.id}", lesion_ids=ids))
        finally:
            self.model.train()
        summary = summarise(results)
        curve = summary["model"]["all"]["dice_curve"]
        return {
            KEY_METRIC: curve[0] if curve else None,
            **{f"val_dice_{k}clicks": curve[k - 1] if len(curve) >= k else None
               for k in sorted({*REPORT_CLICKS, config.val_clicks}) if 1 < k <= config.val_clicks},
            "val_fpv_ml": summary["model_case"]["fpv_ml"],
            "val_fnv_ml": summary["model_case"]["fnv_ml"],
            "val_lesions": summary["lesions"],
            "val_seconds": round(time.perf_counter() - started, 2),
        }

    # ------------------------------------------------------------------------------------------
    # The loop

    def run(self) -> dict:
        """Train (or continue) to ``config.epochs``; returns the train stats (also in train_stats.json)."""
        if self.config.threads:
            torch.set_num_threads(int(self.config.threads))
        self.context = start_distributed(self.config.device)
        try:
            return self._run()
        finally:
            self.context.close()

    def _run(self) -> dict:
        config, context = self.config, self.context
        if self.val_records is not None:
            train_records, val_records = self.records, self.val_records
        else:
            train_records, val_records = split_records(self.records, config.val_cases, config.seed)
        # Tiers spread evenly over the ranks (CPCL's warm-up needs expert labels on every rank).
        ordered = sorted(train_records, key=lambda r: (r.get("tier", "high") != "high", str(r["id"])))
        shard = ordered[context.rank :: context.world_size]
        if not shard:
            raise TrainingDataError(
                f"{len(train_records)} training records cannot give each of {context.world_size} processes a case"
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model = self._build_model().to(context.device).train()
        cases = load_cases(shard, config.label_names, config.split_classes)
        val_cases = load_cases(val_records, config.label_names, config.split_classes) if (
            val_records and context.is_main) else []
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, context.rank]))
        self.sampler = CropSampler(
            cases, self.model.preset, rng, hot_spot_share=config.hot_spot_share,
            position_jitter=config.position_jitter, intensity_scale=config.intensity_scale,
            low_tier_weight=config.low_tier_weight, touching_weight=config.touching_weight,
            neighbours=config.neighbours_per_crop,
        )
        self.prompt_rng = rng
        step_module = self._step_module()
        self.optimizer = self._optimizer(step_module)
        self.scheduler = self._scheduler(self.optimizer)

        state = {"epoch": 0, "step": 0, "history": [], "best_metric": None, "best_metric_epoch": None,
                 "start_ts": int(time.time()), "trained_seconds": 0.0, "start_val": None}
        running = dict(RUNNING_START)  # this epoch's sums on this rank
        last = self.output_dir / CHECKPOINT_LAST
        if config.resume and last.exists():
            record = self._load_last(last)
            state = {key: record.get(key, default) for key, default in state.items()}
            mine = record["ranks"][context.rank]
            running = dict(mine["running"])
            if context.is_main:
                log.info("resuming from %s at epoch %d, step %d", last, state["epoch"], state["step"])

        if (context.is_main and val_cases and config.init_checkpoint and config.validate_start_model
                and state["step"] == 0 and state["start_val"] is None):
            state["start_val"] = self.validate(val_cases)
            if state["start_val"][KEY_METRIC] is not None:  # None: no validation lesion to score
                state["best_metric"], state["best_metric_epoch"] = state["start_val"][KEY_METRIC], 0
                log.info("start model %s: val Dice 1 click %.3f; an epoch must beat it to become %s",
                         config.init_checkpoint, state["best_metric"], MODEL_BEST)

        if context.active:
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            step_module = DistributedDataParallel(step_module, device_ids=device_ids, find_unused_parameters=True)
        total = config.total_iterations
        bar = tqdm(total=total, initial=state["step"], unit="step", desc="training", dynamic_ncols=True,
                   disable=not (config.progress_bar and context.is_main))
        session_started = time.perf_counter()
        step_seconds: list[float] = []
        val_seconds = next((h["val"].get("val_seconds", 0.0) for h in reversed(state["history"]) if h.get("val")), 0.0)
        last_val = next((h["val"].get(KEY_METRIC) for h in reversed(state["history"]) if h.get("val")),
                        (state["start_val"] or {}).get(KEY_METRIC))
        status = "finished"
        epoch_started = time.perf_counter()
        try:
            while state["epoch"] < config.epochs:
                self._on_epoch_start(state["epoch"])
                epoch_end = (state["epoch"] + 1) * config.iterations_per_epoch
                while state["step"] < epoch_end:
                    if context.any(self._stop_requested()):
                        status = "stopped"
                        break
                    started = time.perf_counter()
                    for key, value in self._train_step(step_module).items():
                        running[key] += value
                    running["steps"] += 1
                    state["step"] += 1
                    loss = running["loss"] / running["steps"]
                    step_seconds.append(time.perf_counter() - started)
                    if context.is_main:
                        remaining = total - state["step"]
                        per_step = float(np.median(step_seconds[-50:]))
                        eta = remaining * per_step + val_seconds * (config.epochs - state["epoch"]) * bool(val_cases)
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.3f}",
                                        val=f"{last_val:.3f}" if last_val is not None else "-")
                        self._report(state, loss, last_val, eta)
                if status == "stopped":
                    break
                means = {key: context.mean(running[key] / max(running["steps"], 1)) for key in RUNNING_MEANS}
                epoch_loss = means["loss"]
                running = dict(RUNNING_START)
                rank_states = context.gather(self._rank_state(running))
                state["epoch"] += 1
                if context.is_main:
                    entry = {"epoch": state["epoch"], "loss": round(epoch_loss, 5),
                             "train_dice_first": round(means["dice_first"], 4),
                             "train_dice_last": round(means["dice_last"], 4),
                             "lr": self.scheduler.get_last_lr()[0],
                             "seconds": round(time.perf_counter() - epoch_started, 2)}
                    if val_cases:
                        entry["val"] = self.validate(val_cases)
                        val_seconds, last_val = entry["val"]["val_seconds"], entry["val"][KEY_METRIC]
                    state["history"].append(entry)
                    self._keep_best(state, entry)
                    state["trained_seconds"] += time.perf_counter() - session_started
                    session_started = time.perf_counter()
                    self._save_last(state, rank_states)
                    self._write_stats(state, "running" if state["epoch"] < config.epochs else "finished",
                                      step_seconds)
                    log.info("epoch %d/%d: loss %.4f%s", state["epoch"], config.epochs, epoch_loss,
                             f", val Dice 1 click {last_val:.3f}" if last_val is not None else "")
                context.barrier()
                epoch_started = time.perf_counter()
            if status == "stopped":
                rank_states = context.gather(self._rank_state(running))
                if context.is_main:
                    state["trained_seconds"] += time.perf_counter() - session_started
                    self._save_last(state, rank_states)
                    self.stop_file.unlink(missing_ok=True)
                    log.info("stop requested: saved %s at epoch %d, step %d", self.output_dir / CHECKPOINT_LAST,
                             state["epoch"], state["step"])
                context.barrier()
        finally:
            bar.close()
        if context.is_main and status == "finished":
            if state["best_metric_epoch"] == 0:
                log.info("no epoch beat the start model's val Dice %.3f: %s not written", state["best_metric"],
                         MODEL_BEST)
            self._after_training()
        stats = self._write_stats(state, status, step_seconds) if context.is_main else {}
        return stats

    def _stop_requested(self) -> bool:
        return bool(self.should_stop and self.should_stop()) or self.stop_file.exists()

    def _train_step(self, step_module) -> dict[str, float]:
        config = self.config
        loss, info = step_module(*self._step_inputs())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": float(loss.detach()) / config.clicks_per_sample,
                "dice_first": info["iteration_dice"][0], "dice_last": info["iteration_dice"][-1]}

    def _step_inputs(self) -> tuple:
        """One batch as the step module takes it: (images, targets, opening prompts, crop of each target)."""
        config = self.config
        samples = self.sampler.batch(config.batch_size)
        device = self.context.device
        images = torch.stack([s.image for s in samples]).to(device)
        sets = [(b, s.target, s.click_hint) for b, s in enumerate(samples)]
        sets += [(b, target, None) for b, s in enumerate(samples) for _, target in s.neighbours]
        targets = torch.stack([target for _, target, _ in sets]).to(device)
        crop_of = torch.as_tensor([b for b, _, _ in sets], device=device)
        return images, targets, self._opening_prompts(sets), crop_of

    def _opening_prompts(self, sets) -> list:
        """A first prompt per (crop, target, click hint) set."""
        config = self.config
        return [first_prompt(target.numpy(), self.prompt_rng, config.box_share, config.box_and_click_share, hint)
                for _, target, hint in sets]

    def _keep_best(self, state: dict, entry: dict) -> None:
        metric = entry.get("val", {}).get(KEY_METRIC)
        improved = metric is not None and (state["best_metric"] is None or metric > state["best_metric"])
        if metric is not None and not improved:
            return
        if improved:
            state["best_metric"], state["best_metric_epoch"] = metric, entry["epoch"]
        training = {
            "epoch": entry["epoch"],
            "step": state["step"],
            KEY_METRIC: metric,
            "selected_by": KEY_METRIC if metric is not None else "last epoch (no validation cases)",
            "config": self.config.to_dict(),
        }
        save_checkpoint(self.model, self.output_dir / MODEL_BEST, training=training)

    def _report(self, state: dict, loss: float, val_dice, eta: float) -> None:
        if self.on_progress is None:
            return
        epoch = min(state["step"] // self.config.iterations_per_epoch + 1, self.config.epochs)
        self.on_progress({
            "epoch": epoch, "epochs": self.config.epochs, "iteration": state["step"],
            "iterations": self.config.total_iterations, "loss": loss, "val_dice": val_dice,
            "eta_seconds": eta,
        })

    def _write_stats(self, state: dict, status: str, step_seconds: list[float]) -> dict:
        history = state["history"]
        last_val = next((h["val"] for h in reversed(history) if h.get("val")), None)
        now = time.time()
        stats = {
            "status": status,
            "start_ts": state["start_ts"],
            "start_time": datetime.datetime.fromtimestamp(state["start_ts"]).isoformat(timespec="seconds"),
            "end_time": datetime.datetime.fromtimestamp(now).isoformat(timespec="seconds")
            if status != "running" else None,
            "epoch": state["epoch"],
            "epochs": self.config.epochs,
            "step": state["step"],
            "iterations": self.config.total_iterations,
            ("total_time" if status != "running" else "current_time"): _clock(state["trained_seconds"]),
            "trained_seconds": round(state["trained_seconds"], 1),
            "seconds_per_iteration": round(float(np.median(step_seconds)), 4) if step_seconds else None,
            "batch_size": self.config.batch_size,
            "world_size": self.context.world_size,
            "best_metric": state["best_metric"],
            "best_metric_epoch": state["best_metric_epoch"],  # 0: no epoch beat the start model
            "key_metric_name": KEY_METRIC,
            "start_model": {"file": self.config.init_checkpoint, "val": state["start_val"]},
            "train": {"loss": [h["loss"] for h in history]},
            "eval": {
                "metrics": last_val or {},
                "key_metric_name": KEY_METRIC,
                "best_metric": state["best_metric"],
                "best_metric_epoch": state["best_metric_epoch"],
            },
            "history": history,
            "crops_per_case": dict(self.sampler.drawn),
            "preset": self.model.preset.name,
            **self._extra_stats(),
            "config": self.config.to_dict(),
        }
        path = self.output_dir / TRAIN_STATS
        write_json(path, stats)  # whole or not at all: the server reads it while a job runs, and a job may be killed
        return stats
