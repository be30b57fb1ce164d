"""Lesions: how many, where, how large and how avid, and their irregular shapes.

A lesion is the ``N`` voxels (N = volume / voxel volume) that score highest on a smooth field
"inside a randomly oriented ellipsoid, plus low-frequency bumps", restricted to the tissue it may
grow in and kept away from other lesions. Choosing voxels by count gives exact volumes on any grid
and irregular but compact shapes. Statistics follow shared/reference/pet.md section 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import erf

from segany_pet.pet.organs import ORGAN_LABELS, ORGAN_NAMES
from segany_pet.phantom.anatomy import Anatomy, Ellipsoid, SmoothField

# Where lesions arise, per tracer (lesions placed against a hot organ are drawn separately).
SITE_WEIGHTS: dict[str, dict[str, float]] = {
    "fdg": {"lymph node": 0.5, "lung": 0.2, "liver": 0.15, "bone": 0.15},
    "psma": {"lymph node": 0.45, "bone": 0.4, "prostate": 0.08, "liver": 0.04, "lung": 0.03},
}
# Share of lesions deliberately placed against a hot organ: the hard cases of pet.md.
TOUCH_SHARE = 0.25
TOUCH_WEIGHTS: dict[str, dict[str, float]] = {
    "fdg": {"bladder": 0.25, "kidney": 0.3, "heart": 0.25, "brain": 0.2},
    "psma": {"bladder": 0.4, "kidney": 0.4, "heart": 0.15, "brain": 0.05},
}
_TOUCH_ORGANS = {
    "bladder": ("bladder",),
    "kidney": ("kidney_left", "kidney_right", "renal_pelvis"),
    "heart": ("heart_myocardium", "heart_blood"),
    "brain": ("brain",),
}
# Organs whose physiological uptake blurs into an adjacent lesion; a lesion's "touches" names one.
HOT_NEIGHBOURS = (
    "brain",
    "heart_myocardium",
    "heart_blood",
    "kidney_left",
    "kidney_right",
    "renal_pelvis",
    "bladder",
    "bowel",
    "salivary_glands",
)
# Tissue a lesion of each site may occupy (it replaces that tissue).
_GROWS_IN = {
    "lymph node": ("muscle", "fat"),
    "lung": ("lung_left", "lung_right", "muscle"),
    "liver": ("liver",),
    "bone": ("bone_marrow", "muscle"),
    "prostate": ("muscle", "fat"),
    "brain": ("brain",),
}
# Where a site's centre is drawn (organ shapes to sample inside, and the labels to hit).
_SITE_ORGANS = {
    "lung": ("lung_left", "lung_right"),
    "liver": ("liver",),
    "bone": ("bone_marrow",),
    "brain": ("brain",),
}
# Largest plausible volume per site (mL): a vertebra does not hold a 300 mL mass.
_MAX_ML = {"lymph node": 150.0, "lung": 150.0, "liver": 300.0, "bone": 40.0, "prostate": 30.0, "brain": 30.0}
_NODE_STATION_WEIGHT = {"psma": {"iliac": 3.0, "para-aortic": 2.0, "inguinal": 1.5}}
MAX_LESIONS = 80


@dataclass
class LesionPlan:
    site: str  # lymph node, lung, liver, bone, prostate, brain
    volume_ml: float
    suvmax: float  # wanted SUVmax as measured in the final image
    necrotic: bool
    against: str | None  # organ group the lesion is placed against (bladder, kidney, heart, brain)
    seed: np.random.SeedSequence  # shape and placement stream, independent of other lesions


def _lognormal(rng, median, sigma, lo, hi) -> float:
    return float(np.clip(rng.lognormal(np.log(median), sigma), lo, hi))


def draw_lesion_plans(tracer: str, rng: np.random.Generator, seeds: np.random.SeedSequence) -> list[LesionPlan]:
    """How many lesions a positive case has, and for each its site, size and avidity."""
    count = int(np.clip(round(rng.lognormal(np.log(4.0 if tracer == "fdg" else 5.0), 0.85)), 1, 30))
    sites = SITE_WEIGHTS[tracer]
    touch = TOUCH_WEIGHTS[tracer]
    rows: list[tuple[str, str | None, float]] = []
    for _ in range(count):
        against = None
        if rng.random() < TOUCH_SHARE:
            against = str(rng.choice(list(touch), p=list(touch.values())))
            site = "brain" if against == "brain" else "lymph node"
        else:
            site = str(rng.choice(list(sites), p=list(sites.values())))
        rows.append((site, against, _lognormal(rng, 3.0, 1.25, 0.15, _MAX_ML[site])))
    if tracer == "psma" and rng.random() < 0.1:
        # Disseminated bone disease: dozens of small skeletal lesions.
        for _ in range(int(rng.integers(20, 60))):
            rows.append(("bone", None, _lognormal(rng, 1.0, 0.8, 0.15, 15.0)))
    rows = rows[:MAX_LESIONS]
    plans = []
    for (site, against, volume), seed in zip(rows, seeds.spawn(len(rows)), strict=True):
        if tracer == "fdg":
            suvmax = _lognormal(rng, 6.5, 0.6, 2.5, 45.0)
            necrotic = volume > 15.0 and rng.random() < 0.5
        else:
            suvmax = _lognormal(rng, 11.0, 0.75, 3.0, 120.0)
            necrotic = volume > 15.0 and rng.random() < 0.3
        plans.append(LesionPlan(site, volume, suvmax, necrotic, against, seed))
    # Large lesions first, so they find room; the small ones fit around them.
    return sorted(plans, key=lambda plan: -plan.volume_ml)


def sphere_recovery(radius_mm: float, fwhm_mm: float) -> float:
    """Peak of a uniform sphere after Gaussian blurring, relative to its true value."""
    s = fwhm_mm / 2.3548
    q = radius_mm / s
    return float(erf(q / np.sqrt(2.0)) - np.sqrt(2.0 / np.pi) * q * np.exp(-q * q / 2.0))


@dataclass
class _Shape:
    axes_ratio: np.ndarray
    rot: np.ndarray
    bumps: SmoothField
    bump_amp: float
    core_share: float  # necrotic core, share of the lesion's volume


def _draw_shape(rng: np.random.Generator, radius_mm: float) -> _Shape:
    ratio = rng.uniform(0.65, 1.0, 3)
    ratio /= np.cbrt(np.prod(ratio))
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    rot = q * np.sign(np.diag(r))
    bumps = SmoothField(rng, wavelength_mm=max(2.5 * radius_mm, 8.0), n_waves=6)
    return _Shape(ratio, rot, bumps, float(rng.uniform(0.1, 0.3)), float(rng.uniform(0.2, 0.45)))


def _labels_of(names) -> list[int]:
    return [ORGAN_LABELS[n] for n in names]


def _sample_in_organs(anatomy: Anatomy, names, rng) -> np.ndarray | None:
    """A uniform point inside the named organs, by rejection within their placed shapes."""
    shapes = [s for n in names for s in anatomy.shapes.get(n, [])]
    if not shapes:
        return None
    weights = np.array([np.prod(s.axes) for s in shapes], dtype=float)
    wanted = set(_labels_of(names))
    for _ in range(60):
        shape = shapes[rng.choice(len(shapes), p=weights / weights.sum())]
        lo, hi = shape.bbox()
        point = rng.uniform(lo, hi)
        if anatomy.label_at(point) in wanted:
            return point
    return None


def _candidate_centre(plan: LesionPlan, anatomy: Anatomy, rng, radius_mm: float, tracer: str):
    """One candidate lesion centre (mm), or None."""
    if plan.against is not None and plan.against != "brain":
        # Walk out from the organ centre along a random direction to its surface, then a little on.
        organs = _TOUCH_ORGANS[plan.against]
        shape_key = {"heart": "heart", "bladder": "bladder"}.get(plan.against) or str(rng.choice(organs[:2]))
        centre = anatomy.shapes[shape_key][0].centre
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        inside = set(_labels_of(organs))
        for step in np.arange(0.0, 200.0, 1.0):
            if anatomy.label_at(centre + step * direction) not in inside:
                return centre + (step + rng.uniform(0.2, 0.7) * radius_mm) * direction
        return None
    if plan.site == "lymph node":
        names = list(anatomy.stations)
        weights = np.array(
            [max((w for k, w in _NODE_STATION_WEIGHT.get(tracer, {}).items() if k in n), default=1.0) for n in names]
        )
        mean, spread = anatomy.stations[names[rng.choice(len(names), p=weights / weights.sum())]]
        return mean + spread * rng.normal(size=3)
    if plan.site == "prostate":
        return anatomy.prostate_mm + rng.normal(0.0, 5.0, 3)
    return _sample_in_organs(anatomy, _SITE_ORGANS[plan.site], rng)


def _carve(plan, shape, centre, radius_mm, anatomy: Anatomy, lesion_map):
    """The lesion's voxels around ``centre``: (box, mask, field, rho) or None if it does not fit."""
    grid = anatomy.grid
    axes = radius_mm * shape.axes_ratio
    reach = 1.8 * float(np.max(axes)) + 2.0 * max(grid.spacing)
    box = grid.box(centre - reach, centre + reach)
    if box is None:
        return None
    ellipsoid = Ellipsoid(np.asarray(centre, dtype=float), axes, rot=shape.rot)
    _, rho = ellipsoid.rho(grid, box)
    x, y, z = grid.mesh(box)
    score = -rho + shape.bump_amp * shape.bumps(x - centre[0], y - centre[1], z - centre[2])
    labels = anatomy.labels[box]
    allowed = np.isin(labels, _labels_of(_GROWS_IN[plan.site]))
    # Lesions never touch one another: each stays its own 26-connected component.
    allowed &= ~ndimage.binary_dilation(lesion_map[box] > 0, structure=np.ones((3, 3, 3), bool))
    wanted = max(1, int(round(plan.volume_ml / grid.voxel_ml)))
    available = int(allowed.sum())
    if available < max(1, wanted // 2):
        return None
    score = np.where(allowed, score, -np.inf)
    chosen = np.argpartition(-score.ravel(), min(wanted, available) - 1)[: min(wanted, available)]
    mask = np.zeros(score.shape, dtype=bool)
    mask.ravel()[chosen] = True
    parts, n_parts = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n_parts > 1:
        sizes = np.bincount(parts.ravel())[1:]
        mask = parts == (1 + int(np.argmax(sizes)))
    if mask.sum() < max(1, wanted // 2):
        return None
    if plan.against is not None and plan.against != "brain":
        near = ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), bool))
        if not np.isin(labels[near], _labels_of(_TOUCH_ORGANS[plan.against])).any():
            return None
    return box, mask, score, np.asarray(rho)


def place_lesions(
    anatomy: Anatomy,
    suv: np.ndarray,
    plans: list[LesionPlan],
    tracer: str,
    fwhm_mm: float,
) -> tuple[np.ndarray, list[LesionPlan]]:
    """Carve the planned lesions and paint their uptake into ``suv`` (modified in place).

    Returns the int16 instance map (lesion n has value n, in placement order) and the plans that
    found room, in id order. Uptake is raised by the expected partial-volume loss (at most 2.5x)
    so the measured SUVmax follows the planned distribution; the tiniest lesions stay faint.
    """
    lesion_map = np.zeros(anatomy.grid.shape, dtype=np.int16)
    placed: list[LesionPlan] = []
    for plan in plans:
        rng = np.random.default_rng(plan.seed)
        radius = float(np.cbrt(3.0 * plan.volume_ml * 1000.0 / (4.0 * np.pi)))
        shape = _draw_shape(rng, radius)  # drawn before placement, so every grid sees the same shape
        carved = None
        for _ in range(30):
            centre = _candidate_centre(plan, anatomy, rng, radius, tracer)
            if centre is None or anatomy.label_at(centre) == 0:
                continue
            carved = _carve(plan, shape, centre, radius, anatomy, lesion_map)
            if carved is not None:
                break
        if carved is None:
            continue
        box, mask, score, rho = carved
        region = suv[box]
        background = float(region[mask].mean())
        gain = 1.0 / max(sphere_recovery(radius, fwhm_mm), 0.4)
        peak = max(background + (plan.suvmax - background) * gain, 1.4 * background)
        inner = score[mask]
        rank = (inner - inner.min()) / max(float(np.ptp(inner)), 1e-6)
        values = background + (peak - background) * (0.6 + 0.4 * rank)
        if plan.necrotic:
            core = rho[mask] <= np.quantile(rho[mask], shape.core_share)
            values[core] = rng.uniform(0.4, 1.2) * min(background, 1.5)
        region[mask] = values.astype(np.float32)
        placed.append(plan)
        lesion_map[box][mask] = len(placed)
    return lesion_map, placed


def describe_lesions(
    lesion_map: np.ndarray, image: np.ndarray, anatomy: Anatomy, plans: list[LesionPlan]
) -> list[dict]:
    """Per lesion: centre, volume, SUVmax/SUVmean measured in ``image``, site, hot neighbour."""
    grid = anatomy.grid
    hot = np.array(_labels_of(HOT_NEIGHBOURS))
    rows = []
    for lesion_id, box in enumerate(ndimage.find_objects(lesion_map), start=1):
        if box is None:
            continue
        plan = plans[lesion_id - 1]
        padded = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, grid.shape, strict=True))
        mask = lesion_map[padded] == lesion_id
        values = image[padded][mask]
        offset = np.array([s.start for s in padded])
        voxels = np.argwhere(mask)
        centroid = voxels.mean(axis=0)
        centre = voxels[np.argmin(((voxels - centroid) ** 2).sum(axis=1))] + offset
        shell = ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), bool)) & ~mask
        neighbours = anatomy.labels[padded][shell]
        neighbours = neighbours[np.isin(neighbours, hot)]
        touches = ORGAN_NAMES[int(np.bincount(neighbours).argmax())] if neighbours.size else None
        rows.append(
            {
                "id": lesion_id,
                "centre_voxel": [int(v) for v in centre],
                "centre_mm": [round(float(v), 2) for v in grid.to_world(centre)],
                "volume_ml": round(float(mask.sum() * grid.voxel_ml), 4),
                "suvmax": round(float(values.max()), 3),
                "suvmean": round(float(values.mean()), 3),
                "necrotic": bool(plan.necrotic),
                "site": plan.site,
                "touches": touches,
                "placed_against": plan.against,
            }
        )
    return rows
