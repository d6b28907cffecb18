"""Counter-based random numbers: every value is a pure function of an integer key.

A global RNG makes results depend on which process drew first; hashing the key instead
makes the n-th decision for (seed, view, sample) the same in any worker, batch or rank.
The hash is SplitMix64's finaliser chained over the key's parts (vectorised numpy).

Every consumer draws under its own `Domain`, the one table of them: a key is (domain id,
seed, the domain's parts), so two consumers' keys differ in their first part and a key's
length is fixed by its domain; no two consumers can ever ask for the same number.
"""

from __future__ import annotations

import enum

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


class Domain(enum.Enum):
    """Each consumer of keyed random numbers: (its id, the parts of its key after the seed)."""

    SAMPLER = (1, ("cycle",))  # the permutation of a cycle of R epochs
    PLAN = (2, ("view", "sample", "decision"))  # a view's crop, flip, RandAugment, erasing
    ERASE_NOISE = (3, ("view", "sample"))  # the pixels of a view's erasing box
    REPLACEMENT = (4, ("view", "sample", "attempt"))  # the sample shown for an unreadable one
    MIXUP = (5, ("epoch", "step", "rank"))  # a batch's Mixup/CutMix lambda and box

    @property
    def id(self) -> int:
        return self.value[0]

    @property
    def parts(self) -> tuple[str, ...]:
        return self.value[1]


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


def key(domain: Domain, seed: int, *parts: int | np.ndarray) -> tuple:
    """The full key of a draw: (domain id, seed, parts), checked against the domain's parts."""
    if not isinstance(domain, Domain):
        raise TypeError(f"the first part of a key is a keyed_random.Domain, got {domain!r}")
    if len(parts) != len(domain.parts):
        raise TypeError(f"{domain.name} keys are (seed, {', '.join(domain.parts)}), "
                        f"got {len(parts)} parts after the seed")
    return (domain.id, seed, *parts)


def uniform(domain: Domain, seed: int, *parts: int | np.ndarray) -> np.ndarray:
    """float64 in [0, 1) for each key: the top 53 bits of its hash."""
    h = hash_key(*key(domain, seed, *parts))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def generator(domain: Domain, seed: int, *parts: int) -> np.random.Generator:
    """A numpy Generator for bulk draws (permutations, noise) seeded purely by the key; its
    Philox key is the hashes of the key extended by 0 and by 1."""
    full = key(domain, seed, *parts)
    h = hash_key(*full, 0), hash_key(*full, 1)
    return np.random.Generator(np.random.Philox(key=[int(h[0]), int(h[1])]))
