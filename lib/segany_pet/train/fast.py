"""The fast annotation loop: the image encoder frozen, every training crop encoded once, and only the prompt
encoder and mask decoder trained, on the cached embeddings.

After an annotator saves a batch of labels, a full fine-tuning step encodes every crop again, and the
encoder's forward and backward pass is most of a step's time on a CPU (scripts/benchmark_fast_training.py).
With the encoder frozen the crops' embeddings do not change, so
`EncodedCrops` draws ``fast_crops_per_object`` jittered, intensity-scaled crops of every labeled object (and
hot-spot crops in the configured share) once, encodes them in batches without gradients, and keeps them
(bfloat16: half the memory; rounding moves each value by at most 0.4%). `FastTrainer` then draws
its batches from that store by the sampler's weights, with fresh opening and corrective clicks every time.
Everything else (checkpoints, resume, validation, stop, progress, publishing only a better model) is the
plain trainer's. ``TrainConfig(fast=True)``; over REST ``POST /train/segany_pet {"fast": true}`` (CPCL:
`FastCPCLTrainer` in cpcl.py, both replicas on one frozen encoder).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from segany_pet.model import build_model
from segany_pet.train.data import CropSample, CropSampler
from segany_pet.train.simulate import InteractiveStep
from segany_pet.train.trainer import Trainer

log = logging.getLogger(__name__)

ENCODE_BATCH = 8
CACHE_DTYPE = torch.bfloat16
FROZEN = ("image_encoder", "detail_encoder")  # what `Sam3D.embed` runs


class EncodedCrop:
    """One crop's embedding and the targets prompted on it (its object first, then its neighbours)."""

    __slots__ = ("embedding", "targets", "click_hint", "case_id", "kind")

    def __init__(self, embedding: torch.Tensor, sample: CropSample):
        self.embedding = embedding.to(CACHE_DTYPE)
        self.targets = [sample.target, *(target for _, target in sample.neighbours)]
        self.click_hint = sample.click_hint
        self.case_id, self.kind = sample.case_id, sample.kind


class EncodedCrops:
    """A fixed store of encoded training crops, drawn from as `CropSampler` draws objects.

    Each case's crops are drawn with a generator seeded by ``seed`` and the case id, so a case gives the same
    crops whatever else is trained with it, and ``store`` (a dict kept by the caller: case key -> its crops)
    lets trainers in one process share them: an annotation loop's next round encodes only the new labels.
    """

    def __init__(self, sampler: CropSampler, model, crops_per_object: int, device, seed: int = 0,
                 store: dict | None = None):
        self.sampler = sampler
        self.rng = sampler.rng  # batches: the sampler's generator, which checkpoints save and resume restores
        started = time.perf_counter()
        store = {} if store is None else store
        hot_share = sampler.hot_spot_share if sampler.hot_spots else 0.0
        self.by_object: list[list[EncodedCrop]] = [[] for _ in sampler.objects]
        self.hot: list[EncodedCrop] = []
        encoded = 0
        for case_index, case in enumerate(sampler.cases):
            objects = [i for i, (c, _) in enumerate(sampler.objects) if c == case_index]
            spots = [i for i, (c, _) in enumerate(sampler.hot_spots) if c == case_index]
            key = (case.id, case.record.get("label"), crops_per_object, hot_share, seed, model.preset.name)
            if key not in store:
                case_rng = np.random.default_rng(np.random.SeedSequence([seed, *case.id.encode()]))
                samples = [(n, sampler.sample_object(i, case_rng)) for n, i in enumerate(objects)
                           for _ in range(crops_per_object)]
                hot_count = round(len(samples) * hot_share / (1 - hot_share)) if spots and hot_share < 1 else 0
                samples += [(None, sampler.sample_hot_spot(int(spots[j]), case_rng))
                            for j in case_rng.integers(len(spots), size=hot_count)] if hot_count else []
                embeddings = encode(model, [sample for _, sample in samples], device)
                store[key] = [(n, EncodedCrop(e, sample)) for (n, sample), e in zip(samples, embeddings, strict=True)]
                encoded += len(samples)
            for n, crop in store[key]:
                (self.hot if n is None else self.by_object[objects[n]]).append(crop)
        self.seconds = time.perf_counter() - started
        log.info("fast loop: %d crops (%d encoded now) of %d objects and %d hot spots, %.0f s", len(self), encoded,
                 len(sampler.objects), len(self.hot), self.seconds)

    def __len__(self) -> int:
        return sum(len(crops) for crops in self.by_object) + len(self.hot)

    def stats(self) -> dict:
        return {"encoded_crops": len(self), "encode_seconds": round(self.seconds, 1)}

    def batch(self, size: int) -> list[EncodedCrop]:
        chosen = []
        for _ in range(size):
            if self.hot and self.rng.random() < self.sampler.hot_spot_share:
                chosen.append(self.hot[int(self.rng.integers(len(self.hot)))])
            else:
                crops = self.by_object[int(self.rng.choice(len(self.by_object), p=self.sampler.weights))]
                chosen.append(crops[int(self.rng.integers(len(crops)))])
        return chosen


def encode(model, samples: list[CropSample], device) -> list[torch.Tensor]:
    """Each sample's image embedding (C, g, g, g), ENCODE_BATCH crops per encoder call, without gradients."""
    out = []
    with torch.no_grad():
        for start in range(0, len(samples), ENCODE_BATCH):
            images = torch.stack([s.image for s in samples[start : start + ENCODE_BATCH]]).to(device)
            out.extend(model.embed(images).float().cpu())
    return out


class DecoderStep(InteractiveStep):
    """`InteractiveStep` from cached embeddings: ``forward(embeddings, targets, prompts)``."""

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, prompts):
        return self.session(embeddings, targets, prompts)


def fresh_decoder(model, seed: int):
    """``model``'s encoders with a freshly initialised prompt encoder and mask decoder (seeded): the fast loop's
    start when labels are to teach the decoder from nothing (the benchmarks of active learning and CPCL)."""
    torch.manual_seed(seed)
    fresh = build_model(model.preset)
    for name in FROZEN:
        if hasattr(model, name):
            getattr(fresh, name).load_state_dict(getattr(model, name).state_dict())
    return fresh


def freeze_encoder(model) -> None:
    for name in FROZEN:
        part = getattr(model, name, None)
        if part is not None:
            part.requires_grad_(False)


class FastTrainer(Trainer):
    """The plain trainer with the encoder frozen and each training crop encoded once (`EncodedCrops`).

    ``crop_store``: a dict shared by the trainers of one process (see `EncodedCrops`); they must share the
    frozen encoder too (the same init checkpoint), which is the caller's promise.
    """

    def __init__(self, *args, crop_store: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.crop_store = crop_store

    def _step_module(self) -> torch.nn.Module:
        config = self.config
        freeze_encoder(self.model)
        self.encoded = EncodedCrops(self.sampler, self.model, config.fast_crops_per_object, self.context.device,
                                    config.seed, self.crop_store)
        return DecoderStep(self.model, config.clicks_per_sample, config.loss_resolution, config.iou_loss_weight,
                           config.bce_weight, config.first_click_weight)

    def _step_inputs(self) -> tuple:
        device = self.context.device
        crops = self.encoded.batch(self.config.batch_size)
        sets = [(c, target, crop.click_hint if t == 0 else None)
                for c, crop in enumerate(crops) for t, target in enumerate(crop.targets)]
        embeddings = torch.stack([crops[c].embedding for c, _, _ in sets]).to(device, torch.float32)
        targets = torch.stack([target for _, target, _ in sets]).to(device)
        return embeddings, targets, self._opening_prompts(sets)

    def _extra_stats(self) -> dict:
        return {"fast": self.encoded.stats()}
