"""Repeated-augmentation sampler: coverage, rank placement, resume (also across world sizes)."""

from collections import Counter

import numpy as np
import pytest

from deit_fast.data_pipeline.sampler import RepeatedAugSampler, full_views


def _all_ranks(n, batch, repeats, world, epoch, seed=0):
    samplers = [RepeatedAugSampler(n, batch, repeats, seed, r, world) for r in range(world)]
    return [list(s.batches(epoch)) for s in samplers]


@pytest.mark.parametrize("n,repeats", [(100, 3), (99, 3), (50, 1), (64, 4)])
def test_each_chosen_sample_r_times_and_every_sample_once_per_cycle(n, repeats):
    sampler = RepeatedAugSampler(n, 4, repeats, seed=5)
    chosen = []
    for epoch in range(2 * repeats, 3 * repeats):  # the third cycle
        samples, rep = sampler.epoch_order(epoch)
        counts = Counter(samples.tolist())
        assert set(counts.values()) == {repeats}
        for s in counts:  # repeat ids 0..R-1, one each
            assert sorted(rep[samples == s].tolist()) == list(range(repeats))
        assert abs(len(samples) - n) < repeats  # DeiT's epoch: about len(dataset) views
        chosen.extend(counts)
    assert sorted(chosen) == list(range(n))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_ranks_split_the_epoch_and_copies_go_to_distinct_ranks(world):
    n, batch, repeats = 200, 5, 3
    per_rank = _all_ranks(n, batch, repeats, world, epoch=4)
    steps = {len(b) for b in per_rank}
    assert steps == {RepeatedAugSampler(n, batch, repeats, 0, 0, world).steps_per_epoch}
    items = [
        (int(s), int(k), rank)
        for rank, batches in enumerate(per_rank)
        for samples, reps in batches
        for s, k in zip(samples, reps)
    ]
    assert len({(s, k) for s, k, _ in items}) == len(items)  # no (sample, repeat) twice
    assert len(items) == (n - n % repeats) // (batch * world) * batch * world
    order_s, order_k = RepeatedAugSampler(n, batch, repeats, 0).epoch_order(4)
    assert {(s, k) for s, k, _ in items} == set(zip(order_s[: len(items)], order_k[: len(items)]))
    if world >= repeats:
        ranks_of = {}
        for s, _, rank in items:
            ranks_of.setdefault(s, []).append(rank)
        assert all(len(set(r)) == len(r) for r in ranks_of.values())


def test_epochs_and_seeds_differ_and_are_reproducible():
    a = RepeatedAugSampler(1000, 8, 3, seed=0)
    assert not np.array_equal(a.epoch_order(3)[0], a.epoch_order(4)[0])
    assert not np.array_equal(
        a.epoch_order(3)[0], RepeatedAugSampler(1000, 8, 3, 1).epoch_order(3)[0]
    )
    np.testing.assert_array_equal(
        a.epoch_order(7)[0], RepeatedAugSampler(1000, 8, 3, 0).epoch_order(7)[0]
    )


def test_resume_mid_epoch_gives_the_remaining_batches():
    sampler = RepeatedAugSampler(300, 7, 3, seed=2, rank=1, world_size=2)
    full = list(sampler.batches(5))
    resumed = list(sampler.batches(5, start_step=9))
    assert len(resumed) == len(full) - 9 == sampler.num_steps(start_step=9)
    for (s1, r1), (s2, r2) in zip(full[9:], resumed):
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(r1, r2)


def test_resume_on_another_world_size_continues_the_global_order():
    n, batch = 600, 6
    before = _all_ranks(n, batch, 3, world=2, epoch=1)
    done_steps = 10
    start_item = done_steps * batch * 2  # what the 2-rank run checkpoints
    seen = {
        (int(s), int(k))
        for rank in before
        for samples, reps in rank[:done_steps]
        for s, k in zip(samples, reps)
    }
    after = RepeatedAugSampler(n, 2 * batch, 3, seed=0, rank=0, world_size=1)
    rest = [
        (int(s), int(k))
        for samples, reps in after.batches(1, start_item=start_item)
        for s, k in zip(samples, reps)
    ]
    assert not seen & set(rest)
    order_s, order_k = after.epoch_order(1)
    assert rest == list(
        zip(
            order_s[start_item : start_item + len(rest)].tolist(),
            order_k[start_item : start_item + len(rest)].tolist(),
        )
    )
    assert len(seen) + len(rest) == len(order_s)  # 600 divides evenly: nothing dropped


def test_epoch_length_is_deits_on_imagenet():
    n, world, batch = 1281167, 8, 128
    deit = int(n // 256 * 256 / world) // batch  # RASampler's num_selected_samples, drop_last
    assert RepeatedAugSampler(n, batch, 3, 0, 0, world).steps_per_epoch == deit


def test_too_small_dataset_and_bad_rank_are_refused():
    with pytest.raises(ValueError, match="10 samples make no full step of batch_size 16"):
        RepeatedAugSampler(10, 16, 3, 0)
    with pytest.raises(ValueError, match=r"rank 2 must be in \[0, world_size=2\)"):
        RepeatedAugSampler(100, 4, 3, 0, rank=2, world_size=2)


@pytest.mark.parametrize("n,repeats,epochs,views", [(100, 3, 7, 9), (99, 3, 6, 6), (50, 1, 4, 4),
                                                    (64, 4, 8, 8), (10, 2, 1, 2)])
def test_each_showing_has_its_own_view_and_a_run_uses_one_view_per_cycle_repeat(
        n, repeats, epochs, views):
    """A run of E epochs shows E x R x floor(n / R) (view, sample) pairs, all distinct, over
    ceil(E / R) x R views (the old rule, view = e * R + k, used E x R)."""
    assert full_views(epochs, repeats) == views
    sampler = RepeatedAugSampler(n, 4, repeats, seed=5)
    pairs = [(v, s) for vs, ss in sampler.shown(epochs) for v, s in zip(vs.tolist(), ss.tolist())]
    assert len(pairs) == len(set(pairs)) == epochs * repeats * (n // repeats)
    assert {v for v, _ in pairs} <= set(range(views))
    read = {(int(v), int(s)) for e in range(epochs) for ss, ks in sampler.batches(e)
            for v, s in zip(sampler.views(e, ks), ss)}
    assert read <= set(pairs) and len(pairs) - len(read) < epochs * sampler.items_per_step
    wrapped = {(v, s) for vs, ss in sampler.shown(epochs, num_views=2)
               for v, s in zip(vs.tolist(), ss.tolist())}
    assert wrapped == {(v % 2, s) for v, s in pairs}
