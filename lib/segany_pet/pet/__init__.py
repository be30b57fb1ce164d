"""PET volumes (NIfTI, DICOM series converted to SUV) and their quantification."""

from segany_pet.pet.dicom import SUVConversion, suv_conversion
from segany_pet.pet.dicom_series import read_pet_series
from segany_pet.pet.quantify import label_lesions, quantify
from segany_pet.pet.volume import (
    PETVolume,
    VolumeCache,
    load_nifti,
    mask_nrrd,
    mask_nrrd_box,
    nrrd_from_label_box,
    save_mask,
    save_nifti,
)

__all__ = [
    "PETVolume",
    "SUVConversion",
    "VolumeCache",
    "label_lesions",
    "load_nifti",
    "quantify",
    "read_pet_series",
    "mask_nrrd",
    "mask_nrrd_box",
    "nrrd_from_label_box",
    "save_mask",
    "save_nifti",
    "suv_conversion",
]
