"""The train stage's CUDA-only paths, on the tiny model on a GPU: one `pytest -m cuda` run checks them all.

On a machine without CUDA every test here is skipped (tests/conftest.py), and counted as skipped.
Covered: bf16 autocast (accelerate's) with bf16 frozen weights and validation images; fp8 frozen
weights; full_fp16 with the loss scaler; 8-bit AdamW (bitsandbytes, skipped without it); the fused
Adafactor backward pass; gradient checkpointing; train.compile and train.channels_last; pinned-memory
batches, copied to the GPU in their stored dtype and converted there; NCCL across two GPUs (skipped with fewer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, cli, copy_example
from tests.training.conftest import SMALL, build_samples, make_context, params

pytestmark = pytest.mark.cuda
DEVICE = "cuda"

# bf16 runs share one process (accelerate fixes mixed precision per process); one JSON line per run, its
# done.json or its error, so one failing path does not hide the others.
SCRIPT = """
import json, sys, pathlib, traceback
import torch
from tests.training.conftest import build_samples, make_context, run_train
for name, settings in json.loads(sys.argv[2]).items():
    try:
        if settings.get("optimizer") == "adamw8bit":
            import bitsandbytes  # noqa: F401
        ctx = make_context(pathlib.Path(sys.argv[1]) / name, device=sys.argv[3], **settings)
        print(json.dumps({name: run_train(ctx, build_samples(ctx, 4), ctx.config.params["train"])}), flush=True)
    except ImportError as e:
        print(json.dumps({name: {"skipped": str(e)}}), flush=True)
    except Exception as e:
        traceback.print_exc()
        print(json.dumps({name: {"error": f"{type(e).__name__}: {e}"}}), flush=True)
"""

BF16 = {**SMALL, "max_steps": 6, "save_every_steps": 6, "conv_rank": 4, "learning_rate": 1e-2, "mixed_precision": "bf16",
        "loader_workers": 2}
FULL = {**BF16, "conv_rank": 0, "network": "full", "full_bf16": True, "optimizer": "adafactor", "learning_rate": 1e-3,
        "max_grad_norm": 0.0}
RUNS = {
    "bf16": {**BF16, "gradient_checkpointing": False, "validation_prompts": ["a red square"], "validation_every_steps": 6,
             "validation_steps": 2},
    "bf16_checkpointing": {**BF16, "gradient_checkpointing": True},
    "fp8_base": {**BF16, "base_dtype": "fp8"},
    "full_bf16_fused": {**FULL, "fused_backward": True},
    "full_bf16": FULL,
    "adamw8bit": {**BF16, "optimizer": "adamw8bit"},
    "compiled": {**BF16, "gradient_checkpointing": False, "compile": True},
    "channels_last": {**BF16, "gradient_checkpointing": False, "channels_last": True},
}
# fp16 in a process of its own: the loop builds accelerate with mixed_precision "no" for it (decision 43).
FP16_RUNS = {"full_fp16": {**SMALL, "network": "full", "mixed_precision": "fp16", "full_fp16": True,
                           "optimizer": "adafactor", "learning_rate": 1e-3, "max_steps": 6, "save_every_steps": 6}}


def run_all(root: Path, runs: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(root), json.dumps(runs), DEVICE], env=env, cwd=REPO,
                          timeout=900, capture_output=True, text=True)
    found = {k: v for line in proc.stdout.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}
    return {name: {**found.get(name, {"error": "no report"}), "stderr": proc.stderr[-4000:]} for name in runs}


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory) -> dict:
    return run_all(tmp_path_factory.mktemp("bf16"), RUNS)


def done(runs: dict, name: str) -> dict:
    record = runs[name]
    if "skipped" in record:
        pytest.skip(f"{name}: {record['skipped']}")
    assert "error" not in record, f"{name}: {record['error']}\n{record['stderr']}"
    return record


def test_bf16_autocast_trains_a_lora_on_bf16_frozen_weights_and_renders_validation_images(bf16_runs):
    record = done(bf16_runs, "bf16")
    assert record["eval_loss_after"] < 0.95 * record["eval_loss_before"], record
    assert set(record["weights_bytes"]["frozen"]) == {"bfloat16"}
    assert set(record["weights_bytes"]["trained"]) == {"float32"}
    images = sorted(Path(record["outputs"]["validation"]).rglob("*.png"))
    assert images, "validation rendered nothing"


def test_gradient_checkpointing_gives_the_loss_of_the_plain_pass(bf16_runs):
    plain, checkpointed = done(bf16_runs, "bf16"), done(bf16_runs, "bf16_checkpointing")
    assert checkpointed["gradient_checkpointing"] is True and plain["gradient_checkpointing"] is False
    # The same arithmetic recomputed; cuDNN's backward kernels may add rounding differences, nothing more.
    assert checkpointed["eval_loss_before"] == pytest.approx(plain["eval_loss_before"], rel=1e-3)
    assert checkpointed["eval_loss_after"] == pytest.approx(plain["eval_loss_after"], rel=2e-2)


def test_fp8_frozen_weights_are_float8_on_the_gpu_and_train(bf16_runs):
    record = done(bf16_runs, "fp8_base")
    fp8 = record["weights_bytes"]["frozen"]
    assert set(fp8) == {"float8_e4m3fn", "bfloat16"} and fp8["float8_e4m3fn"] > 4 * fp8["bfloat16"]
    assert record["eval_loss_after"] < record["eval_loss_before"], record


def test_fused_adafactor_backward_steps_like_the_ordinary_step_on_the_gpu(bf16_runs):
    fused, plain = done(bf16_runs, "full_bf16_fused"), done(bf16_runs, "full_bf16")
    assert fused["weights_bytes"] == plain["weights_bytes"]
    assert set(fused["weights_bytes"]["trained"]) == {"bfloat16"} and not fused["weights_bytes"]["frozen"]
    a, b = load_file(fused["outputs"]["weights"]), load_file(plain["outputs"]["weights"])
    assert a.keys() == b.keys()
    # Without clipping the two are the same updates; bf16 weights after 6 steps, so compare to bf16's precision.
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=2e-2, atol=2e-3)
    assert fused["eval_loss_after"] < fused["eval_loss_before"], fused


def test_8bit_adamw_trains_a_lora(bf16_runs):
    record = done(bf16_runs, "adamw8bit")  # skipped where bitsandbytes is not installed
    assert record["eval_loss_after"] < record["eval_loss_before"], record


@pytest.mark.parametrize("name, layout, compiled", [("compiled", "contiguous", True),
                                                    ("channels_last", "channels_last", False)])
def test_compile_and_channels_last_train_to_the_plain_runs_losses(bf16_runs, name, layout, compiled):
    record, plain = done(bf16_runs, name), done(bf16_runs, "bf16")
    assert (record["unet_layout"], record["unet_compiled"]) == (layout, compiled)
    # Other kernels, the same arithmetic up to rounding.
    assert record["eval_loss_before"] == pytest.approx(plain["eval_loss_before"], rel=1e-2)
    assert record["eval_loss_after"] == pytest.approx(plain["eval_loss_after"], rel=5e-2)
    assert record["eval_loss_after"] < 0.95 * record["eval_loss_before"], record


def test_full_fp16_trains_fp16_weights_through_the_loss_scaler_on_the_gpu(tmp_path):
    record = done(run_all(tmp_path, FP16_RUNS), "full_fp16")
    assert set(record["weights_bytes"]["trained"]) == {"float16"} and not record["weights_bytes"]["frozen"]
    assert record["eval_loss_after"] < record["eval_loss_before"], record
    weights = load_file(record["outputs"]["weights"])
    assert {t.dtype for t in weights.values()} == {torch.float16} and all(t.isfinite().all() for t in weights.values())
    # The scaler's state is checkpointed, so a resumed run scales (and skips steps) as the unbroken one.
    state = torch.load(Path(record["outputs"]["checkpoint"]) / "training_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 1


def test_batches_for_a_gpu_arrive_in_pinned_memory_and_reach_it(tmp_path):
    from sdxlpipe.training import stream
    from sdxlpipe.training.data import BatchPlan
    from sdxlpipe.training.feed import open_feed

    ctx = make_context(tmp_path / "pinned", device=DEVICE)
    table = build_samples(ctx, 4)
    p = params(loader_workers=2)
    plan = BatchPlan([(64, 64)] * 4, [1] * 4, p.batch_size, p.seed)
    source = stream.open_source(table, ctx.store, p, plan, DEVICE, stages=ctx.config.stages)
    with open_feed(source, p, start_step=0, max_steps=2, world=1, rank=0, device=DEVICE) as feed:
        for index in feed.indices:
            batch = feed.take(index)
            for name in ("mean", "std", "embeds", "pooled"):
                assert batch[name].is_pinned(), name
                on_gpu = batch[name].to(DEVICE, non_blocking=True)
                assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), batch[name])


def test_batches_go_to_the_gpu_in_their_stored_dtype_and_their_buffers_wait_for_the_copy(tmp_path):
    """The loop's path (decision 78): `to_device` copies the ring's fp16 tensors and converts on the GPU, giving
    the CPU's fp32 exactly; the buffers go back to the ring only once the copy is done. The GPU is kept busy
    before each copy, so a buffer handed back early would be refilled by the readers before it is copied."""
    from sdxlpipe.training import stream
    from sdxlpipe.training.batches import as_float, to_device
    from sdxlpipe.training.data import BatchPlan
    from sdxlpipe.training.feed import open_feed

    ctx = make_context(tmp_path / "copies", device=DEVICE)
    table = build_samples(ctx, 4)
    p = params(loader_workers=2)
    plan = BatchPlan([(64, 64)] * 4, [1] * 4, p.batch_size, p.seed)
    source = stream.open_source(table, ctx.store, p, plan, DEVICE, stages=ctx.config.stages)
    pairs = []
    with open_feed(source, p, start_step=0, max_steps=8, world=1, rank=0, device=DEVICE) as feed:
        for index in feed.indices:
            batch = feed.take(index)
            assert {batch[k].dtype for k in ("mean", "std", "embeds", "pooled")} == {torch.float16}
            want = as_float(batch)  # the CPU's conversion, made before the buffers can go back
            torch.cuda._sleep(100_000_000)  # ~50 ms of GPU work queued before the copies
            got = to_device(batch, DEVICE)
            copied = torch.cuda.Event()
            copied.record()
            feed.release(index, after=copied)
            pairs.append((index, want, got))
        torch.cuda.synchronize()
    for index, want, got in pairs:
        for k in ("mean", "std", "embeds", "pooled"):
            assert got[k].is_cuda and got[k].dtype == torch.float32, (index, k)
            assert torch.equal(got[k].cpu(), want[k]), (index, k)


@pytest.mark.slow
def test_two_processes_train_over_nccl(tmp_path):
    """accelerate launch on two GPUs: NCCL averages the gradients (gloo does on a CPU: tests/integration)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"NCCL needs two GPUs; this machine has {torch.cuda.device_count()}")
    config = copy_example(tmp_path / "tiny")
    settings = ["--set", f"device={DEVICE}", "--set", "train.max_steps=2", "--set", "train.batch_size=2",
                "--set", "train.save_every_steps=2", "--set", "train.mixed_precision=bf16"]
    cli("run", "encode", "-c", str(config), "--set", f"device={DEVICE}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", "29571",
              "-m", "sdxlpipe", "run", "train", "-c", str(config), "--json", *settings]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (done_file,) = (config.parent / ".sdxlpipe" / "train").glob("*/done.json")
    record = json.loads(done_file.read_text())
    assert record["processes"] == 2
    weights = load_file(record["outputs"]["weights"])
    assert all(torch.isfinite(v).all() for v in weights.values())
