"""What the train stage saves for each network type leaves as a file other tools load."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from sdxlpipe.lora.formats import save_kohya_lycoris
from sdxlpipe.models.tiny import build_tiny_component
from sdxlpipe.stages import export
from sdxlpipe.training import networks
from tests.training.conftest import build_samples, make_context, params, run_train


@pytest.mark.parametrize("network", ["loha", "lokr"])
def test_lycoris_file_reproduces_peft_delta_weights_with_the_readers_formula(tmp_path, network):
    unet = build_tiny_component("unet").requires_grad_(False)
    p = params(network=network, rank=4, alpha=3.0, conv_rank=2, conv_alpha=5.0)
    networks.attach(unet, p)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, q in unet.named_parameters():
            if q.requires_grad:
                q.copy_(torch.randn(q.shape, generator=g) * 0.1)
    path = save_kohya_lycoris(tmp_path / "x.safetensors", networks.trained_state(unet, p), networks.config_dict(unet, p))
    saved = load_file(path)
    checked = 0
    for name, module in unet.named_modules():
        if not hasattr(module, "get_delta_weight") or networks.ADAPTER not in getattr(module, "scaling", {}):
            continue
        k = "lora_unet_" + name.replace(".", "_")
        f = {key[len(k) + 1:]: v for key, v in saved.items() if key.startswith(k + ".")}
        alpha = float(f["alpha"])
        if network == "loha":
            # LyCORIS / ComfyUI: (w1a @ w1b) * (w2a @ w2b) * alpha / rank
            delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * alpha / f["hada_w1_b"].shape[0]
        else:
            # ComfyUI: kron(w1, w2) * alpha / dim when a factor is decomposed, else * 1
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
            dim = f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else (f["lokr_w1_b"].shape[0] if "lokr_w1_b" in f else None)
            delta = torch.kron(w1, w2) * (alpha / dim if dim else 1.0)
        want = module.get_delta_weight(networks.ADAPTER)
        assert torch.allclose(delta.reshape(want.shape), want, atol=1e-6), name
        checked += 1
    assert checked > 10


def test_full_fine_tune_exports_a_unet_folder_with_the_trained_weights(tmp_path):
    from diffusers import UNet2DConditionModel

    ctx = make_context(tmp_path / "full", network="full")
    table = build_samples(ctx, 2)
    done = run_train(ctx, table, params(network="full", max_steps=2, save_every_steps=2))
    ctx.stage = "export"
    out = export.Params(formats=("diffusers",), output_dir=str(tmp_path / "out"), name="tuned")
    export.run(table, out, ctx)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "tuned-unet")
    trained = load_file(done["outputs"]["weights"])
    state = unet.state_dict()
    assert all(torch.equal(state[k], trained[k]) for k in trained)
    assert not all(torch.equal(state[k], v) for k, v in build_tiny_component("unet").state_dict().items())


def test_loha_with_diffusers_format_is_a_clear_error(tmp_path):
    from sdxlpipe.errors import UserError

    ctx = make_context(tmp_path / "loha", network="loha")
    table = build_samples(ctx, 2)
    run_train(ctx, table, params(network="loha", max_steps=1, save_every_steps=1))
    ctx.stage = "export"
    with pytest.raises(UserError, match="kohya"):
        export.run(table, dataclasses.replace(export.Params(), output_dir=str(tmp_path / "o")), ctx)
