"""Label-noise injection: what the record says was done is what was done."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from segany_pet.phantom import NOISE_KINDS, inject_label_noise, write_cohort, write_noisy_labels
from segany_pet.phantom.label_noise import IMAGE_KINDS

SPACING = (4.0, 4.0, 4.0)
CENTRES = ((12, 12, 12), (12, 30, 30), (30, 12, 40), (30, 32, 14))
RADII = (3, 4, 2, 5)


def instance_map() -> np.ndarray:
    """Four spheres of different radii in a 44 x 44 x 52 box, far from each other."""
    lesions = np.zeros((44, 44, 52), dtype=np.int16)
    grid = np.indices(lesions.shape)
    for lesion_id, (centre, radius) in enumerate(zip(CENTRES, RADII, strict=True), start=1):
        ball = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2
        lesions[ball] = lesion_id
    return lesions


def suv_image(lesions: np.ndarray) -> np.ndarray:
    """Lesions of SUV 8 with a blurred rim, and one hot 'organ' (SUV 20) well away from them."""
    suv = np.where(lesions > 0, 8.0, 1.0)
    suv[36:42, 36:42, 2:8] = 20.0
    return ndimage.gaussian_filter(suv, 1.0).astype(np.float32)


def dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def only(kind: str, seed: int = 0):
    lesions = instance_map()
    noisy, record = inject_label_noise(lesions, SPACING, seed, rate=1.0, kinds=[kind])
    assert record["corrupted"] and [op["kind"] for op in record["operations"]] == [kind]
    return lesions, noisy, record["operations"][0], record


def test_without_an_image_no_image_kind_is_drawn():
    lesions = instance_map()
    for seed in range(40):
        _, record = inject_label_noise(lesions, SPACING, seed, rate=1.0)
        assert not {op["kind"] for op in record["operations"]} & set(IMAGE_KINDS)
    with pytest.raises(ValueError, match="shape"):
        inject_label_noise(lesions, SPACING, 0, rate=1.0, suv=np.ones((4, 4, 4)))


def test_threshold_outlines_are_the_41_percent_regions_of_the_chosen_lesions():
    lesions = instance_map()
    suv = suv_image(lesions)
    for seed in range(5):
        noisy, record = inject_label_noise(lesions, SPACING, seed, rate=1.0, kinds=["threshold"], suv=suv)
        if not record["operations"]:  # the chosen lesions' outlines matched their labels: no corruption
            assert record["corrupted"] is False and np.array_equal(noisy > 0, lesions > 0)
            continue
        operation = record["operations"][0]
        for lesion_id in range(1, 5):
            true = lesions == lesion_id
            near = ndimage.binary_dilation(true, iterations=3)
            if lesion_id in operation["lesion_ids"]:  # the blurred rim above 41% of SUVmax joins the outline
                assert np.array_equal(noisy[near] > 0, suv[near] >= 0.41 * suv[true].max())
            else:
                assert np.array_equal(noisy[near] > 0, true[near])
        assert operation["voxels_added"] == int(((noisy > 0) & (lesions == 0)).sum()) > 0


def test_organ_uptake_is_labelled_away_from_every_lesion():
    lesions = instance_map()
    suv = suv_image(lesions)
    distance = ndimage.distance_transform_edt(lesions == 0, sampling=SPACING)
    for seed in range(5):
        noisy, record = inject_label_noise(lesions, SPACING, seed, rate=1.0, kinds=["organ"], suv=suv)
        added = (noisy > 0) & (lesions == 0)
        assert added.any() and np.array_equal(noisy[lesions > 0], np.ones(int((lesions > 0).sum()), np.uint8))
        assert distance[added].min() > 20.0 and suv[added].min() > 0.41 * 20.0 * 0.5
        assert record["operations"][0]["voxels_added"] == int(added.sum())


def test_rate_zero_changes_nothing():
    lesions = instance_map()
    for seed in range(20):
        noisy, record = inject_label_noise(lesions, SPACING, seed, rate=0.0)
        assert noisy.dtype == np.uint8 and np.array_equal(noisy, (lesions > 0).astype(np.uint8))
        assert record["corrupted"] is False and record["operations"] == [] and record["dice"] == 1.0


def test_rate_one_corrupts_every_case_and_dice_is_reported():
    lesions = instance_map()
    kinds_seen = set()
    suv = suv_image(lesions)
    for seed in range(40):
        noisy, record = inject_label_noise(lesions, SPACING, seed, rate=1.0, suv=suv)
        assert record["corrupted"] is True and 1 <= len(record["operations"]) <= 3
        assert not np.array_equal(noisy, lesions > 0)
        assert record["dice"] == pytest.approx(dice(noisy > 0, lesions > 0), abs=1e-6)
        assert record["noisy_voxels"] == int(noisy.sum()) and record["true_voxels"] == int((lesions > 0).sum())
        kinds_seen |= {op["kind"] for op in record["operations"]}
    assert kinds_seen == set(NOISE_KINDS)


def test_rate_sets_the_share_of_corrupted_cases():
    lesions = instance_map()
    corrupted = [inject_label_noise(lesions, SPACING, seed, rate=0.3)[1]["corrupted"] for seed in range(200)]
    assert 0.2 < np.mean(corrupted) < 0.4


def test_same_seed_same_noise_and_seeds_differ():
    lesions = instance_map()
    a = inject_label_noise(lesions, SPACING, 42, rate=1.0)
    b = inject_label_noise(lesions, SPACING, 42, rate=1.0)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    others = [inject_label_noise(lesions, SPACING, seed, rate=1.0)[0] for seed in range(43, 48)]
    assert any(not np.array_equal(a[0], other) for other in others)


def test_missed_lesions_are_truly_absent_and_the_rest_untouched():
    for seed in range(10):
        lesions, noisy, operation, _ = only("missed", seed)
        dropped = operation["lesion_ids"]
        assert dropped and set(dropped) <= {1, 2, 3, 4}
        for lesion_id in range(1, 5):
            inside = noisy[lesions == lesion_id]
            assert (inside == 0).all() if lesion_id in dropped else (inside == 1).all()
        assert operation["voxels_removed"] == int(np.isin(lesions, dropped).sum())
        assert not noisy[lesions == 0].any()


def test_over_segmentation_grows_exactly_the_chosen_lesions():
    for seed in range(10):
        lesions, noisy, operation, _ = only("over", seed)
        assert 1 <= operation["radius_voxels"] <= 3
        grown = set(operation["lesion_ids"])
        parts, _ = ndimage.label(noisy, structure=np.ones((3, 3, 3)))
        for lesion_id in range(1, 5):
            component = parts == parts[CENTRES[lesion_id - 1]]
            true = lesions == lesion_id
            assert (component & true).sum() == true.sum()  # nothing lost
            assert (component.sum() > true.sum()) == (lesion_id in grown)
        assert operation["voxels_added"] == int(noisy.sum() - (lesions > 0).sum())


def test_under_segmentation_shrinks_but_keeps_every_lesion():
    for seed in range(10):
        lesions, noisy, operation, _ = only("under", seed)
        assert 1 <= operation["radius_voxels"] <= 2
        for lesion_id in range(1, 5):
            kept = noisy[lesions == lesion_id]
            assert kept.any()
            assert (kept.sum() < kept.size) == (lesion_id in operation["lesion_ids"])
        assert not noisy[lesions == 0].any()
        assert operation["voxels_removed"] == int((lesions > 0).sum() - noisy.sum())


def test_shift_moves_the_chosen_lesions_by_the_recorded_offset():
    for seed in range(10):
        lesions, noisy, operation, _ = only("shift", seed)
        offset = np.array(operation["offset_voxels"])
        assert offset.any() and np.allclose(operation["offset_mm"], offset * SPACING)
        assert 3.0 - 4.0 <= np.linalg.norm(offset * SPACING) <= 8.0 + 4.0  # a few mm, rounded to voxels
        for lesion_id in range(1, 5):
            true = lesions == lesion_id
            if lesion_id in operation["lesion_ids"]:
                moved = np.roll(true, tuple(offset), axis=(0, 1, 2))
                assert (noisy[moved] == 1).all()
            else:
                assert (noisy[true] == 1).all()


def test_spurious_components_appear_inside_the_body_away_from_lesions():
    lesions = instance_map()
    body = np.zeros(lesions.shape, dtype=bool)
    body[:, :, 26:] = True
    for seed in range(10):
        noisy, record = inject_label_noise(lesions, SPACING, seed, rate=1.0, kinds=["spurious"], body=body)
        operation = record["operations"][0]
        blobs = operation["components"]
        _, n_components = ndimage.label(noisy, structure=np.ones((3, 3, 3)))
        assert n_components == 4 + len(blobs)
        assert np.array_equal(noisy[lesions > 0], np.ones(int((lesions > 0).sum()), np.uint8))
        for blob in blobs:
            assert body[tuple(blob["centre_voxel"])] and noisy[tuple(blob["centre_voxel"])] == 1
        assert operation["voxels_added"] == int(noisy.sum() - (lesions > 0).sum())


def test_boundary_jitter_only_flips_voxels_at_the_boundary():
    for seed in range(10):
        lesions, noisy, operation, _ = only("jitter", seed)
        truth = lesions > 0
        band = ndimage.binary_dilation(truth, np.ones((3, 3, 3))) & ~ndimage.binary_erosion(truth, np.ones((3, 3, 3)))
        changed = (noisy > 0) != truth
        assert changed.any() and not (changed & ~band).any()
        assert 0.15 <= operation["flip_probability"] <= 0.35
        assert operation["voxels_added"] == int((changed & ~truth).sum())
        assert operation["voxels_removed"] == int((changed & truth).sum())


def test_empty_case_can_only_get_spurious_components():
    empty = np.zeros((30, 30, 30), dtype=np.int16)
    noisy, record = inject_label_noise(empty, SPACING, 1, rate=1.0)
    assert [op["kind"] for op in record["operations"]] == ["spurious"] and noisy.any()
    assert record["dice"] == 0.0
    noisy, record = inject_label_noise(empty, SPACING, 1, rate=1.0, kinds=["over", "missed"])
    assert record["corrupted"] is False and not noisy.any() and record["dice"] == 1.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kinds"):
        inject_label_noise(instance_map(), SPACING, 0, 1.0, kinds=["smudge"])
    with pytest.raises(ValueError, match="rate"):
        inject_label_noise(instance_map(), SPACING, 0, 1.5)


def test_write_noisy_labels_for_a_cohort(tmp_path):
    cohort = tmp_path / "cohort"
    ids = write_cohort(cohort, 2, tracer="psma", seed=4, progress=False)
    summary = write_noisy_labels(cohort, tmp_path / "noisy", rate=1.0, seed=9)
    records = json.loads((tmp_path / "noisy" / "noise_records.json").read_text())
    assert records == json.loads(json.dumps(summary)) and sorted(records["cases"]) == sorted(ids)
    for case_id in ids:
        label = nib.load(tmp_path / "noisy" / f"{case_id}.nii.gz")
        truth = nib.load(cohort / "truth" / f"{case_id}_lesions.nii.gz")
        assert label.get_data_dtype() == np.uint8 and np.allclose(label.affine, truth.affine)
        noisy = np.asarray(label.dataobj)
        record = records["cases"][case_id]
        assert record["corrupted"] is True
        assert record["dice"] == pytest.approx(dice(noisy > 0, np.asarray(truth.dataobj) > 0), abs=1e-6)
    again = write_noisy_labels(cohort, tmp_path / "again", rate=1.0, seed=9)
    assert again == summary
    clean = write_noisy_labels(cohort, tmp_path / "clean", rate=0.0, seed=9)
    assert not any(record["corrupted"] for record in clean["cases"].values())
