"""Batches for training: one bucket per batch, a seeded order per epoch.

The order of epoch e is a pure function of (seed, e), and every per-sample
choice (caption variant, flip, caption dropout) a pure function of the seed
and where it is made, so a resumed run regenerates exactly the batches an
unbroken run would have seen. Batch i of the whole run is `batch_at(i)`, an
endless sequence of epochs: with N processes and A micro-batches each, step
s takes the batches s*N*A ... (s+1)*N*A - 1 whatever N is, and every process
takes A of them per step, so no process ever waits for one that ran out
(docs/decisions.md 12, 72).

Several sources (`[[sources]]`, told apart by the table's `source_index`)
mix by `max_samples` (a seeded subset of a source's items, fixed for the
run) and `weight` (each source's share of every epoch: a seeded draw that
goes through all of a source's samples before it repeats one), decision 70.

The epoch's samples are then ordered one of two ways (`train.shuffle`,
decision 79): "global" shuffles each bucket over the whole epoch; "shard_blocks"
walks the shards the latents live in (a `Layout`) a block of about
`shuffle_block_gb` at a time, in a seeded order per epoch, and shuffles the
samples within each block, so a run that reads a remote store needs a few
shards at a time (MosaicML streaming's py1b). Both draw the same samples per
epoch and make the same number of batches of each bucket.
"""

from __future__ import annotations

import bisect
import functools
import random
from dataclasses import dataclass
from typing import Sequence

from sdxlpipe.errors import UserError


class Mix:
    """How the sources share the run: the rows each keeps and, with weights, its samples per epoch.

    Built once per run by `mix_sources`; `pools[s]` lists the samples of source s (a row `repeats` times),
    `counts[s]` how many of them each epoch draws (empty without weights).
    """

    def __init__(self, kept: tuple[int, ...], pools: tuple[tuple[int, ...], ...], counts: tuple[int, ...], seed: int):
        self.kept, self.pools, self.counts, self._seed = kept, pools, counts, seed
        self._cycles: dict[int, tuple[int, list[int]]] = {}  # per source, the cycle drawn last

    def drawn(self, epoch: int) -> list[int]:
        """The samples epoch `epoch` draws: positions epoch*n ... of each source's endless stream."""
        picked: list[int] = []
        for s, count in enumerate(self.counts):
            pos, end = epoch * count, (epoch + 1) * count
            while pos < end:
                cycle, offset = divmod(pos, len(self.pools[s]))
                order = self._cycle(s, cycle)
                take = order[offset:offset + end - pos]
                picked += take
                pos += len(take)
        return picked

    def _cycle(self, s: int, cycle: int) -> list[int]:
        """Cycle c of source s: its pool in a seeded order. The stream is these cycles one after another, so
        every sample comes once before any comes twice, and a down-weighted source shows new items each epoch."""
        last = self._cycles.get(s)
        if last is None or last[0] != cycle:
            order = list(self.pools[s])
            random.Random(f"{self._seed}/mix/{s}/{cycle}").shuffle(order)
            self._cycles[s] = last = (cycle, order)
        return last[1]


def mix_sources(source_of: Sequence[int], repeats: Sequence[int], seed: int, weights: Sequence[float] = (),
                max_samples: Sequence[int] = ()) -> Mix | None:
    """The run's `Mix` from each row's source index and each source's weight and max_samples; None when
    neither is set (every row `repeats` times per epoch, as without sources).

    weights: one per source, all > 0, or none. max_samples: one per source, 0 = all of its items.
    """
    if not any(weights) and not any(max_samples):
        return None
    n = max(len(weights), len(max_samples))
    rows: list[list[int]] = [[] for _ in range(n)]
    for i, s in enumerate(source_of):
        if not 0 <= s < n:
            raise ValueError(f"row {i} has source_index {s}; the run has {n} source(s)")
        rows[s].append(i)
    for s, cap in enumerate(max_samples):
        if cap and len(rows[s]) > cap:
            # A fixed subset for the whole run (SimpleTuner's max_num_samples), in table order.
            rows[s] = sorted(random.Random(f"{seed}/max_samples/{s}").sample(rows[s], cap))
    kept = tuple(sorted(i for r in rows for i in r))
    if not any(weights):
        return Mix(kept, (), (), seed)
    pools = tuple(tuple(i for i in r for _ in range(repeats[i])) for r in rows)
    for s, pool in enumerate(pools):
        if weights[s] > 0 and not pool:
            raise UserError(f"sources[{s}] has weight = {weights[s]:g} but none of its images reaches training "
                            "(all rejected, or the same files as an earlier source's, which keeps them)",
                            f"remove sources[{s}], or give it images of its own (`sdxlpipe run ingest --json` lists rejects)")
    return Mix(kept, pools, shares(sum(map(len, pools)), weights), seed)


def shares(total: int, weights: Sequence[float]) -> tuple[int, ...]:
    """`total` split in proportion to `weights`, whole numbers that add up to it (largest remainder; ties to
    the earlier source): each within one of its exact share."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda s: (-(exact[s] - counts[s]), s))
    for s in by_remainder[:total - sum(counts)]:
        counts[s] += 1
    return tuple(counts)


@dataclass(frozen=True)
class Layout:
    """Where each row's latent lives: `shards` (ids, sorted) and their bytes (`sizes`), and for row i the
    index of its shard, `shard_of[i]`. Made by `training.layout` from the store's item locations."""

    shards: tuple[str, ...]
    sizes: tuple[int, ...]
    shard_of: tuple[int, ...]


def epoch_batches(buckets: Sequence[tuple[int, int]], repeats: Sequence[int], batch_size: int,
                  seed: int, epoch: int, is_reg: Sequence[bool] | None = None, mix: Mix | None = None,
                  layout: Layout | None = None, block_bytes: int = 0) -> list[list[int]]:
    """Sample indices per batch for one epoch; every index appears `repeats` times.

    Regularisation samples (is_reg) are drawn to match the count of training
    samples per epoch (kohya's rule), cycling through a shuffled list, so a
    large regularisation set does not swamp a small training set. With source
    weights (`mix`), the weights set every source's share instead, regularisation
    sources included. With a `layout` the batches walk its shards in blocks of
    `block_bytes` (`shard_blocks`); without, each bucket is shuffled over the epoch.
    """
    rng = random.Random(f"{seed}/{epoch}")
    if mix is not None and mix.counts:
        picked = mix.drawn(epoch)
    else:
        rows = mix.kept if mix is not None else range(len(buckets))
        is_reg = is_reg or [False] * len(buckets)
        train = [i for i in rows if not is_reg[i] for _ in range(repeats[i])]
        regs = [i for i in rows if is_reg[i] for _ in range(repeats[i])]
        picked = list(train)
        if regs and train:
            rng.shuffle(regs)
            picked += [regs[k % len(regs)] for k in range(len(train))]
        elif regs:
            picked = regs
    if layout is not None:
        return shard_blocks(picked, buckets, batch_size, layout, block_bytes, random.Random(f"{seed}/{epoch}/blocks"))
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


def shard_blocks(picked: list[int], buckets: Sequence[tuple[int, int]], batch_size: int, layout: Layout,
                 block_bytes: int, rng: random.Random) -> list[list[int]]:
    """The epoch's samples as bucket-pure batches that walk the layout's shards a block at a time.

    The shards, in a seeded order, are cut into blocks of at most `block_bytes` (one shard at least);
    the samples of each block are shuffled and each bucket's samples are cut into batches in that
    order. A bucket's batch still open at a block's end is completed by the next blocks' first samples
    of that bucket and goes first in the block that completes it, so its earlier shards are needed
    only at that block's start; the rest of a block's batches are shuffled. So every bucket makes
    ceil(samples / batch_size) batches, as in the global order, with at most one short one.
    """
    order = list(range(len(layout.shards)))
    rng.shuffle(order)
    block_of_shard, block, filled = [0] * len(order), 0, 0
    for s in order:
        if filled and filled + layout.sizes[s] > block_bytes:
            block, filled = block + 1, 0
        block_of_shard[s] = block
        filled += layout.sizes[s]
    members: list[list[int]] = [[] for _ in range(block + 1)]
    for i in picked:
        members[block_of_shard[layout.shard_of[i]]].append(i)
    first: list[list[list[int]]] = [[] for _ in members]  # per block, batches begun in an earlier block
    rest: list[list[list[int]]] = [[] for _ in members]
    open_batches: dict[tuple[int, int], tuple[list[int], int]] = {}  # bucket -> (samples, block begun in)
    for b, samples in enumerate(members):
        rng.shuffle(samples)
        for i in samples:
            batch, begun = open_batches.setdefault(tuple(buckets[i]), ([], b))
            batch.append(i)
            if len(batch) == batch_size:
                (first if begun < b else rest)[b].append(batch)
                del open_batches[tuple(buckets[i])]
    for bucket in sorted(open_batches):  # each bucket's short batch, in the block of its last sample
        batch, begun = open_batches[bucket]
        last = block_of_shard[layout.shard_of[batch[-1]]]
        (first if begun < last else rest)[last].append(batch)
    batches = []
    for b in range(len(members)):
        rng.shuffle(rest[b])
        batches += first[b] + rest[b]
    return batches


class BatchPlan:
    """Batch i of the run, across epochs.

    Without regularisation samples or source weights every epoch has the same
    batch count; with them the drawn samples, and so the count, vary per epoch,
    and the plan walks the epochs before i once (cheap next to a training step).
    """

    def __init__(self, buckets, repeats, batch_size: int, seed: int, is_reg=None, mix: Mix | None = None,
                 layout: Layout | None = None, block_bytes: int = 0) -> None:
        self._args = (tuple(map(tuple, buckets)), tuple(repeats), batch_size, seed)
        self._is_reg = tuple(is_reg) if is_reg is not None and any(is_reg) else None
        self._mix = mix
        # shard_blocks: the layout its blocks follow, and their size in bytes; (None, 0): the global order.
        self.layout, self.block_bytes = layout, block_bytes if layout is not None else 0
        self._varies = self._is_reg is not None or (mix is not None and bool(mix.counts))
        self.per_epoch = len(self._epoch(0))
        self._starts = [0, self.per_epoch]  # first batch index of each epoch, as far as walked

    @functools.lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> list[list[int]]:
        buckets, repeats, batch_size, seed = self._args
        return epoch_batches(buckets, repeats, batch_size, seed, epoch, self._is_reg, self._mix, self.layout,
                             self.block_bytes)

    def batch_at(self, index: int) -> tuple[int, list[int]]:
        """(epoch, sample indices) of batch `index`."""
        if not self._varies:
            epoch, i = divmod(index, self.per_epoch)
            return epoch, self._epoch(epoch)[i]
        while self._starts[-1] <= index:
            self._starts.append(self._starts[-1] + len(self._epoch(len(self._starts) - 1)))
        epoch = bisect.bisect_right(self._starts, index) - 1
        return epoch, self._epoch(epoch)[index - self._starts[epoch]]

    def samples_per_source(self, batches: int, source_of: Sequence[int]) -> list[int]:
        """How many samples the first `batches` batches take from each source (a row counts once per use)."""
        counts = [0] * (max(source_of, default=-1) + 1)
        for index in range(batches):
            for i in self.batch_at(index)[1]:
                counts[source_of[i]] += 1
        return counts


def plan_of(table, batch_size: int, seed: int, sources=(), layout: Layout | None = None,
            block_bytes: int = 0) -> BatchPlan:
    """The run's plan from its table's columns (bucket, repeats, is_reg, source_index) and its [[sources]]
    entries' weight and max_samples; with a `layout`, in shard blocks of `block_bytes`. The number of
    batches per epoch does not depend on the layout, so counting them needs none."""
    names = table.column_names
    buckets = list(zip(table.column("bucket_w").to_pylist(), table.column("bucket_h").to_pylist()))
    repeats = table.column("repeats").to_pylist()
    is_reg = [bool(r) for r in table.column("is_reg").to_pylist()] if "is_reg" in names else None
    weights, caps = [s.weight for s in sources], [s.max_samples for s in sources]
    mix = None
    if any(weights) or any(caps):
        if "source_index" not in names:
            raise ValueError("source weights or max_samples need the table's source_index column")
        mix = mix_sources(table.column("source_index").to_pylist(), repeats, seed, weights, caps)
    return BatchPlan(buckets, repeats, batch_size, seed, is_reg, mix, layout, block_bytes)


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
