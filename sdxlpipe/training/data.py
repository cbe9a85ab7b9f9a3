"""Batches for training: one bucket per batch, a seeded order per epoch.

The order of epoch e is a pure function of (seed, e), so a resumed run
regenerates exactly the batches an unbroken run would have seen.
"""

from __future__ import annotations

import random
from typing import Iterator


def epoch_batches(buckets: list[tuple[int, int]], repeats: list[int], batch_size: int,
                  seed: int, epoch: int) -> list[list[int]]:
    """Sample indices per batch for one epoch; every index appears `repeats` times."""
    rng = random.Random(f"{seed}/{epoch}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (bucket, n) in enumerate(zip(buckets, repeats)):
        groups.setdefault(bucket, []).extend([i] * n)
    batches = []
    for bucket in sorted(groups):
        members = groups[bucket]
        rng.shuffle(members)
        batches.extend(members[i:i + batch_size] for i in range(0, len(members), batch_size))
    rng.shuffle(batches)
    return batches


def batches_from(step: int, buckets, repeats, batch_size: int, seed: int) -> Iterator[tuple[int, list[int]]]:
    """(epoch, batch) for every step from `step` on, forever."""
    epoch, skip = 0, step
    while True:
        batches = epoch_batches(buckets, repeats, batch_size, seed, epoch)
        if skip >= len(batches):
            skip -= len(batches)
        else:
            for batch in batches[skip:]:
                yield epoch, batch
            skip = 0
        epoch += 1
