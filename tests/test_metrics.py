import numpy as np
import pytest

from segany_pet.evaluate import dice, false_negative_volume, false_positive_volume, lesion_dice

SHAPE = (12, 12, 12)


def empty():
    return np.zeros(SHAPE, dtype=np.uint8)


def test_dice_of_known_overlap():
    pred, truth = empty(), empty()
    pred[0, 0, 0:4] = 1  # 4 voxels
    truth[0, 0, 1:7] = 1  # 6 voxels, 3 shared
    assert dice(pred, truth) == pytest.approx(2 * 3 / 10)
    assert dice(truth, truth) == 1.0


def test_dice_of_empty_masks():
    truth = empty()
    truth[5, 5, 5] = 1
    assert dice(empty(), empty()) == 1.0
    assert dice(empty(), truth) == 0.0
    assert dice(truth, empty()) == 0.0


def test_false_positive_volume_counts_whole_components_that_miss_the_truth():
    truth, pred = empty(), empty()
    truth[2:4, 2:4, 2:4] = 1
    pred[3:6, 3:4, 3:4] = 1  # 3 voxels touching the truth: not a false positive, even its overhang
    pred[8:10, 8:10, 8:10] = 1  # 8 voxels far away
    assert false_positive_volume(pred, truth, voxel_volume_ml=0.5) == pytest.approx(4.0)
    assert false_positive_volume(truth, truth, 0.5) == 0.0


def test_false_positive_components_are_18_connected_as_in_autopet():
    truth, pred = empty(), empty()
    truth[5, 5, 5] = 1
    pred[5, 5, 5] = 1
    pred[6, 6, 5] = 1  # shares an edge with the hit: same component
    pred[4, 4, 4] = 1  # shares only a corner: its own component, touching no truth
    assert false_positive_volume(pred, truth, voxel_volume_ml=0.25) == pytest.approx(0.25)


def test_false_negative_volume_counts_missed_truth_components():
    truth, pred = empty(), empty()
    truth[1:3, 1:3, 1:3] = 1  # 8 voxels, found by one predicted voxel
    truth[7:10, 7:10, 7] = 1  # 9 voxels, missed
    truth[0, 0, 11] = 1  # 1 voxel, missed
    pred[2, 2, 2] = 1
    assert false_negative_volume(pred, truth, voxel_volume_ml=0.1) == pytest.approx(1.0)
    assert false_negative_volume(empty(), empty(), 0.1) == 0.0
    assert false_negative_volume(truth, truth, 0.1) == 0.0


def test_lesion_dice_ignores_other_lesions_and_far_away_predictions():
    instances = np.zeros(SHAPE, dtype=np.int32)
    instances[2:4, 2:4, 2:4] = 1
    instances[2:4, 5:7, 2:4] = 2  # a neighbour inside lesion 1's margin
    pred = (instances > 0).astype(np.uint8)
    pred[11, 11, 11] = 1  # outside lesion 1's box grown by 2 voxels
    assert lesion_dice(pred, instances, 1, margin=2) == 1.0
    assert dice(pred, instances == 1) < 1.0

    pred[4, 2, 2] = 1  # one false-positive voxel next to lesion 1
    assert lesion_dice(pred, instances, 1, margin=2) == pytest.approx(2 * 8 / (9 + 8))
    pred[2, 2, 2] = 0  # and one missed voxel
    assert lesion_dice(pred, instances, 1, margin=2) == pytest.approx(2 * 7 / (8 + 8))


def test_lesion_dice_refuses_an_unknown_lesion():
    instances = np.zeros(SHAPE, dtype=np.int32)
    instances[2, 2, 2] = 1
    with pytest.raises(ValueError, match="lesion id 3"):
        lesion_dice(instances, instances, 3)


def test_masks_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="differ"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
