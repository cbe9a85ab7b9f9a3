"""train.network_weights starts a run from exactly the weights of a kohya-format LoRA file sdxlpipe exported
(SGM module names, alpha != rank), read as `lora info` reads it; a file that does not fit is refused clearly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdxlpipe.errors import UserError
from sdxlpipe.lora.formats import save_kohya_lora
from sdxlpipe.models.loading import load_unet
from sdxlpipe.training import networks
from tests.training.conftest import build_samples, make_context, params, run_train
from tests.lora.conftest import unet_output

# alpha != rank (and conv layers too): a scale bug shows in the output.
NET = dict(rank=4, alpha=8.0, conv_rank=4, conv_alpha=2.0)


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory):
    """A kohya-format file of a LoRA with random (non-zero) weights, and the output of the UNet it came from."""
    p = params(**NET)
    unet = load_unet("tiny")
    networks.attach(unet, p)
    g = torch.Generator().manual_seed(7)
    for q in unet.parameters():
        if q.requires_grad:
            q.data = torch.randn(q.shape, generator=g) * 0.1
    path = tmp_path_factory.mktemp("lora") / "start.safetensors"
    save_kohya_lora(path, networks.trained_state(unet, p), networks.config_dict(unet, p), unet_config=dict(unet.config))
    return path, unet_output(unet)


def test_kohya_file_has_sgm_names_and_alpha_not_rank(kohya_file):
    state = load_file(kohya_file[0])
    assert any(k.startswith("lora_unet_input_blocks_") for k in state)
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {8.0, 2.0}


def test_training_starts_from_exactly_the_kohya_files_weights(tmp_path, kohya_file):
    path, expected = kohya_file
    ctx = make_context(tmp_path / "ws")
    # One step at a learning rate too small to move the weights: what is saved is what training started from.
    p = params(**NET, max_steps=1, save_every_steps=1, learning_rate=1e-12, network_weights=str(path))
    done = run_train(ctx, build_samples(ctx, 2), p)
    unet = load_unet("tiny")
    networks.attach(unet, p)
    fresh = unet_output(unet)
    networks.load_trained_state(unet, p, load_file(done["outputs"]["weights"]))
    assert (unet_output(unet) - expected).abs().max() < 1e-5
    assert (fresh - expected).abs().max() > 1e-3  # the file's LoRA changes the output


@pytest.mark.parametrize("change, says", [(dict(alpha=4.0), "alpha 8"), (dict(rank=8, alpha=16.0), "rank 4"),
                                          (dict(conv_rank=0), "modules this run's network does not")])
def test_a_file_that_does_not_fit_the_network_is_refused_naming_it(tmp_path, kohya_file, change, says):
    path, _ = kohya_file
    unet = load_unet("tiny")
    p = params(**{**NET, **change})
    networks.attach(unet, p)
    with pytest.raises(UserError, match=says) as err:
        networks.load_network_weights(str(path), {"unet": unet}, text_encoders=False)
    assert str(path) in err.value.what and "train.rank" in err.value.hint


@pytest.fixture(scope="module")
def kohya_file_with_text_encoders(tmp_path_factory):
    """A kohya-format file adapting the UNet and both text encoders (lora_te1_/lora_te2_), and its weights."""
    from sdxlpipe.models.loading import load_text_stack

    p = params(**NET, train_text_encoder=True)
    unet = load_unet("tiny")
    networks.attach(unet, p)
    encoders = load_text_stack("tiny")
    g = torch.Generator().manual_seed(8)
    for model in (unet, encoders["text_encoder"], encoders["text_encoder_2"]):
        if model is not unet:
            networks.attach_text_encoder(model, p)
        for q in model.parameters():
            if q.requires_grad:
                q.data = torch.randn(q.shape, generator=g) * 0.1
    text = {n: (networks.text_encoder_state(encoders[n]), {"r": p.rank, "lora_alpha": p.alpha})
            for n in ("text_encoder", "text_encoder_2")}
    path = tmp_path_factory.mktemp("lora") / "with-te.safetensors"
    save_kohya_lora(path, networks.trained_state(unet, p), networks.config_dict(unet, p), text_encoders=text,
                    unet_config=dict(unet.config))
    return path, networks.trained_state(unet, p), {n: s for n, (s, _) in text.items()}


def test_text_encoders_start_from_the_files_weights_when_trained(tmp_path, kohya_file_with_text_encoders):
    path, unet_state, text_states = kohya_file_with_text_encoders
    assert any(k.startswith("lora_te2_") for k in load_file(path))
    ctx = make_context(tmp_path / "ws")
    p = params(**NET, train_text_encoder=True, text_encoder_lr=1e-12, max_steps=1, save_every_steps=1,
               learning_rate=1e-12, network_weights=str(path))
    done = run_train(ctx, build_samples(ctx, 2), p)
    for saved, source in [(load_file(done["outputs"]["weights"]), unet_state),
                          *((load_file(done["outputs"][n]), text_states[n]) for n in text_states)]:
        assert saved.keys() == source.keys()
        assert all(torch.allclose(saved[k], source[k], atol=1e-6) for k in saved)


def test_a_unet_only_run_refuses_a_file_that_adapts_the_text_encoders(kohya_file_with_text_encoders):
    path = kohya_file_with_text_encoders[0]
    unet = load_unet("tiny")
    networks.attach(unet, params(**NET))
    with pytest.raises(UserError, match="also adapts the text encoders") as err:
        networks.load_network_weights(str(path), {"unet": unet}, text_encoders=False)
    assert "train_text_encoder = true" in err.value.hint


def test_a_dora_run_starts_from_a_checkpoints_adapter_file_with_its_magnitudes(tmp_path):
    from safetensors.torch import save_file

    p = params(**NET, use_dora=True)
    source = load_unet("tiny")
    networks.attach(source, p)
    g = torch.Generator().manual_seed(9)
    for q in source.parameters():
        if q.requires_grad:
            q.data = torch.randn(q.shape, generator=g) * 0.1 + (1.0 if q.dim() == 1 else 0.0)
    path = tmp_path / "adapter.safetensors"  # what a checkpoint holds: peft keys
    save_file(networks.trained_state(source, p), path)
    unet = load_unet("tiny")
    networks.attach(unet, p)
    networks.load_network_weights(str(path), {"unet": unet}, text_encoders=False)
    assert (unet_output(unet) - unet_output(source)).abs().max() < 1e-5
