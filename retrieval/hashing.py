"""SplitMix64, the project's one integer hash: the same bits on every machine and library version.

The encoder's projection head takes its fixed pseudo-random layout from it (so `lite0` has one fingerprint
everywhere) and the index's order-free ids digest sums it over the ids LMDB and FAISS hold.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def splitmix64(values: npt.ArrayLike) -> np.ndarray:
    """SplitMix64's output function of each value: a well-mixed uint64 array of the same shape (at least 1-d).

    Arithmetic wraps modulo 2**64 (numpy arrays wrap silently; 0-d scalars would warn, hence at least 1-d).
    """
    z = np.array(values, dtype=np.uint64, ndmin=1) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
