"""The interactive predictor: crop geometry and resampling, prompts, cache, refinement, windows, threads."""

from __future__ import annotations

import copy
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segany_pet.crops import (
    CropGeometry,
    canonical_axes,
    crop_volume,
    extension_windows,
    normalise,
    paste_logits,
    paste_mask,
    place_crop,
    resample,
    touched_faces,
)
from segany_pet.errors import PromptError
from segany_pet.model import PRESETS, build_model
from segany_pet.pet.volume import PETVolume
from segany_pet.predictor import Predictor

# The default preset's architecture at 3 mm, one spacing: the geometry below is worked out for 192 mm crops.
SMALL = dataclasses.replace(PRESETS["segany_pet_small"], spacing_mm=3.0, ensemble_spacings_mm=())


def affine_of(spacing, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def same_image(suv: np.ndarray, affine: np.ndarray, flip=(), order=(0, 1, 2)):
    """The same image stored differently: axes in ``flip`` reversed, then axes reordered to ``order``."""
    suv, affine = suv.copy(), affine.copy()
    for axis in flip:
        affine[:3, 3] += affine[:3, axis] * (suv.shape[axis] - 1)
        affine[:3, axis] *= -1
        suv = np.flip(suv, axis)
    suv = np.ascontiguousarray(suv.transpose(order))
    affine[:3, :3] = affine[:3, list(order)]
    return suv, affine


def world_grid(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def ball(shape, affine, centre_mm, radius_mm) -> np.ndarray:
    return np.linalg.norm(world_grid(shape, affine) - np.asarray(centre_mm), axis=-1) <= radius_mm


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def blob_volume(shape=(48, 48, 60), spacing=(4.0, 4.0, 4.0), seed=0) -> PETVolume:
    """Noisy background SUV ~1 with two bright balls, RAS affine centred near the origin."""
    rng = np.random.default_rng(seed)
    affine = affine_of(spacing, -(np.asarray(shape) - 1) / 2 * np.asarray(spacing))
    suv = rng.gamma(4.0, 0.25, size=shape).astype(np.float32)
    suv[ball(shape, affine, (10, -20, 30), 15)] += 8
    suv[ball(shape, affine, (-40, 30, -60), 10)] += 5
    return PETVolume(suv, affine)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The models here are tiny; one thread keeps them fast when other processes busy the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model(SMALL)


def count_encoder_calls(model) -> list:
    calls = []
    model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls


# ----------------------------------------------------------------------------------------------
# Frames: stored voxel -> world -> crop index, on hand-computed cases


def test_stored_voxel_to_crop_index_identity_like_affine():
    affine = affine_of((1.5, 1.5, 1.5))
    geometry, fits = place_crop(affine, (100, 100, 100), [[49, 49, 49]], size=128, spacing=1.5, snap=False)
    # the click sits at the crop centre up to whole voxels: 63.5 -> 63 or 64
    assert fits
    crop = geometry.stored_to_crop(affine, [[49, 49, 49], [10, 20, 30]])
    shift = crop[0] - 49
    np.testing.assert_allclose(crop[1], np.array([10, 20, 30]) + shift)
    assert np.all(np.abs(crop[0] - 63.5) <= 0.5)


def test_stored_voxel_to_crop_index_anisotropic_and_flipped():
    centre = (0.0, 0.0, 0.0)
    ras = affine_of((2.0, 2.0, 3.0), (-100.0, -100.0, -150.0))
    geometry = CropGeometry.around(ras, centre, spacing=1.5, size=64)  # voxel (0,0,0) at -31.5 * 1.5 mm
    np.testing.assert_allclose(geometry.origin, [-47.25] * 3)
    # voxel (60, 45, 52) is at world (20, -10, 6) mm -> crop 31.5 + world / 1.5
    expected = [[31.5 + 20 / 1.5, 31.5 - 10 / 1.5, 35.5]]
    np.testing.assert_allclose(geometry.stored_to_crop(ras, [[60, 45, 52]]), expected)

    # first axis stored right-to-left: voxel i is at x = 100 - 2 i; the crop axes stay RAS
    flipped = ras.copy()
    flipped[0, 0], flipped[0, 3] = -2.0, 100.0
    np.testing.assert_allclose(canonical_axes(flipped), np.eye(3))
    geometry = CropGeometry.around(flipped, centre, spacing=1.5, size=64)
    np.testing.assert_allclose(geometry.stored_to_crop(flipped, [[60, 45, 52]]), [[31.5 - 20 / 1.5, *expected[0][1:]]])

    # stored axes permuted (z, x, y): canonical crop axis 0 is still world x
    permuted = np.array([[0, 2.0, 0, -100], [0, 0, 2.0, -100], [3.0, 0, 0, -150], [0, 0, 0, 1]])
    np.testing.assert_allclose(canonical_axes(permuted), np.eye(3))
    geometry = CropGeometry.around(permuted, centre, spacing=1.5, size=64)
    np.testing.assert_allclose(geometry.stored_to_crop(permuted, [[52, 60, 45]]), expected)


def test_crop_centres_snap_so_nearby_clicks_share_a_crop_and_keep_a_margin():
    affine = affine_of((4.0, 4.0, 4.0))
    shape = (128, 128, 240)
    first, _ = place_crop(affine, shape, [[60, 60, 100]], SMALL.crop_size, SMALL.spacing_mm)
    second, _ = place_crop(affine, shape, [[61, 59, 101]], SMALL.crop_size, SMALL.spacing_mm)
    far, _ = place_crop(affine, shape, [[20, 20, 20]], SMALL.crop_size, SMALL.spacing_mm)
    assert first == second and hash(first) == hash(second)
    assert far != first
    margin = SMALL.crop_size // 16
    for click in ([0, 0, 0], [127, 127, 239], [5, 70, 230], [64, 63, 120]):
        geometry, fits = place_crop(affine, shape, [click], SMALL.crop_size, SMALL.spacing_mm)
        crop = geometry.stored_to_crop(affine, [click])[0]
        assert fits and np.all(crop >= margin) and np.all(crop <= SMALL.crop_size - 1 - margin), click


def test_prompts_wider_than_a_crop_centre_on_the_anchor():
    affine = affine_of((4.0, 4.0, 4.0))
    prompts = [[60, 60, 30], [60, 60, 200]]  # 680 mm apart, the crop spans 192 mm
    geometry, fits = place_crop(affine, (128, 128, 240), prompts, SMALL.crop_size, SMALL.spacing_mm, anchor=1)
    assert not fits
    crop = geometry.stored_to_crop(affine, prompts)
    # the anchor is within half a snapping step (64 / 4 / 2 voxels) of the centre; the other click is outside
    assert np.all(np.abs(crop[1] - (SMALL.crop_size - 1) / 2) <= SMALL.crop_size / 8)
    assert crop[0, 2] < -0.5


# ----------------------------------------------------------------------------------------------
# Resampling: crop -> paste round trips


def test_upsampling_folded_into_resample_equals_interpolate_then_sample():
    low = torch.randn(8, 8, 8)
    up = F.interpolate(low[None, None], size=(32,) * 3, mode="trilinear", align_corners=False)[0, 0]
    target_to_source = np.array([[0, 0, -0.7, 30.2], [1.3, 0, 0, -2.0], [0, 0.5, 0, 3.3], [0, 0, 0, 1]])
    folded = torch.from_numpy(resample(low, target_to_source, (20, 25, 40), outside="border", upsample_to=32))
    explicit = torch.from_numpy(resample(up, target_to_source, (20, 25, 40), outside="border"))
    torch.testing.assert_close(folded, explicit, atol=1e-5, rtol=0)
    # against grid_sample for the explicit step (x, y, z of grid_sample = axes 2, 1, 0)
    t = torch.from_numpy(np.stack(np.meshgrid(*[np.arange(n) for n in (20, 25, 40)], indexing="ij"), -1)).double()
    source = t @ torch.from_numpy(target_to_source[:3, :3]).T + torch.from_numpy(target_to_source[:3, 3])
    grid = (2 * source.clamp(0, 31) / 31 - 1).flip(-1).float()[None]
    reference = F.grid_sample(up[None, None], grid, align_corners=True)[0, 0]
    torch.testing.assert_close(explicit, reference, atol=1e-4, rtol=0)


def test_crop_is_zero_outside_the_volume_and_exact_on_a_matching_grid():
    suv = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14)
    affine = affine_of((3.0, 3.0, 3.0))
    geometry = CropGeometry.make(affine[:3, 3] - 3.0 * 2, np.eye(3), 3.0, 20)  # starts 2 voxels before (0,0,0)
    crop = crop_volume(suv, affine, geometry).numpy()
    np.testing.assert_allclose(crop[2:12, 2:14, 2:16], suv)
    assert crop[:2].max() == 0 and crop[12:].max() == 0 and crop[:, :, 16:].max() == 0


@pytest.mark.parametrize(("size", "spacing"), [(64, 3.0), (128, 1.5)])
@pytest.mark.parametrize(
    ("case", "shape", "voxel", "centre_voxel", "radius_mm"),
    [
        ("anisotropic", (120, 120, 80), (2.036, 2.036, 3.0), (60, 55, 40), 30.0),
        ("at the edge", (60, 60, 60), (4.0, 4.0, 4.0), (2, 30, 57), 28.0),
        ("smaller than the crop", (20, 24, 16), (4.0, 4.0, 4.0), (10, 12, 8), 24.0),
    ],
)
@pytest.mark.parametrize("stored", ["RAS", "LPS", "permuted"])
def test_mask_survives_crop_and_paste(size, spacing, case, shape, voxel, centre_voxel, radius_mm, stored):
    ras = affine_of(voxel, (-50.0, 20.0, -300.0))
    centre_mm = ras[:3, :3] @ centre_voxel + ras[:3, 3]
    mask = ball(shape, ras, centre_mm, radius_mm).astype(np.uint8)
    flip, order = {"RAS": ((), (0, 1, 2)), "LPS": ((0, 1), (0, 1, 2)), "permuted": ((2,), (2, 0, 1))}[stored]
    mask, affine = same_image(mask, ras, flip, order)
    click = np.round(np.linalg.solve(affine[:3, :3], centre_mm - affine[:3, 3])).astype(int)
    geometry, _ = place_crop(affine, mask.shape, [click], size, spacing)

    fraction = crop_volume(mask, affine, geometry)
    box, logits = paste_logits(fraction - 0.5, geometry, affine, mask.shape)
    back = logits > 0

    assert dice(back, mask[box]) > 0.95
    assert back.shape == tuple(s.stop - s.start for s in box)


def test_oblique_volume_crops_along_its_own_axes():
    angle = np.radians(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([2.036, 2.036, 3.0])
    affine[:3, 3] = (-60.0, -50.0, -90.0)
    shape = (60, 60, 60)
    mask = ball(shape, affine, affine[:3, :3] @ [30, 30, 30] + affine[:3, 3], 25.0).astype(np.uint8)
    geometry, _ = place_crop(affine, shape, [[30, 30, 30]], 64, 1.5)
    np.testing.assert_allclose(np.asarray(geometry.axes), rotation.T, atol=1e-9)
    box, logits = paste_logits(crop_volume(mask, affine, geometry) - 0.5, geometry, affine, shape)
    assert dice(logits > 0, mask[box]) > 0.95


def test_lps_and_permuted_copies_give_the_same_crop():
    rng = np.random.default_rng(3)
    suv = rng.random((40, 36, 30)).astype(np.float32)
    ras = affine_of((2.036, 2.036, 3.0), (-40.0, -36.0, -45.0))
    reference, _ = place_crop(ras, suv.shape, [[20, 18, 15]], 64, 1.5)
    expected = crop_volume(suv, ras, reference)
    for flip, order in [((0, 1), (0, 1, 2)), ((2,), (1, 2, 0))]:
        other, affine = same_image(suv, ras, flip, order)
        click = np.round(np.linalg.solve(affine[:3, :3], ras[:3, :3] @ [20, 18, 15] + ras[:3, 3] - affine[:3, 3]))
        geometry, _ = place_crop(affine, other.shape, [click], 64, 1.5)
        assert geometry == reference
        torch.testing.assert_close(crop_volume(other, affine, geometry), expected, atol=1e-5, rtol=0)


def test_normalisations():
    crop = torch.tensor([0.0, 1.0, 2.0, 3.0])
    torch.testing.assert_close(normalise(crop, "log_suv"), torch.log1p(crop))
    z = normalise(crop, "zscore_nonzero")
    torch.testing.assert_close(z[1:].mean(), torch.tensor(0.0))  # statistics of the voxels > 0 only
    assert z[0] == pytest.approx((0 - 2.0) / 1.0)
    with pytest.raises(ValueError, match="normalisation"):
        normalise(crop, "minmax")


# ----------------------------------------------------------------------------------------------
# Prompts


@pytest.mark.parametrize(
    ("prompts", "words"),
    [
        ({"foreground": [[48, 0, 0]]}, "outside the volume"),
        ({"foreground": [[1, 2, -1]]}, "outside the volume"),
        ({}, "click at least once on the object or draw a box"),
        ({"background": [[3, 3, 3]]}, "click at least once on the object or draw a box"),
        ({"box": [1, 2, 3, 4, 5, 6]}, "two corners"),
        ({"box": ((1, 2), (3, 4))}, "three voxel indices"),
        ({"box": ((5, 2, 3), (4, 6, 7))}, "beyond max corner"),
        ({"box": ((5, 2, 3), (9, 6, 70))}, "outside the volume"),
    ],
)
def test_bad_prompts_are_prompt_errors(small_model, prompts, words):
    session = Predictor(small_model).set_volume(blob_volume(), "blobs")
    with pytest.raises(PromptError, match=words):
        session.predict(**prompts)


def test_predict_before_set_volume_is_a_clear_error(small_model):
    with pytest.raises(RuntimeError, match="set_volume"):
        Predictor(small_model).predict(foreground=[[1, 1, 1]])


def test_previous_from_another_volume_is_refused(small_model):
    predictor = Predictor(small_model, max_windows=1)
    first = predictor.set_volume(blob_volume(), "a").predict(foreground=[[20, 20, 20]])
    with pytest.raises(PromptError, match="previous prediction"):
        predictor.set_volume(blob_volume(seed=1), "b").predict(foreground=[[20, 20, 21]], previous=first)


# ----------------------------------------------------------------------------------------------
# Model round trips


def test_mask_is_uint8_on_the_stored_grid_and_reports_its_work(small_model):
    volume = blob_volume()
    prediction = Predictor(small_model, max_windows=2).set_volume(volume).predict(foreground=[[24, 19, 37]])
    assert prediction.mask.shape == volume.shape and prediction.mask.dtype == np.uint8
    assert set(np.unique(prediction.mask)) <= {0, 1}
    assert prediction.low_res_logits.shape == (1, 1, SMALL.low_res_size, SMALL.low_res_size, SMALL.low_res_size)
    assert 1 <= prediction.windows <= 2 and len(prediction.window_results) == prediction.windows
    assert {"crop", "encode", "decode", "paste", "total"} <= set(prediction.latencies)
    assert prediction.latencies["encode"] > 0 and not prediction.cache_hit
    assert prediction.foreground == ((24, 19, 37),)
    assert prediction.volume_id.startswith("sha1:")


def test_second_click_nearby_reuses_the_embedding_and_far_click_does_not(small_model):
    predictor = Predictor(small_model, max_windows=1)
    calls = count_encoder_calls(small_model)
    session = predictor.set_volume(blob_volume(), "blobs")
    first = session.predict(foreground=[[24, 19, 37]])
    assert len(calls) == 1 and not first.cache_hit
    nearby = session.predict(foreground=[[25, 20, 38]])
    assert len(calls) == 1 and nearby.cache_hit and nearby.latencies["encode"] == 0
    far = session.predict(foreground=[[5, 40, 5]])
    assert len(calls) == 2 and not far.cache_hit
    # another id for the same array is another cache entry
    predictor.set_volume(session.volume, "renamed").predict(foreground=[[24, 19, 37]])
    assert len(calls) == 3


def test_a_preset_with_ensemble_spacings_reads_each_object_at_every_spacing(small_model):
    ensemble = copy.deepcopy(small_model)  # the same weights, served at 3 and 2.5 mm
    ensemble.preset = dataclasses.replace(SMALL, ensemble_spacings_mm=(2.5,))
    calls = count_encoder_calls(ensemble)
    session = Predictor(ensemble, max_windows=1).set_volume(blob_volume(), "blobs")
    first = session.predict(foreground=[[24, 19, 37]])
    assert len(calls) == 2 and first.windows == 2
    assert [w.geometry.spacing for w in first.window_results] == [3.0, 2.5] and first.geometry.spacing == 3.0
    assert first.iou == pytest.approx(np.mean([w.iou for w in first.window_results]))
    windows = [(w.geometry, w.low_res_logits[0, 0]) for w in first.window_results]
    np.testing.assert_array_equal(first.mask, paste_mask(windows, session.volume.affine, session.volume.shape)[0])
    refined = session.predict(foreground=[[25, 20, 38]], previous=first)  # each spacing reuses its own crop
    assert len(calls) == 2 and refined.cache_hit
    alone = Predictor(ensemble, max_windows=1, scale_ensemble=False).set_volume(session.volume, "blobs")
    single = alone.predict(foreground=[[24, 19, 37]])
    assert single.windows == 1 and single.geometry == first.geometry
    with pytest.raises(ValueError, match="ensemble_spacings_mm"):
        dataclasses.replace(SMALL, ensemble_spacings_mm=(SMALL.spacing_mm,))


def test_cache_is_bounded_lru(small_model):
    predictor = Predictor(small_model, cache_size=1, max_windows=1)
    calls = count_encoder_calls(small_model)
    session = predictor.set_volume(blob_volume(), "blobs")
    for click in ([24, 19, 37], [5, 40, 5], [24, 19, 37]):
        session.predict(foreground=[click])
    assert len(calls) == 3


def test_previous_prediction_becomes_the_mask_prompt_and_clicks_accumulate(small_model):
    dense_inputs, mask_prompts = [], []
    handles = [
        small_model.mask_decoder.register_forward_hook(lambda _m, args, _o: dense_inputs.append(args[3])),
        small_model.prompt_encoder.register_forward_pre_hook(
            lambda _m, _a, kwargs: mask_prompts.append(kwargs["masks"]), with_kwargs=True
        ),
    ]
    try:
        predictor = Predictor(small_model, max_windows=1)
        session = predictor.set_volume(blob_volume(), "blobs")
        first = session.predict(foreground=[[24, 19, 37]])
        second = session.predict(background=[[26, 19, 37]], previous=first)
        moved = session.predict(foreground=[[5, 40, 5]], previous=second)  # the crop moves: pasted mask
    finally:
        for handle in handles:
            handle.remove()
    no_mask = small_model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand_as(dense_inputs[0])
    torch.testing.assert_close(dense_inputs[0], no_mask)
    assert not torch.allclose(dense_inputs[1], no_mask) and not torch.allclose(dense_inputs[2], no_mask)
    assert second.geometry == first.geometry and moved.geometry != first.geometry
    # same crop: the previous low-res logits themselves; moved crop: the pasted mask as +-8 logits
    assert mask_prompts[0] is None
    torch.testing.assert_close(mask_prompts[1], first.low_res_logits)
    assert mask_prompts[2].abs().max() <= 8.0 and mask_prompts[2].min() == -8.0
    assert second.foreground == ((24, 19, 37),) and second.background == ((26, 19, 37),)
    assert moved.foreground == ((24, 19, 37), (5, 40, 5))
    # re-clicking a foreground voxel as background moves it
    third = session.predict(background=[[24, 19, 37]], previous=moved)
    assert third.foreground == ((5, 40, 5),) and third.background == ((26, 19, 37), (24, 19, 37))
    # sending every click again (as some clients do) counts each once
    again = session.predict(foreground=[[24, 19, 37], [5, 40, 5]], background=[[26, 19, 37]], previous=moved)
    assert again.foreground == moved.foreground and again.background == moved.background


def test_box_and_clicks_reach_the_prompt_encoder_in_crop_indices(small_model):
    volume = blob_volume(shape=(40, 36, 30), spacing=(2.036, 2.036, 3.0))
    suv, affine = same_image(volume.suv, volume.affine, flip=(0, 1))  # LPS: the box corners swap in the crop
    seen = {}
    handle = small_model.prompt_encoder.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    try:
        session = Predictor(small_model, max_windows=1).set_volume(PETVolume(suv, affine))
        box = ((10, 12, 8), (18, 20, 16))
        prediction = session.predict(box=box)
        boxes_alone, points_alone = seen["boxes"], seen["points"]
        session.predict(foreground=[[14, 15, 12]], box=box)
    finally:
        handle.remove()
    corners = prediction.geometry.stored_to_crop(affine, box)
    expected = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
    np.testing.assert_allclose(boxes_alone[0].numpy(), expected, atol=1e-4)
    assert corners[0, 0] > corners[1, 0]  # stored axis 0 runs right to left
    assert points_alone is None
    coords, labels = seen["points"]
    np.testing.assert_allclose(coords[0].numpy(), prediction.geometry.stored_to_crop(affine, [[14, 15, 12]]), atol=1e-4)
    assert labels.tolist() == [[1]]


def test_same_inputs_same_mask(small_model):
    volume = blob_volume()
    masks = []
    for _ in range(2):
        predictor = Predictor(small_model, max_windows=1)
        masks.append(predictor.set_volume(volume).predict(foreground=[[24, 19, 37]], box=((20, 15, 30), (28, 24, 44))))
    np.testing.assert_array_equal(masks[0].mask, masks[1].mask)
    assert masks[0].iou == masks[1].iou


def test_lps_copy_gives_the_same_mask_as_ras(small_model):
    volume = blob_volume(shape=(40, 36, 30), spacing=(2.036, 2.036, 3.0))
    click = [24, 10, 20]
    predictor = Predictor(small_model, max_windows=1)
    ras = predictor.set_volume(volume).predict(foreground=[click])
    suv, affine = same_image(volume.suv, volume.affine, flip=(0, 1))
    lps_click = [volume.shape[0] - 1 - click[0], volume.shape[1] - 1 - click[1], click[2]]
    lps = predictor.set_volume(PETVolume(suv, affine)).predict(foreground=[lps_click])
    assert lps.geometry == ras.geometry
    assert dice(np.flip(lps.mask, (0, 1)), ras.mask) > 0.99


def test_sessions_on_two_volumes_in_two_threads_match_sequential_results(small_model):
    predictor = Predictor(small_model, max_windows=1)
    jobs = [(blob_volume(seed=0), "a", [[24, 19, 37]]), (blob_volume(seed=1), "b", [[10, 30, 20]])]

    def run(job):
        volume, volume_id, clicks = job
        session = predictor.set_volume(volume, volume_id)
        first = session.predict(foreground=clicks)
        return session.predict(background=[[c + 2 for c in clicks[0]]], previous=first).mask

    sequential = [run(job) for job in jobs]
    predictor.clear_cache()
    start = threading.Barrier(2)

    def run_together(job):
        start.wait()
        return run(job)

    with ThreadPoolExecutor(2) as pool:
        concurrent = list(pool.map(run_together, jobs))
    for alone, together in zip(sequential, concurrent, strict=True):
        np.testing.assert_array_equal(alone, together)


# ----------------------------------------------------------------------------------------------
# Windows for objects larger than one crop


def test_touched_faces_on_constructed_masks():
    mask = np.zeros((32, 32, 32), bool)
    assert touched_faces(mask) == []
    mask[10:20, 10:20, 10:20] = True
    assert touched_faces(mask) == []
    mask[10:20, 10:20, 20:32] = True
    assert touched_faces(mask) == [(2, +1)]
    mask[0, 15, 15] = True
    assert touched_faces(mask) == [(0, -1), (2, +1)]


def test_extension_windows_only_where_the_volume_continues():
    affine = affine_of((4.0, 4.0, 4.0))
    shape = (128, 128, 240)
    geometry, _ = place_crop(affine, shape, [[64, 64, 120]], SMALL.crop_size, SMALL.spacing_mm)
    mask = np.zeros((32, 32, 32), bool)
    mask[12:20, 12:20, 16:] = True  # leaves through the high face of axis 2
    (window,) = extension_windows(mask, geometry, affine, shape)
    np.testing.assert_allclose(
        np.subtract(window.origin, geometry.origin), [0, 0, SMALL.spacing_mm * SMALL.crop_size // 2]
    )
    # the same crop pushed against the top of the volume: nothing beyond that face
    top, _ = place_crop(affine, shape, [[64, 64, 239]], SMALL.crop_size, SMALL.spacing_mm)
    assert top.volume_extent(affine, shape)[1][2] <= SMALL.crop_size - 0.5
    assert extension_windows(mask, top, affine, shape) == []


def test_overlapping_windows_merge_by_the_larger_logit():
    affine = affine_of((4.0, 4.0, 4.0))
    shape = (60, 60, 120)
    first, _ = place_crop(affine, shape, [[30, 30, 40]], SMALL.crop_size, SMALL.spacing_mm)
    second = first.shifted([0, 0, SMALL.crop_size // 2])
    low_res = (SMALL.low_res_size,) * 3
    yes, no = torch.full(low_res, 2.0), torch.full(low_res, -2.0)
    for windows in ([(first, yes), (second, no)], [(second, no), (first, yes)]):
        mask, region = paste_mask(windows, affine, shape)
        assert mask[region].sum() == mask.sum()
        np.testing.assert_array_equal(mask[first.covered_box(affine, shape)], 1)  # overlap included
        assert mask.sum() == np.prod([s.stop - s.start for s in first.covered_box(affine, shape)])
    assert paste_mask([(first, no), (second, no)], affine, shape)[0].sum() == 0


def test_a_scale_ensemble_averages_its_spacings_and_counts_unseen_voxels_as_background():
    affine = affine_of((4.0, 4.0, 4.0))
    shape = (60, 60, 120)
    coarse, _ = place_crop(affine, shape, [[30, 30, 60]], SMALL.crop_size, SMALL.spacing_mm)
    fine, _ = place_crop(affine, shape, [[30, 30, 60]], SMALL.crop_size, SMALL.spacing_mm / 2)
    low_res = (SMALL.low_res_size,) * 3
    coarse_box, fine_box = coarse.covered_box(affine, shape), fine.covered_box(affine, shape)
    outside_fine = np.ones(shape, bool)
    outside_fine[fine_box] = False
    for fine_logit, inside_expected in ((-1.0, 1), (-3.0, 0)):  # mean of +2 and -1 is positive, of +2 and -3 not
        mask, region = paste_mask([(coarse, torch.full(low_res, 2.0)), (fine, torch.full(low_res, fine_logit))],
                                  affine, shape)
        assert region == coarse_box
        np.testing.assert_array_equal(mask[fine_box], inside_expected)
        assert not mask[outside_fine].any()  # only the coarse spacing looked there: outvoted by OUTSIDE_LOGIT


class _Pool(nn.Module):
    """'Embedding' = the normalised crop averaged down to the low-res grid."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.dtype_anchor = nn.Parameter(torch.zeros(1))

    def forward(self, image):
        return F.adaptive_avg_pool3d(image, self.size)


class _NoPrompts(nn.Module):
    def forward(self, points=None, boxes=None, masks=None):
        return torch.zeros(1, 0, 1), torch.zeros(1)

    def get_dense_pe(self):
        return torch.zeros(1)


class _Threshold(nn.Module):
    def __init__(self, level: float):
        super().__init__()
        self.level = level

    def forward(self, image_embeddings, image_pe, sparse, dense, multimask_output=False):
        return image_embeddings - self.level, torch.ones(1, 1)


class ThresholdModel(nn.Module):
    """A stand-in 3D SAM whose mask is the crop's bright voxels: tests geometry end to end, exactly."""

    def __init__(self, inside_suv: float = 10.0, outside_suv: float = 1.0):
        super().__init__()
        self.preset = SMALL  # log_suv normalisation: threshold halfway between the two in log(1 + SUV)
        self.image_encoder = _Pool(SMALL.low_res_size)
        self.prompt_encoder = _NoPrompts()
        self.mask_decoder = _Threshold(float(np.log1p(inside_suv) + np.log1p(outside_suv)) / 2)
        self.inference_dtype = "float32"

    def embed(self, image):
        return self.image_encoder(image)


class _BlindInsideThreshold(_Threshold):
    """Answers nothing when the crop holds no background: one spacing blind to an object another sees."""

    def forward(self, image_embeddings, image_pe, sparse, dense, multimask_output=False):
        logits, iou = super().forward(image_embeddings, image_pe, sparse, dense, multimask_output)
        return (logits if (logits < 0).any() else torch.full_like(logits, -1.0)), iou


def test_a_spacing_that_finds_nothing_abstains_from_the_ensemble():
    shape, spacing = (60, 60, 60), (4.0, 4.0, 4.0)
    affine = affine_of(spacing, -(np.asarray(shape) - 1) / 2 * np.asarray(spacing))
    truth = ball(shape, affine, (0, 0, 0), 75)  # the 64 mm crop at 1 mm lies wholly inside it
    volume = PETVolume(np.where(truth, 10.0, 1.0).astype(np.float32), affine)
    model = ThresholdModel()
    model.mask_decoder = _BlindInsideThreshold(model.mask_decoder.level)
    model.preset = dataclasses.replace(SMALL, ensemble_spacings_mm=(1.0,))
    click = [[30, 30, 30]]
    ensemble = Predictor(model).set_volume(volume).predict(foreground=click)
    assert ensemble.windows == 2 and not (ensemble.window_results[1].low_res_logits > 0).any()
    coarse_alone = Predictor(model, scale_ensemble=False).set_volume(volume).predict(foreground=click)
    np.testing.assert_array_equal(ensemble.mask, coarse_alone.mask)
    assert dice(ensemble.mask, truth) > 0.9


def rod_volume():
    """A bright rod 40 mm thick along the last axis over 640 mm of an 880 mm long anisotropic LPS volume."""
    shape = (80, 80, 294)
    ras = affine_of((2.036, 2.036, 3.0), (-80.0, -80.0, -440.0))
    world = world_grid(shape, ras)
    rod = (np.linalg.norm(world[..., :2], axis=-1) <= 20) & (np.abs(world[..., 2]) <= 320)
    suv = np.where(rod, 10.0, 1.0).astype(np.float32)
    suv, affine = same_image(suv, ras, flip=(0, 1))
    rod, _ = same_image(rod.astype(np.uint8), ras, flip=(0, 1))
    return PETVolume(suv, affine), rod.astype(bool)


def test_objects_longer_than_a_crop_are_followed_by_windows_up_to_the_cap():
    volume, rod = rod_volume()
    click = [40, 40, 147]
    whole = Predictor(ThresholdModel(), max_windows=8).set_volume(volume).predict(foreground=[click])
    # 192 mm crops shifted 96 mm: 3 more per side reach 96 + 3 * 96 = 384 mm > 320 mm from the click
    assert whole.windows == 7
    assert dice(whole.mask, rod) > 0.9
    # no slice of the rod is lost where windows meet (its ends blur over one 6 mm low-res voxel)
    rod_slices = np.flatnonzero(rod.any(axis=(0, 1)))[2:-2]
    recall = (whole.mask.astype(bool) & rod)[:, :, rod_slices].sum(axis=(0, 1)) / rod[:, :, rod_slices].sum(axis=(0, 1))
    assert recall.min() > 0.9
    assert not whole.notes

    for cap in (1, 2, 4):
        capped = Predictor(ThresholdModel(), max_windows=cap).set_volume(volume).predict(foreground=[click])
        assert capped.windows == cap
        assert "max_windows" in capped.notes[0]
        assert capped.mask.sum() < whole.mask.sum()


def ball_volume(shape, origin_mm, centre_mm, radius_mm) -> tuple[PETVolume, np.ndarray]:
    """A hot ball (SUV 10 in 1) in an anisotropic LPS volume (2.036 x 2.036 x 3 mm), and the ball's voxels."""
    ras = affine_of((2.036, 2.036, 3.0), origin_mm)
    truth = ball(shape, ras, centre_mm, radius_mm)
    suv, affine = same_image(np.where(truth, 10.0, 1.0).astype(np.float32), ras, flip=(0, 1))
    truth, _ = same_image(truth, ras, flip=(0, 1))
    return PETVolume(suv, affine), truth


def test_threshold_model_recovers_a_ball_in_an_anisotropic_lps_volume():
    volume, truth = ball_volume((90, 90, 60), (-90.0, -90.0, -90.0), (10.0, -5.0, 0.0), 25.0)
    centre = np.round(np.argwhere(truth).mean(axis=0)).astype(int)
    prediction = Predictor(ThresholdModel()).set_volume(volume).predict(foreground=[centre])
    assert prediction.windows == 1
    assert dice(prediction.mask, truth) > 0.95


def test_foreground_clicks_the_mask_leaves_out_are_named_in_a_note():
    volume, truth = ball_volume((150, 80, 60), (-150.0, -80.0, -90.0), (80.0, 0.0, 0.0), 15.0)
    session = Predictor(ThresholdModel()).set_volume(volume)
    centre = [int(v) for v in np.round(np.argwhere(truth).mean(axis=0))]
    assert not session.predict(foreground=[centre]).notes

    beside = [centre[0], centre[1], centre[2] + 8]  # 24 mm from the centre of a ball of radius 15 mm: cold, same crop
    assert not truth[tuple(beside)]
    partial = session.predict(foreground=[centre, beside])
    assert partial.mask.any()
    assert partial.notes == (f"the mask leaves out the foreground click(s) {[beside]}: the model does not see them "
                             "as part of the object; a click beside them or a box around the object asks again",)

    far = [149 - centre[0], *centre[1:]]  # ~157 mm away: its crop (96 mm) holds none of the ball
    nothing = session.predict(foreground=[far])
    assert not nothing.mask.any()
    assert len(nothing.notes) == 1
    assert nothing.notes[0].startswith(f"no lesion found at the foreground click(s) {[far]}")


def test_real_model_windows_never_exceed_the_cap_and_small_volumes_need_one(small_model):
    # force a mask filling every crop: it touches all faces
    handle = small_model.mask_decoder.register_forward_hook(lambda _m, _a, out: (out[0].abs() + 1.0, out[1]))
    try:
        big = Predictor(small_model, max_windows=3).set_volume(blob_volume(shape=(64, 64, 120))).predict(
            foreground=[[32, 32, 60]]
        )
        tiny = Predictor(small_model, max_windows=3).set_volume(blob_volume(shape=(30, 30, 30))).predict(
            foreground=[[15, 15, 15]]
        )
    finally:
        handle.remove()
    assert big.windows == 3 and big.mask.sum() > np.prod([SMALL.crop_size * SMALL.spacing_mm / 4] * 3)
    assert tiny.windows == 1 and tiny.mask.all()


def test_prefetched_crops_answer_a_click_as_it_would_be_answered_cold(small_model):
    volume, click = blob_volume(), [34, 12, 45]
    cold = Predictor(small_model, max_windows=1).set_volume(volume, "blobs").predict(foreground=[click])
    predictor = Predictor(small_model, max_windows=1)
    session = predictor.set_volume(volume, "blobs")
    assert predictor.prefetch(session, session.click_crops([click])) == 1
    calls = count_encoder_calls(small_model)
    warm = session.predict(foreground=[click])
    assert not calls and warm.cache_hit and not cold.cache_hit
    np.testing.assert_array_equal(warm.mask, cold.mask)
    assert predictor.prefetch(session, session.click_crops([click])) == 0  # cached already: nothing to do


def test_prefetch_waits_while_a_click_is_answered_and_stops_when_cancelled(small_model):
    predictor = Predictor(small_model, max_windows=1)
    session = predictor.set_volume(blob_volume(), "blobs")
    crops = session.click_crops([[8, 8, 8], [40, 40, 52]])
    calls = count_encoder_calls(small_model)
    with predictor.answering():
        worker = threading.Thread(target=predictor.prefetch, args=(session, crops))
        worker.start()
        worker.join(timeout=0.3)
        assert worker.is_alive() and not calls  # waiting for the click to be answered
    worker.join(timeout=30)
    assert len(calls) == len(crops) == 2
    predictor.clear_cache()
    assert predictor.prefetch(session, crops, cancelled=lambda: True) == 0
