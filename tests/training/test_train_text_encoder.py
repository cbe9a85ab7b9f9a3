"""Text-encoder training: captions encoded in the loop, both encoders' LoRA trained and saved."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from safetensors.torch import load_file

from sdxlpipe.models.tiny import build_tiny_component
from sdxlpipe.training import networks
from tests.training.conftest import build_samples, make_context, params, run_train


def test_text_encoder_lora_trains_from_captions_without_the_text_cache(tmp_path):
    ctx = make_context(tmp_path / "te")
    rows = build_samples(ctx, 4).to_pylist()
    for r in rows:  # in-loop encoding must not need a single cached text item
        r["text_key"], r["empty_text_key"], r["text_variant_keys"] = "not-cached", None, None
    p = params(train_text_encoder=True, text_encoder_lr=1e-2, conv_rank=4, learning_rate=1e-2, caption_dropout=0.25,
               max_steps=6, save_every_steps=6, validation_prompts=("a shape",), validation_every_steps=6,
               validation_steps=2)
    done = run_train(ctx, pa.Table.from_pylist(rows), p)
    assert done["eval_loss_after"] < done["eval_loss_before"], done
    assert (Path(done["outputs"]["validation"]) / "step-00000006" / "grid.png").exists()
    for name in ("text_encoder", "text_encoder_2"):
        saved = load_file(done["outputs"][name])
        fresh = build_tiny_component(name).requires_grad_(False)
        networks.attach_text_encoder(fresh, p)
        initial = networks.text_encoder_state(fresh)
        assert saved.keys() == initial.keys() and any("lora_B" in k for k in saved)
        assert any(not torch.equal(saved[k], initial[k]) for k in saved if "lora_B" in k), name
