"""Cross-Prompt Confidence Learning (CPCL): noise-robust training that finds and corrects bad labels.

After the SegAnyPET paper. Two replicas of the model train together, one prompted with points and one with
boxes: the same object seen through different prompts, so their mistakes differ and their agreement means
something. Labels come in two tiers (``high``: expert, ``low``: noisy).

- Stage 1 (``cpcl_warmup_epochs``): both replicas learn from high-tier labels only (Dice + BCE).
- Stage 2: low-tier labels join. For each low-tier crop the replicas' predictions of the opening prompt give
  a confidence map (`confidence_targets`): voxels where both replicas agree with each other but not with the
  label are label noise. Where their averaged prediction is certain (normalised entropy below
  ``cpcl_uncertainty_threshold``) the consensus replaces the label (self-correction); where it is uncertain
  the label is kept but its voxels weigh ``cpcl_uncertain_weight``. Each replica also learns from the other's
  confident voxels on low-tier crops (cross-supervision, weight ``cpcl_cross_weight``).
- After training, `noise_report` runs both replicas on every low-tier label, object by object, and gives each
  case a noise score (the share of its label-or-consensus voxels found noisy) and a corrected label.

The point replica is the model served to annotators (validation and ``model_best.pt``); the box replica is
saved beside it as ``model_box.pt``. Every threshold and weight is a ``cpcl_*`` field of TrainConfig.
`FastCPCLTrainer` runs the same in the fast loop (fast.py): both replicas on one frozen encoder.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segany_pet.agreement import confidence_targets, prompt_pair
from segany_pet.jsonfile import write_json
from segany_pet.model import Sam3D, build_model, load_checkpoint, save_checkpoint
from segany_pet.pet import save_nifti
from segany_pet.predictor import Predictor
from segany_pet.prompts import centre_click
from segany_pet.train.data import TrainingCase, TrainingDataError, load_cases
from segany_pet.train.fast import FROZEN, EncodedCrops, freeze_encoder
from segany_pet.train.simulate import InteractiveStep, Prompt, first_prompt, jittered_box
from segany_pet.train.trainer import Trainer

log = logging.getLogger(__name__)

MODEL_BOX = "model_box.pt"
NOISE_REPORT = "noise_report.json"
CORRECTED_DIR = "cpcl_corrected"


def cross_supervision_loss(logits: torch.Tensor, other_probability: torch.Tensor, confidence: float) -> torch.Tensor:
    """Class-balanced BCE of one replica's logits (N, ...) against the other's confident hard predictions (0
    where the other is nowhere confident). Object and background halves as in `segmentation_loss`."""
    confident = torch.maximum(other_probability, 1 - other_probability) > confidence
    pseudo = (other_probability > 0.5).float()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, pseudo, reduction="none") * confident
    dims = tuple(range(1, logits.dim()))
    on_object = (cross_entropy * pseudo).sum(dims) / (confident * pseudo).sum(dims).clamp_min(1)
    on_background = (cross_entropy * (1 - pseudo)).sum(dims) / (confident * (1 - pseudo)).sum(dims).clamp_min(1)
    return 0.5 * (on_object + on_background).mean()


class CPCLStep(nn.Module):
    """One CPCL training step on a batch: both replicas' sessions, confidence targets for low-tier crops in
    stage 2, cross-supervision. One module so DistributedDataParallel can wrap it."""

    def __init__(self, point_model: Sam3D, box_model: Sam3D, config):
        super().__init__()
        common = (config.loss_resolution, config.iou_loss_weight, config.bce_weight, config.first_click_weight)
        self.point = InteractiveStep(point_model, config.clicks_per_sample, *common)
        self.box = InteractiveStep(box_model, config.cpcl_box_clicks, *common)
        self.config = config

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.point.embed(images), self.box.embed(images)

    def forward(self, images, targets, point_prompts: list[Prompt], box_prompts: list[Prompt],
                low_tier: torch.Tensor, confident_learning: bool):
        config = self.config
        size = targets.shape[-1]
        point_embeddings, box_embeddings = self.embed(images)
        point_opening = self.point.decode(point_embeddings, point_prompts, None)
        box_opening = self.box.decode(box_embeddings, box_prompts, None)
        point_logits = F.interpolate(point_opening[0], size=(size,) * 3, mode="trilinear", align_corners=False)
        box_logits = F.interpolate(box_opening[0], size=(size,) * 3, mode="trilinear", align_corners=False)
        point_probability = torch.sigmoid(point_logits.detach())[:, 0]
        box_probability = torch.sigmoid(box_logits.detach())[:, 0]

        used_targets, weights = targets.float(), torch.ones_like(targets, dtype=torch.float32)
        cross = images.new_zeros(())
        noise = {}
        rows = torch.nonzero(low_tier).flatten()
        if confident_learning and len(rows):
            confidence = confidence_targets(
                point_probability[rows], box_probability[rows], targets[rows],
                agreement_threshold=config.cpcl_agreement_threshold,
                uncertainty_threshold=config.cpcl_uncertainty_threshold,
                uncertain_weight=config.cpcl_uncertain_weight, self_correction=config.cpcl_self_correction,
            )
            used_targets = used_targets.index_copy(0, rows, confidence.target)
            weights = weights.index_copy(0, rows, confidence.weight)
            cross = (cross_supervision_loss(point_logits[rows, 0], box_probability[rows], config.cpcl_cross_confidence)
                     + cross_supervision_loss(box_logits[rows, 0], point_probability[rows],
                                              config.cpcl_cross_confidence))
            noise = {"noisy_voxels": confidence.noisy.flatten(1).sum(1).tolist(),
                     "corrected_voxels": confidence.corrected.flatten(1).sum(1).tolist(),
                     "union_voxels": (confidence.label | confidence.consensus).flatten(1).sum(1).tolist(),
                     "rows": rows.tolist()}
        point_loss, point_info = self.point.session(point_embeddings, used_targets, point_prompts, weights,
                                                    point_opening)
        box_loss, box_info = self.box.session(box_embeddings, used_targets, box_prompts, weights, box_opening)
        total = point_loss + box_loss + config.cpcl_cross_weight * cross
        return total, {"iteration_dice": point_info["iteration_dice"], "box_dice": box_info["iteration_dice"],
                       "cross_loss": float(cross.detach()), "noise": noise}


class CPCLTrainer(Trainer):
    """The trainer with two replicas and CPCL's step; everything else (sampling, schedule, checkpoints and
    resume, validation of the point replica, torchrun) is the plain trainer's."""

    step_class: type[CPCLStep] = CPCLStep

    def _step_module(self) -> nn.Module:
        config = self.config
        if not any(case.tier == "high" for case in self.sampler.cases) and config.cpcl_warmup_epochs:
            raise TrainingDataError("CPCL warms up on high-tier labels and this shard has none: label some cases "
                                    "'high' or set cpcl_warmup_epochs to 0")
        # A different initialisation (or, fine-tuning, the same weights seen through boxes): the replicas differ.
        torch.manual_seed(config.seed + 1)
        box_start = config.cpcl_box_checkpoint or config.init_checkpoint
        box_model = load_checkpoint(box_start) if box_start else build_model(self.model.preset)
        self.box_model = box_model.to(self.context.device).train()
        self.noise_seen: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # noisy, corrected, union voxels
        self.noise_cases: list[dict] | None = None  # the noise report's cases, once this job has written it
        return self.step_class(self.model, self.box_model, config)

    def _cpcl_batch(self) -> tuple[torch.Tensor, list[tuple]]:
        """The step's model inputs (images) and its prompt sets: (case id, crop kind, target, click hint)."""
        samples = self.sampler.batch(self.config.batch_size)
        images = torch.stack([s.image for s in samples]).to(self.context.device)
        return images, [(s.case_id, s.kind, s.target, s.click_hint) for s in samples]

    def _extra_checkpoint_state(self) -> dict:
        return {"box_model_state_dict": {k: v.detach().cpu() for k, v in self.box_model.state_dict().items()}}

    def _load_extra_checkpoint_state(self, record: dict) -> None:
        if "box_model_state_dict" not in record:
            raise TrainingDataError("checkpoint_last.pt is a plain training checkpoint: CPCL cannot continue it; "
                                    "use another output_dir or resume=False")
        self.box_model.load_state_dict(record["box_model_state_dict"])

    def _on_epoch_start(self, epoch: int) -> None:
        self.confident_learning = epoch >= self.config.cpcl_warmup_epochs
        self.sampler.set_low_tier_weight(self.config.low_tier_weight if self.confident_learning else 0.0)

    def _train_step(self, step_module) -> dict[str, float]:
        config, device = self.config, self.context.device
        inputs, sets = self._cpcl_batch()
        targets = torch.stack([target for _, _, target, _ in sets]).to(device)
        tiers = {case.id: case.tier for case in self.sampler.cases}
        low_tier = torch.as_tensor([kind == "object" and tiers[case_id] == "low" for case_id, kind, _, _ in sets],
                                   device=device)
        point_prompts, box_prompts = [], []
        for _, _, target, click_hint in sets:
            target = target.numpy()
            point_prompts.append(first_prompt(target, self.prompt_rng, 0.0, 0.0, click_hint))
            if click_hint is None and target.any():
                box_prompts.append(Prompt(box=jittered_box(target, self.prompt_rng)))
            else:  # a hot spot: nothing to draw a box around, both replicas get the click
                box_prompts.append(Prompt(list(point_prompts[-1].points), list(point_prompts[-1].labels)))
        loss, info = step_module(inputs, targets, point_prompts, box_prompts, low_tier, self.confident_learning)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(
                [p for group in self.optimizer.param_groups for p in group["params"]], config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        noise = info["noise"]
        for position, row in enumerate(noise.get("rows", [])):
            seen = self.noise_seen[sets[row][0]]
            for index, key in enumerate(("noisy_voxels", "corrected_voxels", "union_voxels")):
                seen[index] += int(noise[key][position])
        return {"loss": float(loss.detach()) / (config.clicks_per_sample + config.cpcl_box_clicks),
                "dice_first": info["iteration_dice"][0], "dice_last": info["iteration_dice"][-1]}

    def _after_training(self) -> None:
        save_checkpoint(self.box_model, self.output_dir / MODEL_BOX, training={"role": "cpcl box replica"})
        # Every low-tier label: this rank's shard, the other ranks' and the validation cases alike.
        config = self.config
        low = [record for record in self.records if record.get("tier") == "low"]
        if low:
            cases = load_cases(low, config.label_names, config.split_classes)
            report = noise_report(self.model, self.box_model, cases, config, self.output_dir / CORRECTED_DIR)
            write_json(self.output_dir / NOISE_REPORT, report)  # whole or not at all, as the server reads it
            self.noise_cases = report["cases"]

    def _extra_stats(self) -> dict:
        seen = {case: {"noisy_voxels": n, "corrected_voxels": c, "union_voxels": u,
                       "training_noise_score": round(n / u, 4) if u else 0.0}
                for case, (n, c, u) in self.noise_seen.items()}
        record = {"method": "cpcl", "stage": 2 if getattr(self, "confident_learning", False) else 1,
                  "low_tier_crops_seen": seen}
        if getattr(self, "noise_cases", None) is not None:
            record["suspicious_labels"] = [{k: case[k] for k in ("id", "noise_score", "corrected_voxels")}
                                           for case in self.noise_cases]
        return {"cpcl": record}


class FastCPCLStep(CPCLStep):
    """`CPCLStep` on cached embeddings of the replicas' shared, frozen encoder."""

    def embed(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return embeddings, embeddings


class FastCPCLTrainer(CPCLTrainer):
    """CPCL in the fast loop (fast.py): both replicas keep the init checkpoint's encoder, frozen, so one store
    of encoded crops serves both and a step trains two prompt encoders and mask decoders. The box replica may
    start from its own decoder (``cpcl_box_checkpoint``), never from another encoder."""

    step_class = FastCPCLStep

    def __init__(self, *args, crop_store: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.crop_store = crop_store

    def _step_module(self) -> nn.Module:
        step = super()._step_module()
        config = self.config
        for name, tensor in self.box_model.state_dict().items():
            if name.split(".")[0] in FROZEN and not torch.equal(tensor.cpu(), self.model.state_dict()[name].cpu()):
                raise TrainingDataError(f"fast CPCL: {config.cpcl_box_checkpoint} has another encoder than "
                                        f"{config.init_checkpoint}; the replicas share one frozen encoder")
        freeze_encoder(self.model)
        freeze_encoder(self.box_model)
        self.encoded = EncodedCrops(self.sampler, self.model, config.fast_crops_per_object, self.context.device,
                                    config.seed, self.crop_store)
        return step

    def _cpcl_batch(self) -> tuple[torch.Tensor, list[tuple]]:
        crops = self.encoded.batch(self.config.batch_size)
        sets = [(c, crop.case_id, crop.kind, target, crop.click_hint if t == 0 else None)
                for c, crop in enumerate(crops) for t, target in enumerate(crop.targets)]
        embeddings = torch.stack([crops[c].embedding for c, *_ in sets]).to(self.context.device, torch.float32)
        return embeddings, [rest for _, *rest in sets]

    def _extra_stats(self) -> dict:
        return {**super()._extra_stats(), "fast": self.encoded.stats()}


def noise_report(point_model: Sam3D, box_model: Sam3D, cases: list[TrainingCase], config,
                 corrected_dir: Path | None = None) -> dict:
    """Both replicas on every object of each case's label: per-case noise scores (ranked, highest first), the
    worst objects' locations, and corrected labels (written to ``corrected_dir/<id>.nii.gz`` when given).

    Each object (a lesion component or a whole class) is prompted once per replica, with a click at its
    centre (point replica) and its bounding box (box replica), in one window each. Voxels of other objects of
    the label are left to those objects. Objects the label misses entirely are not looked for here (the
    active-learning scoring does that).
    """
    point, box = (Predictor(replica, max_windows=1, cache_size=2, scale_ensemble=False)
                  for replica in (point_model, box_model))
    thresholds = {"agreement_threshold": config.cpcl_agreement_threshold,
                  "uncertainty_threshold": config.cpcl_uncertainty_threshold,
                  "uncertain_weight": config.cpcl_uncertain_weight, "self_correction": config.cpcl_self_correction}
    results = []
    for case in cases:
        volume = case.volume
        values = {obj.instance: config.label_names[obj.class_name] for obj in case.objects}
        corrected = np.zeros(volume.shape, dtype=np.uint8)
        for instance, value in values.items():
            corrected[case.instances == instance] = value
        point_session = point.set_volume(volume, f"cpcl:{case.id}")
        box_session = box.set_volume(volume, f"cpcl:{case.id}")
        objects, noisy_total, union_total, corrected_total = [], 0, 0, 0
        for obj in case.objects:
            click = centre_click(case.instances[obj.box] == obj.instance, volume.spacing)
            click = [int(c + s.start) for c, s in zip(click, obj.box, strict=True)]
            corners = ([s.start for s in obj.box], [s.stop - 1 for s in obj.box])
            pair = prompt_pair(point_session, box_session, click, corners, around=[obj.box])
            region, maps = pair.region, (pair.point, pair.box)
            here = case.instances[region]
            label = here == obj.instance
            others = (here > 0) & ~label  # left to their own objects
            confidence = confidence_targets(maps[0], maps[1], label, **thresholds)
            noisy = confidence.noisy.numpy() & ~others
            fixed = confidence.corrected.numpy() & ~others
            union = (label | confidence.consensus.numpy()) & ~others
            corrected[region][fixed] = np.where(confidence.target.numpy()[fixed] > 0, values[obj.instance], 0)
            noisy_total += int(noisy.sum())
            union_total += int(union.sum())
            corrected_total += int(fixed.sum())
            objects.append({"instance": obj.instance, "class": obj.class_name, "voxel": click,
                            "voxels": int(label.sum()), "noisy_voxels": int(noisy.sum()),
                            "noise_score": round(int(noisy.sum()) / max(int(union.sum()), 1), 4),
                            "replica_dice": round(1.0 - pair.disagreement(), 4)})
        if corrected_dir is not None:
            corrected_dir.mkdir(parents=True, exist_ok=True)
            save_nifti(corrected, volume.affine, corrected_dir / f"{case.id}.nii.gz")
        objects.sort(key=lambda o: o["noise_score"], reverse=True)
        results.append({"id": case.id, "noise_score": round(noisy_total / union_total, 4) if union_total else 0.0,
                        "noisy_voxels": noisy_total, "corrected_voxels": corrected_total,
                        "corrected_label": str(corrected_dir / f"{case.id}.nii.gz") if corrected_dir else None,
                        "worst_objects": objects[:5]})
        point.clear_cache()
        box.clear_cache()
    results.sort(key=lambda r: r["noise_score"], reverse=True)
    return {"cases": results}
