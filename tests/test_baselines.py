import numpy as np
import pytest
from scipy import ndimage

from segany_pet.errors import PromptError, UserInputError
from segany_pet.segment import METHODS, regions_from_clicks, segment_from_clicks
from segany_pet.segment.threshold import SIZED_FULL_ML, SIZED_MAX_FRACTION, sized_fraction

SPACING = (2.0, 2.0, 2.0)
SHAPE = (60, 60, 40)


def blurred_spheres(spheres, background=1.0, sigma_voxels=2.0, shape=SHAPE):
    """Uniform spheres (centre, radius in voxels, SUV) on a flat background, blurred like a scanner PSF."""
    grid = np.indices(shape)
    suv = np.full(shape, background, dtype=np.float32)
    for centre, radius, value in spheres:
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2
        suv[inside] = value
    return ndimage.gaussian_filter(suv, sigma_voxels).astype(np.float32)


LESION = ((30, 30, 20), 5, 10.0)


def test_41_percent_region_contains_the_50_percent_region_and_is_larger():
    suv = blurred_spheres([LESION])
    r41 = segment_from_clicks(suv, SPACING, [[30, 30, 20]], method="relative_41")
    r50 = segment_from_clicks(suv, SPACING, [[30, 30, 20]], method="relative_50")
    assert r41.dtype == np.uint8 and r41.shape == SHAPE
    assert 0 < r50.sum() < r41.sum()
    assert np.all(r41[r50 == 1] == 1)
    # Both stay on the lesion: a radius-5 sphere blurred, nothing beyond 5 + 3 sigma voxels.
    far = np.indices(SHAPE) - np.array(LESION[0]).reshape(3, 1, 1, 1)
    assert r41[(far**2).sum(axis=0) > 11**2].sum() == 0


def test_relative_threshold_follows_the_local_suvmax():
    suv = blurred_spheres([LESION])
    (region,) = regions_from_clicks(suv, SPACING, [[30, 30, 20]], method="relative_41")
    assert region.suvmax == pytest.approx(float(suv.max()))
    assert region.threshold == pytest.approx(0.41 * float(suv.max()))
    grown = region.mask
    assert suv[region.box][grown].min() >= region.threshold


def sphere_dice(mask, centre, radius):
    inside = sum((g - c) ** 2 for g, c in zip(np.indices(SHAPE), centre, strict=True)) <= radius**2
    return 2 * np.count_nonzero(mask & inside) / (np.count_nonzero(mask) + np.count_nonzero(inside))


def test_sized_threshold_tightens_small_lesions_and_leaves_large_ones_at_41_percent():
    small = ((30, 30, 20), 3, 10.0)  # 1 mL: blurred, its 41% region is 40% too large
    suv = blurred_spheres([small], sigma_voxels=1.5)
    r41 = segment_from_clicks(suv, SPACING, [[30, 30, 20]], method="relative_41")
    sized = segment_from_clicks(suv, SPACING, [[30, 30, 20]], method="sized_41")
    (region,) = regions_from_clicks(suv, SPACING, [[30, 30, 20]], method="sized_41")
    volume_41 = np.count_nonzero(r41) * np.prod(SPACING) / 1000
    assert region.threshold == pytest.approx(sized_fraction(volume_41) * float(suv.max()))
    assert 0.41 < sized_fraction(volume_41) <= SIZED_MAX_FRACTION
    assert np.all(r41[sized == 1] == 1) and 0 < sized.sum() < r41.sum()
    assert sphere_dice(sized == 1, *small[:2]) > sphere_dice(r41 == 1, *small[:2]) + 0.1

    large = ((30, 30, 20), 8, 10.0)  # 17 mL
    suv = blurred_spheres([large], sigma_voxels=1.5)
    assert np.array_equal(
        segment_from_clicks(suv, SPACING, [[30, 30, 20]], method="sized_41"),
        segment_from_clicks(suv, SPACING, [[30, 30, 20]], method="relative_41"),
    )
    assert sized_fraction(SIZED_FULL_ML) == sized_fraction(10 * SIZED_FULL_ML) == 0.41
    assert sized_fraction(1e-3) == SIZED_MAX_FRACTION


def test_sized_threshold_keeps_a_click_on_the_faint_rim_in_its_region():
    suv = blurred_spheres([((30, 30, 20), 2, 10.0)], sigma_voxels=1.5)
    (centre,) = regions_from_clicks(suv, SPACING, [[30, 30, 20]], method="sized_41")
    rim = (30, 30, 23)  # above 41% of the SUVmax, below the raised threshold
    assert 0.41 * suv.max() <= suv[rim] < centre.threshold
    from_centre = segment_from_clicks(suv, SPACING, [[30, 30, 20]], method="sized_41")
    from_rim = segment_from_clicks(suv, SPACING, [rim], method="sized_41")
    assert from_centre[rim] == 0 and from_rim[rim] == 1
    assert np.all(from_rim[from_centre == 1] == 1) and from_rim.sum() > from_centre.sum()
    (region,) = regions_from_clicks(suv, SPACING, [rim], method="sized_41")
    assert region.threshold == pytest.approx(float(suv[rim]))


def test_click_near_the_maximum_or_below_threshold_gives_the_same_region():
    suv = blurred_spheres([LESION])
    centre = segment_from_clicks(suv, SPACING, [[30, 30, 20]])
    assert np.array_equal(segment_from_clicks(suv, SPACING, [[32, 31, 20]]), centre)
    # 8 voxels out (16 mm, within the 10 mm search of the lesion rim) the click is below 41 %.
    rim = [30, 30, 28]
    assert suv[tuple(rim)] < 0.41 * suv.max()
    assert np.array_equal(segment_from_clicks(suv, SPACING, [rim]), centre)


def test_fixed_threshold_above_the_lesion_maximum_gives_an_empty_region_with_a_reason():
    suv = blurred_spheres([((30, 30, 20), 5, 3.2)])
    assert 2.5 < suv.max() < 3.0
    assert segment_from_clicks(suv, SPACING, [[30, 30, 20]], method="fixed_4.0").sum() == 0
    (region,) = regions_from_clicks(suv, SPACING, [[30, 30, 20]], method="fixed_4.0")
    assert "below the threshold 4" in region.note
    fixed_25 = segment_from_clicks(suv, SPACING, [[30, 30, 20]], method="fixed_2.5")
    assert fixed_25.sum() > 0 and suv[fixed_25 == 1].min() >= 2.5


def test_background_click_in_a_neighbouring_hot_blob_separates_them():
    lesion, neighbour = (30, 24, 20), (30, 36, 20)
    suv = blurred_spheres([(lesion, 4, 10.0), (neighbour, 4, 10.0)], sigma_voxels=3.0)
    merged = segment_from_clicks(suv, SPACING, [list(lesion)])
    assert merged[neighbour] == 1  # at 41 % the two blobs are one region

    separated = segment_from_clicks(suv, SPACING, [list(lesion)], background=[list(neighbour)])
    assert separated[lesion] == 1
    assert separated[neighbour] == 0
    assert 0 < separated.sum() < merged.sum()
    (region,) = regions_from_clicks(suv, SPACING, [list(lesion)], background=[list(neighbour)])
    assert region.threshold > 0.41 * region.suvmax


def test_background_click_on_the_lesion_maximum_leaves_the_region_empty():
    suv = blurred_spheres([LESION])
    (region,) = regions_from_clicks(suv, SPACING, [[30, 30, 21]], background=[[30, 30, 20]])
    assert region.voxels == 0
    assert "background click" in region.note


def test_relative_threshold_is_refined_to_the_lesion_maximum_beyond_the_search_radius():
    # A 60 mm long lesion whose uptake rises from 5 to 10: the click at the cool end sees only ~5.9
    # within 10 mm, but the lesion's SUVmax is 10, and 41 % of 10 still keeps the click.
    suv = np.ones(SHAPE, dtype=np.float32)
    suv[15:45, 28:33, 18:23] = np.linspace(5.0, 10.0, 30, dtype=np.float32)[:, None, None]
    (region,) = regions_from_clicks(suv, SPACING, [[15, 30, 20]], method="relative_41")
    assert region.suvmax == pytest.approx(10.0)
    assert region.threshold == pytest.approx(4.1)
    assert region.voxels == 30 * 5 * 5


def test_a_hotter_neighbour_is_cut_off_at_the_saddle_when_asked():
    # A lesion against a hotter organ, the saddle between them above 41% of the lesion's SUVmax: the classical
    # region joins the organ, refines its threshold to the organ's SUVmax and shrinks to the lesion's core; cut
    # at the watershed line, the lesion keeps its own SUVmax and all of its uptake.
    lesion_centre, organ_centre = (30, 30, 12), (30, 30, 27)
    suv = blurred_spheres([(lesion_centre, 5, 10.0), (organ_centre, 8, 18.0)])
    lesion = (np.indices(SHAPE) - np.reshape(lesion_centre, (3, 1, 1, 1))) ** 2
    lesion = lesion.sum(axis=0) <= 5**2
    regions = {}
    for prominence in (None, 0.3):
        (region,) = regions_from_clicks(suv, SPACING, [list(lesion_centre)], peak_prominence=prominence)
        regions[prominence] = np.zeros(SHAPE, bool)
        regions[prominence][region.box] = region.mask
        if prominence:
            assert region.suvmax == pytest.approx(float(suv[lesion].max()))
    assert regions[None][lesion].mean() < 0.3
    assert regions[0.3][lesion].mean() > 0.95 and not regions[0.3][organ_centre]


def test_growth_is_cut_at_the_size_guard_and_says_so():
    suv = np.full((120, 120, 40), 3.0, dtype=np.float32)  # a 240 mm organ above SUV 2.5
    (region,) = regions_from_clicks(suv, SPACING, [[60, 60, 20]], method="fixed_2.5", max_extent_mm=100.0)
    extent = [s.stop - s.start for s in region.box]
    assert extent == [51, 51, 40]  # 100 mm box on 2 mm voxels, the third axis limited by the volume
    assert region.voxels == 51 * 51 * 40
    assert "growth limit" in region.note


def test_clicks_on_two_lesions_give_the_union():
    suv = blurred_spheres([((15, 15, 20), 4, 8.0), ((45, 45, 20), 4, 8.0)])
    both = segment_from_clicks(suv, SPACING, [[15, 15, 20], [45, 45, 20]])
    first = segment_from_clicks(suv, SPACING, [[15, 15, 20]])
    second = segment_from_clicks(suv, SPACING, [[45, 45, 20]])
    assert first[45, 45, 20] == 0
    assert np.array_equal(both, first | second)


def test_integral_floats_and_numpy_clicks_are_accepted():
    suv = blurred_spheres([LESION])
    expected = segment_from_clicks(suv, SPACING, [[30, 30, 20]])
    assert np.array_equal(segment_from_clicks(suv, SPACING, [[30.0, 30.0, 20.0]]), expected)
    assert np.array_equal(segment_from_clicks(suv, SPACING, np.array([[30, 30, 20]])), expected)


@pytest.mark.parametrize(
    "foreground, message",
    [
        ([], "click at least once on the lesion"),
        (None, "click at least once on the lesion"),
        ([[30, 30, 40]], r"lesion click #1 \[30, 30, 40\] is outside the volume.*\(60, 60, 40\).*0\.\.39"),
        ([[-1, 30, 20]], "outside the volume"),
        ([[30, 30]], "three voxel indices"),
        ([[30, 30, 20.5]], "20.5 is not a whole voxel index"),
        ([["a", 30, 20]], "not a whole voxel index"),
        ([[True, 30, 20]], "not a whole voxel index"),
        ([30, 30, 20], "single click"),
        ("30,30,20", "list of"),
    ],
)
def test_bad_lesion_clicks_are_refused_with_what_to_fix(foreground, message):
    suv = blurred_spheres([LESION])
    with pytest.raises(PromptError, match=message):
        segment_from_clicks(suv, SPACING, foreground)


def test_bad_background_click_and_contradictory_clicks_are_refused():
    suv = blurred_spheres([LESION])
    with pytest.raises(PromptError, match=r"background click #2 .* outside the volume"):
        segment_from_clicks(suv, SPACING, [[30, 30, 20]], background=[[0, 0, 0], [60, 0, 0]])
    with pytest.raises(PromptError, match="both a lesion and a background click"):
        segment_from_clicks(suv, SPACING, [[30, 30, 20]], background=[[30, 30, 20]])


def test_unknown_method_lists_the_available_ones():
    suv = blurred_spheres([LESION])
    with pytest.raises(UserInputError, match="relative_41"):
        segment_from_clicks(suv, SPACING, [[30, 30, 20]], method="otsu")
    assert set(METHODS) == {"relative_41", "relative_50", "sized_41", "fixed_2.5", "fixed_4.0"}


def test_region_grows_through_voxels_touching_only_at_corners():
    suv = np.ones(SHAPE, dtype=np.float32)
    diagonal = tuple(np.arange(20, 26) for _ in range(3))  # (20,20,20), (21,21,21), ...
    suv[diagonal] = 8.0
    mask = segment_from_clicks(suv, SPACING, [[20, 20, 20]], method="fixed_4.0")
    assert mask.sum() == 6 and mask[25, 25, 25] == 1
