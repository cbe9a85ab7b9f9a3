"""`accelerate launch -m sdxlpipe run train` on two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import cli, copy_example

pytestmark = pytest.mark.slow

# Text-encoder LoRAs too, so one launch covers the UNet's and the encoders' gradient averaging;
# a high learning rate so their LoRA up-weights move visibly in two steps.
SETTINGS = ["--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "train.save_every_steps=2",
            "--set", "train.train_text_encoder=true", "--set", "train.learning_rate=1e-2"]


def test_two_processes_train_each_its_share_text_encoders_too_and_give_a_result_shaped_like_one(tmp_path):
    """Each process's UNet and text-encoder LoRA gradients are averaged over both before the step, as
    DDP would: the result has one process's shapes, other values, and trained text encoders."""
    config = copy_example(tmp_path / "tiny")
    for image in sorted((config.parent / "images").iterdir())[16:]:
        image.unlink()  # 8 or so images are enough
    cli("run", "encode", "-c", str(config))
    cli("run", "train", "-c", str(config), *SETTINGS)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # --multi_gpu picks torch's launcher; with device = "cpu" each process runs on the CPU with gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29561",
              "-m", "sdxlpipe", "run", "train", "-c", str(config), "--json", *SETTINGS]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count('"stages"') == 1, "only the main process reports"

    runs = {}
    for done in (config.parent / ".sdxlpipe" / "train").glob("*/done.json"):
        record = json.loads(done.read_text())
        runs[record["processes"]] = record
    assert sorted(runs) == [1, 2]
    one, two = (load_file(runs[n]["outputs"]["weights"]) for n in (1, 2))
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in two.items()}
    assert all(torch.isfinite(v).all() for v in two.values())
    assert any(not torch.equal(one[k], two[k]) for k in one), "two processes see twice the batches"
    assert Path(runs[2]["outputs"]["checkpoint"]).name == "step-00000002"
    for name in ("text_encoder", "text_encoder_2"):
        state = load_file(runs[2]["outputs"][name])
        ups = [v for k, v in state.items() if ".lora_B." in k]
        assert ups and all(torch.isfinite(v).all() for v in ups) and any(v.abs().sum() > 0 for v in ups)
