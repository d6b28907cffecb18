"""Keyed random numbers: every consumer draws in its own domain, so no two keys coincide."""

import itertools

import numpy as np
import pytest

from deit_fast.data_pipeline.keyed_random import Domain, generator, hash_key, key, uniform
from deit_fast.data_pipeline.plan import AugmentationPlan, replacement_sample
from deit_fast.data_pipeline.sampler import RepeatedAugSampler
from tests.helpers import recipe_mixup, recipe_plan

SMALL = range(4)  # every part of every key over 0..3: the small values where keys collided


def _hashed_keys(domain: Domain) -> dict[int, tuple]:
    """hash -> key of every draw of `domain` with seeds and parts in SMALL; a generator's
    Philox key is the hashes of the key extended by 0 and by 1."""
    out = {}
    for seed, *parts in itertools.product(SMALL, *[SMALL] * len(domain.parts)):
        full = key(domain, seed, *parts)
        for extended in (full, (*full, 0), (*full, 1)):
            out[int(hash_key(*extended))] = extended
    return out


def test_no_two_consumers_keys_are_equal():
    """Over small ranges, the keys of all domains (uniform draws and generator seeds) and
    their hashes are all distinct: the sampler's key for cycle c is no longer the plan's
    crop draw for view 1, sample c."""
    keys, hashes = [], []
    for domain in Domain:
        found = _hashed_keys(domain)
        keys += found.values()
        hashes += found.keys()
    assert len(set(keys)) == len(keys) and len(set(hashes)) == len(hashes) == len(keys)
    ids = [d.id for d in Domain]
    assert len(set(ids)) == len(ids)


def test_a_key_must_name_its_domain_and_its_parts():
    with pytest.raises(TypeError, match="first part of a key is a keyed_random.Domain"):
        uniform(0, 1, 2, 3)
    with pytest.raises(TypeError, match=r"PLAN keys are \(seed, view, sample, decision\), got 2"):
        uniform(Domain.PLAN, 0, 1, 2)


def test_consumers_draw_in_their_own_domains(monkeypatch):
    """The sampler, the plan, the erasing noise, the replacement of unreadable files and
    Mixup each ask for keys of their own domain, seeded by the run's seed."""
    from deit_fast.data_pipeline import keyed_random, mixup, plan, sampler

    seen: dict[Domain, set[int]] = {}

    def spy(draw):
        def recorded(domain, seed, *parts):
            seen.setdefault(domain, set()).add(seed)
            return draw(domain, seed, *parts)
        return recorded

    for module in (plan, sampler, mixup):
        for name in ("uniform", "generator"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, spy(getattr(keyed_random, name)))
    seed = 7
    RepeatedAugSampler(50, 4, 3, seed).epoch_order(0)
    p = AugmentationPlan(recipe_plan(), seed)
    p.draw([0, 1], [2, 3], 40, 50)
    p.erase_noise(0, 1, 4, 5)
    replacement_sample(seed, 0, 1, 0, 50)
    recipe_mixup(5, seed).draw((0, 1, 0), 32, 32, 8)
    assert seen == {d: {seed} for d in Domain}


def test_uniform_is_uniform_and_generators_differ_by_key():
    u = uniform(Domain.PLAN, 0, np.arange(100000), 0, 0)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    a = generator(Domain.MIXUP, 0, 1, 2, 0).random(4)
    assert np.array_equal(a, generator(Domain.MIXUP, 0, 1, 2, 0).random(4))
    assert not np.array_equal(a, generator(Domain.MIXUP, 0, 1, 2, 1).random(4))
    assert not np.array_equal(a, generator(Domain.SAMPLER, 0, 1).random(4))
