"""What clinicians read off a segmentation: SUVmax, SUVmean, SUVpeak, MTV and TLG per lesion and in total.

A lesion is a 26-connected component of the mask (voxels sharing a face, an edge or a corner belong to
the same lesion), the convention of the autoPET IV click protocol. Arrays are indexed ``[i, j, k]`` in
the stored order of the image and ``spacing`` is the voxel size in mm along those axes; volumes come
from the spacing (exact for any rotated grid, only a sheared grid would differ).

Definitions
- SUVmax, SUVmean: maximum and mean SUV over the lesion's voxels.
- MTV (mL): number of voxels * voxel volume.  TLG = SUVmean * MTV.
- SUVpeak: the highest mean SUV of a 1 mL sphere (radius 6.2 mm) centred on any voxel of the lesion;
  the sphere may reach outside the lesion (PERCIST). Its voxels are those whose centres lie within the
  radius; where the sphere is cut by the edge of the volume, the mean is over the voxels that exist.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from segany_pet.errors import UserInputError
from segany_pet.prompts import centre_click

LESION_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
PEAK_SPHERE_RADIUS_MM = 6.2  # a 1 mL sphere: (3 * 1000 mm^3 / (4 pi)) ** (1/3) = 6.20 mm
DECIMALS = 4  # SUV to 1e-4, mL to 0.1 uL: below any measurement's meaning, above float noise


def sphere_kernel(spacing, radius_mm: float) -> np.ndarray:
    """Boolean ball of the voxels whose centres lie within ``radius_mm`` of the centre voxel."""
    half = [int(np.floor(radius_mm / s + 1e-9)) for s in spacing]
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    dist2 = sum((g * s) ** 2 for g, s in zip(grids, spacing, strict=True))
    return dist2 <= radius_mm**2 * (1 + 1e-9)  # tolerance: a centre exactly on the surface is inside


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 26-connected lesions of ``mask`` as 1..n, largest first.

    The ids are the ones :func:`quantify` reports, so ``labels == lesion["id"]`` selects a lesion.
    Lesions of equal size keep the raster order of their first voxel.
    """
    labels, count = ndimage.label(np.asarray(mask) > 0, structure=LESION_CONNECTIVITY)
    if count == 0:
        return labels, 0
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")
    new_id = np.zeros(count + 1, dtype=labels.dtype)
    new_id[order + 1] = np.arange(1, count + 1, dtype=labels.dtype)
    return new_id[labels], count


def label_in_box(mask: np.ndarray, structure=LESION_CONNECTIVITY) -> tuple[np.ndarray, int]:
    """``ndimage.label`` of a bool mask computed on its bounding box: the same labels (a box keeps the raster
    order that numbers them), and on a whole-body grid with a sparse mask a fraction of the time."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    box = mask_bounding_box(mask)
    if box is None:
        return labels, 0
    labels[box], count = ndimage.label(mask[box], structure=structure)
    return labels, count


def mask_bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The smallest box holding every non-zero voxel, or None for an empty mask.

    Per-axis projections cost a few milliseconds on a whole-body grid, far less than a full scan.
    """
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def quantify(suv: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], region=None) -> dict:
    """Per-lesion and total uptake measures of ``mask`` on the SUV image.

    Returns ``{"lesions": [{"id", "voxels", "centre_voxel", "suvmax", "suvmean", "suvpeak", "mtv_ml",
    "tlg"}, ...], "total": {"count", "mtv_ml", "tlg", "suvmax"}}`` with lesions largest first, plain
    Python numbers (JSON-ready) rounded to 4 decimals. ``centre_voxel`` is the lesion voxel deepest
    inside it (maximum of its distance transform, where autoPET IV places its clicks), so it always
    lies on the lesion even when the lesion is curved or hollow. An empty mask gives no lesions and
    zero totals. ``region`` (slices), when the caller knows a box holding every mask voxel, spares the
    search for it (tens of milliseconds on an autoPET-sized grid).
    """
    suv = np.asarray(suv)
    mask = np.asarray(mask)
    if suv.ndim != 3 or suv.shape != mask.shape:
        raise UserInputError(
            f"mask of shape {mask.shape} does not match the SUV image of shape {suv.shape}; "
            "the segmentation must be on the PET grid"
        )
    spacing = _check_spacing(spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    # Label only the mask's bounding box: on a whole-body grid that is ~1000x less work than the volume.
    if region is None:
        region = mask_bounding_box(mask)
    labels, count = label_lesions(mask[region]) if region else (None, 0)
    kernel = sphere_kernel(spacing, PEAK_SPHERE_RADIUS_MM)

    lesions = []
    for lesion_id, local_box in enumerate(ndimage.find_objects(labels) if count else [], start=1):
        inside = labels[local_box] == lesion_id
        box = tuple(slice(s.start + r.start, s.stop + r.start) for s, r in zip(local_box, region, strict=True))
        values = suv[box][inside].astype(np.float64)
        mtv = values.size * voxel_ml
        suvmean = float(values.mean())
        centre = centre_click(inside, spacing)
        lesions.append(
            {
                "id": lesion_id,
                "voxels": int(values.size),
                "centre_voxel": [int(s.start + c) for s, c in zip(box, centre, strict=True)],
                "suvmax": float(values.max()),
                "suvmean": suvmean,
                "suvpeak": _suv_peak(suv, box, inside, kernel),
                "mtv_ml": mtv,
                "tlg": suvmean * mtv,
            }
        )
    total = {
        "count": count,
        "mtv_ml": _round(sum(lesion["mtv_ml"] for lesion in lesions)),
        "tlg": _round(sum(lesion["tlg"] for lesion in lesions)),
        "suvmax": _round(max((lesion["suvmax"] for lesion in lesions), default=0.0)),
    }
    for lesion in lesions:
        for key in ("suvmax", "suvmean", "suvpeak", "mtv_ml", "tlg"):
            lesion[key] = _round(lesion[key])
    return {"lesions": lesions, "total": total}


def _suv_peak(suv: np.ndarray, box: tuple[slice, ...], inside: np.ndarray, kernel: np.ndarray) -> float:
    """Highest sphere mean centred on the lesion, convolving only the lesion's box plus the sphere."""
    half = [n // 2 for n in kernel.shape]
    lo = [max(s.start - h, 0) for s, h in zip(box, half, strict=True)]
    hi = [min(s.stop + h, n) for s, h, n in zip(box, half, suv.shape, strict=True)]
    crop = suv[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))].astype(np.float64)
    weights = kernel.astype(np.float64)
    # Normalised convolution: dividing by the count of existing voxels makes a sphere cut by the
    # volume's edge average what it covers instead of counting missing voxels as zero uptake.
    sums = ndimage.correlate(crop, weights, mode="constant", cval=0.0)
    counts = ndimage.correlate(np.ones_like(crop), weights, mode="constant", cval=0.0)
    lesion_in_crop = tuple(slice(s.start - a, s.stop - a) for s, a in zip(box, lo, strict=True))
    means = sums[lesion_in_crop] / counts[lesion_in_crop]
    return float(means[inside].max())


def _check_spacing(spacing) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(s) and s > 0 for s in values):
        raise UserInputError(f"voxel spacing {spacing!r} must be three positive sizes in mm")
    return values


def _round(value: float) -> float:
    return float(round(float(value), DECIMALS))
