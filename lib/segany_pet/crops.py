"""Model crops of a PET volume: where a crop goes, and the maps between the volume's grid and the crop's.

Frames. Three coordinate frames meet here, and only this module converts between them:

- stored voxel ``(i, j, k)``: indices of ``volume.suv`` as stored. Clicks and boxes arrive in it, masks
  leave in it.
- world mm (RAS+): ``volume.affine`` maps stored voxels there.
- crop index: voxel index in the model's input cube (``crop_size``^3 voxels of ``spacing_mm``, tensor
  order D, H, W). A `CropGeometry` places the cube in the world.

Crop axes are the volume's own axes, reordered and flipped to the closest RAS+ orientation: the published
models saw volumes reoriented that way (``as_closest_canonical``) and then resampled. So an LPS-stored or
axis-permuted copy of a volume gives the same crop as its RAS copy, and every map between the stored grid
and a crop is separable: each crop axis reads one stored axis through a 1-D affine map. Resampling is then
three small matrix products (exact trilinear interpolation) over the crop's region only, never the volume.

Training, scoring and the predictor share these pieces: `place_crop` (where a crop goes), `crop_volume` (a
volume region -> model input grid), `normalise`, `paste_logits` (crop logits -> the stored grid), `paste_mask`
(windows -> one mask) and `extension_windows` (crops that follow an object past a crop's face).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch

# Prompts stay at least this share of the crop inside it (8 voxels of the published 128^3 crop): a click
# right at the crop edge would leave the model no context on one side.
MARGIN_FRACTION = 1 / 16
# Crop centres snap to multiples of this share of the crop (32 voxels of 128), so the next click nearby
# lands in the same crop and reuses its cached embedding.
SNAP_FRACTION = 1 / 4
# In a scale ensemble, what a spacing says where none of its windows looked: background, firmly enough that
# the other spacings' average cannot outvote it by one confident window.
OUTSIDE_LOGIT = -20.0

# ----------------------------------------------------------------------------------------------
# Crop geometry


def canonical_axes(affine) -> np.ndarray:
    """Unit world directions (rows) of the volume's stored axes, reordered and flipped to the closest RAS+."""
    linear = np.asarray(affine, dtype=float)[:3, :3]
    axes = np.empty((3, 3))
    for stored_axis, (canonical_axis, flip) in enumerate(nib.orientations.io_orientation(affine)):
        column = linear[:, stored_axis]
        axes[int(canonical_axis)] = flip * column / np.linalg.norm(column)
    return axes


def translation(offset) -> np.ndarray:
    """4x4 matrix that adds ``offset`` (3,): e.g. a sub-block's index origin."""
    matrix = np.eye(4)
    matrix[:3, 3] = offset
    return matrix


def invert_affine(matrix) -> np.ndarray:
    """Inverse of a 4x4 affine through the 3x3 adjugate (LAPACK's inv costs ~0.5 ms a call here: threads)."""
    matrix = np.asarray(matrix, dtype=float)
    c0, c1, c2 = matrix[:3, :3].T
    rows = np.array([np.cross(c1, c2), np.cross(c2, c0), np.cross(c0, c1)])
    linear = rows / np.dot(c0, rows[0])
    inverse = np.eye(4)
    inverse[:3, :3] = linear
    inverse[:3, 3] = -linear @ matrix[:3, 3]
    return inverse


def _apply(matrix: np.ndarray, points) -> np.ndarray:
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


@dataclass(frozen=True)
class CropGeometry:
    """Where a model crop sits in the world: ``size``^3 voxels of ``spacing`` mm.

    ``origin`` is the world position (mm) of the centre of crop voxel (0, 0, 0) and ``axes[a]`` the unit
    world direction of crop axis ``a``. Hashable: it is part of the embedding cache key.
    """

    origin: tuple[float, float, float]
    axes: tuple[tuple[float, float, float], ...]
    spacing: float
    size: int

    @classmethod
    def make(cls, origin, axes, spacing: float, size: int) -> CropGeometry:
        # Rounded so that geometries reached by different float paths compare (and hash) equal.
        return cls(
            tuple(round(float(v), 6) for v in origin),
            tuple(tuple(round(float(v), 9) for v in row) for row in np.asarray(axes)),
            float(spacing),
            int(size),
        )

    @classmethod
    def around(cls, affine, centre_mm, spacing: float, size: int) -> CropGeometry:
        """The crop centred on a world point, with the volume's canonical axes."""
        axes = canonical_axes(affine)
        origin = np.asarray(centre_mm, dtype=float) - spacing * (size - 1) / 2 * axes.sum(axis=0)
        return cls.make(origin, axes, spacing, size)

    @property
    def affine(self) -> np.ndarray:
        """4x4: crop index -> world mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.axes).T * self.spacing
        matrix[:3, 3] = self.origin
        return matrix

    def to_stored(self, volume_affine) -> np.ndarray:
        """4x4: crop index -> stored voxel index of a volume."""
        return invert_affine(volume_affine) @ self.affine

    def from_stored(self, volume_affine) -> np.ndarray:
        """4x4: stored voxel index of a volume -> crop index."""
        return invert_affine(self.affine) @ np.asarray(volume_affine, dtype=float)

    def stored_to_crop(self, volume_affine, ijk) -> np.ndarray:
        """Stored voxel indices (N, 3) -> crop indices (N, 3), float."""
        return _apply(self.from_stored(volume_affine), ijk)

    def shifted(self, voxels) -> CropGeometry:
        """The same crop moved by ``voxels`` (3,) crop voxels along its own axes."""
        origin = np.asarray(self.origin) + self.spacing * np.asarray(voxels, dtype=float) @ np.asarray(self.axes)
        return CropGeometry.make(origin, self.axes, self.spacing, self.size)

    def covered_box(self, volume_affine, shape) -> tuple[slice, slice, slice] | None:
        """Slices of the stored voxels whose centres lie inside the crop, or None if none do."""
        edges = np.array([-0.5, self.size - 0.5])
        corners = np.stack(np.meshgrid(edges, edges, edges, indexing="ij"), axis=-1).reshape(-1, 3)
        stored = _apply(self.to_stored(volume_affine), corners)
        low = np.maximum(np.ceil(stored.min(axis=0) - 1e-6), 0).astype(int)
        high = np.minimum(np.floor(stored.max(axis=0) + 1e-6), np.asarray(shape) - 1).astype(int)
        if np.any(high < low):
            return None
        return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(low, high, strict=True))

    def volume_extent(self, volume_affine, shape) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest crop index (per crop axis) of any stored voxel centre of the volume."""
        ends = [np.array([0.0, n - 1.0]) for n in shape]
        corners = np.stack(np.meshgrid(*ends, indexing="ij"), axis=-1).reshape(-1, 3)
        crop = self.stored_to_crop(volume_affine, corners)
        return crop.min(axis=0), crop.max(axis=0)


def place_crop(
    affine, shape, prompts, size: int, spacing: float, anchor: int = 0, snap: bool = True
) -> tuple[CropGeometry, bool]:
    """The crop for prompts given as stored voxel indices (N, 3): centred on their bounding box.

    Crops lie on a lattice anchored at the volume centre; with ``snap`` their centres move in steps of
    ``SNAP_FRACTION`` of the crop, the step nearest the prompts that keeps every prompt ``MARGIN_FRACTION``
    of the crop inside (else the exact centre, to whole voxels). Returns the geometry and whether all prompts
    fit; when they span more than the crop, it is centred on ``prompts[anchor]`` instead.
    """
    centre_mm = _apply(np.asarray(affine, dtype=float), (np.asarray(shape) - 1) / 2)[0]
    reference = CropGeometry.around(affine, centre_mm, spacing, size)
    points = reference.stored_to_crop(affine, prompts)
    margin = max(1, round(size * MARGIN_FRACTION))
    step = max(1, round(size * SNAP_FRACTION)) if snap else 1
    low, high = points.min(axis=0), points.max(axis=0)
    fits = bool(np.all(high - low <= size - 1 - 2 * margin))
    if not fits:
        low = high = points[anchor]
    shift = [_snapped_shift(low[a], high[a], size, margin, step) for a in range(3)]
    return reference.shifted(shift), fits


def _snapped_shift(low: float, high: float, size: int, margin: int, step: int) -> int:
    """Whole-voxel shift of the reference crop along one axis that brings [low, high] inside with margin."""
    wanted = (low + high) / 2 - (size - 1) / 2
    snapped = sorted({step * math.floor(wanted / step), step * math.ceil(wanted / step)}, key=lambda s: abs(s - wanted))
    for shift in snapped:
        if low - shift >= margin and high - shift <= size - 1 - margin:
            return int(shift)
    return int(round(wanted))


# ----------------------------------------------------------------------------------------------
# Separable trilinear resampling


def interpolation_matrix(coords, n_source: int, outside: str = "zero") -> np.ndarray:
    """(len(coords), n_source) float32 weights of linear interpolation at ``coords`` (source voxel indices).

    ``outside="zero"``: the source is zero beyond its ends (background SUV 0); ``"border"``: it repeats
    its edge values.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if outside == "border":
        coords = np.clip(coords, 0, n_source - 1)
    elif outside != "zero":
        raise ValueError(f"outside must be 'zero' or 'border', not {outside!r}")
    low = np.floor(coords)
    frac = coords - low
    low = low.astype(np.int64)
    rows = np.arange(len(coords))
    matrix = np.zeros((len(coords), n_source))
    for tap, weight in ((low, 1 - frac), (low + 1, frac)):
        valid = (tap >= 0) & (tap < n_source)
        np.add.at(matrix, (rows[valid], tap[valid]), weight[valid])
    return matrix.astype(np.float32)


def upsample_matrix(n_low: int, n_high: int) -> np.ndarray:
    """(n_high, n_low) weights of ``F.interpolate(mode="trilinear", align_corners=False)`` along one axis."""
    coords = np.maximum((np.arange(n_high) + 0.5) * (n_low / n_high) - 0.5, 0)
    return interpolation_matrix(coords, n_low, "border")


def axis_coordinates(target_to_source: np.ndarray, target_shape) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """For each target axis: the source axis it reads and the source coordinate of every target index."""
    linear = np.asarray(target_to_source, dtype=float)[:3, :3]
    source_axes = tuple(int(np.argmax(np.abs(linear[:, a]))) for a in range(3))
    off_axis = np.abs(linear).copy()
    off_axis[list(source_axes), [0, 1, 2]] = 0
    if sorted(source_axes) != [0, 1, 2] or off_axis.max() > 1e-6 * np.abs(linear).max():
        raise ValueError(
            "crop axes are not parallel to the volume's axes; build the crop with CropGeometry.around or "
            "place_crop on this volume's affine"
        )
    coords = [
        linear[source, a] * np.arange(target_shape[a]) + target_to_source[source, 3]
        for a, source in enumerate(source_axes)
    ]
    return source_axes, coords


def resample(source, target_to_source, target_shape, outside: str = "zero", upsample_to: int | None = None):
    """Trilinear resampling of a 3D array onto a grid whose axes are parallel to the source's: float32 array.

    ``target_to_source`` (4x4) maps target indices to source indices. With ``upsample_to``, the source is
    first seen as upsampled trilinearly to that many voxels per side, exactly as ``F.interpolate`` does for
    low-res logits; both steps are folded into the per-axis weight matrices, so the upsampled volume is never
    built.
    """
    source = source.numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
    source = source.astype(np.float32, copy=False)
    source_axes, coords = axis_coordinates(target_to_source, target_shape)
    matrices = []
    for axis, coord in zip(source_axes, coords, strict=True):
        n = source.shape[axis]
        if upsample_to is None:
            matrices.append(interpolation_matrix(coord, n, outside))
        else:
            matrices.append(interpolation_matrix(coord, upsample_to, outside) @ upsample_matrix(n, upsample_to))
    # out[a, b, c] = sum_ijk W0[a, i] W1[b, j] W2[c, k] source[axes: i, j, k], one axis at a time. In numpy:
    # OpenBLAS runs products this small on one thread, so they stay fast while torch's threads are busy.
    x, axes_now = source, [("source", 0), ("source", 1), ("source", 2)]
    for target_axis, (matrix, axis) in enumerate(zip(matrices, source_axes, strict=True)):
        position = axes_now.index(("source", axis))
        x = np.tensordot(matrix, x, axes=([1], [position]))  # the new target axis comes first
        axes_now = [("target", target_axis)] + axes_now[:position] + axes_now[position + 1 :]
    return np.ascontiguousarray(x.transpose([axes_now.index(("target", a)) for a in range(3)]))
def crop_volume(array: np.ndarray, affine, geometry: CropGeometry) -> torch.Tensor:
    """A volume region on the crop grid: (size, size, size) float32, trilinear, zero outside the volume.

    Reads only the block of ``array`` under the crop. Works for SUV and for masks (giving the fraction
    of the mask at each crop voxel).
    """
    size = geometry.size
    to_stored = geometry.to_stored(affine)
    ends = np.array([0.0, size - 1.0])
    corners = np.stack(np.meshgrid(ends, ends, ends, indexing="ij"), axis=-1).reshape(-1, 3)
    stored = _apply(to_stored, corners)
    low = np.maximum(np.floor(stored.min(axis=0)), 0).astype(int)
    high = np.minimum(np.ceil(stored.max(axis=0)) + 1, array.shape).astype(int)
    if np.any(high <= low):
        return torch.zeros((size, size, size))
    block = array[tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))]
    return torch.from_numpy(resample(block, translation(-low) @ to_stored, (size,) * 3, outside="zero"))


def paste_logits(logits, geometry: CropGeometry, affine, shape) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Crop logits sampled at the stored voxels the crop covers: (slices of the stored grid, float32 block).

    ``logits`` is (size,)^3 or the decoder's low-res (L,)^3, which is upsampled to the crop size first
    (trilinear, as the reference does). Sampling logits trilinearly and thresholding at 0 afterwards gives
    smooth boundaries on a finer stored grid, where nearest-neighbour on a mask gives staircases.
    None when the crop covers no stored voxel.
    """
    box = geometry.covered_box(affine, shape)
    if box is None:
        return None
    upsample_to = None if logits.shape[0] == geometry.size else geometry.size
    stored_to_crop = geometry.from_stored(affine) @ translation([s.start for s in box])
    block_shape = tuple(s.stop - s.start for s in box)
    return box, resample(logits, stored_to_crop, block_shape, outside="border", upsample_to=upsample_to)


def paste_mask(windows, affine, shape) -> tuple[np.ndarray, tuple[slice, slice, slice] | None]:
    """The mask of one or more windows on the stored grid, uint8, and the box of the grid the windows cover
    (every mask voxel lies in it; None when they cover none).

    ``windows``: (geometry, logits) pairs, logits as for `paste_logits`. Within one crop spacing, where windows
    overlap the larger logit wins (the most confident window); the spacings of a scale ensemble
    (`Preset.ensemble_spacings_mm`) are then averaged, a voxel outside every window of a spacing counting
    as ``OUTSIDE_LOGIT`` (background) for it; the result is thresholded at 0. Only the bounding box
    of the windows is computed; the full-size mask is allocated once, zero elsewhere, in Fortran order:
    the order NRRD and NIfTI store, so writing the reply is a copy, not a transposition (6x faster on an
    autoPET-sized grid, scripts/benchmark_server.py).
    """
    placed = [(geometry.spacing, paste_logits(logits, geometry, affine, shape)) for geometry, logits in windows]
    placed = [(spacing, item) for spacing, item in placed if item is not None]
    mask = np.zeros(shape, dtype=np.uint8, order="F")
    if not placed:
        return mask, None
    starts = [min(box[a].start for _, (box, _) in placed) for a in range(3)]
    stops = [max(box[a].stop for _, (box, _) in placed) for a in range(3)]
    spacings = sorted({spacing for spacing, _ in placed})
    if len(placed) == 1:
        merged = placed[0][1][1]
    else:
        merged = np.full([len(spacings), *(hi - lo for lo, hi in zip(starts, stops, strict=True))], OUTSIDE_LOGIT,
                         np.float32)
        for spacing, (box, block) in placed:
            local = (spacings.index(spacing),
                     *(slice(s.start - lo, s.stop - lo) for s, lo in zip(box, starts, strict=True)))
            np.maximum(merged[local], block, out=merged[local])
        merged = merged.mean(axis=0)
    region = tuple(slice(lo, hi) for lo, hi in zip(starts, stops, strict=True))
    mask[region] = merged > 0
    return mask, region


def normalise(crop: torch.Tensor, method: str) -> torch.Tensor:
    """Crop SUV -> model input.

    - ``"zscore_nonzero"`` (published models): z-score with the mean and standard deviation of the crop's
      voxels > 0, applied to every voxel (zeros included), as torchio's ZNormalization(x > 0) does.
    - ``"log_suv"`` (this project's models): log(1 + max(SUV, 0)). No statistics of the crop, so a voxel
      means the same in every crop, and lesions of SUV 2..400 stay within 1..6.
    """
    if method == "log_suv":
        return torch.log1p(crop.clamp_min(0))
    if method == "zscore_nonzero":
        values = crop[crop > 0]
        if values.numel() < 2:
            return torch.zeros_like(crop)
        return (crop - values.mean()) / values.std().clamp_min(1e-6)
    raise ValueError(f"unknown normalisation {method!r}; expected 'zscore_nonzero' or 'log_suv'")


# ----------------------------------------------------------------------------------------------
# Windows for objects larger than one crop


def touched_faces(mask, band: int = 1) -> list[tuple[int, int]]:
    """Faces of a 3D mask's cube that the mask reaches within ``band`` voxels: (axis, -1 low | +1 high)."""
    mask = torch.as_tensor(mask).bool()
    faces = []
    for axis in range(3):
        n = mask.shape[axis]
        if mask.narrow(axis, 0, band).any():
            faces.append((axis, -1))
        if mask.narrow(axis, n - band, band).any():
            faces.append((axis, +1))
    return faces


def extension_windows(mask, geometry: CropGeometry, affine, shape) -> list[CropGeometry]:
    """Crops that continue an object past the faces it touches, where the volume goes on past that face.

    ``mask`` is the object on the crop grid or on the low-res grid (any cube spanning the crop). Each new
    crop is the old one shifted half a crop along the touched axis, so the two overlap by half.
    """
    low, high = geometry.volume_extent(affine, shape)
    windows = []
    for axis, side in touched_faces(mask):
        continues = high[axis] > geometry.size - 0.5 if side > 0 else low[axis] < -0.5
        if continues:
            windows.append(geometry.shifted(np.eye(3)[axis] * side * (geometry.size // 2)))
    return windows
