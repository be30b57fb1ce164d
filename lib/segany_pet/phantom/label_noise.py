"""Label-noise injection: corrupt ground-truth lesion masks the way hurried annotators do.

Each case is corrupted with probability ``rate``; a corrupted case gets one to three different
operations: over-segmentation (dilate), under-segmentation (erode), shift (a misregistered copy),
missed lesions, spurious components, boundary jitter and, given the SUV image, the two mistakes of
quick threshold labelling: outlines replaced by 41%-of-SUVmax regions (which bleed into neighbouring
uptake or stop short of a heterogeneous lesion) and hot physiological uptake labelled as a lesion. The
record lists exactly what was done
(lesion ids, parameters, voxels changed) and the Dice of the noisy against the true mask, so
noise-robust training and label auditing can be scored against it.
"""

from __future__ import annotations

import glob
import json
import os
import zlib

import nibabel as nib
import numpy as np
from scipy import ndimage

from segany_pet.pet import save_nifti

NOISE_KINDS = ("over", "under", "shift", "missed", "spurious", "jitter", "threshold", "organ")
IMAGE_KINDS = ("threshold", "organ")  # need the SUV image; without one they are never drawn
# Operations run in this order whatever order they were drawn in, so a dropped lesion stays
# dropped and spurious blobs are added last, away from every true lesion.
_ORDER = ("missed", "threshold", "shift", "over", "under", "jitter", "spurious", "organ")
THRESHOLD = 0.41  # of SUVmax: the common fixed-threshold outline (pet.md)
THRESHOLD_MARGIN_MM = 8.0  # how far a threshold outline may reach beyond the lesion's box (the tool's box)
ORGAN_CLEARANCE_MM = 20.0  # labelled organ uptake keeps this far from every true lesion
ORGAN_REACH_MM = 15.0  # ... and covers at most this far around the clicked voxel
_CUBE = np.ones((3, 3, 3), dtype=bool)
# Spurious components get ids from here on, so they never reuse the id of a true lesion.
SPURIOUS_ID_BASE = 1 << 20


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius**2


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _padded_box(box, pad: int, shape):
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, shape, strict=True))


def _some(rng: np.random.Generator, ids: list[int], share: float) -> list[int]:
    """A random non-empty subset, each id kept with probability ``share``."""
    chosen = [i for i in ids if rng.random() < share]
    return sorted(chosen or [int(rng.choice(ids))])


def inject_label_noise(
    lesions: np.ndarray,
    spacing,
    seed: int,
    rate: float,
    kinds=None,
    body: np.ndarray | None = None,
    suv: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """A noisy binary lesion mask (uint8) and the record of what was done to it.

    ``lesions`` is an instance map (0 background, lesion n = n); ``spacing`` in mm per axis;
    ``kinds`` limits the operations (default all of NOISE_KINDS); ``body`` (bool, same shape),
    when given, is where spurious components may appear, else they appear near true lesions;
    ``suv`` (float, same shape) enables IMAGE_KINDS. Without it a seed draws what it drew before they
    existed. Deterministic per seed.
    """
    kinds = list(NOISE_KINDS if kinds is None else kinds)
    unknown = sorted(set(kinds) - set(NOISE_KINDS))
    if unknown:
        raise ValueError(f"unknown label-noise kinds {unknown}; choose from {list(NOISE_KINDS)}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label-noise rate must be within [0, 1], got {rate}")
    spacing = np.asarray(spacing, dtype=float)
    truth = lesions > 0
    rng = np.random.default_rng(int(seed))
    work = lesions.astype(np.int32, copy=True)
    ids = _present(work)
    record: dict = {
        "seed": int(seed),
        "rate": float(rate),
        "true_lesion_ids": ids,
        "corrupted": False,
        "operations": [],
    }

    if rng.random() < rate:
        if suv is None:
            kinds = [k for k in kinds if k not in IMAGE_KINDS]
        elif suv.shape != lesions.shape:
            raise ValueError(f"SUV image {suv.shape} and lesion map {lesions.shape} differ in shape")
        usable = kinds if ids else [k for k in kinds if k in ("spurious", "organ")]
        if usable:
            wanted = 1 + int(rng.random() < 0.35) + int(rng.random() < 0.1)
            drawn = [str(k) for k in rng.choice(usable, size=min(wanted, len(usable)), replace=False)]
            if "over" in drawn and "under" in drawn:  # opposite edits of the same boundary: keep one
                drawn.remove(drawn[max(drawn.index("over"), drawn.index("under"))])
            for kind in sorted(drawn, key=_ORDER.index):
                operation = _OPERATIONS[kind](work, truth, spacing, rng, body, suv)
                if operation is not None:
                    record["operations"].append({"kind": kind, **operation})
        record["corrupted"] = bool(record["operations"])

    noisy = (work > 0).astype(np.uint8)
    record["true_voxels"] = int(truth.sum())
    record["noisy_voxels"] = int(noisy.sum())
    record["dice"] = round(_dice(truth, noisy > 0), 6)
    return noisy, record


def _present(work: np.ndarray) -> list[int]:
    """Ids of the lesions in an instance map (bincount: far faster than np.unique on big grids)."""
    if work.size == 0 or int(work.max()) <= 0:
        return []
    return [int(i) for i in np.flatnonzero(np.bincount(work.ravel())) if i > 0]


def _missed(work, truth, spacing, rng, body, suv):
    present = _present(work)
    if not present:
        return None
    count = int(rng.integers(1, max(1, int(np.ceil(len(present) / 3))) + 1))
    dropped = sorted(int(i) for i in rng.choice(present, size=count, replace=False))
    removed = np.isin(work, dropped)
    work[removed] = 0
    return {"lesion_ids": dropped, "voxels_removed": int(removed.sum())}


def _shift(work, truth, spacing, rng, body, suv):
    present = _present(work)
    if not present:
        return None
    chosen = _some(rng, present, 0.6)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    offset = np.rint(direction * rng.uniform(3.0, 8.0) / spacing).astype(int)
    if not offset.any():  # coarse grids: a few mm can round to nothing; move one voxel at least
        axis = int(np.argmax(np.abs(direction)))
        offset[axis] = 1 if direction[axis] > 0 else -1
    shape = np.array(work.shape)
    boxes = ndimage.find_objects(work)
    moved_total = 0
    for lesion_id in chosen:
        box = boxes[lesion_id - 1]
        voxels = np.argwhere(work[box] == lesion_id) + [s.start for s in box]
        work[tuple(voxels.T)] = 0
        target = voxels + offset
        inside = np.all((target >= 0) & (target < shape), axis=1)
        target = target[inside]
        free = work[tuple(target.T)] == 0
        work[tuple(target[free].T)] = lesion_id
        moved_total += int(free.sum())
    return {
        "lesion_ids": chosen,
        "offset_voxels": [int(v) for v in offset],
        "offset_mm": [round(float(v), 3) for v in offset * spacing],
        "voxels_moved": moved_total,
    }


def _grow_or_shrink(work, rng, grow: bool):
    present = _present(work)
    if not present:
        return None
    chosen = _some(rng, present, 0.6)
    radius = int(rng.integers(1, 4) if grow else rng.integers(1, 3))
    ball = _ball(radius)
    boxes = ndimage.find_objects(work)
    changed = 0
    for lesion_id in chosen:
        box = _padded_box(boxes[lesion_id - 1], radius + 1, work.shape)
        region = work[box]
        mask = region == lesion_id
        if grow:
            new = ndimage.binary_dilation(mask, structure=ball) & (region == 0)
            region[new] = lesion_id
            changed += int(new.sum())
        else:
            kept = ndimage.binary_erosion(mask, structure=ball)
            if not kept.any():  # an eroded-away lesion would be a miss, not an under-segmentation
                depth = ndimage.distance_transform_edt(mask)
                kept = np.zeros_like(mask)
                kept[np.unravel_index(int(np.argmax(depth)), mask.shape)] = True
            lost = mask & ~kept
            region[lost] = 0
            changed += int(lost.sum())
    return {"lesion_ids": chosen, "radius_voxels": radius, ("voxels_added" if grow else "voxels_removed"): changed}


def _over(work, truth, spacing, rng, body, suv):
    return _grow_or_shrink(work, rng, grow=True)


def _under(work, truth, spacing, rng, body, suv):
    return _grow_or_shrink(work, rng, grow=False)


def _jitter(work, truth, spacing, rng, body, suv):
    present = _present(work)
    if not present:
        return None
    flip = float(rng.uniform(0.15, 0.35))
    boxes = ndimage.find_objects(work)
    added = removed = 0
    for lesion_id in present:
        box = _padded_box(boxes[lesion_id - 1], 2, work.shape)
        region = work[box]
        mask = region == lesion_id
        inner = mask & ~ndimage.binary_erosion(mask, structure=_CUBE)
        outer = ndimage.binary_dilation(mask, structure=_CUBE) & (region == 0)
        draws = rng.random(mask.shape)
        off = inner & (draws < flip)
        if off.sum() == mask.sum():  # never jitter a lesion out of existence
            off[np.unravel_index(int(np.argmax(mask)), mask.shape)] = False
        on = outer & (draws < flip)
        region[off] = 0
        region[on] = lesion_id
        added += int(on.sum())
        removed += int(off.sum())
    return {"lesion_ids": present, "flip_probability": round(flip, 4), "voxels_added": added, "voxels_removed": removed}


def _spurious(work, truth, spacing, rng, body, suv):
    shape = np.array(work.shape)
    clearance_mm = 20.0
    reach = np.ceil(clearance_mm / spacing).astype(int)
    lesion_voxels = np.argwhere(truth)
    blobs = []
    next_id = max(int(work.max()) + 1, SPURIOUS_ID_BASE)
    for _ in range(int(rng.integers(1, 3))):
        radius_mm = float(rng.uniform(3.0, 10.0))
        centre = None
        for _ in range(200):
            if body is not None and body.any():
                candidate = np.array([rng.integers(0, n) for n in shape])
                if not body[tuple(candidate)]:
                    continue
            elif len(lesion_voxels):
                direction = rng.normal(size=3)
                direction /= np.linalg.norm(direction)
                anchor = lesion_voxels[rng.integers(len(lesion_voxels))]
                candidate = np.rint(anchor + direction * rng.uniform(25.0, 60.0) / spacing).astype(int)
            else:
                candidate = np.rint(shape * rng.uniform(0.25, 0.75, 3)).astype(int)
            if np.any(candidate < 0) or np.any(candidate >= shape):
                continue
            near = tuple(slice(max(c - r, 0), c + r + 1) for c, r in zip(candidate, reach, strict=True))
            if truth[near].any() or (work[near] > 0).any():
                continue
            centre = candidate
            break
        if centre is None:
            continue
        half = np.ceil(radius_mm / spacing).astype(int)
        box = tuple(slice(max(c - h, 0), min(c + h + 1, n)) for c, h, n in zip(centre, half, shape, strict=True))
        grids = np.meshgrid(
            *[(np.arange(s.start, s.stop) - c) * sp for s, c, sp in zip(box, centre, spacing, strict=True)],
            indexing="ij",
        )
        blob = sum(g**2 for g in grids) <= radius_mm**2
        blob[tuple(c - s.start for c, s in zip(centre, box, strict=True))] = True
        region = work[box]
        new = blob & (region == 0)
        region[new] = next_id
        blobs.append(
            {"centre_voxel": [int(c) for c in centre], "radius_mm": round(radius_mm, 3), "voxels": int(new.sum())}
        )
        next_id += 1
    if not blobs:
        return None
    return {"lesion_ids": [], "components": blobs, "voxels_added": sum(b["voxels"] for b in blobs)}


def _margin(box, margin_mm: float, spacing, shape):
    pad = np.ceil(margin_mm / spacing).astype(int)
    return tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(box, pad, shape, strict=True))


def _threshold_region(values: np.ndarray, peak_at: tuple, allowed: np.ndarray) -> np.ndarray:
    """The connected region of ``values`` >= THRESHOLD x the value at ``peak_at`` that holds it, within
    ``allowed``: what a fixed-threshold tool outlines from a click at the peak."""
    above = (values >= THRESHOLD * values[peak_at]) & allowed
    components, _ = ndimage.label(above, structure=_CUBE)
    return components == components[peak_at]


def _threshold(work, truth, spacing, rng, body, suv):
    present = _present(work)
    if not present:
        return None
    chosen = _some(rng, present, 0.6)
    boxes = ndimage.find_objects(work)
    added = removed = 0
    for lesion_id in chosen:
        box = _margin(boxes[lesion_id - 1], THRESHOLD_MARGIN_MM, spacing, work.shape)
        region, values = work[box], suv[box]
        mask = region == lesion_id
        peak = np.unravel_index(int(np.argmax(np.where(mask, values, -np.inf))), mask.shape)
        outline = _threshold_region(values, peak, (region == 0) | mask)  # other lesions keep their voxels
        region[mask & ~outline] = 0
        region[outline & ~mask] = lesion_id
        added += int((outline & ~mask).sum())
        removed += int((mask & ~outline).sum())
    if not added + removed:  # outlines that match the label are no corruption
        return None
    return {"lesion_ids": chosen, "threshold": THRESHOLD, "voxels_added": added, "voxels_removed": removed}


def _organ(work, truth, spacing, rng, body, suv):
    clear = ndimage.distance_transform_edt(~truth, sampling=spacing) > ORGAN_CLEARANCE_MM if truth.any() else \
        np.ones(truth.shape, dtype=bool)
    clear &= work == 0
    inside = suv[clear]
    if inside.size == 0:
        return None
    hot = clear & (suv >= np.quantile(inside, 0.998))  # the brightest uptake away from lesions: organs
    candidates = np.argwhere(hot)
    components = []
    next_id = max(int(work.max()) + 1, SPURIOUS_ID_BASE)
    for _ in range(int(rng.integers(1, 3))):
        if not len(candidates):
            break
        centre = tuple(int(c) for c in candidates[rng.integers(len(candidates))])
        point = tuple(slice(c, c + 1) for c in centre)
        box = _margin(point, ORGAN_REACH_MM, spacing, work.shape)
        region, values = work[box], suv[box]
        local = tuple(c - s.start for c, s in zip(centre, box, strict=True))
        new = _threshold_region(values, local, (region == 0) & clear[box])
        region[new] = next_id
        components.append({"centre_voxel": list(centre), "suv": round(float(suv[centre]), 3), "voxels": int(new.sum())})
        next_id += 1
        candidates = candidates[work[tuple(candidates.T)] == 0]
    if not components:
        return None
    return {"lesion_ids": [], "components": components, "voxels_added": sum(c["voxels"] for c in components)}


_OPERATIONS = {
    "missed": _missed,
    "shift": _shift,
    "over": _over,
    "under": _under,
    "jitter": _jitter,
    "spurious": _spurious,
    "threshold": _threshold,
    "organ": _organ,
}


def write_noisy_labels(
    cohort_dir: str | os.PathLike, out_tag_dir: str | os.PathLike, rate: float, seed: int, kinds=None
) -> dict:
    """Noisy binary labels for every ``truth/*_lesions.nii.gz`` of a cohort.

    Writes ``out_tag_dir/<case>.nii.gz`` (uint8, the image's grid) and
    ``out_tag_dir/noise_records.json`` ({rate, seed, kinds, cases: {case: record}}); returns that
    dict. Each case's noise depends only on (seed, case id), so subsets of a cohort agree. The SUV image
    (``images/<case>.nii.gz``), where there is one, enables IMAGE_KINDS.
    """
    paths = sorted(glob.glob(os.path.join(cohort_dir, "truth", "*_lesions.nii.gz")))
    if not paths:
        raise FileNotFoundError(f"no truth/*_lesions.nii.gz under {cohort_dir}; write a cohort first")
    os.makedirs(out_tag_dir, exist_ok=True)
    cases = {}
    for path in paths:
        case_id = os.path.basename(path)[: -len("_lesions.nii.gz")]
        image = nib.load(path)
        lesions = np.asarray(image.dataobj).astype(np.int32)
        organs_path = os.path.join(cohort_dir, "truth", f"{case_id}_organs.nii.gz")
        body = np.asarray(nib.load(organs_path).dataobj) > 0 if os.path.exists(organs_path) else None
        image_path = os.path.join(cohort_dir, "images", f"{case_id}.nii.gz")
        suv = np.asarray(nib.load(image_path).dataobj, dtype=np.float32) if os.path.exists(image_path) else None
        case_seed = int(np.random.SeedSequence([int(seed), zlib.crc32(case_id.encode())]).generate_state(1)[0])
        noisy, record = inject_label_noise(lesions, image.header.get_zooms()[:3], case_seed, rate, kinds, body, suv)
        save_nifti(noisy, image.affine, os.path.join(out_tag_dir, f"{case_id}.nii.gz"))
        cases[case_id] = record
    summary = {"rate": float(rate), "seed": int(seed), "kinds": list(kinds or NOISE_KINDS), "cases": cases}
    with open(os.path.join(out_tag_dir, "noise_records.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
