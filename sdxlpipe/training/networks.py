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
# Above this many parameters the UNet counts as SDXL-sized (2.6e9; SD 1.5: 0.86e9): gradient checkpointing
# defaults to on, since a 1024 px SDXL step's activations alone outgrow a 24 GB card without it.
SDXL_SIZED = 1e9
# LoCon: with conv_dim set, kohya's networks/lora.py (LoRANetwork.create_modules) adapts every Linear and Conv2d
# inside its ResnetBlock2D / Downsample2D / Upsample2D modules (diffusers: resnets, downsamplers, upsamplers): the
# kxk convolutions at conv_dim/conv_alpha, and the time-embedding projection (time_emb_proj; SGM emb_layers.1) and
# the 1x1 skip convolution (conv_shortcut; SGM skip_connection) at network_dim/network_alpha, as Linear layers are.
CONV_PARENTS = ("resnets", "downsamplers", "upsamplers")
# target_modules presets. "kohya": what kohya's SDXL LoRA (networks/lora.py) adapts, every Linear inside a
# Transformer2DModel (diffusers names them `...attentions.N...`: proj_in, proj_out, attn1/attn2 to_q/k/v/out.0,
# ff.net.0.proj, ff.net.2). "attention": the attention projections only (sdxlpipe's default before).
UNET_PRESETS = {"kohya": None, "attention": ("to_q", "to_k", "to_v", "to_out.0")}
# The text encoders' targets: kohya's CLIPAttention and CLIPMLP, or the attention projections only.
TEXT_ENCODER_TARGETS = {"kohya": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                        "attention": ["q_proj", "k_proj", "v_proj", "out_proj"]}


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
        locon = p.conv_rank > 0 and any(f".{c}." in f".{name}." for c in CONV_PARENTS)
        if ((isinstance(module, torch.nn.Linear) and (_is_target(name, p.target_modules) or locon))
                or (locon and isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1))):
            rank, alpha = p.rank, p.alpha
            if p.block_dims:
                b = block_index(name, layers)
                rank = p.block_dims[b]
                alpha = p.block_alphas[b] if p.block_alphas else p.alpha
        elif locon and isinstance(module, torch.nn.Conv2d):
            rank, alpha = p.conv_rank, p.conv_alpha
            if p.conv_block_dims:
                b = block_index(name, layers)
                rank = p.conv_block_dims[b]
                alpha = p.conv_block_alphas[b] if p.conv_block_alphas else p.conv_alpha
        else:
            continue
        if rank > 0:
            if p.network == "lokr" and _lokr_full(module, rank, p.lokr_factor):
                alpha = rank  # both Kronecker factors are full matrices: LyCORIS scales them by 1, not alpha/rank
            out[name] = (rank, alpha)
    return out


def _is_target(name: str, targets: tuple[str, ...]) -> bool:
    """A Linear's full name against target_modules: a preset, or name suffixes."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if targets == ("kohya",):
        return name.startswith("attentions.") or ".attentions." in name
    suffixes = UNET_PRESETS.get(targets[0]) if len(targets) == 1 and targets[0] in UNET_PRESETS else targets
    return any(name == t or name.endswith("." + t) for t in suffixes)


def _lokr_full(module, rank: int, factor: int) -> bool:
    """Whether peft's LoKr gives `module` a full w2 (w1 is full unless decompose_both, which is not used here)."""
    from peft.tuners.lokr.layer import factorization

    if isinstance(module, torch.nn.Linear):
        in_dim, out_dim = module.in_features, module.out_features
    else:
        in_dim, out_dim = module.in_channels // module.groups, module.out_channels
    return rank >= max(factorization(out_dim, factor)[1], factorization(in_dim, factor)[1]) / 2


def peft_config(unet, p):
    """The peft config for `p.network`, with per-module ranks and alphas."""
    import peft

    targets = target_names(unet, p)
    if not targets:
        from sdxlpipe.errors import UserError

        raise UserError(f"train.target_modules {list(p.target_modules)} match no layer of the UNet",
                         'use a preset ("kohya" or "attention") or Linear name suffixes such as ["to_q", "to_k", "to_v", "to_out.0"]')
    names = sorted(targets)
    # peft reads pattern keys as regexes; full names match only themselves.
    ranks = {n: r for n, (r, _) in targets.items() if r != p.rank}
    alphas = {n: a for n, (_, a) in targets.items() if a != p.alpha}
    if p.network == "lora":
        return peft.LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout, init_lora_weights=_init(p),
                               use_dora=p.use_dora, target_modules=names, rank_pattern=ranks, alpha_pattern=alphas)
    if p.network == "loha":
        return peft.LoHaConfig(r=p.rank, alpha=p.alpha, rank_dropout=p.dropout, target_modules=names,
                               rank_pattern=ranks, alpha_pattern=alphas)
    if p.network == "lokr":
        return peft.LoKrConfig(r=p.rank, alpha=p.alpha, rank_dropout=p.dropout, target_modules=names,
                               decompose_factor=p.lokr_factor, rank_pattern=ranks, alpha_pattern=alphas)
    if p.network == "ia3":
        return peft.IA3Config(target_modules=names, feedforward_modules=[])
    if p.network == "oft":
        # OFT's block size must divide every adapted layer's width.
        return peft.OFTConfig(r=0, oft_block_size=p.rank, module_dropout=p.dropout, target_modules=names)
    raise ValueError(f"network {p.network!r} has no peft config")


def _init(p):
    """peft's init_lora_weights for train.lora_init: True is kaiming-uniform A (kohya's, so kohya's learning rates
    carry over), "gaussian" is std 1/rank (diffusers' train_text_to_image_lora_sdxl.py); B is zero in both."""
    return "gaussian" if p.lora_init == "gaussian" else True


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


def attach_text_encoder(encoder, p) -> None:
    """A LoRA of `p.rank`/`p.alpha` on a CLIP text encoder (in place); the rest stays frozen.

    Targets: kohya's (attention and MLP), or the attention projections with target_modules = "attention".
    """
    from peft import LoraConfig

    preset = p.target_modules in ("attention", ("attention",))
    targets = TEXT_ENCODER_TARGETS["attention" if preset else "kohya"]
    encoder.add_adapter(LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout, init_lora_weights=_init(p),
                                   use_dora=p.use_dora, target_modules=targets), adapter_name=ADAPTER)


def gradient_checkpointing(unet, p) -> bool:
    """Turn on gradient checkpointing when asked, or, with train.gradient_checkpointing unset, when the UNet is
    SDXL-sized; return whether it is on."""
    on = p.gradient_checkpointing
    if on is None:
        on = sum(q.numel() for q in unet.parameters()) > SDXL_SIZED
    if on:
        unet.enable_gradient_checkpointing()
    return on


def frozen_dtype(p, compute: torch.dtype) -> torch.dtype:
    """Storage dtype of frozen weights: the compute dtype (bf16/fp16 under mixed precision), fp32, or float8."""
    if p.base_dtype == "fp8":
        return torch.float8_e4m3fn
    return torch.float32 if p.base_dtype == "fp32" else compute


def set_precision(model, p, compute: torch.dtype) -> None:
    """Frozen weights to `frozen_dtype` (fp8: upcast layer by layer to `compute` in each forward), trained
    weights to fp32 (bf16 with full_bf16, fp16 with full_fp16). Called after the network is attached, so its init is fp32 whatever
    the storage."""
    storage = frozen_dtype(p, compute)
    trained = torch.bfloat16 if p.full_bf16 else torch.float16 if getattr(p, "full_fp16", False) else torch.float32
    for q in model.parameters():
        want = trained if q.requires_grad else (compute if storage == torch.float8_e4m3fn else storage)
        if q.dtype != want:
            q.data = q.data.to(want)
    if storage == torch.float8_e4m3fn:
        # The frozen Linear and Conv layers (the adapter's own layers train and stay as they are); norms and
        # embeddings' other weights stay in `compute`.
        for module in model.modules():
            if (isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not module.weight.requires_grad
                    and module.weight.dtype == compute):
                _store_in_fp8(module, compute)


def _store_in_fp8(module, compute: torch.dtype) -> None:
    """Keep `module`'s weight in float8 and compute with a temporary `compute` copy made in each forward.

    The copy is a new tensor, so autograd keeps it (not the float8 weight) for the backward pass; with gradient
    checkpointing it lives one block at a time. (diffusers' layerwise casting casts the weight in place after
    the forward, which breaks the backward pass of a frozen layer.)
    """
    import torch.nn.functional as F

    module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
    if isinstance(module, torch.nn.Linear):
        def forward(x):
            bias = module.bias.to(compute) if module.bias is not None else None
            return F.linear(x.to(compute), module.weight.to(compute), bias)
    else:
        def forward(x):
            bias = module.bias.to(compute) if module.bias is not None else None
            return module._conv_forward(x.to(compute), module.weight.to(compute), bias)
    module.forward = forward


def dtype_counts(model) -> dict[str, dict[str, int]]:
    """{"frozen"|"trained": {dtype name: bytes}}: what the weights really are stored as (done.json records it)."""
    out: dict[str, dict[str, int]] = {"frozen": {}, "trained": {}}
    for q in model.parameters():
        side = out["trained" if q.requires_grad else "frozen"]
        name = str(q.dtype).removeprefix("torch.")
        side[name] = side.get(name, 0) + q.numel() * q.element_size()
    return out


def text_encoder_state(encoder) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().clone().contiguous()
            for k, v in get_peft_model_state_dict(encoder, adapter_name=ADAPTER).items()}


def load_text_encoder_state(encoder, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(encoder, state, adapter_name=ADAPTER)


def load_network_weights(path: str, models: dict, *, text_encoders: bool) -> None:
    """Start the LoRA of `models` ({component: model with its adapter attached}) from a file (kohya's
    network_weights): any plain LoRA/LoCon file `lora info` reads (kohya with SGM or diffusers names,
    diffusers, peft, a checkpoint's adapter.safetensors), read through `lora.read`. Each model's modules,
    ranks and alpha / rank scales must be the ones this run builds, so training starts from exactly the
    file's output; a text encoder the file has no modules for keeps its fresh init. `text_encoders`: this
    run trains them (else a file that adapts them is refused rather than half used)."""
    from sdxlpipe.errors import UserError
    from sdxlpipe.lora.read import LoraFileError, read_lora

    hint = ("set train.rank, alpha, conv_rank and target_modules as in the run that made the file "
            "(`sdxlpipe lora info FILE` shows its ranks and alphas)")
    try:
        lora = read_lora(path)
    except LoraFileError as exc:
        raise UserError(f"train.network_weights: {exc.what}", exc.hint) from None
    text = sorted({m.component for m in lora.modules if m.component != "unet"})
    if text and not text_encoders:
        raise UserError(f"train.network_weights: {path} also adapts the text encoders ({', '.join(text)}), "
                        "and this run trains the UNet only",
                        "set train.train_text_encoder = true to train them too, or give a UNet-only file")
    for component, model in sorted(models.items()):
        if component == "unet" or component in text:
            _load_component(lora, component, model, path, hint)


def _load_component(lora, component: str, model, path: str, hint: str) -> None:
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from sdxlpipe.errors import UserError
    from sdxlpipe.lora.read import LoraFileError, module_names, peft_state

    view = _unadapted(model)
    try:
        state, config = peft_state(lora, component, view)
    except LoraFileError as exc:
        raise UserError(f"train.network_weights: {exc.what}",
                        f"{exc.hint}; train.network = \"lora\" starts only from a LoRA/LoCon file") from None
    # DoRA magnitudes (a peft/diffusers file of a use_dora run); peft_state carries only A and B.
    names = module_names(view, component)
    for m in lora.modules:
        if m.component == component and "dora_scale" in m.tensors and m.name in names:
            state[f"{names[m.name]}.lora_magnitude_vector"] = m.tensors["dora_scale"]
    # A peft file without diffusers' lora_adapter_metadata (a checkpoint's adapter.safetensors) records no
    # alpha: it takes this run's (read_lora would assume alpha = rank, which no sdxlpipe checkpoint means).
    records_alpha = lora.format not in ("peft", "diffusers") or "lora_adapter_metadata" in lora.metadata
    # The run's network, module by module: rank and the alpha / rank scale it applies.
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.r}
    file_modules = {m.name: m for m in lora.modules if m.component == component}
    wanted = set(layers)
    got = set(config.get("target_modules", []))
    missing, extra = sorted(wanted - got), sorted(got - wanted)
    what = ""
    if missing:
        what = f"{len(missing)} {component} modules of this run's network are not in it (e.g. {missing[:2]})"
    elif extra:
        what = f"it adapts {len(extra)} {component} modules this run's network does not (e.g. {extra[:2]})"
    else:
        rank_of = {n: config["rank_pattern"].get(n, config["r"]) for n in got}
        alpha_of = {n: config["alpha_pattern"].get(n, config["lora_alpha"]) for n in got}
        for name in sorted(got):
            layer = layers[name]
            run_scale, file_scale = layer.scaling[ADAPTER], alpha_of[name] / rank_of[name]
            if layer.r[ADAPTER] != rank_of[name]:
                what = f"{component} module {name} has rank {rank_of[name]} in the file, {layer.r[ADAPTER]} here"
            elif records_alpha and abs(run_scale - file_scale) > 1e-6 * max(1.0, abs(file_scale)):
                what = (f"{component} module {name} has alpha {alpha_of[name]:g} (rank {rank_of[name]}) in the file, "
                        f"a scale of {file_scale:g}; this run's network scales by {run_scale:g}")
            if what:
                break
    if not what:
        lacking = sorted(set(get_peft_model_state_dict(model, adapter_name=ADAPTER)) - set(state))
        if lacking:
            what = f"it lacks {len(lacking)} {component} weights this run trains (e.g. {lacking[:2]}; DoRA magnitudes?)"
    if what:
        raise UserError(f"train.network_weights: {path} does not fit this run's network: {what}", hint)
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise UserError(f"train.network_weights: {path} has {component} weights this network has no place for "
                        f"(e.g. {unexpected[:2]})", hint)


def _unadapted(model):
    """A view of `model` as before its adapter was attached (each peft LoRA layer shown as its base layer), so
    `peft_state` finds the module names a file uses."""
    from types import SimpleNamespace

    from peft.tuners.lora import LoraLayer

    def named_modules():
        inside = None
        for name, module in model.named_modules():
            if inside is not None and name.startswith(inside):
                continue
            if isinstance(module, LoraLayer):
                inside = name + "."
                yield name, module.get_base_layer()
            else:
                yield name, module

    return SimpleNamespace(config=getattr(model, "config", None), named_modules=named_modules)
