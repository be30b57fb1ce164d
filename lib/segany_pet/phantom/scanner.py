"""The scanner: limited resolution (Gaussian PSF) and count noise, as seen in reconstructed SUV.

Noise is Gaussian with a standard deviation that grows with the square root of the local
activity (Poisson-like) and a short spatial correlation (reconstructed PET noise is blotchy, not
white); it is scaled so the liver's coefficient of variation lands in the clinical 10-14 %.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

# Scanner resolution near the centre of the field of view (pet.md: 4.3-7.8 mm); Ga-68's positron
# range blurs 1-2 mm more than F-18.
PSF_FWHM_MM = {"fdg": (5.0, 7.0), "psma": (6.5, 8.5)}
LIVER_COV = (0.105, 0.14)
NOISE_GRAIN_MM = (2.5, 3.5)  # sigma of the noise correlation
# Scatter and randoms leave a faint signal even in air; it keeps noise off exact zeros.
ACTIVITY_FLOOR_SUV = 0.01

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclass
class ScannerSettings:
    fwhm_mm: float
    liver_cov: float  # wanted noise level in the liver
    noise_grain_mm: float

    def to_dict(self) -> dict:
        return {k: round(float(v), 4) for k, v in asdict(self).items()}


def draw_scanner(tracer: str, rng: np.random.Generator) -> ScannerSettings:
    return ScannerSettings(
        fwhm_mm=float(rng.uniform(*PSF_FWHM_MM[tracer])),
        liver_cov=float(rng.uniform(*LIVER_COV)),
        noise_grain_mm=float(rng.uniform(*NOISE_GRAIN_MM)),
    )


def blur(suv: np.ndarray, spacing, fwhm_mm: float) -> np.ndarray:
    """Separable Gaussian PSF (float32 in, float32 out)."""
    sigma = [fwhm_mm * FWHM_TO_SIGMA / s for s in spacing]
    return ndimage.gaussian_filter(suv.astype(np.float32, copy=False), sigma, mode="constant", truncate=3.0)


def add_noise(
    blurred: np.ndarray, spacing, settings: ScannerSettings, liver_suv: float, rng: np.random.Generator
) -> np.ndarray:
    """Activity-dependent correlated noise; the result is clipped at zero like an OSEM image."""
    grain = ndimage.gaussian_filter(
        rng.standard_normal(blurred.shape, dtype=np.float32),
        [settings.noise_grain_mm / s for s in spacing],
        mode="wrap",
        truncate=3.0,
    )
    grain *= np.float32(1.0 / grain.std())
    # std = cov * sqrt(activity * liver) gives exactly cov / 1 relative noise at liver activity.
    scale = np.float32(settings.liver_cov * np.sqrt(liver_suv))
    noise_sd = np.sqrt(np.maximum(blurred, 0.0) + np.float32(ACTIVITY_FLOOR_SUV))
    noise_sd *= scale
    grain *= noise_sd
    grain += blurred
    np.maximum(grain, 0.0, out=grain)
    return grain
