"""A synthetic PET DICOM series, written the way PET/CT scanners export one: a file per slice.

Pixels are stored as int16 with a rescale slope chosen per slice (as GE and Siemens do), so a reader that
applies the first slice's slope to all, or keeps integer arithmetic, gets wrong SUVs. Activity is written as
``suv * decayed dose / weight[g]``, the inverse of the QIBA conversion in ``segany_pet.pet.dicom``. File names
are shuffled and InstanceNumber runs against the slice direction, so only a reader that sorts by geometry
rebuilds the volume. Bed positions are acquired from the last slice back, so the first slice in geometric
order is not the earliest acquisition.

Frames: ``suv[i, j, k]`` and its RAS+ ``affine`` as in ``segany_pet.pet.dicom``: i is the column within a
slice, j the row, k the slice; the affine's columns become the row cosine and column spacing, the column cosine
and row spacing, and the slice step (converted to DICOM's LPS by negating x and y).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from segany_pet.pet.dicom import (
    GE_PRIVATE_CREATOR,
    GE_SCAN_DATETIME,
    PET_IMAGE_STORAGE,
    PHILIPS_ACTIVITY_SCALE,
    PHILIPS_PRIVATE_CREATOR,
    PHILIPS_SUV_FACTOR,
)

VENDORS = {"generic": "SegAnyPET phantom", "ge": "GE MEDICAL SYSTEMS", "philips": "Philips Medical Systems"}
UNITS = ("BQML", "CNTS", "GML")
DECAY_CORRECTIONS = ("START", "ADMIN", "NONE")
# Bq/mL per count in the synthetic CNTS images (Philips writes its own per scanner calibration).
COUNTS_ACTIVITY_SCALE = 2.5
INT16_MAX = 32767


def write_pet_series(
    suv: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike,
    *,
    weight_kg: float = 75.0,
    height_m: float | None = 1.75,
    sex: str | None = "M",
    dose_bq: float = 3.7e8,
    half_life_s: float = 6586.2,
    injection: datetime = datetime(2024, 3, 5, 9, 0, 0),
    scan: datetime | None = None,
    series_time: datetime | None = None,
    slices_per_bed: int = 64,
    bed_seconds: float = 120.0,
    units: str = "BQML",
    decay_correction: str = "START",
    vendor: str = "generic",
    per_slice_slope: bool = True,
    shuffle_files: bool = True,
    skip_slices: Sequence[int] = (),
    seed: int = 0,
    patient_id: str = "PHANTOM-0001",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_description: str = "PET WB AC (synthetic)",
) -> list[Path]:
    """Write ``suv`` as one PET DICOM file per slice in ``folder``; returns the written paths in slice order.

    ``scan``: start of the scan, what decay is corrected to (default injection + 1 h). ``series_time``: the
    SeriesTime written (default ``scan``); later than the scan mimics a series re-created after acquisition,
    which GE series survive through their private scan datetime (vendor "ge"). ``units`` CNTS writes counts;
    the Philips private factors that convert them are written only for vendor "philips". ``skip_slices`` leaves
    out slices (a broken export). UIDs not given derive from ``seed``, so a call writes the same files twice.
    """
    suv = np.asarray(suv, dtype=np.float64)
    if suv.ndim != 3:
        raise ValueError(f"suv must be 3D, got shape {suv.shape}")
    if units not in UNITS or decay_correction not in DECAY_CORRECTIONS or vendor not in VENDORS:
        raise ValueError(f"units {units!r}, decay_correction {decay_correction!r}, vendor {vendor!r}: use one of "
                         f"{UNITS}, {DECAY_CORRECTIONS}, {tuple(VENDORS)}")
    scan = scan or injection + timedelta(hours=1)
    series_time = series_time or scan
    geometry = _slice_geometry(np.asarray(affine, dtype=np.float64), suv.shape[2])

    # The inverse of the reader: activity [Bq/mL] = SUV * decayed dose / weight [g].
    decayed_dose = dose_bq if decay_correction == "ADMIN" else dose_bq * 2.0 ** (
        -(scan - injection).total_seconds() / half_life_s
    )
    grams_per_becquerel = weight_kg * 1000.0 / decayed_dose
    if units == "GML":
        values = suv
    elif units == "CNTS":
        values = suv / grams_per_becquerel / COUNTS_ACTIVITY_SCALE
    else:
        values = suv / grams_per_becquerel
    slopes = _slopes(values, per_slice_slope)

    entropy = [str(seed), patient_id]
    study_uid = study_uid or generate_uid(entropy_srcs=[*entropy, "study"])
    series_uid = series_uid or generate_uid(entropy_srcs=[*entropy, series_description, "series"])
    frame_of_reference_uid = generate_uid(entropy_srcs=[*entropy, "frame of reference"])
    header = _series_header(
        weight_kg=weight_kg, height_m=height_m, sex=sex, dose_bq=dose_bq, half_life_s=half_life_s,
        injection=injection, scan=scan, series_time=series_time, units=units, decay_correction=decay_correction,
        vendor=vendor, patient_id=patient_id, study_uid=study_uid, series_uid=series_uid,
        frame_of_reference_uid=frame_of_reference_uid, series_description=series_description,
        slices=suv.shape[2], shape=suv.shape,
    )
    if vendor == "philips":
        block = header.private_block(PHILIPS_SUV_FACTOR[0], PHILIPS_PRIVATE_CREATOR, create=True)
        block.add_new(PHILIPS_SUV_FACTOR[1], "DS", _ds(COUNTS_ACTIVITY_SCALE * grams_per_becquerel))
        block.add_new(PHILIPS_ACTIVITY_SCALE[1], "DS", _ds(COUNTS_ACTIVITY_SCALE))
    if vendor == "ge":
        block = header.private_block(GE_SCAN_DATETIME[0], GE_PRIVATE_CREATOR, create=True)
        block.add_new(GE_SCAN_DATETIME[1], "DT", f"{scan:%Y%m%d%H%M%S.%f}")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slices = suv.shape[2]
    file_numbers = np.random.default_rng(seed).permutation(slices) if shuffle_files else np.arange(slices)
    beds = (slices - 1) // slices_per_bed + 1
    paths = []
    for k in range(slices):
        if k in skip_slices:
            continue
        bed = beds - 1 - k // slices_per_bed  # acquired from the last slice back
        acquisition = scan + timedelta(seconds=bed * bed_seconds)
        dataset = _slice_dataset(header, k, slices, geometry, values[:, :, k], slopes[k], acquisition, scan,
                                 injection, half_life_s, bed_seconds, decay_correction, entropy)
        path = folder / f"PT{int(file_numbers[k]):04d}.dcm"
        dataset.filename = str(path)
        dataset.save_as(path, write_like_original=False)
        paths.append(path)
    return paths


def _slice_geometry(affine: np.ndarray, slices: int) -> dict:
    """PixelSpacing, ImageOrientationPatient and each slice's ImagePositionPatient (LPS) of a RAS+ affine."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    along_row, along_column, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    column_spacing, row_spacing = np.linalg.norm(along_row), np.linalg.norm(along_column)
    row_cosine, column_cosine = along_row / column_spacing, along_column / row_spacing
    if abs(row_cosine @ column_cosine) > 1e-6:
        raise ValueError("affine columns i and j must be orthogonal: DICOM slices are rectangular grids")
    normal = np.cross(row_cosine, column_cosine)
    slice_spacing = np.linalg.norm(slice_step)
    if np.linalg.norm(np.cross(slice_step / slice_spacing, normal)) > 1e-6:
        raise ValueError("affine column k must be perpendicular to the slices (no shear or gantry tilt)")
    positions = lps[:3, 3] + np.arange(slices)[:, None] * slice_step
    return {
        "PixelSpacing": [_ds(row_spacing), _ds(column_spacing)],
        "ImageOrientationPatient": [_ds(value) for value in (*row_cosine, *column_cosine)],
        "SliceThickness": _ds(slice_spacing),
        "positions": positions,
        "normal": normal,
    }


def _slopes(values: np.ndarray, per_slice: bool) -> np.ndarray:
    """RescaleSlope per slice: the slice's (or volume's) largest magnitude maps to the int16 limit."""
    peaks = np.abs(values).max(axis=(0, 1)) if per_slice else np.full(values.shape[2], np.abs(values).max())
    return np.where(peaks > 0, peaks / INT16_MAX, 1.0)


def _series_header(*, weight_kg, height_m, sex, dose_bq, half_life_s, injection, scan, series_time, units,
                   decay_correction, vendor, patient_id, study_uid, series_uid, frame_of_reference_uid,
                   series_description, slices, shape) -> Dataset:
    """The tags every slice of the series shares."""
    header = Dataset()
    header.SpecificCharacterSet = "ISO_IR 100"
    header.ImageType = ["ORIGINAL", "PRIMARY"]
    header.SOPClassUID = PET_IMAGE_STORAGE
    header.StudyDate = f"{scan:%Y%m%d}"
    header.StudyTime = f"{scan:%H%M%S}"
    header.SeriesDate, header.SeriesTime = f"{series_time:%Y%m%d}", f"{series_time:%H%M%S.%f}"
    header.Modality = "PT"
    header.Manufacturer = VENDORS[vendor]
    header.StudyDescription = "PET/CT whole body (synthetic)"
    header.SeriesDescription = series_description
    header.PatientName = "Phantom^PET"
    header.PatientID = patient_id
    header.PatientBirthDate = ""
    if sex is not None:
        header.PatientSex = sex
    if height_m is not None:
        header.PatientSize = _ds(height_m)
    header.PatientWeight = _ds(weight_kg)
    header.StudyInstanceUID = study_uid
    header.SeriesInstanceUID = series_uid
    header.StudyID = "1"
    header.SeriesNumber = 1
    header.FrameOfReferenceUID = frame_of_reference_uid
    header.PositionReferenceIndicator = ""
    header.PatientPosition = "FFS"

    # PET Series and PET Isotope modules: what the SUV conversion reads.
    header.Units = units
    header.DecayCorrection = decay_correction
    header.CorrectedImage = ["ATTN", "DECY", "SCAT", "DTIM", "RAN", "NORM"]
    header.SeriesType = ["WHOLE BODY", "IMAGE"]
    header.CountsSource = "EMISSION"
    header.NumberOfSlices = slices
    radionuclide = Dataset()
    radionuclide.CodeValue, radionuclide.CodingSchemeDesignator = "C-111A1", "SRT"
    radionuclide.CodeMeaning = "^18^Fluorine"
    radiopharmaceutical = Dataset()
    radiopharmaceutical.Radiopharmaceutical = "Fluorodeoxyglucose"
    radiopharmaceutical.RadiopharmaceuticalStartTime = f"{injection:%H%M%S.%f}"
    radiopharmaceutical.RadiopharmaceuticalStartDateTime = f"{injection:%Y%m%d%H%M%S.%f}"
    radiopharmaceutical.RadionuclideTotalDose = _ds(dose_bq)
    radiopharmaceutical.RadionuclideHalfLife = _ds(half_life_s)
    radiopharmaceutical.RadionuclidePositronFraction = "0.9673"
    radiopharmaceutical.RadionuclideCodeSequence = DicomSequence([radionuclide])
    header.RadiopharmaceuticalInformationSequence = DicomSequence([radiopharmaceutical])

    # Image Pixel module: int16, rescaled per slice.
    header.SamplesPerPixel = 1
    header.PhotometricInterpretation = "MONOCHROME2"
    header.Rows, header.Columns = int(shape[1]), int(shape[0])  # rows run along j, columns along i
    header.BitsAllocated = header.BitsStored = 16
    header.HighBit = 15
    header.PixelRepresentation = 1
    header.RescaleIntercept = "0"
    return header


def _slice_dataset(header, k, slices, geometry, values, slope, acquisition, scan, injection, half_life_s,
                   bed_seconds, decay_correction, entropy) -> FileDataset:
    sop_uid = generate_uid(entropy_srcs=[*entropy, header.SeriesInstanceUID, str(k)])
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = PET_IMAGE_STORAGE
    file_meta.MediaStorageSOPInstanceUID = sop_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    dataset = FileDataset("", Dataset(), file_meta=file_meta, preamble=b"\0" * 128)
    dataset.update(header)
    dataset.is_little_endian, dataset.is_implicit_VR = True, False
    dataset.SOPInstanceUID = sop_uid
    # Numbered against the stack direction (scanners number from the head): sorting by it reverses the volume.
    dataset.InstanceNumber = slices - k
    dataset.ImageIndex = k + 1
    dataset.AcquisitionDate, dataset.AcquisitionTime = f"{acquisition:%Y%m%d}", f"{acquisition:%H%M%S.%f}"
    dataset.ContentDate, dataset.ContentTime = dataset.AcquisitionDate, dataset.AcquisitionTime
    dataset.FrameReferenceTime = _ds((acquisition - scan).total_seconds() * 1000.0)
    dataset.ActualFrameDuration = int(bed_seconds * 1000)
    if decay_correction != "NONE":
        reference = injection if decay_correction == "ADMIN" else scan
        dataset.DecayFactor = _ds(2.0 ** ((acquisition - reference).total_seconds() / half_life_s))
    position = geometry["positions"][k]
    dataset.ImagePositionPatient = [_ds(value) for value in position]
    dataset.ImageOrientationPatient = geometry["ImageOrientationPatient"]
    dataset.PixelSpacing = geometry["PixelSpacing"]
    dataset.SliceThickness = geometry["SliceThickness"]
    dataset.SliceLocation = _ds(position @ geometry["normal"])
    dataset.RescaleSlope = _ds(slope)
    stored = np.clip(np.round(values / float(dataset.RescaleSlope)), -INT16_MAX - 1, INT16_MAX)
    dataset.PixelData = np.ascontiguousarray(stored.T.astype("<i2")).tobytes()  # [row, column] = [j, i]
    return dataset


def _ds(value: float) -> str:
    """A decimal string within DICOM's 16 characters."""
    return format_number_as_ds(float(value))
