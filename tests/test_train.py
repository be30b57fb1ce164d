"""Training: records and their checks, crops, click simulation, the trainer (overfit, checkpoints, resume, stop,
fine-tuning from published-style weights) and distributed training with torchrun."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segany_pet.model import BOX_CORNER_KEYS, PRESETS, Preset, build_model, load_checkpoint, save_checkpoint
from segany_pet.pet import save_nifti
from segany_pet.phantom import write_cohort
from segany_pet.phantom.cohort import case_seed, cohort_tracer, draws_negative
from segany_pet.train import (
    CHECKPOINT_LAST,
    KEY_METRIC,
    MODEL_BEST,
    TRAIN_STATS,
    CropSampler,
    InteractiveStep,
    Prompt,
    TrainConfig,
    Trainer,
    TrainingDataError,
    first_prompt,
    learning_rate_factor,
    load_cases,
    make_trainer,
    records_from_datastore,
    records_from_folder,
    split_records,
)
from segany_pet.train.simulate import add_corrective_click, interior_click, jittered_box
from support import TINY, train_under_torchrun

REPO = Path(__file__).resolve().parents[1]


def _positive_seed(cases: int) -> int:
    """A cohort seed whose first ``cases`` mixed cases all have lesions, FDG and PSMA both present."""
    for seed in range(1000):
        tracers = [cohort_tracer("mixed", seed, i) for i in range(cases)]
        if len(set(tracers)) == 2 and not any(draws_negative(case_seed(seed, i), t) for i, t in enumerate(tracers)):
            return seed
    raise AssertionError("no positive cohort seed")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Two positive 4 mm phantoms (FDG and PSMA) with binary lesion labels in labels/."""
    root = tmp_path_factory.mktemp("train_cohort")
    cases = write_cohort(root, 2, tracer="mixed", grid="4mm", seed=_positive_seed(2), progress=False)
    (root / "labels").mkdir()
    for case in cases:
        image = nib.load(root / "truth" / f"{case}_lesions.nii.gz")
        save_nifti((np.asarray(image.dataobj) > 0).astype(np.uint8), image.affine, root / "labels" / f"{case}.nii.gz")
    return root


@pytest.fixture(scope="module")
def records(cohort) -> list[dict]:
    return records_from_folder(cohort / "images", cohort / "labels")


@pytest.fixture(scope="module")
def cases(records):
    return load_cases(records)


def config(tmp_path, **overrides) -> TrainConfig:
    options = dict(output_dir=str(tmp_path), preset=TINY.to_dict(), epochs=2, iterations_per_epoch=3, batch_size=2,
                   lr=1e-3, warmup_iterations=2, progress_bar=False, val_cases=0)
    return TrainConfig(**{**options, **overrides})


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------------
# Records


FOUR_MM = np.diag([4.0, 4.0, 4.0, 1.0])


def _write(path: Path, array, affine=FOUR_MM) -> str:
    save_nifti(np.asarray(array), affine, path)
    return str(path)


def test_records_from_folder_pairs_images_with_labels(cohort, records):
    assert [r["id"] for r in records] == sorted(p.name[:-7] for p in (cohort / "images").glob("*.nii.gz"))
    assert all(r["tier"] == "high" and Path(r["label"]).parent.name == "labels" for r in records)
    low = records_from_folder(cohort / "images", cohort / "labels", tiers={records[0]["id"]: "low"})
    assert [r["tier"] for r in low] == ["low", "high"]


def test_record_errors(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    suv = np.ones((8, 8, 8), np.float32)
    _write(images / "a.nii.gz", suv)
    with pytest.raises(TrainingDataError, match="no labeled images"):
        records_from_folder(images, labels)
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:4, 2:4, 2:4] = 1
    _write(labels / "a.nii.gz", label)
    with pytest.raises(TrainingDataError, match="tier 'medium'"):
        records_from_folder(images, labels, tiers="medium")
    good = records_from_folder(images, labels)[0]
    with pytest.raises(TrainingDataError, match="unique"):
        load_cases([good, good])
    with pytest.raises(TrainingDataError, match="does not exist"):
        load_cases([{**good, "image": str(tmp_path / "missing.nii.gz")}])

    def fails(array, match, affine=FOUR_MM):
        path = _write(tmp_path / "bad.nii.gz", array, affine)
        with pytest.raises(TrainingDataError, match=match):
            load_cases([{**good, "label": path}])

    fails(np.zeros((8, 8, 9), np.uint8), r"shape \(8, 8, 9\) differs")
    fails(label, "affine differs", np.diag([4.0, 4.0, 5.0, 1.0]))
    fails(label * 3, r"values \[3\] are not classes")
    fails(label * 0.5, "non-integer")
    fails(np.zeros((8, 8, 8), np.uint8), "every label is empty")


def test_empty_labels_are_skipped_with_a_warning(tmp_path, records, caplog):
    label = nib.load(records[0]["label"])
    empty = _write(tmp_path / "empty.nii.gz", np.zeros(label.shape, np.uint8), label.affine)
    with caplog.at_level(logging.WARNING, logger="segany_pet.train.data"):
        cases = load_cases([{**records[0], "label": empty}, records[1]])
    assert [c.id for c in cases] == [records[1]["id"]]
    assert "label is empty" in caplog.text


def test_records_from_datastore_reads_tiers(tmp_path, cohort):
    from monailabel.datastore.local import LocalDatastore

    studies = tmp_path / "studies"
    studies.mkdir()
    ids = sorted(p.name[:-7] for p in (cohort / "images").glob("*.nii.gz"))
    for case in ids:
        (studies / f"{case}.nii.gz").write_bytes((cohort / "images" / f"{case}.nii.gz").read_bytes())
    store = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    with pytest.raises(TrainingDataError, match="no labeled images"):
        records_from_datastore(store)
    store.save_label(ids[0], str(cohort / "labels" / f"{ids[0]}.nii.gz"), "final", {"quality": "low"})
    store.save_label(ids[1], str(cohort / "labels" / f"{ids[1]}.nii.gz"), "final", {})
    records = records_from_datastore(store)
    assert [(r["id"], r["tier"]) for r in records] == [(ids[0], "low"), (ids[1], "high")]
    assert all(Path(r["label"]).is_file() and Path(r["image"]).is_file() for r in records)


def test_validation_split_is_seeded(records):
    train, val = split_records(records, 1, seed=0)
    assert len(train) == len(val) == 1 and split_records(records, 1, seed=0) == (train, val)
    assert split_records(records, [records[0]["id"]], 0)[1] == [records[0]]
    with pytest.raises(TrainingDataError, match="none of the 2"):
        split_records(records, 2, 0)


# ----------------------------------------------------------------------------------------------
# Cases, crops and prompts


def test_cases_hold_lesion_components_and_hot_spots(cases, cohort):
    for case in cases:
        info = json.loads((cohort / "truth" / f"{case.id}.json").read_text())
        assert {o.class_name for o in case.objects} == {"lesion"}
        assert sum(o.voxels for o in case.objects) == sum(
            round(lesion["volume_ml"] / case.volume.voxel_volume_ml) for lesion in info["lesions"])
        assert case.hot_spots and all(case.instances[spot] == 0 for spot in case.hot_spots)


def test_organ_classes_are_whole_objects(tmp_path, records):
    image = nib.load(records[0]["label"])
    label = np.asarray(image.dataobj).astype(np.uint8)
    label[:4, :4, :4] = 2
    label[-4:, -4:, -4:] = 2  # two pieces, one object
    path = _write(tmp_path / "organs.nii.gz", label, image.affine)
    (case,) = load_cases([{**records[0], "label": path}], {"lesion": 1, "organ": 2}, ["lesion"])
    organs = [o for o in case.objects if o.class_name == "organ"]
    assert len(organs) == 1 and organs[0].voxels == 128


def test_lesions_beside_uptake_are_flagged_and_drawn_as_often_as_asked(tmp_path):
    suv = np.full((40, 40, 40), 1.0, dtype=np.float32)
    label = np.zeros(suv.shape, dtype=np.uint8)
    suv[5:11, 5:11, 5:11] = label[5:11, 5:11, 5:11] = 8  # isolated lesion, SUV 8
    suv[25:31, 25:31, 25:31] = label[25:31, 25:31, 25:31] = 8  # lesion against an organ of SUV 12
    label[label > 0] = 1
    suv[31:38, 22:34, 22:34] = 12.0
    record = {"id": "two", "image": _write(tmp_path / "suv.nii.gz", suv), "label": _write(tmp_path / "l.nii.gz", label)}
    (case,) = load_cases([record])
    flags = {tuple(int(s.start) for s in o.box): o.in_uptake for o in case.objects}
    assert flags == {(5, 5, 5): False, (25, 25, 25): True}
    for weight, expected in ((1.0, 0.5), (3.0, 0.75)):
        sampler = CropSampler([case], TINY, np.random.default_rng(0), hot_spot_share=0.0, touching_weight=weight)
        touching = np.mean([case.objects[s.instance - 1].in_uptake for s in sampler.batch(200)])
        assert abs(touching - expected) < 0.1


def test_crops_follow_the_preset_and_jitter_the_object(cases):
    sampler = CropSampler(cases, TINY, np.random.default_rng(0), hot_spot_share=0.3)
    samples = sampler.batch(40)
    size = TINY.crop_size
    assert all(s.image.shape == (1, size, size, size) and s.target.shape == (size,) * 3 for s in samples)
    objects = [s for s in samples if s.kind == "object"]
    spots = [s for s in samples if s.kind == "hot_spot"]
    assert objects and spots and sum(sampler.drawn.values()) == 40
    assert all(s.target.any() for s in objects) and not any(s.target.any() for s in spots)
    assert all(np.all((s.click_hint >= 0) & (s.click_hint <= size - 1)) for s in spots)
    centres = np.array([np.argwhere(s.target.numpy()).mean(axis=0) for s in objects])
    assert centres.std(axis=0).min() > 2  # not always in the middle
    # log(1 + SUV): the input is the predictor's normalisation of the SUV crop
    assert all(float(s.image.min()) >= 0 for s in samples)
    assert not any(s.neighbours for s in samples)


def test_crops_bring_their_neighbours(cases):
    sampler = CropSampler(cases, TINY, np.random.default_rng(0), neighbours=2)
    samples = sampler.batch(20)
    assert any(s.neighbours for s in samples) and all(len(s.neighbours) <= 2 for s in samples)
    for sample in samples:
        assert all(instance != sample.instance and target.any() for instance, target in sample.neighbours)


def test_prompt_simulation():
    rng = np.random.default_rng(0)
    target = np.zeros((32, 32, 32), bool)
    target[10:20, 12:18, 8:24] = True
    clicks = np.array([interior_click(target, rng) for _ in range(200)])
    voxels = np.rint(clicks).astype(int)
    assert target[tuple(voxels.T)].all()
    depth_of_clicks = np.abs(voxels - [14.5, 14.5, 15.5]).max(axis=1).mean()
    assert depth_of_clicks < 4  # biased towards the interior
    box = jittered_box(target, rng)
    assert np.all(box[:3] <= [11, 13, 9]) or np.all(np.abs(box[:3] - [10, 12, 8]) <= 2)
    kinds = [first_prompt(target, rng, 0.3, 0.2) for _ in range(400)]
    box_only = np.mean([p.box is not None and not p.points for p in kinds])
    both = np.mean([p.box is not None and bool(p.points) for p in kinds])
    assert abs(box_only - 0.3) < 0.07 and abs(both - 0.2) < 0.07
    hinted = first_prompt(np.zeros_like(target), rng, 1.0, 0.0, click_hint=np.array([3.0, 4.0, 5.0]))
    assert hinted.box is None and hinted.labels == [1] and list(hinted.points[0]) == [3, 4, 5]

    prompt = Prompt([np.array([15.0, 15.0, 15.0])], [1])
    leaky = target.copy()
    leaky[20:30, 12:18, 8:24] = True  # a leak larger than anything missed
    leaky[10:12] = False
    assert add_corrective_click(prompt, leaky, target) and prompt.labels[-1] == 0
    assert leaky[tuple(prompt.points[-1].astype(int))] and not target[tuple(prompt.points[-1].astype(int))]
    assert not add_corrective_click(prompt, target, target)


def test_learning_rate_warms_up_then_decays():
    factors = [learning_rate_factor(step, 10, 100, 0.02) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False)) and factors[-1] < 0.03


# ----------------------------------------------------------------------------------------------
# Learning


def fixed_batch(cases, preset, seed: int, size: int, box_share: float):
    """Crops, their targets and opening prompts (a box alone or with a click, each at ``box_share``)."""
    rng = np.random.default_rng(seed)
    samples = CropSampler(cases, preset, rng, hot_spot_share=0.0).batch(size)
    images = torch.stack([s.image for s in samples])
    targets = torch.stack([s.target for s in samples])
    return images, targets, [first_prompt(s.target.numpy(), rng, box_share, box_share) for s in samples]


def test_a_few_steps_overfit_a_fixed_batch(cases):
    # At 3 mm (TINY's 6 mm leaves small lesions a voxel or two of logits): finer crops learn much faster.
    preset = dataclasses.replace(TINY, name="tiny_3mm", spacing_mm=3.0)
    torch.manual_seed(0)
    images, targets, opening = fixed_batch(cases, preset, seed=1, size=4, box_share=0.25)
    step = InteractiveStep(build_model(preset).train(), iterations=2)
    optimizer = torch.optim.AdamW(step.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):  # measured: the loss halves, Dice 0.01 -> ~0.8 in 60 steps (3 s)
        prompts = [Prompt(list(p.points), list(p.labels), p.box) for p in opening]
        loss, info = step(images, targets, prompts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses
    assert info["iteration_dice"][0] > 0.4, info  # from ~0.01: it finds the clicked lesions


def test_the_first_click_weight_scales_the_opening_loss_alone(cases):
    torch.manual_seed(0)
    images, targets, opening = fixed_batch(cases, TINY, seed=2, size=2, box_share=0.0)
    model = build_model(TINY).eval()
    totals, per_iteration = [], []
    for weight in (1.0, 3.0):
        prompts = [Prompt(list(p.points), list(p.labels), p.box) for p in opening]
        with torch.no_grad():
            total, info = InteractiveStep(model, iterations=2, first_weight=weight)(images, targets, prompts)
        totals.append(float(total))
        per_iteration.append(info["iteration_loss"])
    assert per_iteration[0] == pytest.approx(per_iteration[1])  # same clicks, same losses: only the sum changes
    first, second = per_iteration[0]
    assert totals[0] == pytest.approx(first + second, rel=1e-5)
    assert totals[1] == pytest.approx(3 * first + second, rel=1e-5)


def test_training_writes_stats_best_model_and_reports_progress(tmp_path, records):
    reports = []
    cfg = config(tmp_path, epochs=1, iterations_per_epoch=2, val_cases=1, val_clicks=5, val_max_lesions=2,
                 val_max_windows=1, neighbours_per_crop=2)
    stats = Trainer(cfg, records, on_progress=reports.append).run()
    assert [r["iteration"] for r in reports] == [1, 2]
    assert set(reports[0]) == {"epoch", "epochs", "iteration", "iterations", "loss", "val_dice", "eta_seconds"}
    written = json.loads((tmp_path / TRAIN_STATS).read_text())
    assert written["status"] == stats["status"] == "finished"
    assert written["epoch"] == 1 and len(written["train"]["loss"]) == 1 and "total_time" in written
    assert 0 <= written["history"][0]["train_dice_first"] <= 1
    assert written["best_metric"] == written["history"][0]["val"]["val_dice_1click"] is not None
    assert written["eval"]["metrics"]["val_lesions"] == 2
    assert {"val_dice_3clicks", "val_dice_5clicks", "val_fpv_ml", "val_fnv_ml"} <= set(written["eval"]["metrics"])
    best = load_checkpoint(tmp_path / MODEL_BEST)
    assert best.preset == TINY
    assert best.checkpoint_metadata["training"]["selected_by"] == "val_dice_1click"


def test_stop_saves_and_resume_continues_identically(tmp_path, records):
    straight = Trainer(config(tmp_path / "straight"), records)
    straight.run()

    steps_done = []
    stopped = Trainer(config(tmp_path / "stopped"), records, on_progress=lambda p: steps_done.append(p["iteration"]),
                      should_stop=lambda: len(steps_done) >= 4)
    stats = stopped.run()
    assert stats["status"] == "stopped" and stats["step"] == 4 and stats["epoch"] == 1
    saved = torch.load(tmp_path / "stopped" / CHECKPOINT_LAST, weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 4)
    assert_same_weights(saved["model_state_dict"], weights(stopped.model))

    resumed = Trainer(config(tmp_path / "stopped"), records)
    assert resumed.run()["status"] == "finished"
    assert resumed.sampler.drawn == straight.sampler.drawn
    assert_same_weights(weights(resumed.model), weights(straight.model))
    history = json.loads((tmp_path / "stopped" / TRAIN_STATS).read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_stop_file_stops_cleanly(tmp_path, records):
    cfg = config(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "STOP").touch()
    stats = Trainer(cfg, records).run()
    assert stats["status"] == "stopped" and stats["step"] == 0
    assert (tmp_path / CHECKPOINT_LAST).is_file() and not (tmp_path / "STOP").exists()


def test_config_checks(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="touching_weight must be positive"):
        TrainConfig(touching_weight=0)
    with pytest.raises(ValueError, match="first_click_weight must be positive"):
        TrainConfig(first_click_weight=0)
    with pytest.raises(ValueError, match="unknown training options: colour"):
        TrainConfig.from_dict({"colour": "blue"})
    assert TrainConfig.from_dict(config(tmp_path).to_dict()) == config(tmp_path)


# ----------------------------------------------------------------------------------------------
# Fine-tuning from published weights


def _published_file(path: Path, preset: Preset) -> dict:
    """A file as SAM-Med3D publishes them: weights under model_state_dict, no box corners, an argparse args."""
    torch.manual_seed(5)
    state = {k: v for k, v in build_model(preset).state_dict().items() if k not in BOX_CORNER_KEYS}
    torch.save({"model_state_dict": state, "epoch": 3, "args": argparse.Namespace(lr=1e-4)}, path)
    return state


def test_fine_tuning_from_a_published_style_checkpoint(tmp_path, records, monkeypatch):
    monkeypatch.setitem(PRESETS, TINY.name, TINY)  # so the preset is recognised from the keys, as published ones
    state = _published_file(tmp_path / "published.pth", TINY)
    cfg = config(tmp_path / "run", preset=None, init_checkpoint=str(tmp_path / "published.pth"), epochs=1,
                 box_share=1.0, box_and_click_share=0.0)
    trainer = Trainer(cfg, records)
    trainer.run()
    tuned = load_checkpoint(tmp_path / "run" / MODEL_BEST)
    assert tuned.preset == TINY and tuned.initialised_keys == ()
    initial = load_checkpoint(tmp_path / "published.pth")
    for key in BOX_CORNER_KEYS:  # initialised by the loader, then trained by the box prompts
        assert not torch.equal(tuned.state_dict()[key], initial.state_dict()[key])
    assert not torch.equal(tuned.state_dict()["mask_decoder.iou_token.weight"], state["mask_decoder.iou_token.weight"])
    with pytest.raises(ValueError, match="asks for 'segany_pet_small'"):
        Trainer(config(tmp_path / "clash", preset="segany_pet_small", init_checkpoint=str(tmp_path / "published.pth")),
                records).run()
    # The same architecture on crops of another voxel size, or served with a scale ensemble, is a fine-tuning
    # choice, not a clash.
    finer = dataclasses.replace(TINY, spacing_mm=TINY.spacing_mm * 0.8, ensemble_spacings_mm=(TINY.spacing_mm,))
    Trainer(config(tmp_path / "finer", preset=finer.to_dict(), init_checkpoint=str(tmp_path / "published.pth"),
                   epochs=1), records).run()
    assert load_checkpoint(tmp_path / "finer" / MODEL_BEST).preset == finer


def test_fine_tuning_that_does_not_beat_its_start_model_writes_no_best_model(tmp_path, records):
    torch.manual_seed(2)
    start = save_checkpoint(build_model(TINY), tmp_path / "start.pt")
    # A learning rate too small to move a weight: every epoch validates exactly as the start model does.
    frozen = dict(init_checkpoint=str(start), epochs=2, iterations_per_epoch=1, lr=1e-20, val_cases=1,
                  val_clicks=1, val_max_lesions=2, val_max_windows=1)
    stats = Trainer(config(tmp_path / "kept", **frozen), records).run()
    start_dice = stats["start_model"]["val"][KEY_METRIC]
    assert stats["status"] == "finished" and start_dice is not None
    assert [h["val"][KEY_METRIC] for h in stats["history"]] == [start_dice, start_dice]
    assert stats["best_metric"] == start_dice and stats["best_metric_epoch"] == 0
    assert not (tmp_path / "kept" / MODEL_BEST).exists()

    # A detail encoder added for fine-tuning starts silent: the start model validates as the file does. With
    # fresh_lr_factor only the new encoder learns at a rate that moves it.
    detail = dataclasses.replace(TINY, detail_width=4).to_dict()
    trainer = Trainer(config(tmp_path / "detail", **frozen, preset=detail, fresh_lr_factor=1e17), records)
    stats = trainer.run()
    assert trainer.model.preset.detail_width == 4 and stats["start_model"]["val"][KEY_METRIC] == start_dice
    loaded = load_checkpoint(start).state_dict()
    for key, value in trainer.model.state_dict().items():
        if key.startswith("detail_encoder."):
            assert key != "detail_encoder.convs.6.weight" or value.abs().max() > 1e-4, key  # started at zero
        else:
            assert torch.allclose(value, loaded[key], rtol=0, atol=1e-12), key

    stats = Trainer(config(tmp_path / "always", **frozen, validate_start_model=False), records).run()
    assert stats["start_model"]["val"] is None and stats["best_metric_epoch"] == 1
    assert (tmp_path / "always" / MODEL_BEST).exists()


@pytest.mark.slow
def test_one_step_of_the_published_architecture(tmp_path, records):
    _published_file(tmp_path / "sam_med3d.pth", PRESETS["sam_med3d"])
    cfg = config(tmp_path / "run", preset=None, init_checkpoint=str(tmp_path / "sam_med3d.pth"), epochs=1,
                 iterations_per_epoch=1, batch_size=1, clicks_per_sample=2)
    stats = Trainer(cfg, records).run()
    assert stats["status"] == "finished" and stats["step"] == 1
    assert load_checkpoint(tmp_path / "run" / MODEL_BEST).preset == PRESETS["sam_med3d"]


# ----------------------------------------------------------------------------------------------
# Distributed

def test_two_processes_under_torchrun_train_one_model_on_disjoint_shards(tmp_path, cohort):
    run_config = config(tmp_path / "run", epochs=1, iterations_per_epoch=3, threads=1)
    ranks = train_under_torchrun(tmp_path, run_config, records_from_folder(cohort / "images", cohort / "labels"))
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert set(ranks[0]["drawn"]).isdisjoint(ranks[1]["drawn"])
    assert sum(ranks[0]["drawn"].values()) == sum(ranks[1]["drawn"].values()) == 3 * 2
    saved = torch.load(tmp_path / "run" / CHECKPOINT_LAST, weights_only=True)
    assert len(saved["ranks"]) == 2 and saved["step"] == 3
    digest = hashlib.sha256()
    for key, value in sorted(saved["model_state_dict"].items()):
        digest.update(key.encode())
        digest.update(value.numpy().tobytes())
    assert digest.hexdigest() == ranks[0]["weights"]


# ----------------------------------------------------------------------------------------------
# The fast loop (encoder frozen, crops encoded once)


def _start_file(path: Path) -> Path:
    torch.manual_seed(3)
    save_checkpoint(build_model(TINY), path)
    return path


def test_fast_loop_trains_the_decoder_on_crops_encoded_once(tmp_path, records):
    start = _start_file(tmp_path / "start.pt")
    before = weights(load_checkpoint(start))
    store: dict = {}
    cfg = config(tmp_path / "fast", init_checkpoint=str(start), fast=True, fast_crops_per_object=2, epochs=1,
                 iterations_per_epoch=4)
    stats = make_trainer(cfg, records, crop_store=store).run()
    assert stats["status"] == "finished" and stats["fast"]["encoded_crops"] >= 2 * len(load_cases(records)[0].objects)
    after = weights(load_checkpoint(tmp_path / "fast" / MODEL_BEST))
    frozen = [k for k in before if k.split(".")[0] in ("image_encoder", "detail_encoder")]
    trained = [k for k in before if k.split(".")[0] in ("prompt_encoder", "mask_decoder")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    # A second trainer of the same process reuses the store: nothing is encoded again, the crops are the same.
    keys = set(store)
    again = make_trainer(config(tmp_path / "again", init_checkpoint=str(start), fast=True, fast_crops_per_object=2,
                                epochs=1, iterations_per_epoch=1), records, crop_store=store)
    again.run()
    assert set(store) == keys and len(again.encoded) == stats["fast"]["encoded_crops"]


def test_fast_loop_resumes_identically(tmp_path, records):
    start = _start_file(tmp_path / "start.pt")
    options = dict(init_checkpoint=str(start), fast=True, fast_crops_per_object=1)
    straight = make_trainer(config(tmp_path / "straight", **options), records)
    straight.run()
    steps = []
    make_trainer(config(tmp_path / "stopped", **options), records, on_progress=lambda p: steps.append(1),
                 should_stop=lambda: len(steps) >= 4).run()
    resumed = make_trainer(config(tmp_path / "stopped", **options), records)
    assert resumed.run()["status"] == "finished"
    assert_same_weights(weights(resumed.model), weights(straight.model))


def test_fast_loop_needs_weights_to_freeze(tmp_path):
    with pytest.raises(ValueError, match="fast training needs an init_checkpoint"):
        config(tmp_path, fast=True)
    with pytest.raises(ValueError, match="cpcl_box_checkpoint .* needs method cpcl"):
        config(tmp_path, cpcl_box_checkpoint="x.pt")
