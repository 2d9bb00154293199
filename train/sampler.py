"""Aspect-ratio bucket batch sampler: one shape per batch, sharded over ranks, deterministic, resumable.

Per epoch, each bucket's samples are shuffled and cut into *global* batches of ``batch_size × world``
samples, and the global batches are shuffled together; every rank sees the same sequence (same seed), so
at each step all ranks train on the same bucket (equal shapes keep DDP/FSDP step times even). Rank r takes
``global_batch[r::world]``. A bucket's last, smaller global batch is split as evenly as possible; one with
fewer samples than ranks joins the bucket's previous global batch (those ranks' batches grow by one), and
a bucket with fewer samples than ranks in all is padded by repeating its samples. So every rank always
gets a batch, and every sample is seen exactly once per epoch (at least once in that last case).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class BucketBatchSampler(Sampler[list[int]]):
    def __init__(self, buckets: Sequence[Hashable], batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if len(buckets) == 0:
            raise ValueError("no samples to batch: the dataset is empty")
        self.groups: dict[Hashable, list[int]] = defaultdict(list)
        for i, b in enumerate(buckets):
            self.groups[b].append(i)
        self.keys = sorted(self.groups, key=repr)  # a fixed order, whatever the hash seed
        self.batch_size, self.world, self.rank, self.seed = batch_size, num_replicas, rank, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate ``epoch`` from its ``start``-th batch on (the resume position)."""
        if start < 0 or start > self.num_batches():
            raise ValueError(f"start batch {start} is outside epoch of {self.num_batches()} batches")
        self.epoch, self.start = epoch, start

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's samples of each step of ``epoch``, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        size = self.batch_size * self.world
        out: list[list[int]] = []
        for key in self.keys:
            idx = [self.groups[key][i] for i in rng.permutation(len(self.groups[key]))]
            chunks = [idx[i:i + size] for i in range(0, len(idx), size)]
            if len(chunks) > 1 and len(chunks[-1]) < self.world:  # too few to give each rank one: merge
                chunks[-2].extend(chunks.pop())
            out.extend(chunks)
        return [out[i] for i in rng.permutation(len(out))]

    def shard(self, batch: list[int]) -> list[int]:
        if len(batch) < self.world:  # pad with the bucket's own samples so no rank is idle
            batch = [batch[i % len(batch)] for i in range(self.world)]
        return batch[self.rank::self.world]

    def num_batches(self) -> int:
        size, n = self.batch_size * self.world, 0
        for v in self.groups.values():
            full, rest = divmod(len(v), size)
            n += full + (1 if rest and (rest >= self.world or not full) else 0)
        return n

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches(self.epoch)[self.start:]:
            yield self.shard(batch)

    def __len__(self) -> int:
        return self.num_batches() - self.start
