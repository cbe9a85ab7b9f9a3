"""Booru-style tag handling: split, keep the first N, shuffle, drop, wildcards.

Every random choice is drawn from a generator seeded by the sample, so the
`caption_variants` of an image are the same on every machine and every
rerun, and the text encoder can cache each of them once.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Iterable

WILDCARD = re.compile(r"\{([^{}]*\|[^{}]*)\}")


def split_tags(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def join_tags(tags: list[str], separator: str) -> str:
    glue = separator if separator.endswith(" ") or separator.isspace() else separator + " "
    return glue.join(tags)


def resolve_wildcards(text: str, rng: random.Random | None) -> str:
    """`{a|b|c}` -> one option: the first without `rng`, a seeded random one with it."""
    def pick(m: re.Match) -> str:
        options = m.group(1).split("|")
        return options[0] if rng is None else rng.choice(options)
    return WILDCARD.sub(pick, text)


def variants(text: str, *, separator: str, keep_tokens: int, shuffle: bool, tag_dropout: float,
             count: int, seed: str) -> list[str]:
    """`count` seeded variants of one caption (before prefix/suffix)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        resolved = resolve_wildcards(text, rng)
        if not (shuffle or tag_dropout > 0):
            out.append(resolved)
            continue
        tags = split_tags(resolved, separator)
        fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
        if tag_dropout > 0:
            flex = [t for t in flex if rng.random() >= tag_dropout]
        if shuffle:
            rng.shuffle(flex)
        out.append(join_tags(fixed + flex, separator))
    return out


def tag_frequency(subsets: Iterable[str], captions: Iterable[str], separator: str = ",") -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: per subset, how many captions hold each tag."""
    freq: dict[str, Counter] = {}
    for subset, caption in zip(subsets, captions):
        freq.setdefault(subset, Counter()).update(set(split_tags(caption or "", separator)))
    return {s: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for s, c in sorted(freq.items())}
