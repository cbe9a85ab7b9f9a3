"""What a kohya user expects: the fixed bugs (debiased v weight, validation's negative prompt and sampler,
LoKr's full-matrix scale, EMA text-encoder weights) and kohya's defaults (targets, init)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdxlpipe.models.tiny import build_tiny_component, save_tiny
from sdxlpipe.training import losses, networks, validation
from tests.models import sdxl_unet
from tests.training.conftest import build_samples, make_context, params, run_train


# --- debiased estimation and zero terminal SNR ----------------------------------------------------------------

def _zero_snr_alphas() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         rescale_betas_zero_snr=True).alphas_cumprod


def test_debiased_weight_for_v_prediction_is_one_over_snr_plus_one_and_finite_at_zero_terminal_snr():
    snr = losses.snr(_zero_snr_alphas(), torch.tensor([0, 500, 999]))
    assert float(snr[2]) == 0.0  # the rescaled schedule ends in pure noise
    w = losses.debiased_weight(snr, "v_prediction")
    assert torch.allclose(w, 1 / (snr.clamp(max=1000) + 1))
    assert torch.isfinite(w).all() and float(w[2]) == 1.0
    assert torch.allclose(losses.debiased_weight(snr[:2], "epsilon"), 1 / snr[:2].clamp(max=1000).sqrt())


def test_v_pred_loss_like_noise_pred_weight_is_snr_over_snr_plus_one():
    snr = torch.tensor([0.0, 0.5, 4.0, 5000.0])
    assert torch.allclose(losses.v_pred_like_noise_pred_weight(snr), torch.tensor([0.0, 1 / 3, 0.8, 1000 / 1001]))


def test_zero_terminal_snr_v_prediction_with_debiased_estimation_trains_to_a_finite_loss(tmp_path):
    ctx = make_context(tmp_path / "ztsnr")
    # Only t = 999, where the rescaled schedule's SNR is 0.
    p = params(max_steps=8, save_every_steps=8, conv_rank=4, learning_rate=1e-2, prediction_type="v_prediction",
               zero_terminal_snr=True, debiased_estimation=True, min_timestep=999, max_timestep=1000)
    done = run_train(ctx, build_samples(ctx, 4), p)
    assert math.isfinite(done["final_loss"]) and math.isfinite(done["eval_loss_before"]), done
    assert done["eval_loss_after"] < done["eval_loss_before"], done


# --- validation ----------------------------------------------------------------------------------------------

def test_validation_without_a_negative_prompt_uses_the_empty_prompts_embedding(tmp_path):
    ctx = make_context(tmp_path / "neg")
    unet = build_tiny_component("unet")
    from sdxlpipe.models import loading

    sched = loading.load_noise_scheduler("tiny")
    kwargs = dict(seed=3, size=(64, 64), steps=2, guidance=5.0)
    none = validation.render(unet, ctx.models.text_stack(), ctx.models.vae(), sched, ["a red square"], (), **kwargs)
    empty = validation.render(unet, ctx.models.text_stack(), ctx.models.vae(), sched, ["a red square"], ("",), **kwargs)
    other = validation.render(unet, ctx.models.text_stack(), ctx.models.vae(), sched, ["a red square"], ("blue",), **kwargs)
    assert np.array_equal(np.asarray(none[0]), np.asarray(empty[0]))
    assert not np.array_equal(np.asarray(none[0]), np.asarray(other[0]))


def test_a_prediction_type_override_reaches_the_validation_sampler(tmp_path):
    """A model whose scheduler predicts v, and the tiny model told to predict v, validate alike."""
    model = save_tiny(tmp_path / "vmodel")
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    images = []
    for name, model_spec, override in (("config", str(model), ""), ("override", "tiny", "v_prediction")):
        ctx = make_context(tmp_path / name, model=model_spec)
        p = params(max_steps=1, save_every_steps=1, prediction_type=override, validation_prompts=("a red square",),
                   validation_every_steps=1, validation_steps=3, validation_guidance=1.0)
        done = run_train(ctx, build_samples(ctx, 2), p)
        images.append(np.asarray(Image.open(Path(done["outputs"]["validation"]) / "step-00000001" / "prompt-00.png")))
    assert np.array_equal(images[0], images[1])


# --- LoKr ---------------------------------------------------------------------------------------------------------

def _lokr_layers(unet):
    return [m for m in unet.modules() if hasattr(m, "lokr_w1") and networks.ADAPTER in m.scaling]


def test_lokr_with_full_matrix_factors_trains_at_scale_one_as_lycoris():
    unet = build_tiny_component("unet").requires_grad_(False)
    networks.attach(unet, params(network="lokr", rank=10000, alpha=1.0))  # LyCORIS's full-matrix recipe
    layers = _lokr_layers(unet)
    assert layers and all(m.scaling[networks.ADAPTER] == 1.0 for m in layers)
    assert all(networks.ADAPTER in m.lokr_w2 for m in layers)  # w2 really is one full matrix


def test_lokr_with_a_decomposed_factor_keeps_alpha_over_rank_and_the_factor_sets_w1():
    unet = build_tiny_component("unet").requires_grad_(False)
    networks.attach(unet, params(network="lokr", rank=2, alpha=1.0, lokr_factor=4, target_modules=("to_q",)))
    layers = _lokr_layers(unet)
    assert layers and all(m.scaling[networks.ADAPTER] == 0.5 for m in layers)
    assert all(m.lokr_w1[networks.ADAPTER].shape == (4, 4) for m in layers)
    assert all(networks.ADAPTER in m.lokr_w2_a for m in layers)


# --- targets and init -----------------------------------------------------------------------------------------------

def _lora_modules(model) -> set[str]:
    return {n.removesuffix(".lora_A.default") for n, _ in model.named_modules() if n.endswith(".lora_A.default")}


def test_default_targets_are_kohyas_every_linear_of_the_transformer_blocks_and_the_text_encoders_mlp():
    unet = build_tiny_component("unet").requires_grad_(False)
    inside = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attentions." in f".{n}"}
    networks.attach(unet, params())
    adapted = _lora_modules(unet)
    assert adapted == inside
    kinds = {"proj_in", "proj_out", "attn1.to_q", "attn2.to_k", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"}
    assert all(any(n.endswith(k) for n in adapted) for k in kinds)
    attention = build_tiny_component("unet").requires_grad_(False)
    networks.attach(attention, params(target_modules=("attention",)))
    assert _lora_modules(attention) == {n for n in inside if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    encoder = build_tiny_component("text_encoder").requires_grad_(False)
    networks.attach_text_encoder(encoder, params())
    assert {n.rsplit(".", 1)[-1] for n in _lora_modules(encoder)} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def test_lora_init_is_kaiming_uniform_with_a_zero_b_as_kohya_and_peft():
    unet = build_tiny_component("unet").requires_grad_(False)
    networks.attach(unet, params(rank=8))
    for name, module in unet.named_modules():
        if name.endswith(".lora_A.default"):
            w = module.weight
            bound = 1 / math.sqrt(w.shape[1])  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert float(w.abs().max()) <= bound
            assert float(w.abs().max()) > 0.5 * bound
        if name.endswith(".lora_B.default"):
            assert not module.weight.any()


@pytest.fixture(scope="module")
def sdxl_unet_on_meta():
    return sdxl_unet.sdxl_unet_on_meta()


@pytest.mark.parametrize("preset, modules, size", [("kohya", 722, 42_557_440), ("attention", 560, 23_224_320)])
def test_lora_on_the_real_sdxl_unet_counts_as_kohyas(sdxl_unet_on_meta, preset, modules, size):
    targets = networks.target_names(sdxl_unet_on_meta, params(rank=16, target_modules=(preset,)))
    layers = dict(sdxl_unet_on_meta.named_modules())
    count = sum(r * (layers[n].in_features + layers[n].out_features) for n, (r, _) in targets.items())
    assert (len(targets), count) == (modules, size)


@pytest.mark.parametrize("asked, sdxl, tiny", [(None, True, False), (True, True, True), (False, False, False)])
def test_gradient_checkpointing_turns_on_for_an_sdxl_sized_unet_and_stays_off_for_tiny_unless_asked(
        sdxl_unet_on_meta, asked, sdxl, tiny):
    sdxl_unet_on_meta.disable_gradient_checkpointing()  # the fixture is shared
    tiny_unet = build_tiny_component("unet")
    p = params(gradient_checkpointing=asked)
    assert networks.gradient_checkpointing(sdxl_unet_on_meta, p) is sdxl
    assert networks.gradient_checkpointing(tiny_unet, p) is tiny
    assert (sdxl_unet_on_meta.is_gradient_checkpointing, tiny_unet.is_gradient_checkpointing) == (sdxl, tiny)


# --- EMA with text-encoder training -------------------------------------------------------------------------------

def test_ema_pairs_the_ema_unet_with_the_ema_text_encoders(tmp_path):
    ctx = make_context(tmp_path / "ema")
    p = params(max_steps=4, save_every_steps=4, ema_decay=0.5, train_text_encoder=True, learning_rate=1e-2)
    done = run_train(ctx, build_samples(ctx, 2), p)
    out = done["outputs"]
    assert out["weights"].endswith("adapter.ema.safetensors")
    checkpoint = Path(out["checkpoint"])
    for name in ("text_encoder", "text_encoder_2"):
        assert out[name] == str(checkpoint / f"{name}.ema.safetensors")
        ema, raw = load_file(out[name]), load_file(checkpoint / f"{name}.safetensors")
        assert ema.keys() == raw.keys()
        assert any(not torch.equal(ema[k], raw[k]) for k in raw)


# --- DoRA, conv_block_dims, text-encoder LoRA+ ----------------------------------------------------------------------

def test_dora_trains_and_saves_its_magnitudes(tmp_path):
    ctx = make_context(tmp_path / "dora")
    done = run_train(ctx, build_samples(ctx, 4), params(use_dora=True, conv_rank=4, learning_rate=1e-2,
                                                        max_steps=6, save_every_steps=6))
    assert done["eval_loss_after"] < done["eval_loss_before"], done
    saved = load_file(done["outputs"]["weights"])
    assert any("lora_magnitude_vector" in k for k in saved)
    assert json.loads(Path(done["outputs"]["network_config"]).read_text())["use_dora"] is True


def test_conv_block_dims_give_each_blocks_convolutions_their_rank():
    unet = build_tiny_component("unet")
    dims = [2] * 23
    dims[1] = 0  # input block 0 (conv_in's block) left out
    dims[13] = 3
    p = params(conv_rank=4, conv_alpha=1.0, conv_block_dims=tuple(dims), conv_block_alphas=tuple([0.5] * 23))
    targets = networks.target_names(unet, p)
    modules = dict(unet.named_modules())
    # kxk convolutions; 1x1 ones take the linear rank (kohya, decision 53)
    convs = {n: ra for n, ra in targets.items()
             if isinstance(modules[n], torch.nn.Conv2d) and modules[n].kernel_size != (1, 1)}
    layers = unet.config.layers_per_block
    blocks = {n: networks.block_index(n, layers) for n in convs}
    assert convs and 1 not in blocks.values()
    assert all(convs[n] == ((3, 0.5) if blocks[n] == 13 else (2, 0.5)) for n in convs)
    assert any(b == 13 for b in blocks.values())


def test_text_encoder_lora_plus_gives_the_b_matrices_their_own_ratio():
    from sdxlpipe.training import optimizers

    encoders = [build_tiny_component(n).requires_grad_(False) for n in ("text_encoder", "text_encoder_2")]
    p = params(lora_plus_ratio=16.0, text_encoder_lora_plus_ratio=4.0, text_encoder_lr=1e-4)
    for e in encoders:
        networks.attach_text_encoder(e, p)
    groups = optimizers.text_encoder_groups(encoders, p)
    names = {id(q): n for e in encoders for n, q in e.named_parameters()}
    rates = {names[id(q)]: g["lr"] for g in groups for q in g["params"]}
    assert rates and all(r == pytest.approx(4e-4 if ".lora_B." in n else 1e-4) for n, r in rates.items())
    # 0 takes the UNet's ratio, as kohya's loraplus_text_encoder_lr_ratio falls back to loraplus_lr_ratio.
    fallback = optimizers.text_encoder_groups(encoders, params(lora_plus_ratio=16.0, text_encoder_lr=1e-4))
    assert sorted(g["lr"] for g in fallback) == pytest.approx([1e-4, 16e-4])


# --- LoCon: kohya's modules (decision 53) ----------------------------------------------------------------------------

@pytest.mark.parametrize("conv_rank, modules", [(8, 788), (0, 722)])
def test_locon_on_the_real_sdxl_unet_adapts_kohyas_788_modules(sdxl_unet_on_meta, conv_rank, modules):
    """kohya-ss/sd-scripts networks/lora.py, LoRANetwork.create_modules: with conv_dim set, every Linear and Conv2d
    inside ResnetBlock2D / Downsample2D / Upsample2D is adapted; Linear and 1x1 Conv2d get network_dim/alpha, kxk
    Conv2d conv_dim/conv_alpha. On SDXL: 722 transformer Linears + 17 resnet time-embedding projections (SGM
    emb_layers.1) + 11 1x1 skip convolutions + 38 3x3 convolutions = 788 (we adapted 771, without the 17)."""
    targets = networks.target_names(sdxl_unet_on_meta, params(rank=16, alpha=8.0, conv_rank=conv_rank, conv_alpha=2.0))
    layers = dict(sdxl_unet_on_meta.named_modules())
    assert len(targets) == modules
    if not conv_rank:
        return
    emb = [n for n in targets if n.endswith(".time_emb_proj")]
    skip = [n for n in targets if isinstance(layers[n], torch.nn.Conv2d) and layers[n].kernel_size == (1, 1)]
    kxk = [n for n in targets if isinstance(layers[n], torch.nn.Conv2d) and layers[n].kernel_size == (3, 3)]
    assert (len(emb), len(skip), len(kxk)) == (17, 11, 38)
    assert all(targets[n] == (16, 8.0) for n in emb + skip)  # the linear rank and alpha, as kohya's
    assert all(targets[n] == (8, 2.0) for n in kxk)


def test_locon_with_block_dims_gives_resnet_linears_and_skips_the_blocks_linear_rank():
    """kohya's create_modules with block_dims: `is_linear or is_conv2d_1x1` takes block_dims[block], kxk takes
    conv_block_dims[block] (here conv_dim everywhere)."""
    unet = build_tiny_component("unet")
    dims = tuple(range(1, 24))
    targets = networks.target_names(unet, params(conv_rank=4, conv_alpha=1.0, block_dims=dims, block_alphas=dims))
    layers = dict(unet.named_modules())
    per_block = unet.config.layers_per_block
    resnet_linear = [n for n in targets if n.endswith((".time_emb_proj", ".conv_shortcut"))]
    assert any(n.endswith(".time_emb_proj") for n in resnet_linear)
    assert any(n.endswith(".conv_shortcut") for n in resnet_linear)
    for n in resnet_linear:
        b = networks.block_index(n, per_block)
        assert targets[n] == (dims[b], float(dims[b])), n
    assert all(targets[n] == (4, 1.0) for n in targets
               if isinstance(layers[n], torch.nn.Conv2d) and layers[n].kernel_size != (1, 1))


def _train_key(**kw) -> str:
    import pyarrow as pa

    from sdxlpipe.pipeline.keys import item_key
    from sdxlpipe.stages import train

    table = pa.table({"caption": ["a", "b"], "latent_key": ["1" * 32, "2" * 32], "text_key": ["3" * 32, "4" * 32],
                      "empty_text_key": ["5" * 32] * 2, "repeats": [1, 2]})
    return item_key(train.key_doc(table, train.Params(**kw), {"unet": "unetfp", "scheduler": "schedfp"}))


def test_the_train_key_moves_for_locon_runs_and_for_a_gaussian_init_only():
    """The literals are the keys before decisions 53 and 55: a run without conv_rank and with the default init keeps
    its key (its checkpoints still resume); a LoCon run, whose network changed, and a gaussian-init run get new ones."""
    assert _train_key() == "8f12a4fb395b2d24e26cc0d633d2579f"
    assert _train_key(lora_init="kohya", rank=16) == "8f12a4fb395b2d24e26cc0d633d2579f"
    assert _train_key(conv_rank=8, conv_alpha=4.0) != "7928e54d33cce189d7d213e755809727"
    assert _train_key(network="loha", conv_rank=4) != "dbf1b0170bef3dd49fe88dd3d50a12fc"
    assert _train_key(lora_init="gaussian") not in ("8f12a4fb395b2d24e26cc0d633d2579f", _train_key(conv_rank=8))


def test_lora_init_gaussian_is_diffusers_std_one_over_rank_on_the_unet_and_text_encoders():
    """diffusers examples/text_to_image/train_text_to_image_lora_sdxl.py: LoraConfig(init_lora_weights="gaussian")
    for the UNet and both text encoders; peft's LoraLayer.reset_lora_parameters draws A from N(0, 1/r), B = 0."""
    rank = 8
    p = params(rank=rank, lora_init="gaussian")
    unet = build_tiny_component("unet").requires_grad_(False)
    networks.attach(unet, p)
    encoder = build_tiny_component("text_encoder").requires_grad_(False)
    networks.attach_text_encoder(encoder, p)
    for model in (unet, encoder):
        a = torch.cat([m.weight.flatten() for n, m in model.named_modules() if n.endswith(".lora_A.default")])
        b = [m.weight for n, m in model.named_modules() if n.endswith(".lora_B.default")]
        assert abs(float(a.std()) - 1 / rank) < 0.05 / rank and abs(float(a.mean())) < 0.01 / rank
        assert float(a.abs().max()) > 3 / rank  # a normal's tails: kaiming-uniform is bounded by 1/sqrt(fan_in)
        assert b and not any(w.any() for w in b)
