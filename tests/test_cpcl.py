"""Cross-Prompt Confidence Learning: the confidence and self-correction logic on hand-made arrays, the
two-replica step, and a short CPCL run with checkpoints, resume and the noise report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segany_pet.model import build_model, load_checkpoint, save_checkpoint
from segany_pet.pet import save_nifti
from segany_pet.phantom import inject_label_noise
from segany_pet.train import (
    CHECKPOINT_LAST,
    MODEL_BEST,
    TRAIN_STATS,
    CropSampler,
    Prompt,
    TrainConfig,
    confidence_targets,
    load_cases,
    make_trainer,
    records_from_folder,
)
from segany_pet.train.cpcl import (
    CORRECTED_DIR,
    MODEL_BOX,
    NOISE_REPORT,
    CPCLStep,
    CPCLTrainer,
    FastCPCLTrainer,
    cross_supervision_loss,
)
from segany_pet.train.fast import FROZEN
from segany_pet.train.simulate import first_prompt, jittered_box
from support import TINY, train_under_torchrun

# Six voxels, one per situation: (point replica, box replica, label)
CASES = {
    "all agree, object": (0.95, 0.97, 1),
    "all agree, background": (0.03, 0.05, 0),
    "replicas sure it is object, label says background": (0.96, 0.98, 0),
    "replicas sure it is background, label says object": (0.02, 0.04, 1),
    "replicas lean to object, label says background": (0.60, 0.62, 0),
    "replicas disagree, label says object": (0.90, 0.10, 1),
}


def hand_made():
    point, box, label = (np.array(column, dtype=np.float32) for column in zip(*CASES.values(), strict=True))
    return point, box, label


def test_certain_noise_is_corrected_uncertain_noise_down_weighted_disagreement_left_alone():
    point, box, label = hand_made()
    confidence = confidence_targets(point, box, label, uncertainty_threshold=0.5, uncertain_weight=0.3)
    assert confidence.noisy.tolist() == [False, False, True, True, True, False]
    assert confidence.corrected.tolist() == [False, False, True, True, False, False]
    assert confidence.target.tolist() == [1, 0, 1, 0, 0, 1]  # the consensus replaced the label in two voxels
    assert confidence.weight.tolist() == pytest.approx([1, 1, 1, 1, 0.3, 1])
    # entropy in bits of the averaged prediction: near 0 where sure, near 1 at 0.61
    assert confidence.uncertainty[0] < 0.3 and confidence.uncertainty[4] > 0.9
    # noisy voxels over label-or-consensus voxels: 3 of {0, 2, 3, 4, 5}
    assert confidence.noise_score() == pytest.approx(3 / 5)


def test_without_self_correction_every_noisy_voxel_keeps_its_label_at_a_lower_weight():
    point, box, label = hand_made()
    confidence = confidence_targets(point, box, label, uncertain_weight=0.3, self_correction=False)
    assert not confidence.corrected.any()
    assert confidence.target.tolist() == label.tolist()
    assert confidence.weight.tolist() == pytest.approx([1, 1, 0.3, 0.3, 0.3, 1])


def test_thresholds_move_the_decisions():
    point, box, label = hand_made()
    # the two sure noisy voxels average 0.97 and 0.03: 0.19 bits, above a 0.15 bar
    strict = confidence_targets(point, box, label, uncertainty_threshold=0.15)
    assert not strict.corrected.any() and strict.noisy.sum() == 3
    high_bar = confidence_targets(point, box, label, agreement_threshold=0.7)
    assert not high_bar.noisy[4]  # 0.60 / 0.62 no longer say "object"


def test_a_label_both_replicas_reproduce_has_no_noise():
    label = np.zeros((8, 8, 8), dtype=np.float32)
    label[2:6, 2:6, 2:6] = 1
    sure = np.where(label > 0, 0.97, 0.02)
    confidence = confidence_targets(sure, sure, label)
    assert confidence.noise_score() == 0 and torch.equal(confidence.target, torch.as_tensor(label))


def test_cross_supervision_learns_only_from_the_other_replicas_confident_voxels():
    other = torch.tensor([[0.99, 0.01, 0.55, 0.45]])
    agreeing = torch.tensor([[8.0, -8.0, -8.0, 8.0]])  # matches the two confident voxels, not the others
    assert cross_supervision_loss(agreeing, other, 0.9) < 1e-3
    opposed = torch.tensor([[-8.0, 8.0, 8.0, -8.0]])
    assert cross_supervision_loss(opposed, other, 0.9) > 5
    nowhere_confident = torch.tensor([[0.6, 0.4, 0.55, 0.45]])
    assert cross_supervision_loss(opposed, nowhere_confident, 0.9) == 0


# ----------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def tiered(cohort, tmp_path_factory) -> list[dict]:
    """The cohort's three cases: one expert label ('high'), two noisy ones ('low'), one of them corrupted."""
    labels = tmp_path_factory.mktemp("cpcl_labels")
    cases = sorted(p.stem for p in (cohort / "truth").glob("*.json"))
    tiers = {}
    for index, case in enumerate(cases):
        image = nib.load(cohort / "truth" / f"{case}_lesions.nii.gz")
        lesions = np.asarray(image.dataobj)
        label = (lesions > 0).astype(np.uint8)
        tiers[case] = "high" if index == 0 else "low"
        if index == 1:
            label, _ = inject_label_noise(lesions, image.header.get_zooms(), seed=3, rate=1.0, kinds=("over", "shift"))
        save_nifti(label, image.affine, labels / f"{case}.nii.gz")
    return records_from_folder(cohort / "images", labels, tiers)


TINY_3MM = dataclasses.replace(TINY, name="tiny_3mm", spacing_mm=3.0)


def cpcl_config(output_dir: Path, **overrides) -> TrainConfig:
    options = dict(output_dir=str(output_dir), preset=TINY_3MM.to_dict(), method="cpcl", epochs=2,
                   iterations_per_epoch=3, batch_size=2, lr=1e-3, warmup_iterations=2, progress_bar=False,
                   val_cases=0, cpcl_warmup_epochs=1, clicks_per_sample=2, seed=0)
    return TrainConfig(**{**options, **overrides})


def test_two_replicas_reduce_the_loss_on_a_fixed_noisy_batch(tiered):
    config = cpcl_config("unused", clicks_per_sample=2)
    cases = load_cases(tiered)
    rng = np.random.default_rng(1)
    samples = CropSampler(cases, TINY_3MM, rng, hot_spot_share=0.0).batch(4)
    images = torch.stack([s.image for s in samples])
    targets = torch.stack([s.target for s in samples])
    tiers = {case.id: case.tier for case in cases}
    low_tier = torch.tensor([tiers[s.case_id] == "low" for s in samples])
    opening_points = [first_prompt(s.target.numpy(), rng, 0.0, 0.0) for s in samples]
    opening_boxes = [jittered_box(s.target.numpy(), rng) for s in samples]
    torch.manual_seed(0)
    step = CPCLStep(build_model(TINY_3MM).train(), build_model(TINY_3MM).train(), config)
    optimizer = torch.optim.AdamW(step.parameters(), lr=3e-3)
    losses = []
    for iteration in range(40):
        point_prompts = [Prompt(list(p.points), list(p.labels)) for p in opening_points]
        box_prompts = [Prompt(box=b) for b in opening_boxes]
        loss, info = step(images, targets, point_prompts, box_prompts, low_tier, confident_learning=iteration >= 10)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert info["iteration_dice"][0] > 0.3 and info["box_dice"][0] > 0.3, info
    assert info["noise"]["rows"] == torch.nonzero(low_tier).flatten().tolist()


def test_cpcl_run_writes_both_replicas_a_ranked_noise_report_and_corrected_labels(tiered, tmp_path):
    trainer = make_trainer(cpcl_config(tmp_path), tiered)
    assert isinstance(trainer, CPCLTrainer)
    stats = trainer.run()
    assert stats["status"] == "finished" and stats["cpcl"]["stage"] == 2
    assert load_checkpoint(tmp_path / MODEL_BEST).preset == TINY_3MM
    assert load_checkpoint(tmp_path / MODEL_BOX).preset == TINY_3MM
    report = json.loads((tmp_path / NOISE_REPORT).read_text())["cases"]
    low = sorted(r["id"] for r in tiered if r["tier"] == "low")
    assert sorted(case["id"] for case in report) == low  # every low-tier label, no expert one
    scores = [case["noise_score"] for case in report]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    for case in report:
        corrected = nib.load(tmp_path / CORRECTED_DIR / f"{case['id']}.nii.gz")
        original = nib.load(next(r["label"] for r in tiered if r["id"] == case["id"]))
        assert corrected.shape == original.shape and np.allclose(corrected.affine, original.affine)
        changed = int((np.asarray(corrected.dataobj) != np.asarray(original.dataobj)).sum())
        assert changed == case["corrected_voxels"]
        assert case["worst_objects"] and {"voxel", "noise_score"} <= set(case["worst_objects"][0])
    assert [entry["id"] for entry in stats["cpcl"]["suspicious_labels"]] == [case["id"] for case in report]
    assert json.loads((tmp_path / TRAIN_STATS).read_text())["cpcl"]["method"] == "cpcl"


def test_a_stopped_cpcl_run_resumes_both_replicas(tiered, tmp_path):
    steps = []
    stopped = make_trainer(cpcl_config(tmp_path / "run"), tiered, on_progress=lambda p: steps.append(p),
                           should_stop=lambda: len(steps) >= 4)
    assert stopped.run()["status"] == "stopped"
    saved = torch.load(tmp_path / "run" / CHECKPOINT_LAST, weights_only=True)
    for key, value in stopped.box_model.state_dict().items():
        assert torch.equal(saved["box_model_state_dict"][key], value), key
    resumed = make_trainer(cpcl_config(tmp_path / "run"), tiered)
    assert resumed.run()["status"] == "finished"

    uninterrupted = make_trainer(cpcl_config(tmp_path / "straight"), tiered)
    uninterrupted.run()
    for key, value in uninterrupted.box_model.state_dict().items():
        assert torch.equal(resumed.box_model.state_dict()[key], value), key


def test_cpcl_needs_expert_labels_to_warm_up(tiered, tmp_path):
    all_low = [{**record, "tier": "low"} for record in tiered]
    with pytest.raises(Exception, match="high-tier"):
        make_trainer(cpcl_config(tmp_path), all_low).run()
    # without warm-up it runs on low-tier labels alone
    assert make_trainer(cpcl_config(tmp_path / "no_warmup", cpcl_warmup_epochs=0, epochs=1), all_low).run()[
        "status"] == "finished"


def test_cpcl_under_torchrun_keeps_both_replicas_identical_across_ranks(tiered, tmp_path):
    config = cpcl_config(tmp_path / "run", epochs=1, iterations_per_epoch=2, threads=1, cpcl_warmup_epochs=0)
    ranks = train_under_torchrun(tmp_path, config, tiered)
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["box_weights"] == ranks[1]["box_weights"]
    assert ranks[0]["weights"] != ranks[0]["box_weights"]
    assert set(ranks[0]["drawn"]).isdisjoint(ranks[1]["drawn"])


def test_fast_cpcl_trains_both_decoders_on_one_store_of_the_shared_frozen_encoder(tiered, tmp_path):
    torch.manual_seed(5)
    point_start = build_model(TINY_3MM)
    save_checkpoint(point_start, tmp_path / "point.pt")
    torch.manual_seed(6)
    box_start = build_model(TINY_3MM)
    for name in FROZEN:  # the box replica's own decoder on the same encoder
        if hasattr(point_start, name):
            getattr(box_start, name).load_state_dict(getattr(point_start, name).state_dict())
    save_checkpoint(box_start, tmp_path / "box.pt")
    store: dict = {}
    trainer = make_trainer(cpcl_config(tmp_path / "run", fast=True, fast_crops_per_object=1,
                                       init_checkpoint=str(tmp_path / "point.pt"),
                                       cpcl_box_checkpoint=str(tmp_path / "box.pt")), tiered, crop_store=store)
    assert isinstance(trainer, FastCPCLTrainer)
    stats = trainer.run()
    assert stats["status"] == "finished" and stats["cpcl"]["stage"] == 2 and stats["fast"]["encoded_crops"] > 0
    assert stats["cpcl"]["low_tier_crops_seen"]  # stage 2 drew low-tier crops from the store
    point, box = (load_checkpoint(tmp_path / "run" / name).state_dict() for name in (MODEL_BEST, MODEL_BOX))
    for name, start in ((point, point_start.state_dict()), (box, box_start.state_dict())):
        frozen = [k for k in start if k.split(".")[0] in FROZEN]
        trained = [k for k in start if k.split(".")[0] in ("prompt_encoder", "mask_decoder")]
        assert frozen and all(torch.equal(name[k], start[k]) for k in frozen)
        assert any(not torch.equal(name[k], start[k]) for k in trained)
    assert any(not torch.equal(point[k], box[k]) for k in point if k.startswith("mask_decoder"))
    assert json.loads((tmp_path / "run" / NOISE_REPORT).read_text())["cases"]

    other = build_model(TINY_3MM)  # another encoder: the replicas could not share one store
    save_checkpoint(other, tmp_path / "other.pt")
    with pytest.raises(Exception, match="another encoder"):
        make_trainer(cpcl_config(tmp_path / "mismatch", fast=True, init_checkpoint=str(tmp_path / "point.pt"),
                                 cpcl_box_checkpoint=str(tmp_path / "other.pt")), tiered).run()
