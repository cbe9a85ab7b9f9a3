"""The stage registry: the stages `run all` runs, in order.

`STAGES` names each stage module (`sdxlpipe.stages.<name>`); the name is the
stage's `[table]` in the config, its store directory and its workspace table.
Stages never import each other; everything that needs to know about a stage
reads what its module declares (docs/architecture.md lists the declarations).
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGE_NAMES = ("ingest", "caption", "bucket", "vae_encode", "text_encode", "train", "export")


def stage_module(name: str) -> ModuleType:
    return importlib.import_module(f"sdxlpipe.stages.{name}")
