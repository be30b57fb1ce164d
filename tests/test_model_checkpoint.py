"""Loading published and own checkpoints: the three published forms, strict checks, clear errors."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from segany_pet.errors import CheckpointError
from segany_pet.model import BOX_CORNER_KEYS, PRESETS, Preset, build_model, load_checkpoint, save_checkpoint
from test_model import REFERENCE_KEYS, TINY, click, randomise, volume

SMALL = PRESETS["segany_pet_small"]


def published_state(model) -> dict[str, torch.Tensor]:
    """A state dict as published files hold it: without this project's box-corner embeddings."""
    return {k: v.clone() for k, v in model.state_dict().items() if k not in BOX_CORNER_KEYS}


def outputs(model, preset: Preset, boxes=None):
    with torch.no_grad():
        return model(volume(preset), points=click((5, 6, 7)), boxes=boxes)


@pytest.fixture(scope="module")
def small_model():
    return randomise(build_model(SMALL), seed=3)


@pytest.mark.parametrize("form", ["training_dict", "bare", "ddp_prefixed"])
def test_published_forms_load(tmp_path, small_model, form, caplog):
    state = published_state(small_model)
    if form == "training_dict":  # as sam_med3d_turbo.pth: weights plus training state and an argparse Namespace
        content = {"model_state_dict": state, "epoch": 12, "args": argparse.Namespace(lr=1e-4, crop=[128] * 3),
                   "optimizer_state_dict": {"state": {}, "param_groups": []}, "best_dice": 0.8}
    elif form == "bare":
        content = state
    else:
        content = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "published.pth"
    torch.save(content, path)
    with caplog.at_level(logging.INFO, logger="segany_pet.model.checkpoint"):
        model = load_checkpoint(path)
    assert model.preset == SMALL and not model.training
    assert model.initialised_keys == BOX_CORNER_KEYS
    assert all(k in caplog.text for k in BOX_CORNER_KEYS)
    assert "weights_only=False" not in caplog.text  # argparse.Namespace is loaded without a full unpickle
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    for got, expected in zip(outputs(model, SMALL), outputs(small_model, SMALL), strict=True):
        assert torch.equal(got, expected)


def test_initialised_box_corners_are_reproducible(tmp_path, small_model):
    torch.save(published_state(small_model), tmp_path / "a.pth")
    first, second = load_checkpoint(tmp_path / "a.pth"), load_checkpoint(tmp_path / "a.pth")
    for key in BOX_CORNER_KEYS:
        assert torch.equal(first.state_dict()[key], second.state_dict()[key])


def test_published_configuration_is_recognised_from_its_keys(tmp_path):
    """A random key-compatible state dict of vit_b_ori, saved like sam_med3d_turbo.pth (400 MB, ~1.5 s)."""
    state = published_state(build_model("sam_med3d"))
    path = tmp_path / "sam_med3d_turbo.pth"
    torch.save({"model_state_dict": state, "args": argparse.Namespace(model_type="vit_b_ori"), "epoch": 1}, path)
    model = load_checkpoint(path)
    assert model.preset == PRESETS["sam_med3d"] and model.initialised_keys == BOX_CORNER_KEYS
    assert torch.equal(model.state_dict()["image_encoder.blocks.11.mlp.lin2.weight"],
                       state["image_encoder.blocks.11.mlp.lin2.weight"])
    path.unlink()  # pytest keeps recent tmp dirs; do not leave 400 MB behind


def test_own_checkpoint_round_trip(tmp_path):
    model = randomise(build_model(TINY), seed=5)
    path = save_checkpoint(model, tmp_path / "own.pth", epoch=7, training_cohort="phantom-v1")
    loaded = load_checkpoint(path)
    assert loaded.preset == TINY  # a preset that is not in PRESETS: read from the file
    assert loaded.initialised_keys == ()
    assert loaded.checkpoint_metadata == {"epoch": 7, "training_cohort": "phantom-v1"}
    box = torch.tensor([[2.0, 3.0, 4.0, 20.0, 21.0, 22.0]])
    for got, expected in zip(outputs(loaded, TINY, box), outputs(model, TINY, box), strict=True):
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(model, tmp_path / "x.pth", preset="other")
    model.preset = dataclasses.replace(TINY, ensemble_spacings_mm=(4.5, 7.5))  # serving choices travel in the file
    assert load_checkpoint(save_checkpoint(model, tmp_path / "ensemble.pth")).preset.ensemble_spacings_mm == (4.5, 7.5)


def test_a_detail_encoder_grafted_onto_a_checkpoint_starts_as_the_file_and_then_counts(tmp_path):
    model = randomise(build_model(TINY), seed=5)
    path = save_checkpoint(model, tmp_path / "plain.pth")
    grafted = load_checkpoint(path, detail_width=4)
    assert grafted.preset == dataclasses.replace(TINY, detail_width=4)
    assert grafted.initialised_keys and all(k.startswith("detail_encoder.") for k in grafted.initialised_keys)
    for got, expected in zip(outputs(grafted, TINY), outputs(model, TINY), strict=True):
        assert torch.equal(got, expected)
    # Trained (here: randomised), the detail features change the masks, and the file keeps them.
    randomise(grafted.detail_encoder, seed=6)
    detailed = outputs(grafted, TINY)
    assert (detailed[0] - outputs(model, TINY)[0]).abs().max() > 1e-3
    reloaded = load_checkpoint(save_checkpoint(grafted, tmp_path / "detail.pth"), detail_width=4)
    assert reloaded.preset.detail_width == 4 and reloaded.initialised_keys == ()
    for got, expected in zip(outputs(reloaded, TINY), detailed, strict=True):
        assert torch.equal(got, expected)
    # A file without one loads as it is unless a detail encoder is asked for.
    assert load_checkpoint(path).preset == TINY


def test_a_detail_encoder_widened_for_fine_tuning_starts_as_the_file_and_its_new_channels_learn(tmp_path):
    narrow = dataclasses.replace(TINY, detail_width=2)
    model = randomise(build_model(narrow), seed=5)
    path = save_checkpoint(model, tmp_path / "narrow.pth")
    widened = load_checkpoint(path, detail_width=5)
    assert widened.preset == dataclasses.replace(TINY, detail_width=5)
    assert set(widened.initialised_keys) == {k for k in widened.state_dict() if k.startswith("detail_encoder.")}
    for got, expected in zip(outputs(widened, narrow), outputs(model, narrow), strict=True):
        assert torch.allclose(got, expected, rtol=0, atol=1e-5)
    first = widened.detail_encoder.convs[0].weight
    assert first[2:].abs().min() > 0  # the new channels start from a fresh initialisation, not zero ...
    with torch.no_grad():
        widened.detail_encoder.convs[-1].weight[:, 2:] = 0.5  # ... and count once their output weights move
    assert (outputs(widened, narrow)[0] - outputs(model, narrow)[0]).abs().max() > 1e-3
    # Asking for the file's width or a narrower one loads the file as it is.
    for width in (1, 2):
        same = load_checkpoint(path, detail_width=width)
        assert same.preset == narrow and same.initialised_keys == ()


def test_own_checkpoint_must_be_complete(tmp_path):
    model = build_model(TINY)
    save_checkpoint(model, tmp_path / "own.pth")
    record = torch.load(tmp_path / "own.pth", weights_only=True)
    del record["model_state_dict"][BOX_CORNER_KEYS[0]]
    torch.save(record, tmp_path / "incomplete.pth")
    with pytest.raises(CheckpointError, match=BOX_CORNER_KEYS[0]):
        load_checkpoint(tmp_path / "incomplete.pth")
    record["preset"]["crop_size"] = 30
    torch.save(record, tmp_path / "bad_preset.pth")
    with pytest.raises(CheckpointError, match="preset"):
        load_checkpoint(tmp_path / "bad_preset.pth")


def test_mismatches_are_named(tmp_path, small_model):
    state = published_state(small_model)
    state["image_encoder.blocks.1.attn.qkv.weight"] = torch.zeros(5, 5)
    state["image_encoder.blocks.1.attn.extra_gate"] = torch.zeros(3)
    del state["mask_decoder.iou_token.weight"]
    del state["prompt_encoder.no_mask_embed.weight"]
    torch.save(state, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / "edited.pth")
    message = str(error.value)
    for expected in ("segany_pet_small", "2 missing keys", "mask_decoder.iou_token.weight",
                     "prompt_encoder.no_mask_embed.weight", "1 unexpected key", "attn.extra_gate",
                     "1 shape mismatch", "image_encoder.blocks.1.attn.qkv.weight (file [5, 5], model [768, 256])"):
        assert expected in message


def test_long_mismatch_lists_are_shortened(tmp_path, small_model):
    state = published_state(small_model)
    for i in range(8):
        state[f"extra.{i}"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"8 unexpected keys: extra.0, .*extra.4, \.\.\. \(3 more\)"):
        load_checkpoint(tmp_path / "extra.pth")


def test_unknown_configuration(tmp_path):
    other = Preset(name="other", crop_size=64, spacing_mm=2.0, normalisation="log_suv", patch_size=8,
                   encoder_dim=64, encoder_depth=2, encoder_heads=2, window_size=0, prompt_dim=48)
    torch.save(build_model(other).state_dict(), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"unknown configuration .*pos_embed \[1, 8, 8, 8, 64\].*known presets"):
        load_checkpoint(tmp_path / "other.pth")


def test_unreadable_files(tmp_path, small_model):
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing.pth")
    torch.save(published_state(small_model), tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth: damaged"):
        load_checkpoint(tmp_path / "truncated.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "plain.pkl")


@pytest.mark.parametrize(("content", "detail"), [
    ([torch.zeros(2)], "got list"),
    ({"name": "model", "epoch": 3}, "2 of 2 entries are not tensors (name, epoch)"),
    ({"model_state_dict": {}}, "empty"),
    ({"model_state_dict": {"a": torch.zeros(1), "b": "text"}}, "1 of 2 entries are not tensors (b)"),
])
def test_pickles_that_are_not_checkpoints(tmp_path, content, detail):
    torch.save(content, tmp_path / "thing.pth")
    with pytest.raises(CheckpointError, match="not a model checkpoint") as error:
        load_checkpoint(tmp_path / "thing.pth")
    assert detail in str(error.value)


def test_full_unpickle_only_as_a_warned_fallback(tmp_path, small_model, caplog):
    path = tmp_path / "dated.pth"
    torch.save({"model_state_dict": published_state(small_model), "saved": datetime.date(2024, 5, 1)}, path)
    with pytest.raises(CheckpointError, match=r"datetime.date.*refusing"):
        load_checkpoint(path, allow_unsafe_pickle=False)
    with caplog.at_level(logging.WARNING, logger="segany_pet.model.checkpoint"):
        model = load_checkpoint(path)
    assert "weights_only=False" in caplog.text and "datetime.date" in caplog.text
    assert model.preset == SMALL


# Outputs of the SAM-Med3D reference implementation on deterministic weights, and how they were made.
REFERENCE = Path(__file__).with_name("reference")


def deterministic_published_state() -> dict[str, torch.Tensor]:
    """The deterministic weights tests/reference/ holds SAM-Med3D's own outputs for (the reference code, fp32,
    CPU): per key, randn from a generator seeded with the key's crc32, scaled by the key's kind."""
    shapes = json.loads(REFERENCE_KEYS.read_text())
    state = {}
    for key, shape in shapes.items():
        draw = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))
        if "gaussian_matrix" in key:
            state[key] = draw
        elif len(shape) == 1 and key.endswith(".weight"):
            state[key] = 1 + 0.02 * draw
        else:
            state[key] = 0.02 * draw
    return state


@pytest.mark.slow
def test_published_layout_answers_as_the_sam_med3d_reference(tmp_path):
    """A file in the published layout, loaded as a user would, gives SAM-Med3D's own outputs to 1e-4 relative:
    image embedding, prompt embeddings, low-res logits and IoU, and the same after a mask-prompted second pass."""
    expected = np.load(REFERENCE / "sam_med3d_reference.npz")
    facts = json.loads((REFERENCE / "sam_med3d_reference.json").read_text())
    state = deterministic_published_state()
    for key, checksum in facts["weight_checksums"].items():
        assert state[key].double().sum().item() == pytest.approx(checksum, rel=1e-9), key
    torch.save({"model_state_dict": state, "epoch": 0}, tmp_path / "sam_med3d_turbo.pth")
    del state
    model = load_checkpoint(tmp_path / "sam_med3d_turbo.pth")
    assert model.preset == PRESETS["sam_med3d"]
    image = torch.randn((1, 1, 128, 128, 128), generator=torch.Generator().manual_seed(0))
    assert image.double().sum().item() == pytest.approx(facts["x_sum"], rel=1e-9)
    points = (torch.tensor(facts["coords"]), torch.tensor(facts["labels"]))
    with torch.no_grad():
        embedding = model.image_encoder(image)
        sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=None)
        position = model.prompt_encoder.get_dense_pe()
        low, iou = model.mask_decoder(embedding, position, sparse, dense, False)
        sparse2, dense2 = model.prompt_encoder(points=points, boxes=None, masks=low)
        low2, iou2 = model.mask_decoder(embedding, position, sparse2, dense2, False)
    got = {"enc": embedding, "sparse": sparse, "dense_mean": dense.mean(), "low": low, "iou": iou,
           "low2": low2, "iou2": iou2}
    for name, value in got.items():
        reference = expected[name]
        error = np.abs(value.detach().numpy() - reference).max() / np.abs(reference).max()
        assert error < 1e-4, f"{name}: {error:.2e} relative"
