"""Counter-based random numbers: every value is a pure function of an integer key.

A global RNG makes results depend on which process drew first; hashing the key instead
makes the n-th decision for (seed, view, sample) the same in any worker, batch or rank.
The hash is SplitMix64's finaliser chained over the key's parts (vectorised numpy).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _MUL1
    x = x ^ (x >> np.uint64(27))
    x = x * _MUL2
    return x ^ (x >> np.uint64(31))


def hash_key(*parts: int | np.ndarray) -> np.ndarray:
    """uint64 hash of a key whose parts are ints or int arrays (broadcast together)."""
    arrays = np.broadcast_arrays(*(np.asarray(p, dtype=np.int64) for p in parts))
    h = np.full(arrays[0].shape, 0x2545F4914F6CDD1D, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for part in arrays:
            h = _mix(h + part.astype(np.uint64) * _GOLDEN + _GOLDEN)
    return h


def uniform(*parts: int | np.ndarray) -> np.ndarray:
    """float64 in [0, 1) for each key: the top 53 bits of its hash."""
    return (hash_key(*parts) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def generator(*parts: int) -> np.random.Generator:
    """A numpy Generator for bulk draws (permutations, noise) seeded purely by the key."""
    h = hash_key(*parts, 0), hash_key(*parts, 1)
    return np.random.Generator(np.random.Philox(key=[int(h[0]), int(h[1])]))
