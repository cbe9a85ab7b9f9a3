"""A stage is one module: given a stage sdxlpipe has never seen, with a path setting, in the stage list,
when its file changes, then `run all` recomputes it and the no-op record does not answer "up to date"."""

from __future__ import annotations

import os
import time
from pathlib import Path

from PIL import Image

from sdxlpipe.config import load_config
from sdxlpipe.pipeline import noop
from sdxlpipe.pipeline.runner import run_pipeline

STAGES = ("sdxlpipe.stages.ingest", "tests.pipeline.throwaway_stage")
PAST = time.time() - 120  # files as a user's would be: not written in the last seconds (the racy rule)


def run_all(config: Path) -> dict:
    """What `sdxlpipe run all` does, with this stage list: walk the inputs, run, write the record."""
    cfg = load_config(config, [], stages=STAGES)
    began = noop.begin(cfg, [])
    if began is None:  # sdxlpipe's own code was saved in the last seconds (the racy rule): wait that out once
        time.sleep(noop.RACY_NS / 1e9)
        began = noop.begin(cfg, [])
    report = run_pipeline(cfg, "all")
    noop.finish(cfg, began, report)
    return report


def test_changing_a_new_stages_file_makes_run_all_recompute_it(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 48), (100 * i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "note.txt").write_text("first note\n")
    config = tmp_path / "sdxlpipe.toml"
    config.write_text('[[sources]]\npath = "images"\n[throwaway_stage]\npath = "note.txt"\n')
    for p in [tmp_path, *tmp_path.rglob("*")]:
        os.utime(p, (PAST, PAST))

    first = run_all(config)
    assert first["stages"]["throwaway_stage"]["computed"] == 2
    assert noop.answer(config, []) is not None  # nothing changed: the record answers

    (tmp_path / "note.txt").write_text("second note\n")
    assert noop.answer(config, []) is None  # the stage's file is watched, though sdxlpipe never named it
    second = run_all(config)
    assert second["stages"]["throwaway_stage"]["computed"] == 2
    assert second["stages"]["ingest"]["computed"] == 0
