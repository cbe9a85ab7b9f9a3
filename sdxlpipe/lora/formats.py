"""Write trained networks as files other tools load: diffusers and kohya LoRA files, LyCORIS files, peft folders.

Both work from what training saves, without the models: the peft state dict
(`get_peft_model_state_dict(unet)`, keys `<module>.lora_A.weight` /
`<module>.lora_B.weight`) and the LoraConfig as a dict (`peft_config.to_dict()`),
for the UNet and optionally for each text encoder.

Facts that shaped this (shared/reference/lora-formats.md): a diffusers file
without the adapter metadata reloads with alpha = rank, and diffusers' kohya
converter writes every alpha as the rank; both silently change the output.
So the diffusers file always carries the config, and the kohya file carries
the trained alpha per module.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from sdxlpipe.cache_format.shards import default_mode, write_atomic
from sdxlpipe.models.sgm import kohya_name, sgm_unet_name

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(dir) looks for
KOHYA_WEIGHT_NAME = "lora.safetensors"
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for SDXL base
# diffusers' component name -> kohya's key prefix: CLIP-L, OpenCLIP bigG.
KOHYA_TEXT_ENCODER_PREFIX = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def save_diffusers_lora(
    path: str | Path,
    peft_state_dict: dict[str, torch.Tensor],
    lora_config: dict,
    text_encoders: dict[str, tuple[dict[str, torch.Tensor], dict]] | None = None,
) -> Path:
    """Write a file StableDiffusionXLPipeline.load_lora_weights reads, alpha included.

    `path` is the file, or a directory to hold `pytorch_lora_weights.safetensors`.
    `text_encoders` maps "text_encoder" (CLIP-L) and/or "text_encoder_2"
    (OpenCLIP bigG) to that encoder's (peft state dict, LoraConfig dict).
    """
    target = _target(path, DIFFUSERS_WEIGHT_NAME)
    # peft key names under "unet." / "text_encoder." / "text_encoder_2.": what
    # diffusers' loaders convert everything else to. (diffusers.utils.
    # convert_state_dict_to_diffusers renames only attention layers to
    # lora.down/lora.up; load_lora_weights then drops them from a file that
    # mixes both styles.)
    tensors, adapter_metadata = {}, {}
    for component, (state, config) in {"unet": (peft_state_dict, lora_config), **_text_parts(text_encoders)}.items():
        tensors.update({f"{component}.{k}": v for k, v in state.items()})
        # The same layout as StableDiffusionXLPipeline.save_lora_weights(...,
        # unet_lora_adapter_metadata=, text_encoder[_2]_lora_adapter_metadata=):
        # "<component>."-prefixed config keys, all in one JSON.
        adapter_metadata.update({f"{component}.{k}": v for k, v in _json_safe(config).items()})
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter_metadata, indent=2, sort_keys=True)}
    _write_atomic(target, safetensors_bytes(_contiguous(tensors), metadata=metadata))
    return target


def save_kohya_lora(
    path: str | Path,
    peft_state_dict: dict[str, torch.Tensor],
    lora_config: dict,
    metadata: dict[str, str] | None = None,
    text_encoders: dict[str, tuple[dict[str, torch.Tensor], dict]] | None = None,
    *,
    unet_config: dict,
) -> Path:
    """Write a kohya sd-scripts style LoRA (lora_unet_* / lora_te1_* / lora_te2_*, lora_down/lora_up/alpha).

    UNet modules get the original SDXL (SGM) names kohya writes
    (lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q), derived
    from `unet_config` (the indices depend on layers_per_block). Text encoder
    modules are lora_te1_text_model_encoder_layers_0_... / lora_te2_...
    `path` is the file, or a directory to hold `lora.safetensors`; `text_encoders`
    as for `save_diffusers_lora`.
    """
    parts = {"lora_unet": (peft_state_dict, lora_config)}
    parts.update({KOHYA_TEXT_ENCODER_PREFIX[n]: part for n, part in _text_parts(text_encoders).items()})
    target = _target(path, KOHYA_WEIGHT_NAME)
    tensors: dict[str, torch.Tensor] = {}
    conv: dict[str, tuple[int, float]] = {}
    for prefix, (state, part_config) in parts.items():
        config = _json_safe(part_config)
        if config.get("use_dora"):
            raise ValueError("a DoRA adapter has magnitude vectors the kohya LoRA format cannot hold; export it as diffusers")
        for key, value in state.items():
            module, sep, kind = key.rpartition(".lora_")
            if not sep or kind not in ("A.weight", "B.weight"):
                raise ValueError(f"peft LoRA state dict key {key!r} is not <module>.lora_A/lora_B.weight")
            name = _kohya_module_name(prefix, module, unet_config)
            if kind == "A.weight":
                tensors[f"{name}.lora_down.weight"] = value
                rank = value.shape[0]
                # kohya scales by alpha / rank; write the alpha that gives peft's scale.
                alpha = _kohya_alpha(config, module, rank)
                tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
                if value.dim() == 4 and tuple(value.shape[2:]) != (1, 1):
                    conv[name] = (rank, alpha)
            else:
                tensors[f"{name}.lora_up.weight"] = value
    config = _json_safe(lora_config)
    network = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config["r"]),
        "ss_network_alpha": _num(config["lora_alpha"]),
        "ss_network_train_unet_only": str(not text_encoders),
        "ss_network_train_text_encoder_only": "False",
    }
    if conv:
        # kohya's LoCon: conv_dim / conv_alpha in ss_network_args (the most common one if they vary)
        dim, alpha = max(conv.values(), key=list(conv.values()).count)
        network["ss_network_args"] = json.dumps({"conv_dim": str(dim), "conv_alpha": _num(alpha)})
    _write_kohya(target, tensors, network, metadata)
    return target


def save_kohya_lycoris(
    path: str | Path,
    peft_state_dict: dict[str, torch.Tensor],
    lycoris_config: dict,
    metadata: dict[str, str] | None = None,
    *,
    unet_config: dict,
) -> Path:
    """Write a peft LoHa or LoKr as a LyCORIS file in kohya naming (what ComfyUI, A1111 and kohya load).

    Module names are SGM-named as in `save_kohya_lora`. LoHa keys carry over
    (`hada_w1_a` ...) with alpha: LyCORIS scales by alpha / rank as peft does.
    LoKr: LyCORIS readers scale by alpha / dim only when a factor is
    decomposed and by 1 otherwise, so peft's alpha / r is folded into w1 and
    alpha is written as that dim.
    """
    from peft.utils.other import get_pattern_key

    config = _json_safe(lycoris_config)
    kind = config.get("peft_type")
    if kind not in ("LOHA", "LOKR"):
        raise ValueError(f"peft_type {kind!r}: save_kohya_lycoris writes LOHA or LOKR")
    target = _target(path, KOHYA_WEIGHT_NAME)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in peft_state_dict.items():
        module, _, field = key.rpartition(".")
        modules.setdefault(module, {})[field] = value
    tensors: dict[str, torch.Tensor] = {}
    conv = False
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for module, fields in modules.items():
        name = _kohya_module_name("lora_unet", module, unet_config)
        r = ranks.get(get_pattern_key(ranks.keys(), module), config["r"])
        alpha = float(alphas.get(get_pattern_key(alphas.keys(), module), config["alpha"]))
        conv = conv or any(v.dim() == 4 for v in fields.values())
        if kind == "LOKR":
            fields = dict(fields)
            w1 = "lokr_w1" if "lokr_w1" in fields else "lokr_w1_a"
            fields[w1] = fields[w1] * (alpha / r)
            dim = next((fields[f].shape[0] for f in ("lokr_w2_b", "lokr_w1_b") if f in fields), r)
            alpha = float(dim)
        for field, value in fields.items():
            tensors[f"{name}.{field}"] = value
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    args = {"algo": "loha" if kind == "LOHA" else "lokr"}
    if conv:
        args.update({"conv_dim": str(config["r"]), "conv_alpha": _num(config["alpha"])})
    network = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps(args),
        "ss_network_dim": str(config["r"]),
        "ss_network_alpha": _num(config["alpha"]),
        "ss_network_train_unet_only": "True",
    }
    _write_kohya(target, tensors, network, metadata)
    return target


def save_kohya_modules(path: str | Path, modules: list, *, unet_config: dict,
                       metadata: dict[str, str] | None = None) -> Path:
    """Write normalised LoRA modules (`sdxlpipe.lora.read.LoraModule`, kind "lora", diffusers-dotted
    names) as a kohya file: what `lora extract`, `resize` and `merge` produce."""
    prefixes = {component: prefix for prefix, component in KOHYA_TEXT_ENCODER_PREFIX.items()}
    prefixes = {"unet": "lora_unet", **{v: k for k, v in prefixes.items()}}
    target = _target(path, KOHYA_WEIGHT_NAME)
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        if m.kind != "lora":
            raise ValueError(f"module {m.name!r} is {m.kind}; save_kohya_modules writes LoRA modules")
        module = m.name
        if m.component != "unet" and not module.startswith("text_model."):
            module = f"text_model.{module}"
        name = _kohya_module_name(prefixes[m.component], module, unet_config)
        tensors[f"{name}.lora_down.weight"] = m.tensors["down"]
        tensors[f"{name}.lora_up.weight"] = m.tensors["up"]
        tensors[f"{name}.alpha"] = torch.tensor(float(m.alpha if m.alpha is not None else m.rank), dtype=torch.float32)
    ranks = [m.rank for m in modules]
    network = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(set(ranks), key=ranks.count)) if ranks else "0",
        "ss_network_alpha": _num(max((m.alpha or m.rank for m in modules), default=0)),
        "ss_network_train_unet_only": str(all(m.component == "unet" for m in modules)),
    }
    _write_kohya(target, tensors, network, metadata)
    return target


def save_peft_adapter(directory: str | Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """A peft adapter folder (adapter_model.safetensors + adapter_config.json) for IA3/OFT, which no
    LoRA format carries exactly; peft's inject_adapter_in_model + set_peft_model_state_dict load it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / "adapter_model.safetensors",
                  safetensors_bytes(_contiguous(state), metadata={"format": "pt"}))
    text = json.dumps(_json_safe(config), indent=2, sort_keys=True) + "\n"
    _write_atomic(directory / "adapter_config.json", text.encode())
    return directory


def _kohya_module_name(prefix: str, module: str, unet_config: dict) -> str:
    """kohya's flat module name: SGM names for the UNet, the encoders' own names for lora_te1/te2."""
    if prefix == "lora_unet":
        module = sgm_unet_name(module, unet_config)
    return kohya_name(prefix, module)


def _num(value) -> str:
    """A number as kohya writes it in metadata: 8 not 8.0 when whole."""
    value = float(value)
    return str(int(value)) if value.is_integer() else str(value)


def _write_kohya(target: Path, tensors: dict[str, torch.Tensor], network: dict[str, str],
                 metadata: dict[str, str] | None) -> None:
    """The kohya metadata (network fields, base model, the caller's, then the two hashes) and the file."""
    meta = {
        **network,
        "ss_base_model_version": SDXL_BASE_MODEL_VERSION,
        **{k: str(v) for k, v in (metadata or {}).items()},
    }
    tensors = _contiguous(tensors)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya_hashes(tensors, meta)
    _write_atomic(target, safetensors_bytes(tensors, metadata=meta))


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's train_util.precalculate_safetensors_hashes makes them.

    Both are computed on the file as it would be with only the ss_* metadata:
    the model hash is the SHA-256 of the tensor data after the header (what
    A1111's additional-networks hashes, and A1111 shows its first 12 hex
    digits), the legacy hash the first 8 hex digits of the SHA-256 of the
    64 KiB at offset 1 MiB.
    """
    data = safetensors_bytes(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def _text_parts(text_encoders: dict | None) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    """The encoders' (state, config), keys under the standard `text_model.` prefix.

    transformers 5 dropped `text_model.` from CLIPTextModel (not from
    CLIPTextModelWithProjection); kohya files and older loaders name it, and
    diffusers strips it again for a model without it.
    """
    parts = {}
    for name, (state, config) in (text_encoders or {}).items():
        if name not in KOHYA_TEXT_ENCODER_PREFIX:
            raise ValueError(f"text encoder {name!r}: SDXL's are {sorted(KOHYA_TEXT_ENCODER_PREFIX)}")
        parts[name] = ({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, config)
    return parts


def _kohya_alpha(config: dict, module: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    if config.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(rank); kohya by alpha / rank.
        return float(alpha) * math.sqrt(rank)
    return float(alpha)


def _json_safe(config: dict) -> dict:
    def default(o):
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        if isinstance(o, enum.Enum):
            return o.value
        raise TypeError(f"LoRA config value {o!r} is not JSON-serializable")

    return json.loads(json.dumps(config, default=default))


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _target(path: str | Path, default_name: str) -> Path:
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        return path / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename; mode as a plain open() would give (not mkstemp's 0600)."""
    write_atomic(path, data, mode=default_mode())
