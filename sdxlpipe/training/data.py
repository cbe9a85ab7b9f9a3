"""Batches for training: one bucket per batch, a seeded order per epoch.

The order of epoch e is a pure function of (seed, e), and every per-sample
choice (caption variant, flip, caption dropout) a pure function of the seed
and where it is made, so a resumed run regenerates exactly the batches an
unbroken run would have seen. Batch i of the whole run is `batch_at(i)`:
with N processes, process r of step s takes the batches s*N + r.
"""

from __future__ import annotations

import bisect
import functools
import random
from typing import Sequence


def epoch_batches(buckets: Sequence[tuple[int, int]], repeats: Sequence[int], batch_size: int,
                  seed: int, epoch: int, is_reg: Sequence[bool] | None = None) -> list[list[int]]:
    """Sample indices per batch for one epoch; every index appears `repeats` times.

    Regularisation samples (is_reg) are drawn to match the count of training
    samples per epoch (kohya's rule), cycling through a shuffled list, so a
    large regularisation set does not swamp a small training set.
    """
    rng = random.Random(f"{seed}/{epoch}")
    is_reg = is_reg or [False] * len(buckets)
    train = [i for i, r in enumerate(is_reg) for _ in range(repeats[i]) if not r]
    regs = [i for i, r in enumerate(is_reg) for _ in range(repeats[i]) if r]
    picked = list(train)
    if regs and train:
        rng.shuffle(regs)
        picked += [regs[k % len(regs)] for k in range(len(train))]
    elif regs:
        picked = regs
    groups: dict[tuple[int, int], list[int]] = {}
    for i in picked:
        groups.setdefault(tuple(buckets[i]), []).append(i)
    batches = []
    for bucket in sorted(groups):
        members = groups[bucket]
        rng.shuffle(members)
        batches.extend(members[i:i + batch_size] for i in range(0, len(members), batch_size))
    rng.shuffle(batches)
    return batches


class BatchPlan:
    """Batch i of the run, across epochs.

    Without regularisation samples every epoch has the same batch count; with
    them the drawn samples, and so the count, vary per epoch, and the plan
    walks the epochs before i once (cheap next to a training step).
    """

    def __init__(self, buckets, repeats, batch_size: int, seed: int, is_reg=None) -> None:
        self._args = (tuple(map(tuple, buckets)), tuple(repeats), batch_size, seed)
        self._is_reg = tuple(is_reg) if is_reg is not None and any(is_reg) else None
        self.per_epoch = len(self._epoch(0))
        self._starts = [0, self.per_epoch]  # first batch index of each epoch, as far as walked

    @functools.lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> list[list[int]]:
        buckets, repeats, batch_size, seed = self._args
        return epoch_batches(buckets, repeats, batch_size, seed, epoch, self._is_reg)

    def batch_at(self, index: int) -> tuple[int, list[int]]:
        """(epoch, sample indices) of batch `index`."""
        if self._is_reg is None:
            epoch, i = divmod(index, self.per_epoch)
            return epoch, self._epoch(epoch)[i]
        while self._starts[-1] <= index:
            self._starts.append(self._starts[-1] + len(self._epoch(len(self._starts) - 1)))
        epoch = bisect.bisect_right(self._starts, index) - 1
        return epoch, self._epoch(epoch)[index - self._starts[epoch]]


def choice(options: Sequence[str], seed: int, *where) -> str:
    """One of `options`, seeded by the seed and where the choice is made."""
    if len(options) == 1:
        return options[0]
    return random.Random("/".join(map(str, (seed, "choice", *where)))).choice(list(options))


def coin(probability: float, seed: int, *where) -> bool:
    """True with `probability`, seeded by the seed and where the toss is made."""
    if probability <= 0:
        return False
    return random.Random("/".join(map(str, (seed, "coin", *where)))).random() < probability
