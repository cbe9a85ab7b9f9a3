"""A run killed with SIGKILL resumes and ends exactly where an unbroken run ends.

The slow test kills a real process; the fast one resumes in-process from a checkpoint of an
unbroken run (its later checkpoints removed) with the LR schedule, EMA and dropout on.

Exactness covers the optimizer, the LR schedule, EMA, gradient accumulation
and clipping, LoRA dropout (the global RNG), and every seeded per-sample
choice: flips, caption variants, caption dropout, regularisation draws.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.training.conftest import SMALL, build_samples, make_context, params, run_train

SETTINGS = {
    **SMALL, "max_steps": 8, "save_every_steps": 2, "conv_rank": 4, "dropout": 0.1,
    "ema_decay": 0.9, "lr_scheduler": "cosine_with_restarts", "lr_cycles": 2, "lr_warmup": 0.25,
    "gradient_accumulation_steps": 2, "max_grad_norm": 0.5, "caption_dropout": 0.3,
    "noise_offset": 0.05, "noise_offset_random_strength": True, "input_perturbation": 0.1,
    "multires_noise_iterations": 2, "masked_loss": True, "min_snr_gamma": 5.0, "prior_loss_weight": 0.5,
    "loader_workers": 2,  # batches streamed by two reader threads, killed with the run
}

# Runs the train stage on a workspace made by make_context/build_samples, in its own process.
SCRIPT = """
import json, sys
import pyarrow.parquet as pq
import torch
torch.set_num_threads(1)
from tests.training.conftest import make_context
from sdxlpipe.stages import train
root, settings = sys.argv[1], json.loads(sys.argv[2])
ctx = make_context(__import__("pathlib").Path(root), **settings)
train.run(pq.read_table(root + "/table.parquet"), ctx.config.params["train"], ctx)
"""


def prepare(root: Path, settings: dict) -> list[str]:
    ctx = make_context(root, **settings)
    pq.write_table(build_samples(ctx, 5, flips=True, variants=2, masks=True, reg=2), root / "table.parquet")
    return [sys.executable, "-c", SCRIPT, str(root), json.dumps(settings)]


def final(root: Path, step: int) -> tuple[dict, dict, list]:
    (ckpt,) = (root / ".sdxlpipe" / "train").glob(f"*/checkpoints/step-{step:08d}")
    state = json.loads((ckpt / "state.json").read_text())
    return load_file(ckpt / "adapter.safetensors"), load_file(ckpt / "adapter.ema.safetensors"), state["losses"]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights_ema_and_loss_curve(tmp_path):
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    whole = prepare(tmp_path / "whole", SETTINGS)
    subprocess.run(whole, check=True, env=env, cwd=REPO, timeout=300, capture_output=True)

    broken_root = tmp_path / "broken"
    broken = prepare(broken_root, SETTINGS)
    proc = subprocess.Popen(broken, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train_root = broken_root / ".sdxlpipe" / "train"
    deadline = time.time() + 240
    while time.time() < deadline and not list(train_root.glob("*/checkpoints/step-00000004")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not list(train_root.glob("*/done.json")), "the run finished before it was killed"

    resumed = subprocess.run(broken, env=env, cwd=REPO, timeout=300, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert list(train_root.glob("*/done.json"))
    # max_checkpoints = 2: only the newest two survive.
    assert sorted(p.name for p in train_root.glob("*/checkpoints/step-*")) == ["step-00000006", "step-00000008"]

    (wa, ea, la), (wb, eb, lb) = final(tmp_path / "whole", 8), final(broken_root, 8)
    assert la == lb and len(la) == 8
    assert wa.keys() == wb.keys() and ea.keys() == eb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert any(not torch.equal(wa[k], ea[k]) for k in wa), "EMA weights should differ from the raw weights"


def test_a_run_resumed_from_a_checkpoint_ends_bit_equal_with_lr_schedule_ema_and_dropout(tmp_path):
    """The fast, in-process version: the unbroken run's later checkpoints and done marker are removed,
    as if it had stopped after step 2, and the run again ends with the same weights, EMA and losses.

    Each setting below only resumes exactly if its state does: the LR schedule (restarts and warmup
    straddle step 2), EMA, and LoRA dropout (the global RNG, seeded per micro-batch).
    """
    ctx = make_context(tmp_path / "ws")
    table = build_samples(ctx, 4)
    p = params(max_steps=4, save_every_steps=2, max_checkpoints=2, dropout=0.2, ema_decay=0.8,
               lr_scheduler="cosine_with_restarts", lr_cycles=2, lr_warmup=0.25, learning_rate=1e-2,
               gradient_accumulation_steps=2, conv_rank=4)
    done = run_train(ctx, table, p)
    run_dir = Path(done["outputs"]["checkpoint"]).parent.parent
    unbroken = final(ctx.workspace.root.parent, 4)
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")
    (run_dir / "done.json").unlink()

    run_train(ctx, table, p)

    (wa, ea, la), (wb, eb, lb) = unbroken, final(ctx.workspace.root.parent, 4)
    assert la == lb and len(la) == 4
    assert wa.keys() == wb.keys() and ea.keys() == eb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert any(not torch.equal(wa[k], ea[k]) for k in wa), "EMA weights should differ from the raw weights"
