"""The encode stages on a GPU: the fp16 VAE's NaN guard, reduced-precision latents, text embeddings.

Skipped (and counted) without CUDA; `pytest -m cuda` on a GPU machine runs them.
"""

from __future__ import annotations

import logging

import pytest
import torch

from sdxlpipe.cache_format import decode_tensors, open_store
from sdxlpipe.config import load_config
from sdxlpipe.pipeline.runner import run_pipeline
from tests.encode_data import make_dataset
from tests.stages.test_vae_encode import broken_fp16_vae

pytestmark = pytest.mark.cuda
DEVICE = "cuda"


def encode(config, *sets, target="vae_encode"):
    cfg = load_config(config, [f'device="{DEVICE}"', *sets])
    return cfg, run_pipeline(cfg, target)


def latents(cfg) -> dict[str, torch.Tensor]:
    from sdxlpipe.pipeline.workspace import Workspace

    store = open_store(cfg.store_url)
    rows = Workspace(cfg.workspace).read_table("vae_encode").to_pylist()
    return {r["source"]: decode_tensors(store.read("vae_encode", r["latent_key"]), "pt")[0]["mean"] for r in rows}


def test_non_finite_fp16_latents_are_encoded_again_in_fp32_on_the_gpu(tmp_path, caplog):
    config = make_dataset(tmp_path, 4)
    broken_fp16_vae(tmp_path / "vae")
    with caplog.at_level(logging.WARNING, logger="sdxlpipe"):
        cfg, report = encode(config, f'vae="{tmp_path / "vae"}"', 'vae_encode.dtype="float16"')
    assert report["stages"]["vae_encode"]["computed"] == 4
    assert "encoded again in float32" in caplog.text
    assert all(torch.isfinite(m).all() for m in latents(cfg).values())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_latents_on_the_gpu_match_fp32_ones(tmp_path, dtype):
    config = make_dataset(tmp_path, 4)
    cfg32, _ = encode(config)
    reduced, _ = encode(config, f'vae_encode.dtype="{dtype}"')
    want, got = latents(cfg32), latents(reduced)
    assert want.keys() == got.keys()
    for source in want:
        torch.testing.assert_close(got[source].float(), want[source].float(), rtol=5e-2, atol=5e-2)


def test_text_embeddings_on_the_gpu_match_the_cpus(tmp_path):
    from sdxlpipe.models.loading import load_text_stack
    from sdxlpipe.models.sdxl import encode_prompts

    texts = ["a red square", "a blue circle on a long caption " * 6, ""]
    cpu = encode_prompts(texts, load_text_stack("tiny"))
    gpu = encode_prompts(texts, load_text_stack("tiny", device=DEVICE))
    for a, b in zip(cpu, gpu):
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)
