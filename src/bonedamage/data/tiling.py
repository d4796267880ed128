"""Tile geometry: physical tile sizes in pixels and the grid of tiles cut from a slice.

Tiles are square, of a physical size in um, laid on a regular grid centred in the slice.
A tile is kept when enough of it lies inside the reconstructed field of view (the disc
inscribed in the slice), so the dark corners outside the reconstruction never make
tiles.
"""

from __future__ import annotations

import numpy as np


class TilingError(ValueError):
    """A tile size does not fit the scan."""


def tile_px(tile_um: float, voxel_um: float) -> int:
    """Tile edge in pixels for a physical edge ``tile_um`` (rounded, at least 8 px)."""
    if not (voxel_um > 0 and tile_um > 0):
        raise TilingError(f"tile size {tile_um} um / voxel size {voxel_um} um must be positive")
    return max(8, int(round(tile_um / voxel_um)))


def tile_origins(shape_yx: tuple[int, int], tile: int) -> list[tuple[int, int]]:
    """Top-left corners of a non-overlapping grid of ``tile`` px tiles centred in the slice."""
    ny, nx = shape_yx
    if tile > min(ny, nx):
        raise TilingError(f"tile of {tile} px is larger than the {ny}x{nx} px slice")
    oy, ox = (ny % tile) // 2, (nx % tile) // 2
    return [(y, x) for y in range(oy, ny - tile + 1, tile) for x in range(ox, nx - tile + 1, tile)]


def fov_disc(shape_yx: tuple[int, int]) -> np.ndarray:
    """Boolean disc inscribed in the slice: the reconstructed field of view."""
    ny, nx = shape_yx
    yy, xx = np.meshgrid(
        np.arange(ny) - (ny - 1) / 2.0, np.arange(nx) - (nx - 1) / 2.0, indexing="ij"
    )
    return np.hypot(yy, xx) <= (min(ny, nx) - 1) / 2.0


def tiles_in_fov(
    shape_yx: tuple[int, int], tile: int, min_fraction: float
) -> list[tuple[int, int]]:
    """Grid tiles with at least ``min_fraction`` of their pixels inside the field of view."""
    disc = fov_disc(shape_yx)
    return [
        (y, x)
        for y, x in tile_origins(shape_yx, tile)
        if disc[y : y + tile, x : x + tile].mean() >= min_fraction
    ]
