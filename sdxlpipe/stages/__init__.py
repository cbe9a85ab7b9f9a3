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

import dataclasses
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
    # (settings, rows, ctx) -> {key: text}: what the stage adds to an exported file's metadata (kohya's
    # ss_* keys): from its settings as a run record holds them (`recorded`) and the training rows they
    # made. A stage up to the publish point is asked once per group of rows made with one set of settings
    # (the config's own rows; each dataset source's, with the settings its snapshot records).
    "export_metadata": None,
    # True: the stage trains a network and leaves the run in `ctx.outputs[its name]` (key, dir, weights,
    # network_config, network, use_dora, alpha; the text encoders' weights when trained), which export
    # writes out. At most one stage of a config trains.
    "TRAINS": False,
    # True: the stage needs every row of the table at once (training does), so `--shards K/N`, which
    # gives each machine a part of the items, cannot split a run that reaches it.
    "NEEDS_EVERY_ROW": False,
}


def load_stages(modules: Sequence[str] = STAGES) -> dict[str, ModuleType]:
    """The stage modules by name, in pipeline order."""
    return {module.rpartition(".")[2]: importlib.import_module(module) for module in modules}


def declared(module: ModuleType, name: str):
    """What a stage module declares under `name` (one of OPTIONAL), or the default."""
    return getattr(module, name, OPTIONAL[name])


def trained_run(ctx) -> dict:
    """What the training stage left in `ctx.outputs` (the `TRAINS` declaration), {} before it ran."""
    return next((ctx.outputs.get(name, {}) for name, module in ctx.config.stages.items()
                 if declared(module, "TRAINS")), {})


def recorded(module: ModuleType, settings: dict | None) -> dict:
    """A stage's settings as a run record holds them (JSON values by field name), for a declaration to read:
    `settings` (a record from elsewhere: a published snapshot's) over the module's `Params` defaults. A
    field the record lacks (published by an older version) is the default, and so is a value of another
    JSON type than the default's (a snapshot from elsewhere is untrusted: a declaration never meets one)."""
    out = {f.name: plain(getattr(module.Params(), f.name)) for f in dataclasses.fields(module.Params)}
    for name, value in (settings or {}).items():
        if name in out and _same_kind(value, out[name]):
            out[name] = value
    return out


def plain(value):
    """A Params value as JSON-ready data: dataclasses as dicts, tuples as lists (settings records, snapshots)."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


def _same_kind(value, default) -> bool:
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def store_fields(stages: dict[str, ModuleType]) -> dict[str, tuple[str, str]]:
    """{table column: (stage, store field)} for every column that holds store item keys."""
    return {column: (name, declared(module, "FIELD")) for name, module in stages.items()
            for column in declared(module, "STORE_COLUMNS")}
