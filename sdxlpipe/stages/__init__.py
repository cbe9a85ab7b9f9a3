"""The stage registry: the stages `run all` runs, in order, and what each stage module declares.

`STAGES` names the stage modules in pipeline order. A stage's name is its
module's last dotted part: its `[table]` in the config, its store directory
and its workspace table. `load_config` loads the stages (`load_stages`) and
the `Config` carries them (`Config.stages`, name -> module, in order), so the
graph, the runner, the no-op record, status and training's batch source take
the stages from the config they are given and name none. The CLI always runs
`STAGES`; a program that runs another list (a test's throwaway stage) passes
it to `load_config(..., stages=...)` (docs/decisions.md 50). Stages never
import each other.

A stage module declares `Params` (frozen; a path setting is a field with
`metadata={"path": True}`: resolved against the config's folder and watched
by the no-op record), `check(params)`, `VERSION`, `OUTPUT_COLUMNS` and
`run(table, params, ctx) -> table`; and, where they apply, the names in
`OPTIONAL`, read through `declared`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Sequence

STAGES = tuple(f"sdxlpipe.stages.{name}" for name in
               ("ingest", "caption", "bucket", "vae_encode", "text_encode", "train", "export"))
STAGE_NAMES = tuple(module.rpartition(".")[2] for module in STAGES)

# What a stage module may declare besides the above, and the value of a stage that does not.
OPTIONAL = {
    # Table columns holding the keys of its store items (stored under the stage's name).
    "STORE_COLUMNS": (),
    # The store field its items' payload is written to.
    "FIELD": None,
    # The model components its items depend on (`status` names them when their weights change).
    "MODELS": (),
    # What its items are called in reports: "12 latents".
    "ITEMS": "images",
    # params -> bool: does a run read files no path setting names (a manifest's images)? Then the
    # no-op record cannot cover the run, and none is written.
    "reads_unlisted_files": None,
    # (outputs, stats, dry_run) -> dict: what the stage adds to the run report's `outputs`, from what
    # it left in `ctx.outputs` and its own counts.
    "report": None,
}


def load_stages(modules: Sequence[str] = STAGES) -> dict[str, ModuleType]:
    """The stage modules by name, in pipeline order."""
    return {module.rpartition(".")[2]: importlib.import_module(module) for module in modules}


def declared(module: ModuleType, name: str):
    """What a stage module declares under `name` (one of OPTIONAL), or the default."""
    return getattr(module, name, OPTIONAL[name])


def store_fields(stages: dict[str, ModuleType]) -> dict[str, tuple[str, str]]:
    """{table column: (stage, store field)} for every column that holds store item keys."""
    return {column: (name, declared(module, "FIELD")) for name, module in stages.items()
            for column in declared(module, "STORE_COLUMNS")}
