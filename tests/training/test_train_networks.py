"""Every network type trains on the tiny model; per-block ranks and rates land where kohya puts them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdxlpipe.errors import UserError
from sdxlpipe.models.tiny import build_tiny_component
from sdxlpipe.training import networks, optimizers
from tests.training.conftest import build_samples, make_context, params, run_train

NETWORKS = {
    "lora": dict(learning_rate=1e-2, conv_rank=4, conv_alpha=8.0),
    "loha": dict(network="loha", learning_rate=1e-2, conv_rank=4, conv_alpha=8.0),
    "lokr": dict(network="lokr", learning_rate=1e-2, conv_rank=4, conv_alpha=8.0),
    "ia3": dict(network="ia3", learning_rate=3e-2, target_modules=("to_k", "to_v", "ff.net.2")),
    "oft": dict(network="oft", learning_rate=1e-2),
    "full": dict(network="full", learning_rate=1e-3),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_each_network_lowers_the_loss_and_its_checkpoint_loads_back(tmp_path, name):
    ctx = make_context(tmp_path / name)
    p = params(max_steps=6, save_every_steps=6, **NETWORKS[name])
    done = run_train(ctx, build_samples(ctx, 4), p)
    assert done["eval_loss_after"] < done["eval_loss_before"], done
    saved = load_file(done["outputs"]["weights"])
    unet = build_tiny_component("unet").requires_grad_(False)
    networks.attach(unet, p)
    before = networks.trained_state(unet, p)
    networks.load_trained_state(unet, p, saved)
    after = networks.trained_state(unet, p)
    assert after.keys() == saved.keys()
    assert all(torch.equal(after[k], saved[k]) for k in saved)
    assert any(not torch.equal(before[k], saved[k]) for k in saved)


def test_block_index_follows_kohyas_sdxl_layout():
    # SDXL: 2 layers per block, so down_blocks.1 holds input_blocks 4, 5 and up_blocks.0 output_blocks 0-2.
    assert networks.block_index("time_embedding.linear_1.weight", 2) == 0
    assert networks.block_index("add_embedding.linear_1.weight", 2) == 0
    assert networks.block_index("conv_in.weight", 2) == 1
    assert networks.block_index("down_blocks.0.resnets.1.conv1.weight", 2) == 1 + 2
    assert networks.block_index("down_blocks.0.downsamplers.0.conv.weight", 2) == 1 + 3
    assert networks.block_index("down_blocks.1.attentions.0.proj_in.weight", 2) == 1 + 4
    assert networks.block_index("down_blocks.2.attentions.1.proj_in.weight", 2) == 1 + 8
    assert networks.block_index("mid_block.resnets.0.conv1.weight", 2) == 10
    assert networks.block_index("mid_block.attentions.0.proj_in.weight", 2) == 11
    assert networks.block_index("mid_block.resnets.1.conv1.weight", 2) == 12
    assert networks.block_index("up_blocks.0.attentions.2.proj_in.weight", 2) == 13 + 2
    assert networks.block_index("up_blocks.1.upsamplers.0.conv.weight", 2) == 13 + 5
    assert networks.block_index("up_blocks.2.resnets.2.conv1.weight", 2) == 13 + 8
    assert networks.block_index("conv_out.weight", 2) == 22


def test_block_dims_give_each_block_its_rank_and_zero_leaves_it_out():
    unet = build_tiny_component("unet").requires_grad_(False)
    dims = [0] * 23
    dims[1 + 3] = 2  # input_blocks.3 = down_blocks.1.attentions.0 on tiny (1 layer per block)
    dims[13 + 1] = 6  # output_blocks.1 = up_blocks.0.attentions.1
    p = params(block_dims=tuple(dims), block_alphas=tuple(float(d) for d in dims))
    networks.attach(unet, p)
    ranks = {k.rsplit(".lora_A", 1)[0]: v.shape[0] for k, v in networks.trained_state(unet, p).items() if ".lora_A" in k}
    assert ranks
    assert {r for k, r in ranks.items() if k.startswith("down_blocks.1.attentions.0.")} == {2}
    assert {r for k, r in ranks.items() if k.startswith("up_blocks.0.attentions.1.")} == {6}
    assert all(k.startswith(("down_blocks.1.attentions.0.", "up_blocks.0.attentions.1.")) for k in ranks)


def test_each_module_trains_at_its_own_blocks_alpha_over_rank():
    """Per-block alphas (and the convolutions' own) act in the forward pass the training runs,
    not only in what export writes: each adapted module adds alpha_b / rank_b * B(A(x))."""
    unet = build_tiny_component("unet").requires_grad_(False)
    dims = [2 + b % 3 for b in range(23)]  # ranks 2-4 and alphas that differ in every block
    alphas = [0.5 + b for b in range(23)]
    p = params(block_dims=tuple(dims), block_alphas=tuple(alphas), alpha=8.0,
               conv_rank=4, conv_alpha=1.0, conv_block_dims=tuple(dims[::-1]), conv_block_alphas=tuple(alphas[::-1]))
    networks.attach(unet, p)
    unet.eval()
    layers = unet.config.layers_per_block
    g = torch.Generator().manual_seed(0)
    seen = {"linear": set(), "conv": set()}
    for name, module in unet.named_modules():
        if networks.ADAPTER not in getattr(module, "lora_A", {}):
            continue
        down, up = module.lora_A[networks.ADAPTER], module.lora_B[networks.ADAPTER]
        with torch.no_grad():
            up.weight.copy_(torch.randn(up.weight.shape, generator=g))  # B starts at zero: no delta to see
        b = networks.block_index(name, layers)
        if isinstance(module.base_layer, torch.nn.Conv2d):
            # A 1x1 convolution takes the block's linear rank and alpha, as kohya's (decision 53).
            kxk = module.base_layer.kernel_size != (1, 1)
            kind, rank, alpha = ("conv", dims[::-1][b], alphas[::-1][b]) if kxk else ("linear", dims[b], alphas[b])
            x = torch.randn(1, module.base_layer.in_channels, 8, 8, generator=g)
        else:
            kind, rank, alpha = "linear", dims[b], alphas[b]
            x = torch.randn(3, module.base_layer.in_features, generator=g)
        assert down.weight.shape[0] == rank, name
        with torch.no_grad():
            delta = module(x) - module.base_layer(x)
            want = alpha / rank * up(down(x))
        assert torch.allclose(delta, want, rtol=1e-4, atol=1e-5), (name, alpha, rank)
        seen[kind].add(b)
    assert len(seen["linear"]) > 3 and len(seen["conv"]) > 3, seen  # many blocks, so many alphas, checked


def test_block_lrs_and_lora_plus_set_each_groups_rate():
    unet = build_tiny_component("unet").requires_grad_(False)
    lrs = [1e-4] * 23
    lrs[1 + 3] = 5e-4
    lrs[13 + 1] = 0.0  # frozen
    p = params(block_lrs=tuple(lrs), lora_plus_ratio=16.0)
    networks.attach(unet, p)
    groups = optimizers.param_groups(unet, p)
    by_name = {id(q): g["lr"] for g in groups for q in g["params"]}
    for name, q in unet.named_parameters():
        if "lora_" not in name:
            continue
        if name.startswith("up_blocks.0.attentions.1."):
            assert not q.requires_grad and id(q) not in by_name
            continue
        base = 5e-4 if name.startswith("down_blocks.1.attentions.0.") else 1e-4
        assert by_name[id(q)] == pytest.approx(base * (16.0 if ".lora_B." in name else 1.0)), name


def test_optimizers_adafactor_and_prodigy_train(tmp_path):
    pytest.importorskip("prodigyopt")  # in the dev extra
    for name, lr in (("adafactor", 1e-2), ("prodigy", 1.0)):
        ctx = make_context(tmp_path / name)
        done = run_train(ctx, build_samples(ctx, 4), params(optimizer=name, learning_rate=lr, conv_rank=4,
                                                            conv_alpha=8.0, max_steps=10, save_every_steps=10))
        assert done["eval_loss_after"] < done["eval_loss_before"], (name, done)


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import sys

    # A None entry makes `import bitsandbytes` fail as if it were not installed, so the
    # test runs on CUDA machines that have it too.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    unet = build_tiny_component("unet").requires_grad_(False)
    p = params(optimizer="adamw8bit")
    networks.attach(unet, p)
    with pytest.raises(UserError, match="bitsandbytes"):
        optimizers.build_optimizer(optimizers.param_groups(unet, p), p)


@pytest.mark.parametrize("schedule", ["constant_with_warmup", "linear", "cosine"])
def test_lr_schedule_with_warmup_as_logged(tmp_path, schedule):
    import math

    ctx = make_context(tmp_path / schedule)
    done = run_train(ctx, build_samples(ctx, 2), params(lr_scheduler=schedule, lr_warmup=0.25, max_steps=8,
                                                       save_every_steps=8, learning_rate=1e-3))
    logged = [json.loads(line) for line in (Path(done["outputs"]["logs"]) / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged] == list(range(1, 9))
    for e in logged:
        s = e["step"]  # the rate for the next step, after s scheduler steps
        if s < 2:
            want = s / 2
        elif schedule == "constant_with_warmup":
            want = 1.0
        elif schedule == "linear":
            want = (8 - s) / 6
        else:
            want = 0.5 * (1 + math.cos(math.pi * (s - 2) / 6))
        assert e["lr"] == pytest.approx(1e-3 * want, abs=1e-12), e
        assert math.isfinite(e["grad_norm"]) and e["grad_norm"] > 0, e  # the LoRA got gradients
