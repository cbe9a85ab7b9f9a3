"""Through the CLI on the bundled example: a finished run whose max_steps is raised continues to the weights
an unbroken longer run ends with, and train.network_weights starts a run from an exported LoRA."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import cli, cli_json, copy_example

pytestmark = pytest.mark.slow

SHORT = ["--set", "train.max_steps=2", "--set", "train.save_every_steps=2"]
LONG = ["--set", "train.max_steps=4", "--set", "train.save_every_steps=2"]


def _done(config) -> dict:
    (done,) = (config.parent / ".sdxlpipe" / "train").glob("*/done.json")
    return json.loads(done.read_text())


def test_raising_max_steps_continues_the_finished_run_to_the_unbroken_runs_weights(tmp_path):
    extended = copy_example(tmp_path / "extended")
    for image in sorted((extended.parent / "images").iterdir())[16:]:
        image.unlink()  # 8 or so images (and their captions) are enough
    cli("run", "all", "-c", str(extended), *SHORT)
    short = _done(extended)
    exported = extended.parent / "output" / "tiny-shapes.diffusers.safetensors"
    # The unbroken run: the same encoded data and store, no train run yet.
    unbroken = tmp_path / "unbroken" / "sdxlpipe.toml"
    shutil.copytree(extended.parent, unbroken.parent, symlinks=True)
    shutil.rmtree(unbroken.parent / ".sdxlpipe" / "train")

    report = cli_json("run", "train", "-c", str(extended), *LONG)
    assert report["stages"]["train"]["computed"] == 1
    assert "extending from step 2 to 4" in json.dumps(report["stages"]["train"])
    cli("run", "train", "-c", str(unbroken), *LONG)
    a, b = _done(extended), _done(unbroken)
    assert a["steps"] == b["steps"] == 4
    wa, wb = load_file(a["outputs"]["weights"]), load_file(b["outputs"]["weights"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["eval_loss_before"] == b["eval_loss_before"] and a["eval_loss_after"] == b["eval_loss_after"]
    # Asked again, the 4-step run is done; the LoRA exported after 2 steps is not (same train key, other weights).
    again = cli_json("status", "-c", str(extended), *LONG)["stages"]
    assert again["train"]["to_compute"] == 0 and again["train"]["up_to_date"] == 1
    assert again["export"]["to_compute"] == 1, again["export"]

    # A new run (another seed) that starts from the exported 2-step LoRA starts where that run ended:
    # its fixed-noise loss before training is the 2-step run's loss after.
    start = tmp_path / "start" / "sdxlpipe.toml"
    shutil.copytree(unbroken.parent, start.parent, symlinks=True)
    shutil.rmtree(start.parent / ".sdxlpipe" / "train")
    cli("run", "train", "-c", str(start), "--set", "train.max_steps=1", "--set", f"train.network_weights={exported}")
    assert _done(start)["eval_loss_before"] == pytest.approx(short["eval_loss_after"], rel=1e-6)
