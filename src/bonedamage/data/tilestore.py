"""Tile storage: a few chunk files per scan plus one index table.

Hundreds of thousands of one-tile files choke DVC and file systems, so tiles are kept as
``<root>/<tissue>/<scan_id>-NNNN.npy`` arrays of shape (n, tile_px, tile_px), or
(n, channels, tile_px, tile_px) for 2.5-D tiles (neighbouring planes as channels), at most
``chunk_tiles`` each, which ``numpy.load(mmap_mode="r")`` opens for random access without
reading them whole. Tiles hold the scan's raw values in its own dtype (float32 when the
scan was resampled): storing them costs a copy, not a conversion, and a model can be
served raw tiles exactly as a scanner writes them. ``<root>/index.parquet`` has one row
per tile with its chunk file and row, and the scan's normalisation (``norm_lo``,
``norm_hi``) that :class:`TileStore` applies to give [0, 1] values. Chunks are written
atomically as they fill.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from bonedamage.atomic import atomic_path, require_parquet

INDEX_NAME = "index.parquet"
NORMALIZATION_NAME = "normalization.json"


class ChunkWriter:
    """Append tiles; flush full chunks to ``<root>/<prefix>-NNNN.npy``."""

    def __init__(
        self,
        root: Path,
        prefix: str,
        tile_shape: tuple[int, ...],
        chunk_tiles: int,
        dtype: np.dtype | str,
    ) -> None:
        self.root, self.prefix = root, prefix
        self.tile_shape, self.chunk_tiles = tuple(tile_shape), chunk_tiles
        self.dtype = np.dtype(dtype)
        self._buffer = np.empty((chunk_tiles, *self.tile_shape), dtype=self.dtype)
        self._filled = 0
        self._chunk = 0

    def add_many(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store (n, *tile_shape) tiles; return their chunk paths and rows (arrays)."""
        n = len(tiles)
        chunks = np.empty(n, dtype=object)
        rows = np.empty(n, dtype=np.int32)
        done = 0
        while done < n:
            take = min(n - done, self.chunk_tiles - self._filled)
            self._buffer[self._filled : self._filled + take] = tiles[done : done + take]
            chunks[done : done + take] = self._relpath(self._chunk)
            rows[done : done + take] = np.arange(self._filled, self._filled + take)
            self._filled += take
            done += take
            if self._filled == self.chunk_tiles:
                self.flush()
        return chunks, rows

    def flush(self) -> None:
        if self._filled == 0:
            return
        target = self.root / self._relpath(self._chunk)
        with atomic_path(target) as tmp, open(tmp, "wb") as fh:
            np.save(fh, self._buffer[: self._filled])
        self._chunk += 1
        self._filled = 0

    def _relpath(self, chunk: int) -> str:
        return f"{self.prefix}-{chunk:04d}.npy"


class TileStore:
    """Read-only random access to stored tiles by index row or tile id."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.index = pd.read_parquet(self.root / INDEX_NAME)
        self._chunks: dict[str, np.ndarray] = {}
        # columns as arrays: per-tile access without pandas' per-row cost
        self._chunk_of = self.index["chunk"].to_numpy(dtype=object)
        self._row_of = self.index["row"].to_numpy()
        self._lo = self.index["norm_lo"].to_numpy(dtype=np.float64)
        self._hi = self.index["norm_hi"].to_numpy(dtype=np.float64)

    def __len__(self) -> int:
        return len(self.index)

    def _chunk(self, relpath: str) -> np.ndarray:
        if relpath not in self._chunks:
            self._chunks[relpath] = np.load(self.root / relpath, mmap_mode="r")
        return self._chunks[relpath]

    def channels(self, tissue: str) -> int:
        """Input channels of a tissue's tiles: 1, or the planes of a 2.5-D tile."""
        rows = np.flatnonzero(self.index["tissue"].to_numpy() == tissue)
        if len(rows) == 0:
            raise ValueError(f"{self.root}: no {tissue} tiles in the tile store")
        chunk = self._chunk(self._chunk_of[rows[0]])
        return int(chunk.shape[1]) if chunk.ndim == 4 else 1

    def raw(self, position: int) -> np.ndarray:
        """The stored tile of index row ``position``: raw values in the scan's dtype,
        (tile_px, tile_px) or (channels, tile_px, tile_px)."""
        return np.array(self._chunk(self._chunk_of[position])[int(self._row_of[position])])

    def tile(self, position: int) -> np.ndarray:
        """The normalised float32 tile of index row ``position`` (as models see it)."""
        return normalize(self.raw(position), self._lo[position], self._hi[position])

    def tiles(self, positions: np.ndarray | list[int]) -> np.ndarray:
        """Normalised tiles of several index rows as one float32 array (n, [channels,]
        tile_px, tile_px)."""
        return np.stack([self.tile(int(p)) for p in positions])


def with_channels(tiles: np.ndarray) -> np.ndarray:
    """A batch of tiles as (n, channels, h, w): one-plane tiles (n, h, w) get a channel axis."""
    if tiles.ndim == 3:
        return tiles[:, None]
    if tiles.ndim != 4:
        raise ValueError(f"tiles must be (n, h, w) or (n, channels, h, w), got {tiles.shape}")
    return tiles


def centre_plane(tiles: np.ndarray) -> np.ndarray:
    """The tiled plane itself, (n, h, w): the middle channel of 2.5-D tiles (n, c, h, w)."""
    return with_channels(tiles)[:, tiles.shape[1] // 2 if tiles.ndim == 4 else 0]


def normalize(raw: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The tile normalisation: ``(raw - lo) / (hi - lo)`` in float32."""
    return ((raw.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)


def require_tables(tiles: Path, splits: Path) -> None:
    """The tile index and the splits table a stage reads: there, not empty and Parquet
    (``InputError`` naming the file), before the slow imports and MLflow."""
    require_parquet(Path(tiles) / INDEX_NAME, "tile index")
    require_parquet(splits, "splits table")
