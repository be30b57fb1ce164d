"""Synthetic whole-body PET: anatomy, uptake per tracer, lesions, scanner, cohort files."""

from __future__ import annotations

import json
import re
from functools import lru_cache

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from segany_pet.pet import PETVolume
from segany_pet.phantom import ORGAN_LABELS, UPTAKE_RANGES, generate_case, organ_core, write_cohort
from segany_pet.phantom.anatomy import Grid, build_anatomy, draw_uptake, uptake_image
from segany_pet.phantom.cohort import NEGATIVE_SHARE, draws_negative
from segany_pet.phantom.lesions import LesionPlan, draw_lesion_plans, place_lesions, sphere_recovery
from segany_pet.phantom.scanner import ScannerSettings, add_noise, blur

SPACING_4MM = (4.0, 4.0, 4.0)
MAIN_HOT_ORGANS = {"bladder", "kidney_left", "kidney_right", "renal_pelvis", "heart_myocardium", "heart_blood", "brain"}


@lru_cache(maxsize=8)
def case(seed: int, tracer: str = "fdg", negative: bool | None = False):
    return generate_case(seed, tracer, "4mm", negative)


def core_median(c, names, margin_mm=8.0) -> float:
    core = organ_core(c.organs, SPACING_4MM, names, margin_mm) & (c.lesions == 0)
    assert core.sum() > 10, f"no core left in {names}"
    return float(np.median(c.suv[core]))


# --- geometry ---------------------------------------------------------------------------------


def test_grid_affine_is_ras_with_head_at_high_k():
    c = case(1)
    volume = PETVolume(c.suv, c.affine)
    assert c.suv.shape == (128, 128, 240) and c.suv.dtype == np.float32
    assert volume.spacing == SPACING_4MM
    # i runs to the patient's left (-x in RAS+), j anterior (+y), k superior (+z)
    assert np.allclose(c.affine[:3, :3], np.diag([-4.0, 4.0, 4.0]))
    centroid = {name: np.argwhere(c.organs == ORGAN_LABELS[name]).mean(axis=0) for name in ORGAN_LABELS}
    assert centroid["brain"][2] > 0.85 * c.suv.shape[2]
    assert centroid["brain"][2] > centroid["heart_blood"][2] > centroid["liver"][2] > centroid["bladder"][2]
    world = {name: volume.index_to_world(v) for name, v in centroid.items()}
    assert world["lung_right"][0] > 0 > world["lung_left"][0]  # RAS+: the patient's right is +x
    assert world["liver"][0] > 0 > world["spleen"][0]
    assert world["bone_marrow"][1] < world["heart_blood"][1]  # spine behind the heart
    assert world["bladder"][1] > world["bone_marrow"][1]
    # Whole body vertex to thigh: tissue in the top and bottom 5 % of slices, air above the head.
    body_k = np.flatnonzero(c.organs.any(axis=(0, 1)))
    assert body_k[0] == 0 and 225 <= body_k[-1] < 240


def test_same_seed_gives_identical_case_and_other_seeds_differ():
    a, b = generate_case(5, "psma", negative=False), generate_case(5, "psma", negative=False)
    assert np.array_equal(a.suv, b.suv) and np.array_equal(a.lesions, b.lesions)
    assert np.array_equal(a.organs, b.organs) and a.info == b.info
    other = case(6, "psma")
    assert not np.array_equal(a.organs, other.organs)
    assert not np.array_equal(a.lesions, other.lesions)


def test_info_is_json_serialisable_and_complete():
    c = case(2)
    info = json.loads(json.dumps(c.info))
    assert info["tracer"] == "fdg" and info["seed"] == 2 and info["grid"] == "4mm"
    assert info["spacing"] == list(SPACING_4MM) and info["shape"] == [128, 128, 240]
    assert info["negative"] is False
    keys = {"id", "centre_voxel", "centre_mm", "volume_ml", "suvmax", "suvmean", "necrotic", "site", "touches"}
    assert info["lesions"] and all(keys <= set(lesion) for lesion in info["lesions"])


# --- uptake -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tracer", ["fdg", "psma"])
def test_drawn_organ_uptake_stays_in_literature_ranges(tracer):
    ranges = UPTAKE_RANGES[tracer]
    groups = {"lung_left": "lung", "aorta": "blood", "heart_blood": "blood", "kidney_left": "kidney"}
    for seed in range(40):
        uptake = draw_uptake(tracer, np.random.default_rng(seed))
        for name, value in uptake.items():
            group = groups.get(name, "kidney" if name == "kidney_right" else "lung" if name == "lung_right" else name)
            lo, hi = ranges[group]
            assert lo <= value <= hi, (tracer, name, value)


# Measured medians in organ cores of the final noisy image, against pet.md section 2.
FDG_EXPECTED = {
    "liver": (1.9, 2.5),
    "spleen": (1.6, 2.0),
    ("lung_left", "lung_right"): (0.4, 0.6),
    "muscle": (0.6, 1.0),
    "brain": (7.0, 10.0),
    "heart_blood": (1.5, 2.0),
    "bladder": (5.0, 50.0),
    ("kidney_left", "kidney_right"): (2.0, 4.0),
}
PSMA_EXPECTED = {
    "liver": (4.0, 8.0),
    "spleen": (5.0, 10.0),
    ("kidney_left", "kidney_right"): (20.0, 50.0),
    "bladder": (10.0, 100.0),
    "heart_blood": (1.0, 2.0),
    "brain": (0.1, 0.3),
}


@pytest.mark.parametrize("tracer, expected", [("fdg", FDG_EXPECTED), ("psma", PSMA_EXPECTED)])
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_organ_suv_medians_match_pet_reference(tracer, expected, seed):
    c = case(seed, tracer, True)
    for names, (lo, hi) in expected.items():
        median = core_median(c, names)
        # 5 % slack: neighbours' partial volume and noise at the core's edge.
        assert 0.95 * lo <= median <= 1.05 * hi, (tracer, names, median)


def test_psma_and_fdg_differ_where_the_tracers_do():
    fdg, psma = case(14, "fdg", True), case(14, "psma", True)
    assert core_median(fdg, "brain") > 20 * core_median(psma, "brain")
    assert core_median(psma, "salivary_glands", 4.0) > 3 * core_median(fdg, "salivary_glands", 4.0)
    kidneys = ("kidney_left", "kidney_right")
    assert core_median(psma, kidneys) > 4 * core_median(fdg, kidneys)
    # Same seed, same body: a tracer swap keeps the anatomy.
    assert np.array_equal(fdg.organs, psma.organs)


def test_renal_collecting_system_is_brighter_than_the_kidney():
    c = case(15, "fdg", True)
    pelvis = np.median(c.suv[c.organs == ORGAN_LABELS["renal_pelvis"]])
    assert pelvis > core_median(c, ("kidney_left", "kidney_right"))


# --- scanner ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tracer", ["fdg", "psma"])
def test_liver_noise_cov_is_clinical(tracer):
    for seed in (21, 22, 23):
        c = case(seed, tracer)
        core = organ_core(c.organs, SPACING_4MM, "liver", 10.0)
        core &= ~ndimage.binary_dilation(c.lesions > 0, iterations=3)
        values = c.suv[core].astype(float)
        cov = values.std() / values.mean()
        assert 0.10 <= cov <= 0.15, (tracer, seed, cov)
        assert c.info["liver_cov"] == pytest.approx(cov, abs=2e-3)


def test_psf_within_scanner_range_and_gallium_blurs_more():
    fdg = [case(s, "fdg").info["scanner"]["fwhm_mm"] for s in (21, 22, 23)]
    psma = [case(s, "psma").info["scanner"]["fwhm_mm"] for s in (21, 22, 23)]
    assert all(5.0 <= f <= 7.0 for f in fdg) and all(6.5 <= f <= 8.5 for f in psma)


def test_image_is_non_negative_and_finite():
    c = case(24)
    assert c.suv.min() >= 0.0 and np.isfinite(c.suv).all()


def test_blur_keeps_activity_and_has_the_requested_fwhm():
    point = np.zeros((41, 41, 41), dtype=np.float32)
    point[20, 20, 20] = 1000.0
    blurred = blur(point, (2.0, 2.0, 3.0), fwhm_mm=6.0)
    assert blurred.dtype == np.float32 and blurred.sum() == pytest.approx(1000.0, rel=1e-3)
    for axis, spacing in enumerate((2.0, 2.0, 3.0)):
        profile = blurred.sum(axis=tuple(a for a in range(3) if a != axis)).astype(float)
        x = np.arange(41) * spacing
        mean = (profile * x).sum() / profile.sum()
        sigma = np.sqrt((profile * (x - mean) ** 2).sum() / profile.sum())
        assert sigma * 2.3548 == pytest.approx(6.0, rel=0.03)


def test_noise_grows_with_the_square_root_of_activity():
    settings = ScannerSettings(fwhm_mm=6.0, liver_cov=0.12, noise_grain_mm=3.0)
    flat = np.full((60, 60, 60), 2.0, dtype=np.float32)
    flat[30:] = 8.0
    noisy = add_noise(flat, (4.0, 4.0, 4.0), settings, liver_suv=2.0, rng=np.random.default_rng(0))
    low, high = noisy[:30].astype(float), noisy[30:].astype(float)
    assert low.mean() == pytest.approx(2.0, rel=0.01) and high.mean() == pytest.approx(8.0, rel=0.01)
    assert low.std() / low.mean() == pytest.approx(0.12, rel=0.1)  # the liver level gets the asked COV
    assert high.std() / low.std() == pytest.approx(2.0, rel=0.1)  # sqrt(8 / 2)


def test_sphere_recovery_behaves_like_partial_volume():
    assert sphere_recovery(100.0, 6.0) == pytest.approx(1.0, abs=1e-3)
    assert 0.5 < sphere_recovery(5.0, 6.0) < 0.85  # a 10 mm sphere loses a good share of its peak
    assert sphere_recovery(3.0, 8.0) < sphere_recovery(3.0, 5.0)


# --- lesions ----------------------------------------------------------------------------------


def test_negative_cases_have_no_lesions():
    c = case(31, "fdg", True)
    assert not c.lesions.any() and c.info["lesions"] == [] and c.info["negative"] is True
    assert case(31, "psma", True).info["lesions"] == []


@pytest.mark.parametrize("tracer", ["fdg", "psma"])
def test_negative_share_drawn_per_seed(tracer):
    share = np.mean([draws_negative(seed, tracer) for seed in range(400)])
    assert abs(share - NEGATIVE_SHARE[tracer]) < 0.08
    seed = next(s for s in range(100) if draws_negative(s, tracer))
    assert generate_case(seed, tracer).info["negative"] is True


def test_lesion_records_match_the_maps():
    c = case(32, "psma")
    voxel_ml = 0.064
    ids = sorted(int(i) for i in np.unique(c.lesions) if i)
    assert ids == [lesion["id"] for lesion in c.info["lesions"]] == list(range(1, len(ids) + 1))
    for lesion in c.info["lesions"]:
        mask = c.lesions == lesion["id"]
        assert lesion["volume_ml"] == pytest.approx(mask.sum() * voxel_ml, rel=1e-3)
        assert lesion["suvmax"] == pytest.approx(float(c.suv[mask].max()), abs=1e-3)
        assert lesion["suvmean"] == pytest.approx(float(c.suv[mask].mean()), abs=1e-3)
        assert mask[tuple(lesion["centre_voxel"])]
        assert np.allclose(lesion["centre_mm"], PETVolume(c.suv, c.affine).index_to_world(lesion["centre_voxel"]))


def _lesion_mask(c, lesion, pad: int = 1):
    """A lesion's mask in a padded box around it (full-volume compares are slow)."""
    lo = np.maximum(np.argwhere(c.lesions == lesion["id"]).min(axis=0) - pad, 0)
    hi = np.argwhere(c.lesions == lesion["id"]).max(axis=0) + pad + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return box, c.lesions[box] == lesion["id"]


@pytest.mark.parametrize("tracer, suvmax_median", [("fdg", (4.0, 9.0)), ("psma", (7.0, 15.0))])
def test_lesion_statistics_follow_the_reference(tracer, suvmax_median):
    counts, lesions = [], []
    for seed in range(100, 110):
        c = generate_case(seed, tracer, negative=False)
        counts.append(len(c.info["lesions"]))
        lesions += c.info["lesions"]
        # Lesions never touch one another: one 26-connected component each.
        _, n_components = ndimage.label(c.lesions > 0, structure=np.ones((3, 3, 3)))
        assert n_components == len(c.info["lesions"])
        for lesion in c.info["lesions"]:
            if lesion["touches"] is not None:  # it really borders that organ
                box, mask = _lesion_mask(c, lesion)
                shell = ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3))) & ~mask
                assert (c.organs[box][shell] == ORGAN_LABELS[lesion["touches"]]).any()
    volumes = np.array([lesion["volume_ml"] for lesion in lesions])
    suvmax = np.array([lesion["suvmax"] for lesion in lesions])
    assert min(counts) >= 1 and max(counts) <= (30 if tracer == "fdg" else 80)
    assert np.median(counts) >= 2
    assert 1.0 <= np.median(volumes) <= 6.0
    assert volumes.min() >= 0.1 and volumes.max() <= 500.0 and volumes.max() > 10.0
    assert suvmax_median[0] <= np.median(suvmax) <= suvmax_median[1]
    assert suvmax.max() < 200.0
    touching = np.mean([lesion["touches"] in MAIN_HOT_ORGANS for lesion in lesions])
    assert 0.15 <= touching <= 0.45, touching
    sites = {lesion["site"] for lesion in lesions}
    assert {"lymph node", "bone"} <= sites and len(sites) >= 4


def test_only_large_lesions_are_planned_necrotic():
    plans = [
        p
        for seed in range(300)
        for p in draw_lesion_plans("fdg", np.random.default_rng(seed), np.random.SeedSequence(seed))
    ]
    necrotic = [p for p in plans if p.necrotic]
    assert necrotic and all(p.volume_ml > 15.0 for p in necrotic)
    assert 0.3 < len(necrotic) / sum(p.volume_ml > 15.0 for p in plans) < 0.7


def test_necrotic_lesion_has_a_cold_core():
    grid = Grid.named("4mm")
    anatomy = build_anatomy(grid, np.random.default_rng(0))
    suv = uptake_image(anatomy, draw_uptake("fdg", np.random.default_rng(0)))
    plans = [LesionPlan("liver", 60.0, 12.0, necrotic, None, np.random.SeedSequence(7)) for necrotic in (True, False)]
    centres = []
    for plan in plans:
        image = suv.copy()
        lesions, placed = place_lesions(anatomy, image, [plan], "fdg", 6.0)
        assert placed == [plan] and lesions.sum() == pytest.approx(60.0 / 0.064, abs=1)
        depth = ndimage.distance_transform_edt(lesions > 0)
        centre = depth >= 0.7 * depth.max()
        blurred = blur(image, grid.spacing, 6.0)
        centres.append(blurred[centre].mean() / blurred[lesions > 0].max())
    assert centres[0] < 0.6 < centres[1]


# --- grids and files --------------------------------------------------------------------------


@pytest.mark.slow
def test_autopet_grid_shows_the_same_case():
    big = generate_case(8, "fdg", "autopet", negative=False)
    small = case(8)
    assert big.suv.shape == (400, 400, 326) and big.suv.dtype == np.float32
    assert np.allclose(PETVolume(big.suv, big.affine).spacing, (2.036, 2.036, 3.0))
    assert np.allclose(big.affine[:3, :3], np.diag([-2.036, 2.036, 3.0]))
    for name in ("liver", "brain", "bladder", "lung_left"):
        ml_big = (big.organs == ORGAN_LABELS[name]).sum() * 2.036 * 2.036 * 3.0 / 1000
        ml_small = (small.organs == ORGAN_LABELS[name]).sum() * 0.064
        assert ml_big == pytest.approx(ml_small, rel=0.08), name
    assert len(big.info["lesions"]) == len(small.info["lesions"])
    volume_big = sorted(lesion["volume_ml"] for lesion in big.info["lesions"])
    volume_small = sorted(lesion["volume_ml"] for lesion in small.info["lesions"])
    assert np.allclose(volume_big, volume_small, rtol=0.1, atol=0.1)
    assert 0.10 <= big.info["liver_cov"] <= 0.15


def test_write_cohort_layout_and_json_round_trip(tmp_path):
    ids = write_cohort(tmp_path, 2, tracer="mixed", grid="4mm", seed=3, progress=False)
    assert len(ids) == 2 and all(re.fullmatch(r"(fdg|psma)_000\d", i) for i in ids)
    assert [int(i[-4:]) for i in ids] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(f"{i}.nii.gz" for i in ids)
    for case_id in ids:
        image = nib.load(tmp_path / "images" / f"{case_id}.nii.gz")
        lesions = nib.load(tmp_path / "truth" / f"{case_id}_lesions.nii.gz")
        organs = nib.load(tmp_path / "truth" / f"{case_id}_organs.nii.gz")
        assert image.get_data_dtype() == np.float32 and image.shape == (128, 128, 240)
        assert lesions.get_data_dtype() == np.int16 and organs.get_data_dtype() == np.uint8
        assert np.allclose(image.affine, lesions.affine) and np.allclose(image.affine, organs.affine)
        info = json.loads((tmp_path / "truth" / f"{case_id}.json").read_text())
        assert info["case_id"] == case_id and info["tracer"] == case_id.split("_")[0]
        assert info["organ_names"]["9"] == "liver"
        lesion_map = np.asarray(lesions.dataobj)
        assert sorted(int(v) for v in np.unique(lesion_map) if v) == [lesion["id"] for lesion in info["lesions"]]
        # The JSON describes exactly the case generate_case makes from the recorded seed.
        again = generate_case(info["seed"], info["tracer"], "4mm")
        assert np.array_equal(again.lesions, lesion_map)
        assert np.allclose(again.suv, np.asarray(image.dataobj))
        assert json.loads(json.dumps(again.info)) == {
            k: v for k, v in info.items() if k not in ("case_id", "organ_names")
        }


def test_unknown_tracer_or_grid_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="tracer"):
        generate_case(0, "fes")
    with pytest.raises(ValueError, match="grid"):
        generate_case(0, "fdg", "1mm")
    with pytest.raises(ValueError, match="tracer"):
        write_cohort(tmp_path, 1, tracer="both", progress=False)
