"""Frozen weights are stored in the asked dtype, trained ones in fp32 (bf16 with full_bf16, fp16 with full_fp16),
and the fused Adafactor backward pass steps exactly like the ordinary one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.training.conftest import SMALL, build_samples, make_context, params, run_train

# Three bf16 runs in one process (accelerate fixes mixed precision per process); prints each done.json.
SCRIPT = """
import json, sys, pathlib
import torch
torch.set_num_threads(1)
from tests.training.conftest import build_samples, make_context, run_train
for name, settings in json.loads(sys.argv[2]).items():
    ctx = make_context(pathlib.Path(sys.argv[1]) / name, **settings)
    print(json.dumps({name: run_train(ctx, build_samples(ctx, 4), ctx.config.params["train"])}))
"""

BF16 = {**SMALL, "max_steps": 6, "save_every_steps": 6, "conv_rank": 4, "learning_rate": 1e-2, "mixed_precision": "bf16"}
RUNS = {
    "bf16_base": BF16,
    "fp8_base": {**BF16, "base_dtype": "fp8"},
    "full_bf16_fused": {**BF16, "conv_rank": 0, "network": "full", "full_bf16": True, "optimizer": "adafactor",
                        "fused_backward": True, "learning_rate": 1e-3},
}


@pytest.mark.slow
def test_frozen_and_trained_weights_are_stored_in_the_asked_dtypes_and_train(tmp_path):
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(RUNS)], env=env, cwd=REPO,
                          timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    done = {k: v for line in proc.stdout.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}
    for name, record in done.items():
        assert record["eval_loss_after"] < record["eval_loss_before"], (name, record)
    weights = {name: record["weights_bytes"] for name, record in done.items()}
    assert set(weights["bf16_base"]["frozen"]) == {"bfloat16"}
    assert set(weights["bf16_base"]["trained"]) == {"float32"}
    fp8 = weights["fp8_base"]["frozen"]
    # Linear and conv weights in float8; the norms (a small part) stay in the compute dtype.
    assert set(fp8) == {"float8_e4m3fn", "bfloat16"} and fp8["float8_e4m3fn"] > 4 * fp8["bfloat16"]
    assert set(weights["fp8_base"]["trained"]) == {"float32"}
    assert weights["full_bf16_fused"] == {"frozen": {}, "trained": {"bfloat16": weights["full_bf16_fused"]["trained"]["bfloat16"]}}


def test_fused_adafactor_backward_steps_like_the_ordinary_step(tmp_path):
    """Without clipping (per-tensor in the fused pass) the two are the same arithmetic, weight by weight."""
    results = []
    for fused in (False, True):
        ctx = make_context(tmp_path / f"fused-{fused}")
        p = params(network="full", optimizer="adafactor", fused_backward=fused, max_grad_norm=0.0, learning_rate=1e-3,
                   max_steps=3, save_every_steps=3)
        done = run_train(ctx, build_samples(ctx, 2), p)
        results.append(load_file(done["outputs"]["weights"]))
    plain, fused = results
    assert plain.keys() == fused.keys()
    assert all(torch.equal(plain[k], fused[k]) for k in plain)
    start = make_context(tmp_path / "start").models  # the tiny UNet before training
    from sdxlpipe.models.tiny import build_tiny_component

    base = build_tiny_component("unet").state_dict()
    assert any(not torch.equal(base[k], plain[k]) for k in plain)
    del start


def test_full_fp16_trains_fp16_weights_through_the_loss_scaler_on_the_cpu(tmp_path):
    """fp16 autocast and torch's GradScaler run on the CPU too, so full_fp16 is tested here, not only on a GPU
    (in this process: fp16's autocast and scaler are the loop's own, not accelerate's per-process state)."""
    # Two steps of one sample: fp16 matmuls are emulated on this CPU (~30x slower than fp32).
    settings = dict(network="full", mixed_precision="fp16", full_fp16=True, optimizer="adafactor", learning_rate=1e-3,
                    batch_size=1, max_steps=2, save_every_steps=2)
    ctx = make_context(tmp_path / "fp16", **settings)
    done = run_train(ctx, build_samples(ctx, 1), params(**settings))
    assert set(done["weights_bytes"]["trained"]) == {"float16"} and not done["weights_bytes"]["frozen"]
    assert done["eval_loss_after"] < done["eval_loss_before"], done
    weights = load_file(done["outputs"]["weights"])
    assert {t.dtype for t in weights.values()} == {torch.float16} and all(t.isfinite().all() for t in weights.values())
    # The scaler's state is checkpointed with the optimizer's, so a resumed run scales (and skips) as before.
    state = torch.load(Path(done["outputs"]["checkpoint"]) / "training_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 1


def test_full_fp16_refuses_optimizers_whose_fp16_state_goes_nan():
    from sdxlpipe.stages.train import check

    problems = dict(check(params(network="full", mixed_precision="fp16", full_fp16=True, optimizer="adamw")))
    assert "NaN" in problems["train.full_fp16"] and "adafactor" in problems["train.full_fp16"]
    assert "train.full_fp16" in dict(check(params(network="full", mixed_precision="bf16", full_fp16=True, optimizer="adafactor")))
    assert not check(params(network="full", mixed_precision="fp16", full_fp16=True, optimizer="adafactor"))
