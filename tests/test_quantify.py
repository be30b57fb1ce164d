import json

import numpy as np
import pytest
from scipy import ndimage

from segany_pet.errors import UserInputError
from segany_pet.pet.quantify import LESION_CONNECTIVITY, label_in_box, label_lesions, quantify, sphere_kernel


def brute_force_suvpeak(suv, lesion, spacing, radius=6.2):
    """Sphere mean at every lesion voxel by direct summation: the definition, slowly."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in suv.shape], indexing="ij"), axis=-1)
    best = -np.inf
    for centre in np.argwhere(lesion):
        dist = np.sqrt((((grid - centre) * np.asarray(spacing)) ** 2).sum(axis=-1))
        best = max(best, suv[dist <= radius].mean())
    return best


def test_block_of_known_suvs_gives_hand_computed_measures():
    suv = np.zeros((9, 9, 9), dtype=np.float32)
    suv[3:6, 3:6, 3:6] = np.arange(1, 28, dtype=np.float32).reshape(3, 3, 3)
    mask = suv > 0

    result = quantify(suv, mask, (2.0, 2.0, 2.0))

    (lesion,) = result["lesions"]
    assert lesion["id"] == 1
    assert lesion["voxels"] == 27
    assert lesion["centre_voxel"] == [4, 4, 4]
    assert lesion["suvmax"] == 27.0
    assert lesion["suvmean"] == 14.0  # (1 + ... + 27) / 27
    assert lesion["mtv_ml"] == pytest.approx(0.216)  # 27 voxels * 8 mm^3
    assert lesion["tlg"] == pytest.approx(14.0 * 0.216)
    assert result["total"] == {"count": 1, "mtv_ml": 0.216, "tlg": 3.024, "suvmax": 27.0}


def test_sphere_kernel_holds_the_voxels_whose_centres_lie_within_the_radius():
    # Integer points with x^2 + y^2 + z^2 <= 9.61 at 2 mm: 123 voxels, 0.984 mL.
    assert sphere_kernel((2.0, 2.0, 2.0), 6.2).sum() == 123
    # At 2 x 2 x 3 mm: 29 in the central plane, 21 in each neighbour, 1 two planes away.
    kernel = sphere_kernel((2.0, 2.0, 3.0), 6.2)
    assert kernel.shape == (7, 7, 5)
    assert kernel.sum() == 73


def test_suvpeak_sphere_reaches_outside_the_lesion_to_its_best_position():
    suv = np.zeros((21, 21, 21), dtype=np.float32)
    suv[10, 10, 5:10] = 1.0  # a rod-shaped lesion of SUV 1
    mask = suv > 0
    suv[10, 10, 12] = 123.0  # hot voxel outside the lesion, 6 mm beyond its end voxel (10, 10, 9)

    (lesion,) = quantify(suv, mask, (2.0, 2.0, 2.0))["lesions"]

    # Only the sphere centred on (10, 10, 9) reaches the hot voxel (6 mm <= 6.2 mm, the next voxel is at
    # 8 mm); it also covers 4 rod voxels (k = 6..9) out of its 123.
    assert lesion["suvmax"] == 1.0
    assert lesion["suvpeak"] == pytest.approx((123 + 4) / 123, abs=1e-4)


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (2.036, 2.036, 3.0), (4.0, 1.5, 2.5)])
def test_suvpeak_matches_direct_summation_including_at_the_volume_edge(spacing):
    rng = np.random.default_rng(7)
    suv = rng.gamma(2.0, 2.0, size=(12, 11, 10)).astype(np.float32)
    mask = np.zeros(suv.shape, dtype=bool)
    mask[0:3, 4:8, 6:10] = True  # touches two faces of the volume, where spheres are cut off

    (lesion,) = quantify(suv, mask, spacing)["lesions"]

    assert lesion["suvpeak"] == pytest.approx(brute_force_suvpeak(suv, mask, spacing), abs=1e-4)


def test_two_lesions_sorted_by_volume_with_summed_totals():
    suv = np.ones((20, 20, 20), dtype=np.float32)
    mask = np.zeros(suv.shape, dtype=bool)
    mask[1:3, 1:3, 1:3] = True  # small lesion first in raster order: 8 voxels, SUV 2
    suv[1:3, 1:3, 1:3] = 2.0
    mask[10:13, 10:13, 10:13] = True  # larger: 27 voxels, SUV 5
    suv[10:13, 10:13, 10:13] = 5.0

    result = quantify(suv, mask, (2.0, 2.0, 2.0))

    big, small = result["lesions"]
    assert (big["id"], big["voxels"], big["suvmean"]) == (1, 27, 5.0)
    assert (small["id"], small["voxels"], small["suvmean"]) == (2, 8, 2.0)
    assert big["tlg"] == pytest.approx(5.0 * 0.216)
    assert small["tlg"] == pytest.approx(2.0 * 0.064)
    total = result["total"]
    assert total["count"] == 2
    assert total["mtv_ml"] == pytest.approx(0.28)
    assert total["tlg"] == pytest.approx(1.08 + 0.128)
    assert total["suvmax"] == 5.0
    labels, count = label_lesions(mask)
    assert count == 2 and labels[11, 11, 11] == 1 and labels[1, 1, 1] == 2
    # A box known to hold the mask (the predictor's pasted windows) gives the same numbers, voxels included.
    assert quantify(suv, mask, (2.0, 2.0, 2.0), region=(slice(0, 15), slice(1, 14), slice(0, 20))) == result


def test_voxels_touching_only_at_a_corner_are_one_lesion():
    mask = np.zeros((6, 6, 6), dtype=bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True
    result = quantify(np.ones(mask.shape, dtype=np.float32), mask, (1.0, 1.0, 1.0))
    assert result["total"]["count"] == 1
    assert result["lesions"][0]["voxels"] == 2


def test_anisotropic_spacing_sets_the_voxel_volume():
    suv = np.zeros((8, 8, 8), dtype=np.float32)
    suv[2:5, 2:5, 2:5] = 3.0
    (lesion,) = quantify(suv, suv > 0, (2.0, 2.0, 3.0))["lesions"]
    assert lesion["mtv_ml"] == pytest.approx(27 * 0.012)
    assert lesion["tlg"] == pytest.approx(3.0 * 27 * 0.012)


def test_empty_mask_gives_no_lesions_and_zero_totals():
    suv = np.ones((5, 5, 5), dtype=np.float32)
    result = quantify(suv, np.zeros(suv.shape, dtype=np.uint8), (2.0, 2.0, 2.0))
    assert result == {"lesions": [], "total": {"count": 0, "mtv_ml": 0.0, "tlg": 0.0, "suvmax": 0.0}}


def test_result_is_plain_json():
    rng = np.random.default_rng(0)
    suv = rng.random((10, 10, 10), dtype=np.float32) * 10
    result = quantify(suv, suv > 8, (2.036, 2.036, 3.0))
    text = json.dumps(result)  # numpy scalars would raise here
    assert json.loads(text) == result
    for lesion in result["lesions"]:
        assert all(type(lesion[key]) is float for key in ("suvmax", "suvmean", "suvpeak", "mtv_ml", "tlg"))
        assert all(type(x) is int for x in lesion["centre_voxel"])


def test_mask_on_another_grid_is_refused():
    with pytest.raises(UserInputError, match="PET grid"):
        quantify(np.ones((5, 5, 5)), np.ones((5, 5, 4)), (2.0, 2.0, 2.0))


@pytest.mark.parametrize("density", [0.0, 0.001, 0.3])
def test_labelling_within_the_masks_box_gives_the_labels_of_the_whole_grid(density):
    mask = np.zeros((40, 30, 50), dtype=bool)
    rng = np.random.default_rng(3)
    mask[5:31, 8:22, 10:45] = rng.random((26, 14, 35)) < density
    mask[5, 8, 10] = density > 0  # a voxel on the box's corner
    labels, count = label_in_box(mask)
    expected, expected_count = ndimage.label(mask, structure=LESION_CONNECTIVITY)
    assert count == expected_count and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, expected)
