"""Configs of the built-in tiny SDXL stack, as plain JSON-able data.

Torch-free on purpose: `fingerprints.py` hashes these configs on the no-op
path, where importing torch (3 s) is not allowed. `tiny.py` builds the models
from them. Sizes follow docs measured on this machine
(shared/reference/tiny-model.md): every SDXL code path runs, on a CPU, in
milliseconds.
"""

from __future__ import annotations

import copy

# Bump when a config below or the way tiny.py initialises weights changes:
# it enters the "tiny" model fingerprint, so cached latents and text
# embeddings made with the old weights become stale.
TINY_VERSION = 1

# Merged BPE symbols of the generated tokenizer vocab. Any list works; these
# are common English bigrams so captions tokenize into fewer, more varied ids.
_BIGRAMS = [
    "th", "he", "in", "er", "an", "re", "on", "at", "en", "nd",
    "ti", "es", "or", "te", "of", "ed", "is", "it", "al", "ar",
    "st", "to", "nt", "ng", "se", "ha", "as", "ou", "io", "le",
]

_TEXT_ENCODER = {
    "vocab_size": None,  # filled in from the tokenizer vocab below
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",  # CLIP ViT-L, like SDXL's text_encoder
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
}

# Must differ in width from text_encoder: diffusers' single-file loader tells
# the two encoders apart by width, and never loads the projection otherwise.
_TEXT_ENCODER_2 = {
    **_TEXT_ENCODER,
    "hidden_size": 64,
    "intermediate_size": 128,
    "hidden_act": "gelu",  # OpenCLIP bigG, like SDXL's text_encoder_2
    "projection_dim": 32,
}

_UNET = {
    "sample_size": 16,  # pipeline default height/width: 16 * 8 = 128 px
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4, 4],
    "transformer_layers_per_block": [1, 1, 2],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    # 6 micro-conditioning ids x 8 + pooled width of text_encoder_2 (32)
    "projection_class_embeddings_input_dim": 80,
    "cross_attention_dim": 96,  # 32 + 64: both encoders' hidden states, concatenated
    "norm_num_groups": 32,
}

_VAE = {
    # Four levels downsample x8 like SDXL's VAE (diffusers' test VAE only x2).
    "block_out_channels": [32, 32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 128,
    "scaling_factor": 0.13025,  # SDXL's
}

# SDXL base's scheduler values.
_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def _tokenizer(pad_token: str) -> dict:
    return {"bigrams": list(_BIGRAMS), "pad_token": pad_token, "model_max_length": 77}


def tiny_tokenizer(name: str = "tokenizer", seed: int = 0):
    """The tiny stack's tokenizer (transformers, no torch): `inspect` counts caption tokens with it."""
    from transformers import CLIPTokenizer

    cfg = tiny_configs(seed)[name]
    vocab, merges = tokenizer_vocab(cfg["bigrams"])
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=cfg["pad_token"], model_max_length=cfg["model_max_length"])


def tokenizer_vocab(bigrams: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style byte-level BPE vocab and merges, generated in code.

    256 byte symbols, their end-of-word forms, each bigram as a merge both
    inside and at the end of a word, then the two CLIP specials.
    """
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for pair in bigrams:
        a, b = pair[0], pair[1]
        merges += [(a, b), (a, b + "</w>")]
        tokens += [a + b, a + b + "</w>"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _bytes_to_unicode() -> list[str]:
    # GPT-2 / CLIP's printable stand-ins for the 256 byte values, in CLIP's order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_configs(seed: int = 0) -> dict:
    """Every component's config plus the seed, as a fresh JSON-able dict."""
    vocab, _ = tokenizer_vocab(_BIGRAMS)
    specials = {
        "vocab_size": len(vocab),
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
    }
    te1 = {**_TEXT_ENCODER, **specials, "pad_token_id": vocab["<|endoftext|>"]}
    te2 = {**_TEXT_ENCODER_2, **specials, "pad_token_id": vocab["!"]}
    return copy.deepcopy({
        "seed": seed,
        "unet": _UNET,
        "vae": _VAE,
        "text_encoder": te1,
        "text_encoder_2": te2,
        "tokenizer": _tokenizer("<|endoftext|>"),
        "tokenizer_2": _tokenizer("!"),  # SDXL's tokenizer_2 pads with "!"
        "scheduler": _SCHEDULER,
    })
