"""PK batch sampling over two simulated DDP ranks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from reid_platform.data.sampler import PKBatchSampler

WORLD = 2


def make_pids(counts: list[int], seed: int = 0) -> list[int]:
    """Dataset labels with counts[i] images of identity 100 + i, in shuffled order."""
    pids = [100 + i for i, n in enumerate(counts) for _ in range(n)]
    np.random.default_rng(seed).shuffle(pids)
    return pids


def rank_samplers(pids, world=WORLD, **kwargs) -> list[PKBatchSampler]:
    return [PKBatchSampler(pids, num_replicas=world, rank=r, **kwargs) for r in range(world)]


def epoch_batches(samplers, epoch: int) -> list[list[list[int]]]:
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


def assert_pk(batch: list[int], pids: list[int], p: int, k: int) -> None:
    assert len(batch) == p * k
    per_id = Counter(pids[i] for i in batch)
    assert len(per_id) == p
    assert set(per_id.values()) == {k}
    # the K images of an identity sit next to each other
    labels = [pids[i] for i in batch]
    assert all(len(set(labels[j : j + k])) == 1 for j in range(0, p * k, k))


BALANCED = [6] * 20
UNBALANCED = [2] * 10 + [30] * 3 + [5] * 9 + [1] * 2


@pytest.mark.parametrize("counts", [BALANCED, UNBALANCED], ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("p,k", [(4, 2), (3, 4)])
def test_batches_are_p_ids_times_k_images(counts, p, k):
    pids = make_pids(counts)
    samplers = rank_samplers(pids, num_ids=p, num_instances=k, seed=1)
    for epoch in range(3):
        per_rank = epoch_batches(samplers, epoch)
        for batches in per_rank:
            assert batches, "every rank forms at least one batch"
            for batch in batches:
                assert_pk(batch, pids, p, k)
                assert all(0 <= i < len(pids) for i in batch)


@pytest.mark.parametrize("counts", [BALANCED, UNBALANCED], ids=["balanced", "unbalanced"])
def test_ranks_draw_disjoint_identities(counts):
    pids = make_pids(counts)
    samplers = rank_samplers(pids, num_ids=4, num_instances=2, seed=3)
    for epoch in range(3):
        ids = [{pids[i] for b in batches for i in b} for batches in epoch_batches(samplers, epoch)]
        assert ids[0] and ids[1]
        assert not ids[0] & ids[1]


def test_too_few_ids_to_split_every_rank_draws_from_all():
    pids = make_pids([4] * 6)  # 6 ids < P * world = 8
    samplers = rank_samplers(pids, num_ids=4, num_instances=2, seed=0)
    per_rank = epoch_batches(samplers, 0)
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    for batches in per_rank:
        for batch in batches:
            assert_pk(batch, pids, 4, 2)


@pytest.mark.parametrize(
    "counts", [BALANCED, UNBALANCED, [40] * 4 + [2] * 12], ids=["bal", "unbal", "skewed"]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_number_of_batches_on_every_rank(counts, seed):
    pids = make_pids(counts, seed)
    samplers = rank_samplers(pids, num_ids=4, num_instances=2, seed=seed)
    for epoch in range(3):
        per_rank = epoch_batches(samplers, epoch)
        lengths = {len(b) for b in per_rank}
        assert len(lengths) == 1
        assert lengths == {len(samplers[0])} == {len(samplers[1])}


@pytest.mark.parametrize("batches_per_epoch", [1, 5, 40])
def test_fixed_batches_per_epoch(batches_per_epoch):
    pids = make_pids(UNBALANCED)
    samplers = rank_samplers(pids, num_ids=3, num_instances=2, batches_per_epoch=batches_per_epoch)
    per_rank = epoch_batches(samplers, 2)
    assert [len(b) for b in per_rank] == [batches_per_epoch] * WORLD
    assert [len(s) for s in samplers] == [batches_per_epoch] * WORLD
    for batches in per_rank:
        for batch in batches:
            assert_pk(batch, pids, 3, 2)


def test_deterministic_per_seed_and_epoch():
    pids = make_pids(UNBALANCED)
    first = rank_samplers(pids, num_ids=4, num_instances=2, seed=7)
    again = rank_samplers(pids, num_ids=4, num_instances=2, seed=7)
    assert epoch_batches(first, 3) == epoch_batches(again, 3)
    assert epoch_batches(first, 0) == epoch_batches(again, 0)
    # a resumed run (fresh sampler, set_epoch) redraws the same epoch
    assert epoch_batches(first, 3) == epoch_batches(
        rank_samplers(pids, num_ids=4, num_instances=2, seed=7), 3
    )
    assert epoch_batches(first, 0) != epoch_batches(first, 1)
    other_seed = rank_samplers(pids, num_ids=4, num_instances=2, seed=8)
    assert epoch_batches(first, 0) != epoch_batches(other_seed, 0)
    # iterating twice within an epoch gives the same batches
    assert list(first[0]) == list(first[0])


def test_small_ids_sampled_with_replacement():
    counts = [1, 3] + [8] * 6
    pids = make_pids(counts)
    index_of = {pid: [i for i, p in enumerate(pids) if p == pid] for pid in set(pids)}
    samplers = rank_samplers(pids, world=1, num_ids=4, num_instances=4, seed=0)
    seen_small = set()
    for epoch in range(6):
        for batch in epoch_batches(samplers, epoch)[0]:
            assert_pk(batch, pids, 4, 4)
            for small in (100, 101):  # the ids with 1 and 3 images
                chosen = [i for i in batch if pids[i] == small]
                if chosen:
                    seen_small.add(small)
                    assert set(chosen) <= set(index_of[small])
                    assert len(set(chosen)) < 4  # repeats are unavoidable
    assert seen_small == {100, 101}
    assert all(len(index_of[pid]) >= 1 for pid in seen_small)


def test_no_image_repeats_within_an_epoch_when_ids_have_k_multiples():
    pids = make_pids([8] * 8)  # 8 images = 2 chunks of K=4 per id: nothing padded
    (sampler,) = rank_samplers(pids, world=1, num_ids=4, num_instances=4, seed=5)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        used = [i for b in sampler for i in b]
        # greedy random draws may strand a few chunks, never reuse one
        assert len(used) == len(set(used)) and len(used) >= 2 * 16


def test_errors():
    with pytest.raises(ValueError, match=r"at least P=8 identities, the data has 5"):
        PKBatchSampler(make_pids([4] * 5), num_ids=8, num_instances=2)
    with pytest.raises(ValueError, match="must both be >= 1"):
        PKBatchSampler(make_pids([4] * 5), num_ids=0)
    with pytest.raises(ValueError, match=r"rank 2 must be in \[0, 2\)"):
        PKBatchSampler(make_pids([4] * 5), num_ids=2, num_replicas=2, rank=2)


def test_batch_size_property():
    assert PKBatchSampler(make_pids([4] * 5), num_ids=3, num_instances=4).batch_size == 12


def test_max_images_per_id_caps_each_epoch_with_a_new_subset():
    pids = make_pids([40] * 4 + [5] * 8)  # four frequent identities, eight rare ones
    index_of = {pid: {i for i, p in enumerate(pids) if p == pid} for pid in set(pids)}
    capped = rank_samplers(pids, num_ids=2, num_instances=4, seed=3, max_images_per_id=8)
    subsets: dict[int, list[frozenset[int]]] = {pid: [] for pid in range(100, 104)}
    for epoch in range(5):
        per_rank = epoch_batches(capped, epoch)
        assert len({len(b) for b in per_rank}) == 1  # every rank the same number of batches
        used: dict[int, list[int]] = {}
        for batches in per_rank:
            for batch in batches:
                assert_pk(batch, pids, 2, 4)
                for i in batch:
                    used.setdefault(pids[i], []).append(i)
        for pid, indices in used.items():
            assert set(indices) <= index_of[pid]
            assert len(set(indices)) <= 8  # the cap: distinct images of an identity per epoch
            if pid < 104:
                assert len(indices) <= 8  # 8 = 2 x K: no padding repeats either
                subsets[pid].append(frozenset(indices))
    for seen in subsets.values():
        assert len(set(seen)) > 1, "a different random subset each epoch"
        assert len(frozenset().union(*seen)) > 8, "over epochs more of the images are seen"
    # under-sampling shortens the epoch: frequent identities no longer fill most batches
    (one_rank,) = rank_samplers(pids, world=1, num_ids=2, num_instances=4, max_images_per_id=8)
    (all_images,) = rank_samplers(pids, world=1, num_ids=2, num_instances=4)
    # 12 ids x 2 chunks of K (capped) vs 4 x 10 + 8 x 2 chunks: P=2 chunks a batch, a few
    # chunks may be stranded by the random draws
    assert 10 <= len(one_rank) <= 12 and 25 <= len(all_images) <= 28


def test_max_images_per_id_below_k_is_an_error():
    with pytest.raises(ValueError, match=r"max_images_per_id=3 must be 0 \(off\) or at least K"):
        PKBatchSampler(make_pids([4] * 5), num_ids=2, num_instances=4, max_images_per_id=3)
    with pytest.raises(ValueError, match="max_images_per_id=-1"):
        PKBatchSampler(make_pids([4] * 5), num_ids=2, max_images_per_id=-1)
