"""`accelerate launch -m sdxlpipe run train` on two CPU processes (gloo), and a run moved between 1 and 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from sdxlpipe.training.data import plan_of
from tests.conftest import copy_example

pytestmark = pytest.mark.slow

# Text-encoder LoRAs too, so the launches cover the UNet's and the encoders' gradient averaging;
# a high learning rate so their LoRA up-weights move visibly in two steps.
SETTINGS = ["--set", "train.batch_size=2", "--set", "train.save_every_steps=2", "--set", "train.train_text_encoder=true",
            "--set", "train.learning_rate=1e-2"]
# One thread per process in every launch: the same kernels sum in the same order, so runs compare bit for bit.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def train(config: Path, processes: int, *settings: str) -> subprocess.CompletedProcess:
    command = ["-m", "sdxlpipe", "run", "train", "-c", str(config), "--json", *SETTINGS, *settings]
    if processes > 1:
        # --multi_gpu picks torch's launcher; with device = "cpu" each process runs on the CPU with gloo.
        command = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29561", *command]
    proc = subprocess.run([sys.executable, *command], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count('"stages"') == 1, "only the main process reports"
    return proc


def only_run(config: Path) -> tuple[Path, dict]:
    (run,) = (config.parent / ".sdxlpipe" / "train").iterdir()
    return run, json.loads((run / "done.json").read_text())


def trained(run: Path, step: int) -> dict:
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    return {name: load_file(ckpt / f"{name}.safetensors") for name in ("adapter", "text_encoder", "text_encoder_2")}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n])
                                        for n in a)


def test_a_run_moves_from_two_processes_to_one_and_back_bit_for_bit(tmp_path):
    """The global batch sequence does not depend on the process count, and the key holds the micro-batches
    per step, so 2 processes x 1 and 1 process x 2 train the same run: r trains steps 1-2 on one process
    (gradient_accumulation_steps = 2) and 3-4 on two; x trains 1-2 on two and 3-4 on one, with no edit to
    its config. Their checkpoints are equal tensor for tensor at step 2 and step 4 (UNet and text-encoder
    LoRAs: two processes average gradients exactly as one accumulates them). The epochs have an odd
    number of batches, so an epoch ends inside a step and the processes still take one batch each."""
    config = copy_example(tmp_path / "r")
    for image in sorted((config.parent / "images").iterdir())[14:]:
        image.unlink()  # 8 images (and their captions): 5 batches of 2 or 1 per epoch
    subprocess.run([sys.executable, "-m", "sdxlpipe", "run", "encode", "-c", str(config)], env=ENV, check=True,
                   capture_output=True)
    table = pq.read_table(config.parent / ".sdxlpipe" / "tables" / "bucket.parquet")
    assert plan_of(table, 2, 0).per_epoch % 2 == 1, "an epoch that ends inside a 2-batch step"
    shutil.copytree(config.parent, tmp_path / "x")
    moved = tmp_path / "x" / "sdxlpipe.toml"

    train(config, 1, "--set", "train.gradient_accumulation_steps=2", "--set", "train.max_steps=2")
    train(moved, 2, "--set", "train.max_steps=2")
    (r, r_two), (x, x_two) = only_run(config), only_run(moved)
    assert r.name == x.name, "one key for 1 x 2 and 2 x 1 micro-batches per step"
    assert (r_two["processes"], x_two["processes"]) == (1, 2)
    assert same(trained(r, 2), trained(x, 2))

    proc = train(config, 2, "--set", "train.gradient_accumulation_steps=2", "--set", "train.max_steps=4")
    reasons = json.loads(proc.stdout)["stages"]["train"]["reasons"]
    assert any("extending from step 2 to 4 on 2 process(es) x 1 micro-batches" in r for r in reasons), reasons
    train(moved, 1, "--set", "train.max_steps=4")
    (r, r_four), (x, x_four) = only_run(config), only_run(moved)
    assert (r_four["steps"], r_four["processes"], x_four["steps"], x_four["processes"]) == (4, 2, 4, 1)
    assert same(trained(r, 4), trained(x, 4))
    assert not same(trained(r, 4), trained(r, 2))
    ups = [v for k, v in trained(x, 4)["text_encoder"].items() if ".lora_B." in k]
    assert ups and any(v.abs().sum() > 0 for v in ups), "the text encoders trained"


def test_two_processes_in_shard_blocks_order_finish_and_equal_one(tmp_path):
    """shard_blocks keeps the batches per epoch, so decision 72's rule holds: two processes over 5-batch
    epochs finish, and train what one process accumulating 2 trains (the main process records the layout;
    the other locates the same one)."""
    config = copy_example(tmp_path / "r")
    for image in sorted((config.parent / "images").iterdir())[14:]:
        image.unlink()  # 8 images (and their captions): 5 batches of 2 or 1 per epoch
    subprocess.run([sys.executable, "-m", "sdxlpipe", "run", "encode", "-c", str(config)], env=ENV, check=True,
                   capture_output=True)
    shutil.copytree(config.parent, tmp_path / "x")
    blocks = ["--set", 'train.shuffle="shard_blocks"', "--set", "train.max_steps=3"]
    train(config, 1, "--set", "train.gradient_accumulation_steps=2", *blocks)
    train(tmp_path / "x" / "sdxlpipe.toml", 2, *blocks)
    (r, _), (x, x_done) = only_run(config), only_run(tmp_path / "x" / "sdxlpipe.toml")
    assert r.name == x.name and x_done["processes"] == 2
    assert json.loads((x / "layout.json").read_text()) == json.loads((r / "layout.json").read_text())
    assert same(trained(r, 3), trained(x, 3))
