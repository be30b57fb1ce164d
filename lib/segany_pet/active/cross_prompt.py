"""Cross-prompt disagreement: where a point-prompted and a box-prompted model see an object differently.

The same object prompted two ways (a click at its centre, a box around it) through two replicas of the model
(CPCL's point and box replicas) or through one model: where the two answers disagree the model is unsure, so
an annotator's time there is well spent; where they agree with each other but not with a stored label, the
label is suspect (CPCL's confidence rule, `segany_pet.train.cpcl.confidence_targets`).

A scan is scored without any click (`score_scan`): its targets (`scan_targets`) are the components of its label,
if it has one, and its hot spots (`hot_spots`: local SUV maxima above a liver-referenced threshold, as PERCIST
defines measurable uptake) that the hot-spot classifier (`organs.py`) does not call physiological organ uptake,
which finds what a label misses and what an unlabeled scan holds.

Frames: voxel indices of the stored image throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from segany_pet.active.organs import LESION_PROBABILITY, HotSpotClassifier, describe_hot_spots, shipped_classifier
from segany_pet.agreement import confidence_targets, prompt_pair
from segany_pet.crops import CropGeometry
from segany_pet.pet import PETVolume
from segany_pet.pet.quantify import label_in_box, mask_bounding_box
from segany_pet.pet.volume import BODY_SUV, superior_axis
from segany_pet.prompts import centre_click
from segany_pet.session import VolumeSession

# PERCIST: measurable uptake exceeds 1.5 x liver SUVmean + 2 x liver SD (3 cm liver VOI).
PERCIST_LIVER_FACTOR = 1.5
PERCIST_LIVER_SD_FACTOR = 2.0
LIVER_WINDOW_MM = 30.0
# The liver estimate (`liver_reference`): the most active homogeneous region of at least this many mL of
# window centres, between these shares of the body's head-to-feet extent (below the head, above the pelvis).
LIVER_MAX_CV = 0.2
LIVER_MIN_ML = 100.0
LIVER_ZONE = (0.2, 0.7)
# Without a liver reference, hot spots exceed this multiple of the body's median SUV.
FALLBACK_MEDIAN_FACTOR = 4.0
MAX_HOT_SPOTS = 16
# Hot spots looked at per kept one: organ uptake is left out after the classifier has seen the spots.
ORGAN_SEARCH_FACTOR = 3
# A scan's disagreement is the mean of its TOP_TARGETS most disputed targets: one ambiguous lesion among many
# clear hot spots still ranks the scan high.
TOP_TARGETS = 3
WORST_REPORTED = 5
# `scan_descriptor`: dimensions kept of the pooled image embedding, and the seed of the projection.
DESCRIPTOR_DIMS = 16
DESCRIPTOR_SEED = 20261207


def liver_reference(volume: PETVolume) -> dict | None:
    """Liver SUV mean and SD estimated from the image, or None where no region qualifies.

    PERCIST measures the liver in a 3 cm VOI. Without a liver segmentation: the SUV mean and SD in a 3 cm
    window at every voxel; window centres where the coefficient of variation is below LIVER_MAX_CV are
    homogeneous tissue; of their connected regions between 10% and 60% of the body's head-to-feet extent
    (below the brain, above the bladder) holding at least LIVER_MIN_ML, the one of highest mean SUV is the
    liver (muscle and blood pool are less active, kidneys and heart wall too small or too uneven for a 3 cm
    window). Checked against the phantoms' known liver uptake, FDG and PSMA (tests/test_active.py).
    """
    suv, spacing = volume.suv, volume.spacing
    # Voxels of 3 mm or more are fine enough for a 3 cm window: an autoPET grid (2 x 2 x 3 mm) is filtered at
    # 4 x 4 x 3 mm, a quarter of the work. float32: a liver's variance is ~1e5 times float32's resolution.
    step = [max(1, int(np.ceil(3.0 / s - 1e-6))) for s in spacing]
    coarse = suv[:: step[0], :: step[1], :: step[2]].astype(np.float32)
    coarse_spacing = [s * k for s, k in zip(spacing, step, strict=True)]
    size = [max(3, int(round(LIVER_WINDOW_MM / s)) | 1) for s in coarse_spacing]
    mean = ndimage.uniform_filter(coarse, size, mode="nearest")
    sd = np.sqrt(np.maximum(ndimage.uniform_filter(coarse**2, size, mode="nearest") - mean**2, 0.0))
    homogeneous = (mean > BODY_SUV) & (sd < LIVER_MAX_CV * mean)
    axis, towards_head = superior_axis(volume.affine)
    body = np.flatnonzero((coarse > BODY_SUV).any(axis=tuple(a for a in range(3) if a != axis)))
    if body.size == 0:
        return None
    head, feet = (body[-1], body[0]) if towards_head > 0 else (body[0], body[-1])
    shares = (np.arange(coarse.shape[axis]) - head) / (feet - head if feet != head else 1)
    zone = (shares >= LIVER_ZONE[0]) & (shares <= LIVER_ZONE[1])
    homogeneous &= np.expand_dims(zone, tuple(a for a in range(3) if a != axis))
    regions, count = ndimage.label(homogeneous)
    if count == 0:
        return None
    voxel_ml = float(np.prod(coarse_spacing)) / 1000.0
    sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:] * voxel_ml
    means = ndimage.mean(mean, regions, np.arange(1, count + 1))
    eligible = np.flatnonzero(sizes >= LIVER_MIN_ML)
    if eligible.size == 0:
        return None
    best = int(eligible[np.argmax(means[eligible])]) + 1
    inside = regions == best
    return {"mean": round(float(mean[inside].mean()), 4), "sd": round(float(sd[inside].mean()), 4),
            "ml": round(float(sizes[best - 1]), 1), "source": "estimated"}


def hot_spot_threshold(volume: PETVolume, liver: dict | None) -> float:
    """PERCIST's threshold from a liver reference, or FALLBACK_MEDIAN_FACTOR x the body's median SUV."""
    if liver is not None:
        return PERCIST_LIVER_FACTOR * liver["mean"] + PERCIST_LIVER_SD_FACTOR * liver["sd"]
    body = volume.suv[volume.suv > BODY_SUV]
    return FALLBACK_MEDIAN_FACTOR * float(np.median(body)) if body.size else float("inf")


def hot_spots(volume: PETVolume, threshold: float, exclude: np.ndarray | None = None,
              limit: int = MAX_HOT_SPOTS, regions: np.ndarray | None = None) -> list[list[int]]:
    """The hottest voxel of each 26-connected region above ``threshold`` outside ``exclude`` (bool, e.g. a
    label's lesions), hottest first, at most ``limit``: voxel indices. ``regions``: those regions labelled
    already (`above_threshold_regions` of the same threshold and exclusion).

    One spot per region, not per local maximum: a bladder or a kidney is one target, however noisy its
    uptake; a lesion merged with an organ above the threshold is found through the organ's spot.
    """
    if regions is None:
        regions = above_threshold_regions(volume, threshold, exclude)
    if not regions.any():
        return []
    # Each region's hottest voxel by one sort of the voxels above the threshold (ndimage.maximum_position
    # took 20 s on an autoPET grid whose noise leaves thousands of small regions).
    where = np.flatnonzero(regions)
    region_of, values = regions.ravel()[where], volume.suv.ravel()[where]
    order = np.lexsort((-values, region_of))
    first = order[np.r_[True, np.diff(region_of[order]) != 0]]  # the hottest voxel of each region
    hottest = first[np.argsort(-values[first], kind="stable")][:limit]
    return [[int(v) for v in np.unravel_index(where[i], volume.shape)] for i in hottest]


def above_threshold_regions(volume: PETVolume, threshold: float, exclude: np.ndarray | None = None) -> np.ndarray:
    """The 26-connected regions above ``threshold`` outside ``exclude``, labelled 1, 2, ... (0 elsewhere)."""
    above = volume.suv > threshold
    if exclude is not None:
        above &= ~exclude
    return label_in_box(above)[0]


def dilated_label(label: np.ndarray, iterations: int = 2) -> np.ndarray:
    """``label > 0`` dilated (6-connected, ``iterations`` times), computed on the label's box grown by as many
    voxels: the same array as dilating the whole grid, in a fraction of the time on a whole-body scan."""
    inside = label > 0
    dilated = np.zeros(inside.shape, dtype=bool)
    box = mask_bounding_box(inside)
    if box is not None:
        box = tuple(slice(max(s.start - iterations, 0), s.stop + iterations) for s in box)
        dilated[box] = ndimage.binary_dilation(inside[box], iterations=iterations)
    return dilated


# ----------------------------------------------------------------------------------------------
# A scan's score


@dataclass
class Target:
    """One object to prompt both ways: a label component or a hot spot (stored voxel indices)."""

    kind: str  # "label" or "hot_spot"
    click: list[int]
    corners: tuple[list[int], list[int]]  # the box prompt, min and max inclusive
    box: tuple[slice, slice, slice]  # the object's extent
    component: int  # its label component (0: a hot spot)


@dataclass
class ScanTargets:
    """What a scan is scored on, whatever the models: computed once per image and label."""

    targets: list[Target]
    threshold: float
    liver: dict | None
    components: np.ndarray | None  # the label's 26-connected components
    organ_spots: int  # hot spots the classifier called physiological uptake (not targets)


def scan_targets(volume: PETVolume, label: np.ndarray | None = None, liver: dict | None = None,
                 classifier: HotSpotClassifier | None = None, max_hot_spots: int = MAX_HOT_SPOTS) -> ScanTargets:
    """The label's components (prompted at the deepest voxel and by the extent) and the hot spots outside it
    that the hot-spot classifier (default: the shipped one) calls lesions, at most ``max_hot_spots``, hottest
    first (prompted at the peak and by the box of the 41% SUVmax region grown from it)."""
    classifier = classifier or shipped_classifier()
    liver = liver or liver_reference(volume)
    threshold = hot_spot_threshold(volume, liver)
    targets = []
    components, count = label_in_box(label > 0) if label is not None else (None, 0)
    for index, component_box in enumerate(ndimage.find_objects(components) if count else [], start=1):
        inside = components[component_box] == index
        click = [int(c + s.start) for c, s in zip(centre_click(inside, volume.spacing), component_box, strict=True)]
        corners = ([s.start for s in component_box], [s.stop - 1 for s in component_box])
        targets.append(Target("label", click, corners, component_box, index))
    exclude = dilated_label(components) if count else None
    regions = above_threshold_regions(volume, threshold)
    outside = regions if exclude is None else above_threshold_regions(volume, threshold, exclude)
    # Organs are among the hottest spots: look further, so that the lesions after them are still found.
    spots = hot_spots(volume, threshold, exclude, limit=ORGAN_SEARCH_FACTOR * max_hot_spots, regions=outside)
    features, grown = describe_hot_spots(volume, spots, threshold, liver, regions)
    lesion_like = (classifier.lesion_probability(features) >= LESION_PROBABILITY if spots
                   else np.zeros(0, dtype=bool))
    kept = np.flatnonzero(lesion_like)[:max_hot_spots]
    for i in kept:
        spot, region = spots[i], grown[i]
        voxels = np.argwhere(region.mask) + [s.start for s in region.box]
        corners = (voxels.min(axis=0).tolist(), voxels.max(axis=0).tolist()) if len(voxels) else (spot, spot)
        targets.append(Target("hot_spot", spot, corners, region.box, 0))
    return ScanTargets(targets, threshold, liver, components, int((~lesion_like).sum()))


def score_scan(point: VolumeSession, box: VolumeSession, label: np.ndarray | None = None, liver: dict | None = None,
               *, max_hot_spots: int = MAX_HOT_SPOTS, confidence: dict | None = None,
               consensus: np.ndarray | None = None, targets: ScanTargets | None = None) -> dict:
    """Cross-prompt scores of one scan (the sessions' volume), JSON-ready.

    Targets: `scan_targets` of the volume and ``label`` (stored value > 0), or ``targets`` computed before.
    ``liver``: a known liver reference (``{"mean", "sd"}``), else estimated. ``confidence``: keyword arguments
    of `confidence_targets` (the CPCL thresholds). ``consensus``: a bool array of the scan's shape that
    receives the models' consensus (mean probability > 0.5), target by target (the audit report's overlay).

    Returns ``cross_prompt_disagreement`` (mean of the TOP_TARGETS largest target disagreements, 1 - Dice),
    ``cross_prompt_entropy`` (the same targets' mean entropy, bits), ``cross_prompt_worst`` (the most disputed
    targets: voxel, kind, disagreement, entropy), ``cross_prompt_features`` (where the scan sits in the image
    encoder's feature space, for diverse batches: `scan_descriptor`), ``hot_spot_threshold``,
    ``liver_reference``, ``targets`` (counts, with the organ spots left out); with a label also
    ``label_noise_score`` (voxels where both models agree against the label, over voxels the label or their
    consensus calls object) and ``label_noise_worst``.
    """

    plan = targets or scan_targets(point.volume, label, liver, max_hot_spots=max_hot_spots)
    components = plan.components
    scored, pairs, noisy_total, union_total = [], [], 0, 0
    for target in plan.targets:
        pair = prompt_pair(point, box, target.click, target.corners, around=[target.box])
        pairs.append(pair)
        if consensus is not None:
            consensus[pair.region] |= 0.5 * (pair.point + pair.box) > 0.5  # as CPCL defines consensus
        record = {"voxel": target.click, "kind": target.kind, "disagreement": round(pair.disagreement(), 4),
                  "entropy_bits": round(pair.entropy_bits(), 4)}
        if label is not None:
            here = components[pair.region]
            this = here == target.component if target.component else np.zeros(here.shape, dtype=bool)
            others = (here > 0) & ~this  # each label component answers for its own voxels
            rule = confidence_targets(pair.point, pair.box, this, **(confidence or {}))
            noisy = rule.noisy.numpy() & ~others
            union = (this | rule.consensus.numpy()) & ~others
            noisy_total += int(noisy.sum())
            union_total += int(union.sum())
            record["noise_score"] = round(int(noisy.sum()) / max(int(union.sum()), 1), 4)
        scored.append(record)

    order = sorted(range(len(scored)), key=lambda i: scored[i]["disagreement"], reverse=True)
    top = [scored[i] for i in order]
    count = sum(t.kind == "label" for t in plan.targets)
    result = {
        "cross_prompt_disagreement": _mean([r["disagreement"] for r in top[:TOP_TARGETS]]),
        "cross_prompt_entropy": _mean([r["entropy_bits"] for r in top[:TOP_TARGETS]]),
        "cross_prompt_worst": top[:WORST_REPORTED],
        "cross_prompt_features": scan_descriptor(point, [pairs[i].geometry for i in order[:TOP_TARGETS]]),
        "hot_spot_threshold": round(float(plan.threshold), 4),
        "liver_reference": plan.liver,
        "targets": {"label": count, "hot_spot": len(plan.targets) - count, "organ_spot": plan.organ_spots},
    }
    if label is not None:
        result["label_noise_score"] = round(noisy_total / union_total, 4) if union_total else 0.0
        result["label_noise_worst"] = sorted(scored, key=lambda r: r["noise_score"], reverse=True)[:WORST_REPORTED]
    return result


def scan_descriptor(session: VolumeSession, geometries: list[CropGeometry]) -> list[float] | None:
    """The mean image embedding (channels averaged over the crop's tokens) of the scan's most disputed
    targets, projected to DESCRIPTOR_DIMS by a fixed random matrix and scaled to unit length: scans whose
    disputed objects look alike to the encoder lie close together. None without a target."""
    if not geometries:
        return None
    predictor = session.predictor
    channels = predictor.preset.prompt_dim  # the encoder's own channels (a detail encoder's ride behind)
    pooled = np.mean([predictor.embedding(session, g)[0][0, :channels].mean(dim=(1, 2, 3)).numpy()
                      for g in geometries], axis=0)
    projection = np.random.default_rng(DESCRIPTOR_SEED).standard_normal((channels, DESCRIPTOR_DIMS))
    projected = pooled @ projection / np.sqrt(DESCRIPTOR_DIMS)
    return [round(float(v), 4) for v in projected / max(float(np.linalg.norm(projected)), 1e-12)]


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 4) if values else 0.0
