"""The interactive predictor: set a PET volume once, then predict a mask from clicks, a box or a previous mask.

    predictor = Predictor(model)                          # one per model, shared by every annotator
    session = predictor.set_volume(volume, "case_0042")   # cheap: nothing is encoded yet
    first = session.predict(foreground=[[210, 188, 140]])
    better = session.predict(background=[[214, 190, 141]], previous=first)
    better.mask                                           # uint8, on the volume's own stored grid

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

A click is answered by one crop centred on the prompts (`place_crop`); when the mask reaches a crop face
and the volume goes on, further crops shifted by half a crop follow it (`extension_windows`), up to
``max_windows``, and their logits are merged by maximum. A previous prediction is the mask prompt of the
next click, SAM-style, with all clicks so far.

Training and scoring reuse the same pieces: `place_crop` (where a crop goes), `crop_volume` (a volume
region -> model input grid), `normalise`, `paste_logits` (crop logits -> the stored grid) and `paste_mask`
(windows -> one mask).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from segany_pet.edge import EDGE_METHODS, snap_to_uptake
from segany_pet.errors import PromptError
from segany_pet.pet.volume import PETVolume
from segany_pet.prompts import parse_clicks

# Prompts stay at least this share of the crop inside it (8 voxels of the published 128^3 crop): a click
# right at the crop edge would leave the model no context on one side.
MARGIN_FRACTION = 1 / 16
# Crop centres snap to multiples of this share of the crop (32 voxels of 128), so the next click nearby
# lands in the same crop and reuses its cached embedding.
SNAP_FRACTION = 1 / 4
# A previous mask that has to be resampled into a new crop becomes logits of +-8: confident, not saturated.
MASK_PROMPT_LOGIT = 8.0
# In a scale ensemble, what a spacing says where none of its windows looked: background, firmly enough that
# the other spacings' average cannot outvote it by one confident window.
OUTSIDE_LOGIT = -20.0
DEFAULT_MAX_WINDOWS = 6
# A prefetch encodes only when no click has been answered for this long (a server still quantifies, encodes and
# sends the reply after the predictor is done, and an annotator's next click often follows within it); it looks
# again every PREFETCH_POLL_S.
PREFETCH_QUIET_S = 0.5
PREFETCH_POLL_S = 0.01
LATENCY_KEYS = ("crop", "encode", "decode", "paste", "plan", "edge")


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


def _axis_coordinates(target_to_source: np.ndarray, target_shape) -> tuple[tuple[int, ...], list[np.ndarray]]:
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
    source_axes, coords = _axis_coordinates(target_to_source, target_shape)
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


# ----------------------------------------------------------------------------------------------
# Prompts


def parse_box(box, shape) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """A box ``((i0, j0, k0), (i1, j1, k1))``: inclusive min and max corners in stored voxel indices."""
    if box is None:
        return None
    if isinstance(box, np.ndarray):
        box = box.tolist()
    if (
        isinstance(box, str | bytes)
        or not isinstance(box, list | tuple)
        or len(box) != 2
        or not all(isinstance(corner, list | tuple | np.ndarray) for corner in box)
    ):
        raise PromptError(f"box must be two corners ((i0, j0, k0), (i1, j1, k1)) in voxel indices, got {box!r}")
    low, high = parse_clicks(list(box), shape, "box corner")
    flipped = [axis for axis in range(3) if low[axis] > high[axis]]
    if flipped:
        raise PromptError(
            f"box min corner {low} is beyond max corner {high} on axis {flipped}: send the minimum corner first"
        )
    return low, high


def _accumulate(old: tuple, new: list, other_new: list) -> tuple:
    """Old clicks then new ones, each once; an old click re-clicked with the other label is dropped."""
    kept = [click for click in old if click not in other_new]
    kept += [click for click in new if click not in kept]
    return tuple(dict.fromkeys(kept))


def volume_fingerprint(volume: PETVolume) -> str:
    """A content hash of SUV and affine (SHA-1: about 0.1 s for a 400x400x326 volume)."""
    digest = hashlib.sha1()
    digest.update(repr((volume.shape, str(volume.suv.dtype))).encode())
    digest.update(np.ascontiguousarray(volume.affine, dtype=np.float64).tobytes())
    digest.update(memoryview(np.ascontiguousarray(volume.suv)).cast("B"))
    return "sha1:" + digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class WindowResult:
    """One crop the model looked at: its geometry, low-res logits (1, 1, L, L, L) and IoU estimate."""

    geometry: CropGeometry
    low_res_logits: torch.Tensor = field(repr=False)
    iou: float
    cache_hit: bool


@dataclass
class Prediction:
    """A mask and what is needed to refine it with the next click.

    ``low_res_logits`` and ``geometry`` are those of the first window (centred on the prompts, at the
    preset's ``spacing_mm``); ``iou`` (the model's estimate) is that window's, averaged with the first windows
    of a scale ensemble's other spacings; ``window_results`` holds every window. ``foreground``,
    ``background`` and ``box`` are all prompts so far (stored voxel indices). ``cache_hit`` is True when no
    window needed the image encoder. ``latencies`` (s) sums crop, encode, decode, paste and plan (choosing and
    seeding extra windows) over windows, plus total.
    """

    mask: np.ndarray = field(repr=False)
    region: tuple[slice, slice, slice] | None  # holds every voxel of the mask: measure there, not everywhere
    low_res_logits: torch.Tensor = field(repr=False)
    geometry: CropGeometry
    iou: float
    windows: int
    cache_hit: bool
    latencies: dict[str, float]
    edge: str  # where the mask's boundary came from: "model", or the uptake threshold it was snapped to
    foreground: tuple[tuple[int, int, int], ...]
    background: tuple[tuple[int, int, int], ...]
    box: tuple[tuple[int, int, int], tuple[int, int, int]] | None
    volume_id: str
    window_results: tuple[WindowResult, ...] = field(repr=False)
    notes: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------
# The predictor


class Predictor:
    """A 3D SAM ready for interactive use: set a volume, then predict from prompts.

    Design for several annotators at once: the Predictor holds only what is shared, the model (read-only
    in eval mode) and an LRU cache of image embeddings behind a lock. Everything about one volume lives in
    the `VolumeSession` that `set_volume` returns, and everything about one click in the `Prediction` it
    gives back. So a server keeps one Predictor per model and calls ``set_volume(...).predict(...)`` per
    request from any thread. ``Predictor.predict`` is a single-user shortcut for the last volume set.

    The cache key is (volume id, crop geometry, preset name, encoder dtype): the next click in the same
    region (crop centres are snapped, see `place_crop`) skips the encoder, which is almost all of the cost.
    Two threads missing the same key at once both encode; the result is the same.

    Model calls take turns (a second lock); cropping, pasting and planning run in parallel. One forward
    pass already uses every core torch is given, and two at once oversubscribe them: on the 2-core
    machines, a 11 ms decode took 0.1-0.7 s while another thread was busy with torch.

    `prefetch` encodes crops before anyone clicks (a server warming a scan its client just fetched) at low
    priority: one crop at a time, and only once no click has been answered for ``PREFETCH_QUIET_S``, so a click
    waits for at most the one crop being encoded.

    ``dtype`` ("bfloat16" or "float32") sets how the image encoder computes (``Sam3D.to_inference_dtype``);
    None keeps the model as it is. ``max_windows`` caps the crops spent on one object at each spacing.
    ``scale_ensemble``: read each object at every spacing of the preset (`Preset.ensemble_spacings_mm`), or
    at ``spacing_mm`` alone (False: ranking and training loops, where the ensemble's cost buys little).
    """

    def __init__(self, model, device="cpu", cache_size: int = 8, dtype=None, max_windows: int = DEFAULT_MAX_WINDOWS,
                 scale_ensemble: bool = True):
        if max_windows < 1:
            raise ValueError(f"max_windows must be at least 1, got {max_windows}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if dtype is not None:
            self.model.to_inference_dtype(dtype)
        self.preset = model.preset
        self.spacings = (self.preset.spacing_mm, *(self.preset.ensemble_spacings_mm if scale_ensemble else ()))
        self.cache_size = cache_size
        self.max_windows = max_windows
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # the cache
        self._model_lock = threading.Lock()
        self._answering = 0  # clicks being answered now (under _lock): prefetch waits while there are any ...
        self._answered_at = -math.inf  # ... and for PREFETCH_QUIET_S after the last (time.monotonic)
        self._last_session: VolumeSession | None = None

    def set_volume(self, volume: PETVolume, volume_id: str | None = None) -> VolumeSession:
        """Start annotating a volume; cheap (nothing is encoded until a prompt needs a crop).

        ``volume_id`` names the volume in the embedding cache: pass a stable id (the datastore's image id).
        Without one it is a content hash of SUV and affine (`volume_fingerprint`), so the same scan loaded
        twice shares cached embeddings and a changed array never hits a stale one.
        """
        if volume.suv.ndim != 3:
            raise ValueError(f"volume must be 3D, got shape {volume.suv.shape}")
        session = VolumeSession(self, volume, volume_id if volume_id is not None else volume_fingerprint(volume))
        self._last_session = session
        return session

    def predict(self, foreground=(), background=(), box=None, previous: Prediction | None = None,
                edge: str | None = None) -> Prediction:
        """`VolumeSession.predict` on the volume of the last `set_volume` (single-user scripts)."""
        if self._last_session is None:
            raise RuntimeError("no volume set: call predictor.set_volume(volume) before predict")
        return self._last_session.predict(foreground, background, box, previous, edge)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def _cache_key(self, session: VolumeSession, geometry: CropGeometry) -> tuple:
        return session.volume_id, geometry, self.preset.name, self.model.inference_dtype

    def is_cached(self, session: VolumeSession, geometry: CropGeometry) -> bool:
        with self._lock:
            return self._cache_key(session, geometry) in self._cache

    @contextlib.contextmanager
    def answering(self):
        """Marks a click in progress: `prefetch` encodes nothing until it is answered (and a while after)."""
        with self._lock:
            self._answering += 1
        try:
            yield
        finally:
            with self._lock:
                self._answering -= 1
                self._answered_at = time.monotonic()

    def _clicks_recent(self) -> bool:
        return bool(self._answering) or time.monotonic() - self._answered_at < PREFETCH_QUIET_S

    def prefetch(self, session: VolumeSession, geometries: Iterable[CropGeometry],
                 cancelled: Callable[[], bool] = lambda: False) -> int:
        """Encode the crops not yet cached, in order, after clicks (see the class); stops early once ``cancelled()``.

        Returns how many crops it encoded. Crops beyond the cache's capacity would only evict each other:
        the caller keeps the list within ``cache_size``.
        """
        encoded = 0
        for geometry in geometries:
            while self._clicks_recent() and not cancelled():
                time.sleep(PREFETCH_POLL_S)
            if cancelled():
                break
            if not self.is_cached(session, geometry):
                self.embedding(session, geometry)
                encoded += 1
        return encoded

    def embedding(
        self, session: VolumeSession, geometry: CropGeometry, latencies: dict | None = None
    ) -> tuple[torch.Tensor, bool]:
        """The image embedding of one crop of a session's volume (cached) and whether it came from the cache.

        Adds the seconds spent to ``latencies["crop"]`` and ``["encode"]`` when given.
        """
        latencies = latencies if latencies is not None else dict.fromkeys(LATENCY_KEYS, 0.0)
        key = self._cache_key(session, geometry)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key], True
        started = time.perf_counter()
        crop = crop_volume(session.volume.suv, session.volume.affine, geometry)
        image = normalise(crop, self.preset.normalisation)
        encoding = time.perf_counter()
        with self._model_lock, torch.no_grad():
            embedding = self.model.embed(image[None, None].to(self.device)).float()
        latencies["crop"] += encoding - started
        latencies["encode"] += time.perf_counter() - encoding
        with self._lock:
            self._cache[key] = embedding
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedding, False

    def decode(self, embedding, points, labels, box, mask_prompt) -> tuple[torch.Tensor, float]:
        """Prompts in crop indices -> (low-res logits (1, 1, L, L, L) on the CPU, IoU estimate).

        ``points`` (N, 3) with ``labels`` (N,) 1/0, ``box`` (6,) min then max corner or None,
        ``mask_prompt`` (L, L, L) logits or None.
        """
        device = self.device
        with self._model_lock, torch.no_grad():
            point_prompt = None
            if len(points):
                point_prompt = (
                    torch.as_tensor(np.asarray(points), dtype=torch.float32, device=device)[None],
                    torch.as_tensor(np.asarray(labels), dtype=torch.int64, device=device)[None],
                )
            boxes = None if box is None else torch.as_tensor(box, dtype=torch.float32, device=device)[None]
            masks = None if mask_prompt is None else mask_prompt[None, None].to(device, torch.float32)
            prompt_encoder = self.model.prompt_encoder
            sparse, dense = prompt_encoder(points=point_prompt, boxes=boxes, masks=masks)
            logits, iou = self.model.mask_decoder(
                embedding, prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False
            )
        return logits.float().cpu(), float(iou[0, 0])


def _left_out_clicks(mask: np.ndarray, region, foreground) -> list[str]:
    """A note for the annotator when foreground clicks fall outside the mask: the model says "no lesion here"."""
    missed = [list(click) for click in foreground if not mask[tuple(click)]]
    if not missed:
        return []
    if region is None or not mask[region].any():
        return [f"no lesion found at the foreground click(s) {missed}: the model reads the uptake there as "
                "physiological or background. Click the lesion's hottest voxel, draw a box around it, or use "
                "suv_threshold"]
    return [f"the mask leaves out the foreground click(s) {missed}: the model does not see them as part of the "
            "object; a click beside them or a box around the object asks again"]


class VolumeSession:
    """One volume being annotated with a `Predictor`: holds the volume and its id, nothing else.

    Cheap to create; safe to use from several threads (each click's state travels in its `Prediction`).
    """

    def __init__(self, predictor: Predictor, volume: PETVolume, volume_id: str):
        self.predictor = predictor
        self.volume = volume
        self.volume_id = volume_id

    def predict(self, foreground=(), background=(), box=None, previous: Prediction | None = None,
                edge: str | None = None) -> Prediction:
        """A mask from prompts in stored voxel indices.

        ``foreground`` / ``background``: lists of ``[i, j, k]``; ``box``: ``((i0, j0, k0), (i1, j1, k1))``,
        inclusive corners. ``previous``: the Prediction of the last click on this volume. Its prompts are
        kept (send only the new clicks, or all of them: repeats count once) and its logits become the mask
        prompt, as SAM refines. The mask is the maximum of the logits of every window at each crop spacing,
        averaged over the spacings of a scale ensemble that found something and thresholded at 0 (`paste_mask`).
        ``edge``: None keeps that mask; a method of `segany_pet.edge` snaps it to the lesion's uptake where the
        two agree (the mask prompt of the next click stays the model's own logits).
        """
        if edge is not None and edge not in EDGE_METHODS:
            raise PromptError(f"edge must be one of {', '.join(EDGE_METHODS)} (or none), got {edge!r}")
        with self.predictor.answering():
            return self._predict(foreground, background, box, previous, edge)

    def click_crops(self, clicks) -> list[CropGeometry]:
        """The first crops that single clicks at ``clicks`` (stored voxel indices) would be answered from, at
        every spacing the predictor reads, each once, in the order of the clicks: what to `prefetch` for them."""
        preset, affine, shape = self.predictor.preset, self.volume.affine, self.volume.shape
        crops = {}
        for click in clicks:
            for spacing in self.predictor.spacings:
                crops.setdefault(place_crop(affine, shape, [click], preset.crop_size, spacing)[0])
        return list(crops)

    def _predict(self, foreground, background, box, previous, edge) -> Prediction:
        started = time.perf_counter()
        foreground, background, box = self._prompts_so_far(foreground, background, box, previous)
        latencies = dict.fromkeys(LATENCY_KEYS, 0.0)
        results, voting, firsts, notes = [], [], [], []
        for spacing in self.predictor.spacings:
            scale_results, scale_notes = self._follow_object(spacing, foreground, background, box, previous, latencies)
            results += scale_results
            firsts.append(scale_results[0])
            notes += [note for note in scale_notes if note not in notes]
            # A spacing that finds nothing abstains rather than outvoting one that found the object (the shipped
            # model reads a 15 mL demo lesion as background at 1.25 mm); when none finds anything, the mask is empty.
            if any(bool((result.low_res_logits > 0).any()) for result in scale_results):
                voting += scale_results
        mask, region = self._paste(voting or results, latencies)
        if edge is not None:
            snapping = time.perf_counter()
            region, snapped = snap_to_uptake(self.volume.suv, self.volume.spacing, mask, region, foreground,
                                             background, edge)
            edge = edge if snapped else None
            latencies["edge"] = time.perf_counter() - snapping
        notes += _left_out_clicks(mask, region, foreground)
        latencies["total"] = time.perf_counter() - started
        first = results[0]
        return Prediction(
            mask=mask,
            region=region,
            low_res_logits=first.low_res_logits,
            geometry=first.geometry,
            iou=float(np.mean([result.iou for result in firsts])),
            windows=len(results),
            cache_hit=all(result.cache_hit for result in results),
            latencies=latencies,
            edge=edge or "model",
            foreground=foreground,
            background=background,
            box=box,
            volume_id=self.volume_id,
            window_results=tuple(results),
            notes=tuple(notes),
        )

    def _prompts_so_far(self, foreground, background, box, previous):
        """Validated prompts (stored voxel indices), with those of the previous prediction."""
        shape = self.volume.shape
        new_foreground = parse_clicks(foreground, shape, "foreground")
        new_background = parse_clicks(background, shape, "background")
        box = parse_box(box, shape)
        if previous is not None:
            self._check_previous(previous)
            foreground = _accumulate(previous.foreground, new_foreground, new_background)
            background = _accumulate(previous.background, new_background, new_foreground)
            box = box if box is not None else previous.box
        else:
            foreground, background = tuple(dict.fromkeys(new_foreground)), tuple(dict.fromkeys(new_background))
        if not foreground and box is None:
            raise PromptError("no prompt on the object: click at least once on the object or draw a box")
        return foreground, background, box

    def _follow_object(self, spacing, foreground, background, box, previous,
                       latencies) -> tuple[list[WindowResult], list]:
        """At one crop spacing: the first window, centred on the prompts, then windows past every face the
        object leaves through (breadth first, so it grows evenly in all directions) until it stops or
        ``max_windows`` is reached."""
        preset, affine, shape = self.predictor.preset, self.volume.affine, self.volume.shape
        notes = []
        placement = list(foreground)
        if box is not None:  # the box centre first: the anchor when the prompts do not fit one crop
            placement = [tuple(np.add(box[0], box[1]) / 2), *box, *placement]
        geometry, fits = place_crop(affine, shape, placement, preset.crop_size, spacing)
        if not fits:
            anchor = "box centre" if box is not None else "first foreground click"
            notes.append(
                f"the prompts span more than one crop: the first crop is centred on the {anchor}; "
                "prompts outside it count only in extra windows that contain them"
            )
        mask_prompt = self._mask_prompt(geometry, previous, latencies)
        results = [self._window(geometry, foreground, background, box, [], mask_prompt, latencies)]
        seen = {geometry}
        queue = deque(results)
        capped = False
        while queue:
            parent = queue.popleft()
            started = time.perf_counter()
            candidates = extension_windows(parent.low_res_logits[0, 0] > 0, parent.geometry, affine, shape)
            latencies["plan"] += time.perf_counter() - started
            for candidate in candidates:
                if candidate in seen:
                    continue
                if len(results) >= self.predictor.max_windows:
                    capped = True
                    break
                seen.add(candidate)
                result = self._extension(parent, candidate, foreground, background, box, previous, latencies)
                if result is not None:
                    results.append(result)
                    queue.append(result)
        if capped:
            notes.append(
                f"the object reaches past {self.predictor.max_windows} windows (max_windows): "
                "it may continue beyond the mask"
            )
        return results, notes

    def _check_previous(self, previous: Prediction) -> None:
        if previous.volume_id != self.volume_id or previous.mask.shape != self.volume.shape:
            raise PromptError(
                f"previous prediction belongs to volume {previous.volume_id!r}, not {self.volume_id!r}: "
                "pass the Prediction of the last click on this volume"
            )

    def _window(self, geometry, foreground, background, box, seeds, mask_prompt, latencies) -> WindowResult:
        """Encode (or reuse) one crop and decode the prompts that fall inside it, plus seed points (crop index)."""
        embedding, hit = self.predictor.embedding(self, geometry, latencies)
        started = time.perf_counter()
        affine, size = self.volume.affine, geometry.size
        points, labels = [], []
        for clicks, label in ((foreground, 1), (background, 0)):
            if clicks:
                crop = geometry.stored_to_crop(affine, clicks)
                inside = crop[np.all((crop >= -0.5) & (crop <= size - 0.5), axis=1)]
                points += inside.tolist()
                labels += [label] * len(inside)
        points += [list(seed) for seed in seeds]
        labels += [1] * len(seeds)
        box_crop = None
        if box is not None:
            corners = geometry.stored_to_crop(affine, box)
            low = np.clip(corners.min(axis=0), 0, size - 1)
            high = np.clip(corners.max(axis=0), 0, size - 1)
            if np.all(corners.max(axis=0) >= 0) and np.all(corners.min(axis=0) <= size - 1):
                box_crop = np.concatenate([low, high])
        logits, iou = self.predictor.decode(embedding, points, labels, box_crop, mask_prompt)
        latencies["decode"] += time.perf_counter() - started
        return WindowResult(geometry, logits, iou, hit)

    def _mask_prompt(self, geometry: CropGeometry, previous: Prediction | None, latencies) -> torch.Tensor | None:
        """The previous prediction as low-res logits of this crop: its own logits if it looked here too,
        else its pasted mask resampled into the crop, averaged to the low-res grid and scaled to +-8."""
        if previous is None:
            return None
        for window in previous.window_results:
            if window.geometry == geometry:
                return window.low_res_logits[0, 0]
        started = time.perf_counter()
        fraction = crop_volume(previous.mask, self.volume.affine, geometry)
        factor = geometry.size // self.predictor.preset.low_res_size
        fraction = F.avg_pool3d(fraction[None, None], factor)[0, 0]
        latencies["crop"] += time.perf_counter() - started
        return (2 * fraction - 1) * MASK_PROMPT_LOGIT

    def _extension(self, parent, geometry, foreground, background, box, previous, latencies) -> WindowResult | None:
        """A window continuing ``parent``: prompted with the user's prompts inside it, a positive point at the
        deepest voxel of the parent's mask in the overlap, and a mask prompt that is the parent's logits in the
        overlap and elsewhere the previous prediction, or 0 (undecided: a negative prior would tell the model
        the object stops at the old crop face). None if the parent's mask does not reach into the window."""
        started = time.perf_counter()
        low_res = parent.low_res_logits.shape[-1]
        factor = geometry.size / low_res
        # low-res voxel l is crop voxel factor * l + (factor - 1) / 2 (centre of the voxels it upsamples to)
        low_res_to_crop = np.diag([factor, factor, factor, 1.0])
        low_res_to_crop[:3, 3] = (factor - 1) / 2
        to_parent = invert_affine(parent.geometry.affine) @ geometry.affine @ low_res_to_crop
        carried = resample(
            parent.low_res_logits[0, 0], to_parent, (low_res,) * 3, outside="border", upsample_to=geometry.size
        )
        carried = torch.from_numpy(carried)
        _, coords = _axis_coordinates(to_parent, (low_res,) * 3)
        inside = [torch.from_numpy((c >= -0.5) & (c <= geometry.size - 0.5)) for c in coords]
        overlap = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        prior = self._mask_prompt(geometry, previous, latencies)
        prior = torch.zeros_like(carried) if prior is None else prior.clone()
        prior[overlap] = carried[overlap]
        carried_mask = ((carried > 0) & overlap).numpy()
        seeds = []
        if carried_mask.any():
            depth = ndimage.distance_transform_edt(carried_mask)
            deepest = np.unravel_index(int(np.argmax(depth)), depth.shape)
            seeds.append([factor * index + (factor - 1) / 2 for index in deepest])
        latencies["plan"] += time.perf_counter() - started
        if not seeds:  # nothing of the object reaches into this window
            return None
        return self._window(geometry, foreground, background, box, seeds, prior, latencies)

    def _paste(self, results: list[WindowResult], latencies):
        started = time.perf_counter()
        windows = [(result.geometry, result.low_res_logits[0, 0]) for result in results]
        pasted = paste_mask(windows, self.volume.affine, self.volume.shape)
        latencies["paste"] += time.perf_counter() - started
        return pasted
