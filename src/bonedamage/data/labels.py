"""Damage label values of the ground-truth label volumes (``mask_path`` in the manifest).

One uint8 volume per scan: 0 no damage, 1 microcrack (the crack's opening), 2 fracture
(the gap and the bone of the fracture surfaces), 3 buckled bone. The binary
damage mask of a scan is ``labels > 0``; displaced marrow is never damage.
"""

from __future__ import annotations

import numpy as np

NONE, MICROCRACK, FRACTURE, BUCKLED = 0, 1, 2, 3
NAMES = {NONE: "none", MICROCRACK: "microcrack", FRACTURE: "fracture", BUCKLED: "buckled"}


def damage_mask(labels: np.ndarray) -> np.ndarray:
    """The binary damage mask of a label volume (any kind of damage)."""
    return np.asarray(labels) > NONE
