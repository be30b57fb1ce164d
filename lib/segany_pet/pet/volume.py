"""A PET volume: SUV array, its affine and metadata, read from and written to NIfTI.

Frames: arrays are indexed in the stored order of the file, ``suv[i, j, k]``; ``affine`` maps
voxel index (i, j, k, 1) to world millimetres in RAS+ (NIfTI convention). Clients (OHIF, Slicer)
send clicks as voxel indices of this stored array.
"""

from __future__ import annotations

import math
import os
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import nibabel as nib
import nrrd
import numpy as np

from segany_pet.errors import InvalidImageError

# Above this a "SUV" image almost surely holds raw Bq/mL (whole-body lesion SUVs stay below ~400).
MAX_PLAUSIBLE_SUV = 1000.0
# A whole-body PET on the autoPET grid holds 52 M voxels, a total-body scanner's a few times that; 2^28 voxels are
# 1 GiB as float32.
MAX_VOXELS = 2**28
# Below this it holds a CT in Hounsfield units (air is -1000); reconstructions dip only slightly below 0.
MIN_PLAUSIBLE_SUV = -100.0
# Voxels above this SUV are the body (air and the table read ~0).
BODY_SUV = 0.2


def superior_axis(affine: np.ndarray) -> tuple[int, int]:
    """(stored axis closest to the patient's head-feet direction, +1 if its index grows towards the head)."""
    axis = int(np.argmax(np.abs(affine[2, :3])))
    return axis, 1 if affine[2, axis] > 0 else -1


@dataclass
class PETVolume:
    suv: np.ndarray  # float32, stored axis order
    affine: np.ndarray  # 4x4, voxel index -> world mm (RAS+)
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.suv.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the stored axes."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def index_to_world(self, ijk) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


def load_nifti(path: str | os.PathLike) -> PETVolume:
    """Read a 3D SUV NIfTI, refusing what would give meaningless SUV numbers."""
    name = os.path.basename(str(path))
    try:
        image = nib.load(str(path))
        voxels = math.prod(image.shape)
        if voxels > MAX_VOXELS:  # read from the header: refused before anything is allocated
            raise InvalidImageError(
                f"{name}: the header claims {'x'.join(map(str, image.shape))} = {voxels:,} voxels, more than the "
                f"{MAX_VOXELS:,} a PET volume here may hold; check the file (or resample the scan)"
            )
        data = np.asanyarray(image.dataobj)
    except InvalidImageError:
        raise
    except Exception as exc:  # nibabel raises many types for damaged files
        reason = str(exc).replace(str(path), name)  # nibabel names the whole path: the client needs the name
        raise InvalidImageError(f"{name}: cannot be read as NIfTI ({reason}); replace the file") from exc
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim != 3:
        raise InvalidImageError(
            f"{name}: PET image must be a 3D volume, got shape {tuple(data.shape)}; "
            "split 4D/dynamic series into 3D frames"
        )
    if min(data.shape) < 2:
        raise InvalidImageError(f"{name}: volume of shape {data.shape} is too small to segment")
    suv = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(suv)
    if not finite.all():
        share = 1.0 - finite.mean()
        raise InvalidImageError(
            f"{name}: {share:.1%} of voxels are NaN or infinite; re-export the SUV image "
            "(NaN usually marks voxels outside the reconstructed field of view)"
        )
    lowest = float(suv.min())
    if lowest < MIN_PLAUSIBLE_SUV:
        raise InvalidImageError(
            f"{name}: values down to {lowest:.4g} look like a CT in Hounsfield units, not PET: give the PET "
            "(SUV) image, not the CT (in nnU-Net layouts, check which channel is which)"
        )
    peak = float(suv.max())
    if peak > MAX_PLAUSIBLE_SUV:
        raise InvalidImageError(
            f"{name}: maximum value {peak:.4g} is not a plausible SUV; the image looks like "
            "raw activity (Bq/mL): convert it to SUV first"
        )
    if peak <= 0:
        raise InvalidImageError(f"{name}: image holds no positive uptake (max {peak:.4g}); is it a PET?")
    affine = np.asarray(image.affine, dtype=float)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InvalidImageError(f"{name}: affine is singular; fix the NIfTI header (pixdim / qform)")
    return PETVolume(suv=suv, affine=affine, meta={"source": str(path)})


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Write an array on the given grid; the header keeps both qform and sform."""
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def save_mask(mask: np.ndarray, affine: np.ndarray, path: str | os.PathLike, compress: bool = True) -> None:
    """Write a label on the image's own grid: NRRD (OHIF, Slicer) or NIfTI, chosen by extension."""
    path = str(path)
    if path.endswith(".nrrd"):
        with open(path, "wb") as file:
            for part in mask_nrrd(mask, affine, compress):
                file.write(part)
    elif path.endswith((".nii", ".nii.gz")):
        save_nifti(mask, affine, path)
    else:
        raise ValueError(f"unsupported label format for {os.path.basename(path)}: use .nrrd or .nii.gz")


# Shared zero bytes for the empty stretches of a label reply (see mask_nrrd).
_ZERO_BLOCK = memoryview(np.zeros(1 << 20, dtype=np.uint8)).toreadonly()


def _zeros(count: int) -> list[memoryview]:
    """``count`` zero bytes as views of one shared block."""
    whole, rest = divmod(count, len(_ZERO_BLOCK))
    return [_ZERO_BLOCK] * whole + ([_ZERO_BLOCK[:rest]] if rest else [])


def mask_nrrd(mask: np.ndarray, affine: np.ndarray, compress: bool = False, nonzero_box=None) -> list:
    """A uint8 label as an NRRD file (OHIF, Slicer) in parts: the header, then the voxels in Fortran order.

    Uncompressed, the voxels are a view of ``mask`` when it is Fortran-ordered (the predictor's masks are), not
    a copy: an autoPET-sized reply is 52 MB, and pynrrd's writer copies it once more before writing (the
    header is written here for that reason; pynrrd reads the files back in the tests). Compressed: gzip
    level 1, which on a mostly empty whole-body mask is 2.3x faster than the default level 6 for a file of a
    few hundred kB either way.

    ``nonzero_box`` (slices holding every non-zero voxel, as the predictor reports them): the voxels before
    and after its span in Fortran order are sent as views of one shared zero block instead of the mask's own
    pages. A fresh mask's untouched pages cost a page fault each when first read: zstd over a fresh
    autoPET-sized mask took 0.037 s, over the same mask sent this way 0.020 s (a warm click from Python in
    scripts/benchmark_server.py: 0.22 -> 0.16 s).
    """
    mask = np.asfortranarray(mask, dtype=np.uint8)
    flat = mask.ravel(order="F")
    voxels = [flat.data]
    if nonzero_box is not None:
        nx, ny, _ = mask.shape
        first = [s.start for s in nonzero_box]
        last = [s.stop - 1 for s in nonzero_box]
        start = first[0] + nx * (first[1] + ny * first[2])
        stop = last[0] + nx * (last[1] + ny * last[2]) + 1
        voxels = [*_zeros(start), flat[start:stop].data, *_zeros(flat.size - stop)]
    if compress:
        compressor = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        voxels = [b"".join([compressor.compress(part) for part in voxels] + [compressor.flush()])]
    return [_nrrd_header(mask.shape, affine, compress), *voxels]


def mask_nrrd_box(mask: np.ndarray, affine: np.ndarray, nonzero_box) -> tuple[list, str]:
    """A label as the NRRD of `mask_nrrd` (uncompressed) with only its box's voxels: (parts, the box).

    The parts are the whole file's header followed by the voxels of ``nonzero_box`` (slices holding every
    non-zero voxel; None for an empty mask) in Fortran order; the box is ``"i0 j0 k0 ni nj nk"`` (its first
    voxel and its size; all zero for an empty mask). `nrrd_from_label_box` rebuilds the whole file from the
    two. For a browser, receiving a 52 MB label costs more than the model's whole click; with the box filled in
    in the page, the click costs 0.02 s more than the model's (scripts/benchmark_server.py; OHIF's add-on
    ohif_label_box.js).
    """
    header = _nrrd_header(mask.shape, affine, compress=False)
    if nonzero_box is None:
        return [header], "0 0 0 0 0 0"
    block = np.asfortranarray(mask[tuple(nonzero_box)], dtype=np.uint8)
    box = " ".join(str(n) for n in [*(s.start for s in nonzero_box), *block.shape])
    return [header, block.ravel(order="F").data], box


def nrrd_from_label_box(body: bytes, box: str) -> bytearray:
    """The whole NRRD file of a `mask_nrrd_box` reply (``body``: header and box voxels; ``box`` as it gives)."""
    i0, j0, k0, ni, nj, nk = (int(n) for n in box.split())
    header_end = body.index(b"\n\n") + 2
    sizes = next(line for line in body[:header_end].decode("ascii").splitlines() if line.startswith("sizes:"))
    shape = tuple(int(n) for n in sizes.split(":", 1)[1].split())
    block = np.frombuffer(body, dtype=np.uint8, offset=header_end)
    if block.size != ni * nj * nk:
        raise ValueError(f"the reply holds {block.size} voxels after its header; its box {box!r} has {ni * nj * nk}")
    whole = bytearray(header_end + int(np.prod(shape)))  # zeros, written in place: no copy of a 52 MB file
    whole[:header_end] = body[:header_end]
    mask = np.frombuffer(whole, dtype=np.uint8, offset=header_end).reshape(shape, order="F")
    mask[i0:i0 + ni, j0:j0 + nj, k0:k0 + nk] = block.reshape((ni, nj, nk), order="F")
    return whole


def _nrrd_header(shape, affine: np.ndarray, compress: bool) -> bytes:
    fields = (
        ("type", "uint8"),
        ("dimension", 3),
        ("space", "right-anterior-superior"),
        ("sizes", " ".join(str(n) for n in shape)),
        # NRRD lists one direction vector per axis: the affine's columns
        ("space directions", nrrd.format_matrix(affine[:3, :3].T)),
        ("kinds", "domain domain domain"),
        ("encoding", "gzip" if compress else "raw"),
        ("space origin", nrrd.format_vector(affine[:3, 3])),
    )
    return ("NRRD0004\n" + "".join(f"{field}: {value}\n" for field, value in fields) + "\n").encode("ascii")


class VolumeCache:
    """Keeps the last few volumes in memory so repeated clicks on a scan skip reading it.

    Keyed on path, size and modification time, so a replaced file is read again.
    """

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._items: OrderedDict[tuple, PETVolume] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, path: str | os.PathLike) -> PETVolume:
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        volume = load_nifti(path)
        with self._lock:
            self._items[key] = volume
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return volume
