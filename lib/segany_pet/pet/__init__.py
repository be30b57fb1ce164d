"""PET volumes and their quantification."""

from segany_pet.pet.quantify import label_lesions, quantify
from segany_pet.pet.volume import PETVolume, VolumeCache, load_nifti, save_mask, save_nifti

__all__ = ["PETVolume", "VolumeCache", "label_lesions", "load_nifti", "quantify", "save_mask", "save_nifti"]
