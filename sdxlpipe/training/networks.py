"""What gets trained: a peft network on the UNet (LoRA, LoCon, LoHa, LoKr, IA3, OFT) or the whole UNet.

Target modules are listed by their full names, so `rank_pattern` can give
each one its block's rank (kohya's `block_dims`) and a rank of 0 leaves a
block out. Blocks are kohya's 23 for SDXL (sdxl_train_util's block_lr):
0 time/label embedding, 1-9 input_blocks 0-8, 10-12 middle_block 0-2,
13-21 output_blocks 0-8, 22 out; diffusers names are mapped onto them.
"""

from __future__ import annotations

import torch

ADAPTER = "default"
NUM_BLOCKS = 23
# LoCon: the convolutions kohya's LoCon (conv_dim) trains, inside these modules.
CONV_PARENTS = ("resnets", "downsamplers", "upsamplers")


def block_index(name: str, layers_per_block: int) -> int:
    """kohya's SDXL block (0-22) of a diffusers UNet module or parameter name."""
    parts = name.split(".")
    L = layers_per_block
    head = parts[0]
    if head in ("time_embedding", "add_embedding", "time_proj", "add_time_proj"):
        return 0
    if head == "conv_in":
        return 1
    if head == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        j = L if kind == "downsamplers" else int(parts[3])
        return min(1 + 1 + i * (L + 1) + j, 9)
    if head == "mid_block":
        kind, j = parts[1], int(parts[2])
        return 11 if kind == "attentions" else 10 + 2 * j
    if head == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        j = L if kind == "upsamplers" else int(parts[3])
        return min(13 + i * (L + 1) + j, 21)
    return 22  # conv_norm_out, conv_out


def target_names(unet, p) -> dict[str, tuple[int, float]]:
    """{full module name: (rank, alpha)} for every module the network adapts."""
    layers = unet.config.layers_per_block
    layers = layers if isinstance(layers, int) else layers[0]
    out: dict[str, tuple[int, float]] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in p.target_modules):
            rank, alpha = p.rank, p.alpha
            if p.block_dims:
                b = block_index(name, layers)
                rank = p.block_dims[b]
                alpha = p.block_alphas[b] if p.block_alphas else p.alpha
        elif p.conv_rank and isinstance(module, torch.nn.Conv2d) and any(f".{c}." in f".{name}." for c in CONV_PARENTS):
            rank, alpha = p.conv_rank, p.conv_alpha
        else:
            continue
        if rank > 0:
            out[name] = (rank, alpha)
    return out


def peft_config(unet, p):
    """The peft config for `p.network`, with per-module ranks and alphas."""
    import peft

    targets = target_names(unet, p)
    if not targets:
        from sdxlpipe.errors import UserError

        raise UserError(f"train.target_modules {list(p.target_modules)} match no layer of the UNet",
                         'use attention projections such as ["to_q", "to_k", "to_v", "to_out.0"]')
    names = sorted(targets)
    # peft reads pattern keys as regexes; full names match only themselves.
    ranks = {n: r for n, (r, _) in targets.items() if r != p.rank}
    alphas = {n: a for n, (_, a) in targets.items() if a != p.alpha}
    if p.network == "lora":
        return peft.LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout, init_lora_weights="gaussian",
                               target_modules=names, rank_pattern=ranks, alpha_pattern=alphas)
    if p.network == "loha":
        return peft.LoHaConfig(r=p.rank, alpha=p.alpha, rank_dropout=p.dropout, target_modules=names,
                               rank_pattern=ranks, alpha_pattern=alphas)
    if p.network == "lokr":
        return peft.LoKrConfig(r=p.rank, alpha=p.alpha, rank_dropout=p.dropout, target_modules=names,
                               rank_pattern=ranks, alpha_pattern=alphas)
    if p.network == "ia3":
        return peft.IA3Config(target_modules=names, feedforward_modules=[])
    if p.network == "oft":
        # OFT's block size must divide every adapted layer's width.
        return peft.OFTConfig(r=0, oft_block_size=p.rank, module_dropout=p.dropout, target_modules=names)
    raise ValueError(f"network {p.network!r} has no peft config")


def attach(unet, p) -> None:
    """Make `p.network` trainable on `unet` (in place); everything else stays frozen."""
    if p.network == "full":
        unet.requires_grad_(True)
        return
    unet.add_adapter(peft_config(unet, p), adapter_name=ADAPTER)


def weights_file(p, ema: bool = False) -> str:
    """The checkpoint file of the trained weights (adapter.safetensors: the name the skeleton used)."""
    name = "unet" if p.network == "full" else "adapter"
    return f"{name}.ema.safetensors" if ema else f"{name}.safetensors"


def trained_state(unet, p) -> dict[str, torch.Tensor]:
    """The weights this run trains, as saved in a checkpoint."""
    if p.network == "full":
        state = unet.state_dict()
    else:
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    # A copy: the caller may keep it while training goes on.
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def load_trained_state(unet, p, state: dict[str, torch.Tensor]) -> None:
    if p.network == "full":
        unet.load_state_dict(state)
        return
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint has keys the network lacks: {unexpected[:3]}")


def config_dict(unet, p) -> dict:
    """The network's config as JSON (export reads it): peft's dict (its `peft_type` names the
    network; diffusers reads it back as LoraConfig kwargs, so nothing is added), or {"network": "full"}."""
    if p.network == "full":
        return {"network": "full"}
    d = unet.peft_config[ADAPTER].to_dict()
    plain = {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()
             if isinstance(v, (str, int, float, bool, list, set, dict, type(None)))}
    return plain


# The CLIP attention projections kohya's and diffusers' text-encoder LoRAs train.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def attach_text_encoder(encoder, p) -> None:
    """A LoRA of `p.rank`/`p.alpha` on a CLIP text encoder (in place); the rest stays frozen."""
    from peft import LoraConfig

    encoder.add_adapter(LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout, init_lora_weights="gaussian",
                                   target_modules=TEXT_ENCODER_TARGETS), adapter_name=ADAPTER)


def text_encoder_state(encoder) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().clone().contiguous()
            for k, v in get_peft_model_state_dict(encoder, adapter_name=ADAPTER).items()}


def load_text_encoder_state(encoder, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(encoder, state, adapter_name=ADAPTER)
