"""What the train stage saves for each network type leaves as a file other tools load."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from sdxlpipe.lora.formats import save_kohya_lycoris
from sdxlpipe.models.sgm import sgm_unet_name
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
    config = dict(unet.config)
    path = save_kohya_lycoris(tmp_path / "x.safetensors", networks.trained_state(unet, p), networks.config_dict(unet, p),
                              unet_config=config)
    saved = load_file(path)
    checked = 0
    for name, module in unet.named_modules():
        if not hasattr(module, "get_delta_weight") or networks.ADAPTER not in getattr(module, "scaling", {}):
            continue
        k = "lora_unet_" + sgm_unet_name(name, config).replace(".", "_")  # kohya's SGM names
        f = {key[len(k) + 1:]: v for key, v in saved.items() if key.startswith(k + ".")}
        alpha = float(f["alpha"])
        if network == "loha":
            # LyCORIS / ComfyUI: (w1a @ w1b) * (w2a @ w2b) * alpha / rank
            delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * alpha / f["hada_w1_b"].shape[0]
        else:
            # ComfyUI: kron(w1, w2) * alpha / dim when a factor is decomposed, else * 1
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
            if w2.dim() == 4:  # a full conv factor (comfy/weight_adapter/lokr.py LoKrAdapter.calculate_weight)
                w1 = w1.unsqueeze(2).unsqueeze(2)
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
    out = export.Params(formats=("unet",), output_dir=str(tmp_path / "out"), name="tuned")
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
    with pytest.raises(UserError, match="loha network cannot be written as diffusers") as error:
        export.run(table, dataclasses.replace(export.Params(), formats=("diffusers",), output_dir=str(tmp_path / "o")), ctx)
    assert '["kohya"]' in error.value.hint


def test_text_encoder_lora_goes_into_both_files_and_reloads_as_trained(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from sdxlpipe.models.tiny import save_tiny

    ctx = make_context(tmp_path / "te", rank=4, alpha=8.0, train_text_encoder=True)
    table = build_samples(ctx, 2)
    p = params(train_text_encoder=True, text_encoder_lr=1e-2, max_steps=2, save_every_steps=2)
    done = run_train(ctx, table, p)
    ctx.stage = "export"
    export.run(table, export.Params(output_dir=str(tmp_path / "out"), name="te"), ctx)
    kohya, diffusers = tmp_path / "out" / "te.safetensors", tmp_path / "out" / "te.diffusers.safetensors"
    with safe_open(kohya, "pt") as f:
        te_alphas = {float(f.get_tensor(k)) for k in f.keys() if k.startswith("lora_te") and k.endswith(".alpha")}
        assert {k[:8] for k in f.keys()} == {"lora_une", "lora_te1", "lora_te2"}
    assert te_alphas == {8.0}

    def embeds(pipe):
        with torch.no_grad():
            e, _, pooled, _ = pipe.encode_prompt("a shape number 1", device="cpu", do_classifier_free_guidance=False)
        return torch.cat([e.flatten(), pooled.flatten()])

    model = save_tiny(tmp_path / "tiny")
    trained = StableDiffusionXLPipeline.from_pretrained(model, local_files_only=True)
    base = embeds(trained)
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(trained, name)
        networks.attach_text_encoder(encoder, p)
        networks.load_text_encoder_state(encoder, load_file(done["outputs"][name]))
    want = embeds(trained)
    assert (want - base).abs().max() > 1e-4, "two steps at lr 1e-2 must move the encoders"
    for path in (kohya, diffusers):
        pipe = StableDiffusionXLPipeline.from_pretrained(model, local_files_only=True)
        pipe.load_lora_weights(str(path))
        assert (embeds(pipe) - want).abs().max() < 1e-5, path.name
