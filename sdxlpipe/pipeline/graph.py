"""The stage graph: `run STAGE` brings its upstream up to date first, the way `make` does.

The stages and their order come from the registry (`sdxlpipe.stages`). Stage
modules import no model library at top level, so loading the graph costs no
torch import.
"""

from __future__ import annotations

from sdxlpipe.stages import STAGE_NAMES

# What a stage's `items` are, for people: text_encode counts distinct texts (captions, their
# variants and the empty caption), vae_encode latents (flipped ones too), not images. Here, not in
# progress.py, so the no-op fast path prints a report without importing rich.progress.
ITEM_NAMES = {"vae_encode": "latents", "text_encode": "texts", "train": "runs", "export": "exports"}

# Targets that name more than one stage.
ALIASES = {"all": "export", "encode": "text_encode"}


def stages_for(target: str) -> list[str]:
    """Every stage up to and including `target`, in order."""
    last = ALIASES.get(target, target)
    if last not in STAGE_NAMES:
        raise KeyError(target)
    return list(STAGE_NAMES[: STAGE_NAMES.index(last) + 1])
