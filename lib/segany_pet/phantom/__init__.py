"""Synthetic whole-body PET cohorts (organs, lesions, PSF, noise) and label-noise injection."""

from segany_pet.pet.organs import ORGAN_LABELS, ORGAN_NAMES
from segany_pet.phantom.anatomy import TRACERS, UPTAKE_RANGES, Grid, organ_core
from segany_pet.phantom.cohort import PhantomCase, case_seed, generate_case, write_cohort
from segany_pet.phantom.label_noise import NOISE_KINDS, inject_label_noise, write_noisy_labels

__all__ = [
    "NOISE_KINDS",
    "ORGAN_LABELS",
    "ORGAN_NAMES",
    "TRACERS",
    "UPTAKE_RANGES",
    "Grid",
    "PhantomCase",
    "case_seed",
    "generate_case",
    "inject_label_noise",
    "organ_core",
    "write_cohort",
    "write_noisy_labels",
]
