"""SR-microCT imaging model: from bone volume fraction to a reconstructed, quantised scan.

Steps, in the order the physics acts on a reconstructed slice stack:
attenuation map (bone, marrow/saline inside the specimen, air outside) -> partial-volume
blur (Gaussian PSF) -> propagation phase-contrast edge enhancement (a negative Laplacian
term: bright/dark fringes at interfaces, as in in-line phase-contrast SR-microCT) ->
slice-correlated noise at a given SNR -> ring artifacts about the rotation axis ->
the cylindrical reconstructed field of view -> fixed-window quantisation to 16 bit
(8-bit and float32 optional).

The intensity window is fixed per tissue, never per scan, and the instrument settings
(PSF, phase strength, SNR) are drawn per specimen, so a specimen's pristine and failed
scans differ only by the damage, its mechanics, the noise realisation and the rings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage


def draw_instrument(rng: np.random.Generator, cfg: dict[str, Any]) -> dict[str, float]:
    """Per-specimen instrument settings (one beamline session per specimen)."""
    return {
        "psf_sigma_vox": float(rng.uniform(*cfg["psf_sigma_vox"])),
        "phase_strength": float(rng.uniform(*cfg["phase_strength"])),
        "snr": float(rng.uniform(*cfg["snr"])),
    }


def attenuation(
    occupancy: np.ndarray, mineral: np.ndarray, inside: np.ndarray, cfg: dict[str, Any]
) -> np.ndarray:
    """Linear attenuation map from bone fraction, mineral factor and the specimen mask."""
    mu_bone, mu_soft, mu_air = cfg["mu_bone"], cfg["mu_soft"], cfg["mu_air"]
    tissue = occupancy * (mu_bone * mineral) + (1.0 - occupancy) * mu_soft
    return (inside * tissue + (1.0 - inside) * mu_air).astype(np.float32)


def acquire(
    mu: np.ndarray, instrument: dict[str, float], cfg: dict[str, Any], rng: np.random.Generator
) -> np.ndarray:
    """Blur, phase contrast, noise, rings and FOV applied to an attenuation map (z, y, x)."""
    contrast = cfg["mu_bone"] - cfg["mu_soft"]
    img = ndimage.gaussian_filter(mu, instrument["psf_sigma_vox"], mode="nearest")
    sigma_pc = cfg["phase_sigma_vox"]
    img = img - instrument["phase_strength"] * sigma_pc**2 * ndimage.gaussian_laplace(
        img, sigma_pc, mode="nearest"
    )
    noise = rng.standard_normal(mu.shape).astype(np.float32)
    noise = ndimage.gaussian_filter(noise, (0.0, cfg["noise_corr_vox"], cfg["noise_corr_vox"]))
    noise /= noise.std()
    sigma_noise = contrast / instrument["snr"]
    img = img + sigma_noise * noise
    img = img + sigma_noise * ring_profile(rng, mu.shape, cfg)
    fov = fov_mask(mu.shape[1:])
    return np.where(fov[None], img, np.float32(cfg["fov_outside"])).astype(np.float32)


def ring_profile(
    rng: np.random.Generator, shape: tuple[int, int, int], cfg: dict[str, Any]
) -> np.ndarray:
    """Concentric rings about the rotation axis, in units of the noise std.

    Each defective detector column gives a thin ring at a fixed radius; its strength
    drifts slowly along z.
    """
    nz, ny, nx = shape
    yy, xx = np.meshgrid(
        np.arange(ny) - (ny - 1) / 2.0, np.arange(nx) - (nx - 1) / 2.0, indexing="ij"
    )
    radius = np.hypot(yy, xx).astype(np.float32)
    n_rings = int(rng.integers(*cfg["ring_count"], endpoint=True))
    out = np.zeros(shape, dtype=np.float32)
    z = np.arange(nz, dtype=np.float32)
    for _ in range(n_rings):
        r0 = rng.uniform(1.0, min(ny, nx) / 2.0)
        amp = rng.uniform(-1.0, 1.0) * cfg["ring_amplitude"]
        drift = 1.0 + 0.3 * np.sin(2 * np.pi * z / rng.uniform(nz, 4 * nz) + rng.uniform(0, 6.3))
        ring = np.exp(-0.5 * ((radius - r0) / 0.6) ** 2)
        out += (amp * drift)[:, None, None] * ring[None]
    return out


def fov_mask(shape_yx: tuple[int, int]) -> np.ndarray:
    """The reconstructed field of view: the disc inscribed in the slice."""
    ny, nx = shape_yx
    yy, xx = np.meshgrid(
        np.arange(ny) - (ny - 1) / 2.0, np.arange(nx) - (nx - 1) / 2.0, indexing="ij"
    )
    return np.hypot(yy, xx) <= (min(ny, nx) - 1) / 2.0


def quantise(img: np.ndarray, dtype: str, window: tuple[float, float]) -> np.ndarray:
    """Map attenuation to the output dtype with a fixed window (float32 keeps values)."""
    if dtype == "float32":
        return img.astype(np.float32)
    top = {"uint16": 65535.0, "uint8": 255.0}[dtype]
    lo, hi = window
    scaled = np.clip((img - lo) / (hi - lo), 0.0, 1.0) * top
    return np.rint(scaled).astype(dtype)
