"""Reading DICOM: a folder holding one PET series into a ``PETVolume`` in SUV (`read_pet_series`, its geometry
checked and its headers converted by `segany_pet.pet.dicom.suv_conversion`), and a DICOM-SEG into a label on a
volume's grid (`read_dicom_seg`). Each refusal names the files at fault and says what to fix.

Frames: DICOM positions are patient LPS millimetres (x towards the patient's left, y posterior, z head).
The returned array is indexed ``suv[i, j, k]`` with
    i = column index within a slice (steps along the row cosine of ImageOrientationPatient),
    j = row index (steps along the column cosine),
    k = slice, in increasing position along the slice normal (row cosine x column cosine),
which is how NIfTI tools index a DICOM series. ``affine`` maps (i, j, k, 1) to RAS+ millimetres (NIfTI): the
LPS affine with its x and y rows negated. Slices are ordered by geometry alone, never by file name or
InstanceNumber, so k always runs along the normal: a NIfTI grid whose k axis runs against it, written as DICOM
and read back, returns with k reversed (the same voxels at the same world positions).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from segany_pet.errors import InvalidImageError, UserInputError
from segany_pet.pet.dicom import SUV_NORMS, suv_conversion, tag_name, text_value
from segany_pet.pet.volume import PETVolume

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: an index of a CD export, not an image
# Geometry tolerances (mm). DS strings keep about 16 characters, so positions round-trip to far better than this.
DUPLICATE_POSITION_MM = 0.01
MISSING_SLICE_GAP = 1.5  # a step above 1.5x the median step means at least one slice is missing
SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_SHARE = 0.01  # also allow 1% of the step (scanners round positions to 0.01-0.1 mm)


def read_pet_series(folder: str | os.PathLike, norm: str = "bw") -> PETVolume:
    """Read the one PET series in ``folder`` (searched recursively) as SUV, float32, in the frame above.

    Files that are not DICOM (no 'DICM' prefix) and a DICOMDIR are skipped; images of other modalities are
    ignored with a warning. ``norm``: "bw" (SUVbw), "lbm" (SUL) or "bsa" (SUVbsa).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"{folder} is not a folder: give the folder of one PET DICOM series")
    if norm not in SUV_NORMS:
        raise UserInputError(f"unknown SUV normalisation {norm!r}: use one of {', '.join(SUV_NORMS)}")
    images, warnings = _read_images(folder)
    slices = _one_pet_series(images, folder, warnings)
    _check_slices_agree(slices, folder)
    slices, affine = _stack(slices, folder)
    conversion = suv_conversion(slices)
    factor = conversion.factor(norm)

    columns, rows = int(slices[0].Columns), int(slices[0].Rows)
    suv = np.empty((columns, rows, len(slices)), dtype=np.float32)
    for k, dataset in enumerate(slices):
        # Rescale per instance, in float: GE and Siemens choose a slope per slice.
        activity = _pixels(dataset, folder).astype(np.float64) * float(dataset.RescaleSlope)
        activity += float(dataset.get("RescaleIntercept", 0.0) or 0.0)
        suv[:, :, k] = (activity * factor).T  # pixel array is [row, column]; i is the column

    warnings += conversion.warnings  # callers show them: the CLI prints them, a server logs them
    first = slices[0]
    meta = {
        "source": str(folder),
        "modality": "PT",
        "series": {
            "StudyInstanceUID": str(first.get("StudyInstanceUID", "")),
            "SeriesInstanceUID": str(first.get("SeriesInstanceUID", "")),
            "SeriesDescription": str(first.get("SeriesDescription", "")),
            "Manufacturer": str(first.get("Manufacturer", "")),
            "slices": len(slices),
        },
        "suv_norm": norm,
        "suv_factor": factor,
        "suv_conversion": conversion.to_dict(),
        "warnings": warnings,
    }
    return PETVolume(suv=suv, affine=affine, meta=meta)


def _relative(dataset: Dataset, folder: Path) -> str:
    path = Path(dataset.filename)
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _read_images(folder: Path) -> tuple[list[Dataset], list[str]]:
    """Every DICOM image under ``folder``; refuses a DICOM file that is not an image."""
    images, skipped = [], 0
    paths = sorted(path for path in folder.rglob("*") if path.is_file())
    for path in paths:
        try:
            # Pixel data is read when used: the CT of a PET/CT export in the same folder never is.
            dataset = pydicom.dcmread(path, defer_size="64 KB")
        except InvalidDicomError:
            skipped += 1
            continue
        except Exception as exc:  # pydicom raises many types for damaged files
            raise InvalidImageError(
                f"{path.relative_to(folder)}: damaged DICOM file ({exc}); replace or remove it"
            ) from exc
        file_meta = getattr(dataset, "file_meta", Dataset())
        sop_class = str(file_meta.get("MediaStorageSOPClassUID", "") or dataset.get("SOPClassUID", ""))
        if sop_class == MEDIA_STORAGE_DIRECTORY:
            continue
        if "PixelData" not in dataset:
            name = pydicom.uid.UID(sop_class).name if sop_class else "unknown SOP class"
            raise InvalidImageError(
                f"{path.relative_to(folder)}: DICOM file holds no image ({name}, modality "
                f"{dataset.get('Modality', '?')}); move it out of the folder, which should hold one PET series"
            )
        images.append(dataset)
    if not images:
        raise InvalidImageError(
            f"no DICOM images in {folder} ({len(paths)} files, {skipped} not DICOM Part 10 files with the 'DICM' "
            "prefix); give the folder of a PET series"
        )
    warnings = [f"skipped {skipped} files that are not DICOM"] if skipped else []
    return images, warnings


def _one_pet_series(images: list[Dataset], folder: Path, warnings: list[str]) -> list[Dataset]:
    modalities = Counter(str(image.get("Modality", "?")) for image in images)
    pet = [image for image in images if image.get("Modality") == "PT"]
    found = ", ".join(f"{modality} ({count} files)" for modality, count in sorted(modalities.items()))
    if not pet:
        raise InvalidImageError(f"{folder} holds no PET (modality PT) images, only {found}; give the PET series")
    if len(pet) < len(images):
        warnings.append(f"ignored the images of other modalities (found {found})")
    series = Counter(str(image.get("SeriesInstanceUID", "")) for image in pet)
    if len(series) > 1:
        descriptions = {str(image.get("SeriesInstanceUID", "")): image.get("SeriesDescription", "") for image in pet}
        listing = "; ".join(f"{uid} '{descriptions[uid]}' ({count} files)" for uid, count in sorted(series.items()))
        raise InvalidImageError(
            f"{folder} holds {len(series)} PET series: {listing}; pass the folder of one series"
        )
    return pet


SLICE_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "RescaleSlope")


def _check_slices_agree(slices: list[Dataset], folder: Path) -> None:
    """Every slice has the tags the volume needs, and they agree where they must."""
    for dataset in slices:
        for keyword in SLICE_TAGS:
            if text_value(dataset.get(keyword)) is None:
                raise InvalidImageError(f"{_relative(dataset, folder)}: {tag_name(keyword)} is missing")
        if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
            raise InvalidImageError(
                f"{_relative(dataset, folder)}: a multi-frame (enhanced) PET file; export the series as one file "
                "per slice"
            )
    _check_same(slices, folder, "Units", lambda dataset: str(dataset.get("Units", "")).strip().upper())
    _check_same(slices, folder, "Rows", lambda dataset: int(dataset.Rows))
    _check_same(slices, folder, "Columns", lambda dataset: int(dataset.Columns))
    _check_same(slices, folder, "PixelSpacing", lambda dataset: tuple(np.round(_floats(dataset.PixelSpacing), 4)))
    _check_same(
        slices, folder, "ImageOrientationPatient",
        lambda dataset: tuple(np.round(_floats(dataset.ImageOrientationPatient), 4)),
    )


def _check_same(slices: list[Dataset], folder: Path, keyword: str, value_of) -> None:
    values = Counter(value_of(dataset) for dataset in slices)
    if len(values) > 1:
        listing = ", ".join(f"{value} ({count} files)" for value, count in values.most_common())
        odd = next(dataset for dataset in slices if value_of(dataset) != values.most_common(1)[0][0])
        raise InvalidImageError(
            f"{tag_name(keyword)} differs across the slices of one series: {listing} (e.g. "
            f"{_relative(odd, folder)}); re-export the series"
        )


def _floats(values) -> np.ndarray:
    return np.array([float(value) for value in values], dtype=np.float64)


def _stack(slices: list[Dataset], folder: Path) -> tuple[list[Dataset], np.ndarray]:
    """Slices sorted along their normal, checked for gaps and duplicates, and the RAS+ affine of the stack."""
    if len(slices) < 2:
        raise InvalidImageError(f"{folder} holds a single PET slice: a 3D volume needs the whole series")
    orientation = _floats(slices[0].ImageOrientationPatient)
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row_cosine) - 1) > 1e-3
        or abs(np.linalg.norm(column_cosine) - 1) > 1e-3
        or abs(row_cosine @ column_cosine) > 1e-3
    ):
        raise InvalidImageError(
            f"{tag_name('ImageOrientationPatient')} = {orientation.tolist()} is not two orthogonal unit vectors"
        )
    normal = np.cross(row_cosine, column_cosine)
    positions = np.array([_floats(dataset.ImagePositionPatient) for dataset in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices, positions, along = [slices[n] for n in order], positions[order], along[order]

    steps = np.diff(along)
    duplicates = np.flatnonzero(steps < DUPLICATE_POSITION_MM)
    if duplicates.size:
        shown = ", ".join(
            f"{along[n]:.2f} mm ({_relative(slices[n], folder)}, {_relative(slices[n + 1], folder)})"
            for n in duplicates[:5]
        )
        raise InvalidImageError(
            f"{duplicates.size} slices repeat a position along the slice normal: {shown}; a dynamic or gated "
            "series holds several frames per position: export one frame (or remove duplicated files)"
        )
    step = float(np.median(steps))
    gaps = np.flatnonzero(steps > MISSING_SLICE_GAP * step)
    if gaps.size:
        shown = ", ".join(f"{along[n]:.2f} to {along[n + 1]:.2f} mm" for n in gaps[:5])
        raise InvalidImageError(
            f"missing slices: the slice position jumps from {shown} (slice spacing elsewhere {step:.3g} mm); "
            "re-export the complete series"
        )
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_SHARE * step)
    uneven = np.flatnonzero(np.abs(steps - step) > tolerance)
    if uneven.size:
        shown = ", ".join(f"{steps[n]:.3f} mm after {along[n]:.2f} mm" for n in uneven[:5])
        raise InvalidImageError(
            f"slice spacing is uneven (median {step:.3f} mm; {shown}); resample the series to a regular grid"
        )
    offsets = positions - positions[0]
    in_plane = np.abs(np.stack([offsets @ row_cosine, offsets @ column_cosine])).max()
    if in_plane > tolerance:
        raise InvalidImageError(
            f"slices are not stacked along their normal ({tag_name('ImagePositionPatient')} shifts up to "
            f"{in_plane:.3f} mm within the slice plane: gantry tilt or a sheared series); resample it first"
        )

    row_spacing, column_spacing = _floats(slices[0].PixelSpacing)  # between rows, between columns
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * column_spacing  # i: the column index steps along a row
    lps[:3, 1] = column_cosine * row_spacing  # j: the row index steps along a column
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
    lps[:3, 3] = positions[0]
    return slices, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _pixels(dataset: Dataset, folder: Path) -> np.ndarray:
    try:
        pixels = dataset.pixel_array
    except Exception as exc:  # missing decoder plugins, truncated data: many types
        syntax = getattr(dataset, "file_meta", Dataset()).get("TransferSyntaxUID")
        raise InvalidImageError(
            f"{_relative(dataset, folder)}: pixel data cannot be decoded ({exc}; transfer syntax "
            f"{syntax.name if syntax else 'unknown'}); decompress the series (e.g. gdcmconv --raw) and retry"
        ) from exc
    if pixels.shape != (int(dataset.Rows), int(dataset.Columns)):
        raise InvalidImageError(
            f"{_relative(dataset, folder)}: pixel data of shape {pixels.shape} is not Rows x Columns; "
            "replace the file"
        )
    return pixels


# ----------------------------------------------------------------------------------------------
# DICOM-SEG labels


SEG_GRID_TOLERANCE = 0.01  # voxel units: a SEG voxel centre must lie this close to an image voxel centre


def read_dicom_seg(path: str | os.PathLike, volume: PETVolume) -> np.ndarray:
    """A DICOM-SEG (segment numbers as label values) on ``volume``'s grid, uint16 in its stored order.

    The SEG's frames may cover part of the series (empty frames are often left out) and may be stored in
    another axis order; each SEG voxel centre must fall on an image voxel centre, else the SEG was drawn on
    another grid and is refused.
    """
    import pydicom_seg
    import SimpleITK as sitk

    name = Path(path).name
    try:
        seg = pydicom_seg.MultiClassReader().read(pydicom.dcmread(path)).image
    except Exception as exc:  # pydicom and pydicom-seg raise many types for damaged or unsupported files
        raise InvalidImageError(f"DICOM-SEG {name}: cannot be read ({exc}); export it again as a labelmap or "
                                "binary SEG of the PET series") from exc
    grid = _itk_grid(volume)
    corner = np.asarray(grid.TransformPhysicalPointToContinuousIndex(seg.TransformIndexToPhysicalPoint((0, 0, 0))))
    steps = [np.asarray(grid.TransformPhysicalPointToContinuousIndex(seg.TransformIndexToPhysicalPoint(unit)))
             - corner for unit in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    aligned = np.abs(corner - np.round(corner)).max() < SEG_GRID_TOLERANCE and all(
        np.abs(np.abs(step) - np.round(np.abs(step))).max() < SEG_GRID_TOLERANCE
        and np.isclose(np.abs(step).sum(), 1.0, atol=SEG_GRID_TOLERANCE) for step in steps)
    if not aligned:
        raise InvalidImageError(f"DICOM-SEG {name}: grid mismatch, its voxels do not fall on the PET series' "
                                f"voxels (SEG voxel 0 at PET index {np.round(corner, 3).tolist()}); give a SEG of "
                                "this series")
    placed = sitk.Resample(seg, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    label = np.asfortranarray(sitk.GetArrayFromImage(placed).transpose(2, 1, 0))
    drawn, kept = int(np.count_nonzero(sitk.GetArrayViewFromImage(seg))), int(np.count_nonzero(label))
    if kept != drawn:
        raise InvalidImageError(f"DICOM-SEG {name}: grid mismatch, {drawn - kept} of its {drawn} segment voxels lie "
                                "outside the PET series; give a SEG of this series")
    return label


def _itk_grid(volume: PETVolume):
    """An empty SimpleITK image on ``volume``'s grid: ITK indexes (i, j, k) like the stored array and measures
    in LPS, so the affine's first two rows change sign."""
    import SimpleITK as sitk

    columns = np.diag([-1.0, -1.0, 1.0]) @ volume.affine[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    grid = sitk.Image([int(n) for n in volume.shape], sitk.sitkUInt8)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection((columns / spacing).flatten().tolist())
    grid.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ volume.affine[:3, 3]).tolist())
    return grid
