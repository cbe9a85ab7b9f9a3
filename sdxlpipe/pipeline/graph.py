"""The stage graph: `run STAGE` brings its upstream up to date first, the way `make` does.

The stages and their order are the config's (`Config.stages`, from the
registry in `sdxlpipe/stages/__init__.py`). Stage modules import no model
library at top level, so loading the graph costs no torch import.
"""

from __future__ import annotations

from types import ModuleType

from sdxlpipe.stages import declared

# Targets that name more than one stage: `all`, every stage; `encode`, every stage up to the last
# one with store items (the encodings training reads).
ALIASES = ("all", "encode")



def stages_for(target: str, stages: dict[str, ModuleType]) -> list[str]:
    """Every stage up to and including `target`, in order; KeyError for a target that is not one."""
    names = list(stages)
    if target == "all":
        return names
    if target == "encode":
        point = publish_point(stages)
        return names[: names.index(point) + 1] if point else []
    if target not in names:
        raise KeyError(target)
    return names[: names.index(target) + 1]


def publish_point(stages: dict[str, ModuleType]) -> str | None:
    """The last stage with store items (where `encode` ends): after it the table is training-ready (every
    sample's caption, bucket, crop and item keys), so a run that reaches it publishes the table
    (pipeline/publish.py) and dataset sources' rows join it there (pipeline/sources.py). None without one."""
    stored = [name for name, module in stages.items() if declared(module, "STORE_COLUMNS")]
    return stored[-1] if stored else None
