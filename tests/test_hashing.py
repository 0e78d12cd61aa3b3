"""splitmix64 against the reference generator's published outputs and a plain-integer implementation."""

from __future__ import annotations

import numpy as np

from retrieval.hashing import splitmix64

GAMMA = 0x9E3779B97F4A7C15
MASK = 2**64 - 1


def _reference(value: int) -> int:
    """Vigna's splitmix64.c next() for state `value`, in Python integers."""
    z = (value + GAMMA) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_published_outputs():
    """SplitMix64 seeded with 1234567 yields 6457827717110365317, then 3203168211198807973."""
    got = splitmix64([1234567, (1234567 + GAMMA) & MASK])
    assert got.tolist() == [6457827717110365317, 3203168211198807973]
    assert int(splitmix64(0)[0]) == 0xE220A8397B1DCDAF


def test_matches_integer_arithmetic_for_wide_values():
    values = np.random.default_rng(0).integers(0, 2**63 - 1, size=1000).tolist() + [0, 1, 2**63 - 1]
    assert splitmix64(values).tolist() == [_reference(v) for v in values]
    assert splitmix64(np.array(values, dtype=np.int64)).dtype == np.uint64
