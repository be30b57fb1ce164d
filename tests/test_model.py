"""The 3D SAM modules: published names and shapes, exact windowed attention, prompt encoding quirks, boxes, bf16."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import segany_pet.model
from segany_pet.model import (
    BOX_CORNER_KEYS,
    PRESETS,
    Preset,
    Sam3D,
    build_model,
    expected_shapes,
)
from segany_pet.model.image_encoder import RelPosAttention
from segany_pet.model.layers import LayerNorm3d, fold_detail, unfold_detail

# All 324 keys and shapes of the published checkpoint (copied from shared/reference/ into the package).
REFERENCE_KEYS = Path(segany_pet.model.__file__).with_name("sam_med3d_vit_b_ori_keys.json")
PUBLISHED_PARAMETERS = 100_509_616

# Published geometry (128^3 crop, 16^3 patches -> 8^3 tokens, windows of 14^3 so padding happens) at a
# width that makes the padded reference fast: 64 dims, 2 heads, windows in blocks 0 and 2.
NARROW = Preset(
    name="narrow_published_geometry",
    crop_size=128,
    spacing_mm=1.5,
    normalisation="zscore_nonzero",
    encoder_dim=64,
    encoder_depth=4,
    encoder_heads=2,
    global_attn_indexes=(1, 3),
    prompt_dim=96,
    decoder_mlp_dim=256,
    iou_head_hidden=64,
)
TINY = Preset(
    name="tiny",
    crop_size=32,
    spacing_mm=3.0,
    normalisation="log_suv",
    patch_size=8,
    encoder_dim=32,
    encoder_depth=2,
    encoder_heads=2,
    global_attn_indexes=(),
    window_size=0,
    prompt_dim=48,
    decoder_mlp_dim=64,
    iou_head_hidden=32,
)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere: strong relative position bias, qkv biases (the padded tokens' k and v),
    LayerNorm affine terms away from identity."""
    generator = torch.Generator().manual_seed(seed)

    def normal(t, scale, mean=0.0):
        t.copy_(mean + scale * torch.randn(t.shape, generator=generator))

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                normal(p, 0.3)
            elif name.endswith("pos_embed") or p.ndim == 1:
                normal(p, 0.2)
            else:  # matrices, convolutions, embeddings
                normal(p, 1.0 / math.sqrt(p[0].numel()) if p.shape[0] > 1 else 1.0)
        for module in model.modules():
            if isinstance(module, nn.LayerNorm | LayerNorm3d):
                normal(module.weight, 0.1, mean=1.0)
    return model.eval()


def volume(preset: Preset, batch: int = 1, seed: int = 1) -> torch.Tensor:
    s = preset.crop_size
    return torch.randn(batch, 1, s, s, s, generator=torch.Generator().manual_seed(seed))


def click(*coords, label: int = 1):
    """One click per batch item, crop voxel indices."""
    return torch.tensor([[list(c)] for c in coords], dtype=torch.float32), torch.full((len(coords), 1), label)


def test_published_configuration_has_the_reference_keys_and_shapes():
    reference = {k: tuple(v) for k, v in json.loads(REFERENCE_KEYS.read_text()).items()}
    shapes = expected_shapes(PRESETS["sam_med3d"])
    added = {k: shapes[k] for k in BOX_CORNER_KEYS}
    assert {k: v for k, v in shapes.items() if k not in added} == reference
    assert list(reference) == [k for k in shapes if k not in added]  # same order as well
    assert set(added.values()) == {(1, 384)}
    assert sum(math.prod(s) for s in reference.values()) == PUBLISHED_PARAMETERS


def test_small_preset_uses_the_same_naming_scheme():
    published = expected_shapes(PRESETS["sam_med3d"])
    small = expected_shapes(PRESETS["segany_pet_small"])
    small_preset = PRESETS["segany_pet_small"]
    depth = small_preset.encoder_depth
    assert {k for k in small if not k.startswith("detail_encoder.")} == {k for k in published if not k.startswith(
        tuple(f"image_encoder.blocks.{i}." for i in range(depth, 12)))}
    assert small["image_encoder.pos_embed"] == (1, 8, 8, 8, small_preset.encoder_dim)


def test_preset_round_trip_and_validation():
    for preset in PRESETS.values():
        record = preset.to_dict()
        assert json.loads(json.dumps(record)) == record
        assert Preset.from_dict(record) == preset
    published = PRESETS["sam_med3d"]
    assert (published.embedding_grid, published.low_res_size) == (8, 32)
    small = PRESETS["segany_pet_small"]
    assert (small.embedding_grid, small.low_res_size) == (small.crop_size // small.patch_size, 32)
    with pytest.raises(ValueError, match="patch_size"):
        Preset(name="bad", crop_size=100, spacing_mm=1.0, normalisation="log_suv")
    with pytest.raises(ValueError, match="normalisation"):
        Preset(name="bad", crop_size=128, spacing_mm=1.0, normalisation="minmax")
    with pytest.raises(ValueError, match="detail_width"):
        dataclasses.replace(TINY, detail_width=-1)
    with pytest.raises(ValueError, match="unknown preset fields"):
        Preset.from_dict({**published.to_dict(), "dropout": 0.1})
    with pytest.raises(KeyError, match="segany_pet_small"):
        build_model("vit_h")
    assert isinstance(build_model(TINY), Sam3D) and build_model(TINY).preset is TINY


def _encode_and_decode(model: Sam3D, image: torch.Tensor, mode: str):
    model.image_encoder.attention_mode = mode
    with torch.inference_mode():
        embedding = model.image_encoder(image)
        logits, iou = model.decode(embedding, click(*[(10, 20, 30), (64, 64, 64)][: image.shape[0]]))
    return embedding, logits, iou


def _assert_close(reference, result, tolerance):
    for ref, got in zip(reference, result, strict=True):
        scale = ref.abs().max().item()
        assert (got - ref).abs().max().item() < tolerance * max(scale, 1.0), (got - ref).abs().max()


LAYOUTS = pytest.mark.parametrize("layout", ["per_axis", "published"])


def narrow(layout: str) -> Preset:
    return dataclasses.replace(NARROW, rel_pos_layout=layout)


@LAYOUTS
def test_exact_attention_equals_the_padded_reference(layout):
    model = randomise(build_model(narrow(layout)))
    image = volume(NARROW, batch=2)
    padded = _encode_and_decode(model, image, "padded")
    exact = _encode_and_decode(model, image, "exact")
    _assert_close(padded, exact, 1e-5)
    assert model.image_encoder.attention_mode == "exact"


@LAYOUTS
def test_exact_attention_trains_like_the_padded_reference(layout):
    """Gradients too (fine-tuning published weights): the padded keys' k, v (and q, in the published layout)
    come from the qkv bias."""
    model = randomise(build_model(narrow(layout))).train()
    image = volume(NARROW)
    windowed = model.image_encoder.blocks[0].attn
    gradients = {}
    for mode in ("padded", "exact"):
        model.zero_grad()
        model.image_encoder.attention_mode = mode
        logits, iou = model(image, points=click((10, 20, 30)))
        (logits.square().mean() + iou.sum()).backward()
        gradients[mode] = [p.grad.clone() for p in (windowed.qkv.bias, windowed.rel_pos_d, windowed.rel_pos_w,
                                                    windowed.qkv.weight)]
    _assert_close(gradients["padded"], gradients["exact"], 1e-4)


def test_the_two_relative_position_layouts_answer_differently():
    """The published broadcast is not a relabelling of the per-axis one: with the same weights the embeddings
    differ far beyond rounding (so the reference test below can tell them apart)."""
    image = volume(NARROW)
    per_axis, published = (_encode_and_decode(randomise(build_model(narrow(layout))), image, "exact")[0]
                           for layout in ("per_axis", "published"))
    assert (per_axis - published).abs().max() > 0.05 * per_axis.abs().max()
    with pytest.raises(ValueError, match="rel_pos_layout 'sam' is not one of"):
        narrow("sam")


def test_the_window_padding_changes_the_result(monkeypatch):
    """Without the padded keys (a logit of -1e4: zero weight) the result is far off: the padding matters."""
    model = randomise(build_model(NARROW))
    image = volume(NARROW)
    exact = _encode_and_decode(model, image, "exact")
    no_padding = staticmethod(lambda rel_d, *_: torch.full(rel_d.shape[:-1], -1e4))
    monkeypatch.setattr(RelPosAttention, "_log_padding_weight", no_padding)
    unpadded = _encode_and_decode(model, image, "exact")
    assert (unpadded[0] - exact[0]).abs().max() > 0.05 * exact[0].abs().max()


@LAYOUTS
@pytest.mark.parametrize(("crop", "window"), [(96, 4), (80, 5)])
def test_exact_attention_with_several_windows_per_axis(crop, window, layout):
    """Grids larger than the window: full windows plus a padded last window along each axis."""
    preset = Preset(name="multi", crop_size=crop, spacing_mm=1.5, normalisation="zscore_nonzero",
                    encoder_dim=32, encoder_depth=2, encoder_heads=2, global_attn_indexes=(1,),
                    window_size=window, prompt_dim=48, decoder_mlp_dim=64, iou_head_hidden=32,
                    rel_pos_layout=layout)
    model = randomise(build_model(preset))
    image = volume(preset)
    _assert_close(_encode_and_decode(model, image, "padded")[:1], _encode_and_decode(model, image, "exact")[:1], 1e-5)


@pytest.mark.slow
def test_exact_attention_equals_the_padded_reference_published_configuration():
    model = randomise(build_model("sam_med3d"))
    image = volume(PRESETS["sam_med3d"])
    _assert_close(_encode_and_decode(model, image, "padded"), _encode_and_decode(model, image, "exact"), 1e-4)


def test_unknown_attention_mode_and_wrong_crop_size_are_errors():
    model = build_model(TINY)
    with pytest.raises(ValueError, match=r"expected crops of shape \(B, 1, 32, 32, 32\)"):
        model.image_encoder(torch.zeros(1, 1, 64, 64, 64))
    model.image_encoder.attention_mode = "fast"
    with pytest.raises(ValueError, match="attention_mode"):
        model.image_encoder(volume(TINY))


def _axis_probe(model: Sam3D, axis: int):
    """Make channel 0 of the position encoding sin(2 pi (2 c_axis - 1)): a function of coordinate `axis` only."""
    matrix = torch.zeros_like(model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix)
    matrix[axis, 0] = 1.0
    model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.copy_(matrix)


def test_dense_position_encoding_swaps_the_first_two_axes():
    model = build_model(TINY)
    g = TINY.embedding_grid
    centres = (torch.arange(g) + 0.5) / g
    expected = torch.sin(2 * math.pi * (2 * centres - 1))
    # Encoded coordinate 0 varies along tensor axis 1 (H), coordinate 1 along axis 0 (D), coordinate 2 along W.
    for coordinate, tensor_axis in ((0, 1), (1, 0), (2, 2)):
        _axis_probe(model, coordinate)
        channel = model.prompt_encoder.get_dense_pe()[0, 0]
        assert channel.shape == (g, g, g)
        along = channel.movedim(tensor_axis, 0).reshape(g, -1)
        assert torch.allclose(along, expected[:, None].expand(g, g * g), atol=1e-6)
    assert model.prompt_encoder.get_dense_pe().shape == (1, TINY.prompt_dim, g, g, g)


def test_point_encoding_shifts_to_voxel_centres_and_divides_by_the_crop():
    model = build_model(TINY)
    encoder = model.prompt_encoder
    matrix = torch.zeros(3, TINY.prompt_dim // 3)
    matrix[0, 0], matrix[1, 1], matrix[2, 2] = 1.0, 0.5, 2.0
    encoder.pe_layer.positional_encoding_gaussian_matrix.copy_(matrix)
    with torch.no_grad():
        sparse, _ = encoder(points=click((3, 10, 31)), boxes=None, masks=None)
    pe = sparse[0, 0] - encoder.point_embeddings[1].weight[0]
    third = TINY.prompt_dim // 3
    # crop 32: index 3 -> (3.5 / 32); 2 pi (2 c - 1) times the matrix column.
    angles = [2 * math.pi * (2 * 3.5 / 32 - 1) * 1.0, 2 * math.pi * (2 * 10.5 / 32 - 1) * 0.5,
              2 * math.pi * (2 * 31.5 / 32 - 1) * 2.0]
    for channel, angle in enumerate(angles):
        assert pe[channel].item() == pytest.approx(math.sin(angle), abs=1e-5)
        assert pe[third + channel].item() == pytest.approx(math.cos(angle), abs=1e-5)
        assert pe[2 * third + channel].item() == pytest.approx(math.sin(angle), abs=1e-5)
    assert pe[3].item() == pytest.approx(0.0, abs=1e-6)  # sin(0): no frequency on this channel


def test_labels_select_embeddings_and_padding_point_only_without_boxes():
    model = build_model(TINY)
    encoder = model.prompt_encoder
    coords = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]])
    labels = torch.tensor([[1, 0, -1]])
    box = torch.tensor([[2.0, 2.0, 2.0, 9.0, 9.0, 9.0]])
    with torch.no_grad():
        sparse, dense = encoder(points=(coords, labels), boxes=None, masks=None)
        pe = encoder.pe_layer.encode((coords + 0.5) / TINY.crop_size)[0]
        assert sparse.shape == (1, 4, TINY.prompt_dim)  # padding point appended
        assert torch.allclose(sparse[0, 0], pe[0] + encoder.point_embeddings[1].weight[0], atol=1e-5)
        assert torch.allclose(sparse[0, 1], pe[1] + encoder.point_embeddings[0].weight[0], atol=1e-5)
        assert torch.equal(sparse[0, 2], encoder.not_a_point_embed.weight[0])
        assert torch.equal(sparse[0, 3], encoder.not_a_point_embed.weight[0])
        assert torch.equal(dense[0, :, 0, 0, 0], encoder.no_mask_embed.weight[0])
        with_box, _ = encoder(points=(coords, labels), boxes=box, masks=None)
        assert with_box.shape == (1, 5, TINY.prompt_dim)  # 3 points + 2 corners, no padding point
        assert torch.allclose(with_box[0, :3], sparse[0, :3], atol=1e-5)


def test_box_corners_are_encoded_like_points():
    encoder = build_model(TINY).prompt_encoder
    flat = torch.tensor([[2.0, 3.0, 4.0, 20.0, 21.0, 22.0]])
    with torch.no_grad():
        sparse, _ = encoder(points=None, boxes=flat, masks=None)
        paired, _ = encoder(points=None, boxes=flat.view(1, 2, 3), masks=None)
        corners = encoder.pe_layer.encode((flat.view(1, 2, 3) + 0.5) / TINY.crop_size)[0]
    assert sparse.shape == (1, 2, TINY.prompt_dim) and torch.equal(sparse, paired)
    assert torch.allclose(sparse[0, 0], corners[0] + encoder.point_embeddings[2].weight[0], atol=1e-5)
    assert torch.allclose(sparse[0, 1], corners[1] + encoder.point_embeddings[3].weight[0], atol=1e-5)


def test_box_prompts_change_the_output_and_train_the_corner_embeddings():
    model = randomise(build_model(TINY)).train()
    image = volume(TINY)
    points = click((10, 12, 14))
    box = torch.tensor([[6.0, 8.0, 10.0, 16.0, 18.0, 20.0]])
    point_only, _ = model(image, points=points)
    box_only, _ = model(image, boxes=box)
    both, iou = model(image, points=points, boxes=box)
    assert both.shape == point_only.shape == box_only.shape == (1, 1, 16, 16, 16) and iou.shape == (1, 1)
    assert (point_only - both).abs().max() > 1e-3 and (point_only - box_only).abs().max() > 1e-3
    (both.mean() + box_only.mean() + iou.mean()).backward()
    for index in (2, 3):
        grad = model.prompt_encoder.point_embeddings[index].weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_mask_prompt_multimask_and_one_embedding_for_several_prompts():
    model = randomise(build_model(TINY))
    low = TINY.low_res_size
    with torch.no_grad():
        embedding = model.image_encoder(volume(TINY))
        assert embedding.shape == (1, TINY.prompt_dim, 4, 4, 4)
        first, _ = model.decode(embedding, click((5, 5, 5)))
        refined, _ = model.decode(embedding, click((5, 5, 5)), masks=first)
        assert (refined - first).abs().max() > 1e-4
        multi, iou = model.decode(embedding, click((5, 5, 5)), multimask_output=True)
        assert multi.shape == (1, 3, low, low, low) and iou.shape == (1, 3)
        batched, iou = model.decode(embedding, click((5, 5, 5), (20, 20, 20)))  # batch-1 embedding, 2 prompt sets
        assert batched.shape == (2, 1, low, low, low) and iou.shape == (2, 1)
        assert torch.allclose(batched[:1], first, atol=1e-5)


def test_detail_features_fold_into_the_embedding_and_serve_several_prompt_sets():
    preset = dataclasses.replace(TINY, detail_width=4)
    model = randomise(build_model(preset))
    low = preset.low_res_size
    detail = torch.randn(2, preset.prompt_dim // 8, low, low, low)
    assert torch.equal(unfold_detail(fold_detail(detail)), detail)
    assert fold_detail(detail)[0, :64, 0, 0, 0].tolist() == detail[0, 0, :4, :4, :4].flatten().tolist()
    with torch.no_grad():
        embedding = model.embed(volume(preset))
        assert embedding.shape == (1, preset.prompt_dim * 9, 4, 4, 4)  # C + 64 * C / 8 channels
        first, _ = model.decode(embedding, click((5, 5, 5)))
        batched, _ = model.decode(embedding, click((5, 5, 5), (20, 20, 20)))
        assert torch.allclose(batched[:1], first, atol=1e-5)
        torch.nn.init.zeros_(model.detail_encoder.convs[-1].weight)
        torch.nn.init.zeros_(model.detail_encoder.convs[-1].bias)
        assert (model.decode(model.embed(volume(preset)), click((5, 5, 5)))[0] - first).abs().max() > 1e-3


def test_bfloat16_inference_is_opt_in_and_close_to_float32():
    model = randomise(build_model(NARROW))
    image = volume(NARROW)
    assert model.inference_dtype == "float32"
    reference = _encode_and_decode(model, image, "exact")
    model.to_inference_dtype("bfloat16")
    assert model.inference_dtype == "bfloat16"
    fast = _encode_and_decode(model, image, "exact")
    assert all(t.dtype == torch.float32 for t in fast)
    # Documented tolerance (Sam3D.to_inference_dtype; measured in scripts/benchmark_encoder.py): mean error
    # within 2% and max error within 10% of the float32 outputs' scale. The IoU estimate is a single number
    # near 0 for random weights (~0.015), where a relative bound is noise: it gets an absolute one (0.01).
    embedding_and_logits, iou = zip(reference[:2], fast[:2], strict=True), (reference[2], fast[2])
    for ref, got in embedding_and_logits:
        error = (got - ref).abs()
        assert error.mean() < 0.02 * ref.abs().mean()
        assert error.max() < 0.1 * ref.abs().max()
    assert (iou[1] - iou[0]).abs().max() < 0.01
    assert not torch.equal(fast[0], reference[0])  # it did compute in bf16
    model.to_inference_dtype(torch.float32)
    assert torch.equal(_encode_and_decode(model, image, "exact")[0], reference[0])
    with pytest.raises(ValueError, match="inference dtype"):
        model.to_inference_dtype("float16")
