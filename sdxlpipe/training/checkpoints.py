"""Training checkpoints on disk: written atomically, found without torch.

A run directory holds `checkpoints/step-NNNNNNNN/` (adapter weights,
optimizer state, `state.json`) and `done.json` once the run finished.
A checkpoint directory is renamed into place only when complete, so a
killed run never leaves a half-written one visible.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from sdxlpipe.cache_format.shards import rename_durably
from sdxlpipe.pipeline.atomic import write_json_atomic


def write_json(path: Path, obj: Any) -> None:
    write_json_atomic(obj, path)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def latest_step(run_dir: Path) -> int:
    root = run_dir / "checkpoints"
    if not root.exists():
        return 0
    steps = [int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").exists()]
    return max(steps, default=0)


def read_done(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "done.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def commit_checkpoint(tmp: Path, run_dir: Path, step: int, keep: int) -> Path:
    """fsync the files in `tmp`, rename it to step-N, drop all but the newest `keep`."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = checkpoint_dir(run_dir, step)
    if final.exists():
        shutil.rmtree(final)
    rename_durably(tmp, final)  # the renamed directory, not just its files, survives a power cut
    # A run killed while writing a checkpoint left its temp folder (a checkpoint's size: GBs for a
    # full fine-tune); only the main process writes checkpoints, so any other one is a leftover.
    for leftover in final.parent.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    steps = sorted(int(p.name[5:]) for p in final.parent.iterdir() if p.name.startswith("step-"))
    for old in steps[:-keep]:
        shutil.rmtree(checkpoint_dir(run_dir, old), ignore_errors=True)
    return final
