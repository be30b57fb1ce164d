"""PET volumes and their quantification."""

from segany_pet.pet.volume import PETVolume, VolumeCache, load_nifti, save_mask, save_nifti

__all__ = ["PETVolume", "VolumeCache", "load_nifti", "save_mask", "save_nifti"]
