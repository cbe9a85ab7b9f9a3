"""The original SDXL (SGM / "LDM") names of the diffusers UNet's modules, derived from the UNet config.

kohya sd-scripts, A1111/Forge's per-block tools and single-file checkpoints
name UNet modules as Stability's generative-models code does
(`input_blocks.4.1.transformer_blocks.0.attn1.to_q`), diffusers as
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`. The block
indices depend on `layers_per_block` and on which levels have attention
and resamplers, so they are computed from the config, never hard-coded for
SDXL: the tiny stack (1 layer per block) and SDXL (2) get different indices.

Torch-free: works on names and a config dict only.
"""

from __future__ import annotations

import re

# Module renames outside the three block lists (diffusers -> SGM).
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# Inside a ResnetBlock2D (diffusers) / ResBlock (SGM).
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _per_level(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * levels


def sgm_unet_name(name: str, config: dict) -> str:
    """The SGM name (under `model.diffusion_model.`) of a diffusers UNet module or parameter name.

    Raises KeyError for a name the SGM layout has no place for.
    """
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    levels = len(down_types)
    down_layers = _per_level(config["layers_per_block"], levels)
    up_layers = [n + 1 for n in reversed(down_layers)]  # each up block has one resnet more
    for diffusers_name, sgm in _TOP.items():
        if name == diffusers_name or name.startswith(diffusers_name + "."):
            return sgm + name[len(diffusers_name):]
    if m := _MID.match(name):
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        index = 1 if kind == "attentions" else 2 * j  # resnet, attention, resnet
        return _join(f"middle_block.{index}", _inner(kind, rest))
    m = _BLOCK.match(name)
    if not m:
        raise KeyError(f"UNet module {name!r} has no place in the original SDXL layout")
    side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if side == "down_blocks":
        start = 1 + sum(down_layers[p] + 1 for p in range(i))  # + 1: each level's downsampler
        if kind == "downsamplers":
            # diffusers' Downsample2D.conv is SGM's Downsample.op
            return _join(f"input_blocks.{start + down_layers[i]}.0", re.sub(r"^conv(?=\.|$)", "op", rest or ""))
        return _join(f"input_blocks.{start + j}.{1 if kind == 'attentions' else 0}", _inner(kind, rest))
    start = sum(up_layers[:i])
    if kind == "upsamplers":
        slot = 2 if "CrossAttn" in up_types[i] else 1  # after the resnet (and the attention, if any)
        return _join(f"output_blocks.{start + up_layers[i] - 1}.{slot}", rest)
    return _join(f"output_blocks.{start + j}.{1 if kind == 'attentions' else 0}", _inner(kind, rest))


def _inner(kind: str, rest: str | None) -> str | None:
    if kind != "resnets" or not rest:
        return rest  # attention internals keep their names
    head, _, tail = rest.partition(".")
    if head not in _RESNET:
        raise KeyError(f"resnet module {head!r} has no place in the original SDXL layout")
    return _join(_RESNET[head], tail or None)


def _join(prefix: str, rest: str | None) -> str:
    return f"{prefix}.{rest}" if rest else prefix


def kohya_name(prefix: str, module: str) -> str:
    """kohya's module key: `lora_unet` + `input_blocks.4.1.proj_in` -> `lora_unet_input_blocks_4_1_proj_in`."""
    return f"{prefix}_" + module.replace(".", "_")


# --- whole checkpoints in the original layout ------------------------------------
# Prefixes of a single-file SDXL checkpoint (what A1111, ComfyUI and diffusers'
# from_single_file read): UNet, VAE, CLIP-L (HF names), OpenCLIP bigG (open_clip names).
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def sgm_vae_name(name: str, config: dict) -> str:
    """The original (LDM) name of a diffusers AutoencoderKL weight, without `first_stage_model.`."""
    levels = len(config["up_block_types"])
    parts = name.split(".")
    side = parts[0]
    if parts[1] in ("conv_in", "conv_out") or side in ("quant_conv", "post_quant_conv"):
        return name
    if parts[1] == "conv_norm_out":
        return f"{side}.norm_out.{parts[2]}"
    if parts[1] in ("down_blocks", "up_blocks"):
        i = int(parts[2]) if side == "encoder" else levels - 1 - int(parts[2])
        level = f"{side}.{'down' if side == 'encoder' else 'up'}.{i}"
        if parts[3] == "resnets":
            return f"{level}.block.{parts[4]}." + _rename(".".join(parts[5:]), _VAE_RESNET)
        return f"{level}.{'downsample' if parts[3] == 'downsamplers' else 'upsample'}." + ".".join(parts[5:])
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            return f"{side}.mid.block_{int(parts[3]) + 1}." + _rename(".".join(parts[4:]), _VAE_RESNET)
        return f"{side}.mid.attn_1." + _rename(".".join(parts[4:]), _VAE_ATTENTION)
    raise KeyError(f"VAE weight {name!r} has no place in the original layout")


def _rename(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def sgm_checkpoint(unet: dict, vae: dict, text_encoder: dict, text_encoder_2: dict,
                   unet_config: dict, vae_config: dict) -> dict:
    """Diffusers state dicts of the four SDXL components -> one single-file state dict (original layout).

    The inverse of what diffusers' from_single_file reads: the VAE's mid-block
    attention as 1x1 convolutions, OpenCLIP's q/k/v merged into in_proj and
    its text_projection stored transposed.
    """
    import torch

    out = {UNET_PREFIX + sgm_unet_name(k, unet_config): v for k, v in unet.items()}
    for k, v in vae.items():
        name = sgm_vae_name(k, vae_config)
        if ".mid.attn_1." in name and name.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[VAE_PREFIX + name] = v
    for k, v in text_encoder.items():
        if not k.endswith("position_ids"):
            out[TE1_PREFIX + (k if k.startswith("text_model.") else f"text_model.{k}")] = v
    te2 = {k.removeprefix("text_model."): v for k, v in text_encoder_2.items() if not k.endswith("position_ids")}
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in te2.items():
        if k == "text_projection.weight":
            out[TE2_PREFIX + "text_projection"] = v.T.contiguous()
        elif k == "embeddings.position_embedding.weight":
            out[TE2_PREFIX + "positional_embedding"] = v
        elif k == "embeddings.token_embedding.weight":
            out[TE2_PREFIX + "token_embedding.weight"] = v
        elif k.startswith("final_layer_norm."):
            out[TE2_PREFIX + "ln_final." + k.rpartition(".")[2]] = v
        elif m := re.match(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", k):
            merged.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = v
        elif m := re.match(r"^encoder\.layers\.(\d+)\.(.*)$", k):
            out[TE2_PREFIX + f"transformer.resblocks.{m[1]}." + _rename(m[2], _OPENCLIP_LAYER)] = v
        else:
            raise KeyError(f"text_encoder_2 weight {k!r} has no place in the OpenCLIP layout")
    for name, qkv in merged.items():
        out[TE2_PREFIX + name] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out
