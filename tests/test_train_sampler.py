"""The bucket batch sampler: one shape per batch, sharded over ranks, deterministic and resumable."""

from __future__ import annotations

from collections import Counter

import pytest

from train.sampler import BucketBatchSampler

# 23 samples over 3 shapes, sizes 11 / 7 / 5 (none a multiple of the global batch)
BUCKETS = [(64, 64)] * 11 + [(48, 96)] * 7 + [(96, 48)] * 5
BUCKETS = [BUCKETS[(i * 7) % 23] for i in range(23)]  # interleaved, as a real folder would be


def _ranks(buckets, batch_size=2, world=2, seed=0, epoch=0):
    out = []
    for rank in range(world):
        s = BucketBatchSampler(buckets, batch_size, world, rank, seed)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def test_batches_never_mix_shapes_and_ranks_share_the_step_shape():
    per_rank = _ranks(BUCKETS, batch_size=3)
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    for b0, b1 in zip(*per_rank):
        shapes = {BUCKETS[i] for i in b0 + b1}
        assert len(shapes) == 1  # within a batch and across ranks at the same step
        assert 1 <= len(b0) <= 4 and 1 <= len(b1) <= 4  # a remainder smaller than the world adds one


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_len_matches_what_it_yields(world):
    for rank in range(world):
        s = BucketBatchSampler(BUCKETS, 2, world, rank)
        assert len(s) == len(list(s))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_once_per_epoch_across_ranks(world):
    per_rank = _ranks(BUCKETS, batch_size=2, world=world, epoch=4)
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert seen == Counter(range(len(BUCKETS)))
    if world > 1:  # disjoint shards
        sets = [{i for b in batches for i in b} for batches in per_rank]
        assert not sets[0] & sets[1]


def test_a_bucket_smaller_than_the_world_is_padded_not_dropped():
    buckets = [(64, 64)] * 4 + [(48, 96)]  # a lone sample, two ranks
    per_rank = _ranks(buckets, batch_size=2, world=2)
    seen = {i for batches in per_rank for b in batches for i in b}
    assert seen == set(range(5))
    assert all(len(b) >= 1 for batches in per_rank for b in batches)
    # the lone sample is repeated so both ranks get it, alone in its batch, at the same step
    assert [[b for b in batches if 4 in b] for batches in per_rank] == [[[4]], [[4]]]
    step = [batches.index([4]) for batches in per_rank]
    assert step[0] == step[1]


def test_deterministic_per_epoch_and_seed():
    assert _ranks(BUCKETS, epoch=1) == _ranks(BUCKETS, epoch=1)
    assert _ranks(BUCKETS, epoch=1) != _ranks(BUCKETS, epoch=2)
    assert _ranks(BUCKETS, seed=1) != _ranks(BUCKETS, seed=2)


def test_resumes_from_a_position():
    s = BucketBatchSampler(BUCKETS, 2, 2, 1, seed=3)
    s.set_epoch(5)
    full = list(s)
    s.set_epoch(5, start=4)
    assert list(s) == full[4:] and len(s) == len(full) - 4
    with pytest.raises(ValueError, match="outside epoch"):
        s.set_epoch(5, start=len(full) + 1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rank 2 is not in"):
        BucketBatchSampler(BUCKETS, 2, 2, 2)
    with pytest.raises(ValueError, match="empty"):
        BucketBatchSampler([], 2)
