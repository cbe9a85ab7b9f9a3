"""Single-file SDXL checkpoints (the original SGM layout most community models ship as): read and write.

Reading: one component at a time, only its tensors are read from the file
(diffusers' converters map them to diffusers names); the architecture comes
from configs, found offline, in this order:
1. a diffusers folder beside the file: `<file stem>.config/`, or the file's
   own folder when it holds a `model_index.json`;
2. SDXL base's configs in the local Hugging Face cache
   (stabilityai/stable-diffusion-xl-base-1.0, configs only are enough);
3. the built-in tiny stack, when the file's weights have its shapes.
Writing: `save_single_file` (UNet, VAE, CLIP-L, OpenCLIP bigG in their
original names; `models/sgm.py` does the names) and `fuse_lora`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdxlpipe.models.spec import ModelError, ModelSpec

SDXL_BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"  # whose configs a bare SDXL file is built with
# The tiny UNet's conv_in: (32, 4, 3, 3); SDXL's is (320, 4, 3, 3).
_TINY_PROBE = ("model.diffusion_model.input_blocks.0.0.weight", (32, 4, 3, 3))
_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
           "text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."}


def config_source(model: ModelSpec) -> ModelSpec:
    """Where a single file's architecture configs come from: a diffusers folder ("dir") or "tiny"."""
    path = model.path
    probe = _shape(path, _TINY_PROBE[0])  # also refuses a file that is not safetensors
    for folder in (path.with_name(path.stem + ".config"), path.parent):
        if (folder / "model_index.json").is_file():
            return ModelSpec("dir", path=folder, spec=str(folder))
    from sdxlpipe.models.spec import hub_snapshot

    try:
        snapshot = hub_snapshot(SDXL_BASE_REPO)
        if (snapshot / "unet" / "config.json").is_file():
            return ModelSpec("dir", path=snapshot, hub_id=SDXL_BASE_REPO, spec=SDXL_BASE_REPO)
    except ModelError:
        pass
    if probe == _TINY_PROBE[1]:
        return ModelSpec("tiny", spec="tiny")
    raise ModelError(
        f"model {model.spec!r}: a single-file checkpoint needs its architecture configs, and none were found "
        f"(looked for {path.with_name(path.stem + '.config')}/model_index.json, {path.parent}/model_index.json "
        f"and {SDXL_BASE_REPO} in the Hugging Face cache)",
        f"put the base model's diffusers configs beside it as {path.stem}.config/ (e.g. `hf download {SDXL_BASE_REPO} "
        "--include '*.json' '*.txt' --local-dir " + str(path.with_name(path.stem + ".config")) + "`), "
        "or set model to a diffusers folder")


def _shape(path: Path, key: str) -> tuple | None:
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return None  # a pickle checkpoint: no cheap look inside
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return tuple(f.get_slice(key).get_shape()) if key in f.keys() else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"model {str(path)!r} is not a readable .safetensors file ({exc})",
                         "give a complete single-file SDXL checkpoint, a diffusers folder, or tiny") from None


def read_component(model: ModelSpec, name: str) -> dict[str, torch.Tensor]:
    """The tensors of one component (`unet`, `vae`, `text_encoder`, `text_encoder_2`), original names."""
    prefix = _PREFIX[name]
    if model.path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors import safe_open

        with safe_open(str(model.path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    state = torch.load(str(model.path), map_location="cpu", weights_only=True)  # allowed pickle: tensors only
    state = state.get("state_dict", state)
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def load_component(model: ModelSpec, name: str, configs: ModelSpec):
    """One diffusers/transformers component built from `configs` with the file's weights."""
    from accelerate import init_empty_weights
    from diffusers.loaders import single_file_utils as sfu

    original = read_component(model, name)
    if not original:
        raise ModelError(f"model {model.spec!r} holds no {name} weights (no keys under {_PREFIX[name]})",
                         "give a whole SDXL checkpoint (UNet, VAE and both text encoders)")
    with init_empty_weights(include_buffers=False):
        module = _empty(name, configs)
    if name == "unet":
        state = sfu.convert_ldm_unet_checkpoint(original, dict(module.config))
    elif name == "vae":
        state = sfu.convert_ldm_vae_checkpoint(original, dict(module.config))
    elif name == "text_encoder":
        state = sfu.convert_ldm_clip_checkpoint(original)
    else:
        state = sfu.convert_open_clip_checkpoint(module, original, prefix=_PREFIX[name])
    own = module.state_dict()
    if not any(k.startswith("text_model.") for k in own):  # transformers 5's CLIPTextModel has no text_model.
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in own or not k.endswith("position_ids")}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ModelError(
            f"model {model.spec!r}: its {name} does not fit the architecture from {configs.spec} "
            f"({len(missing)} weight(s) missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})",
            f"give configs for this checkpoint's architecture as {model.path.stem}.config/ beside it")
    module.load_state_dict(state, assign=True)
    return module


def _empty(name: str, configs: ModelSpec):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if configs.kind == "tiny":
        from sdxlpipe.models.tiny import tiny_configs

        config = tiny_configs()[name]
    elif name in ("unet", "vae"):
        cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
        config = cls.load_config(str(configs.path), subfolder=name, local_files_only=True)
    else:
        config = CLIPTextConfig.from_pretrained(str(configs.path), subfolder=name, local_files_only=True)
    if name == "unet":
        return UNet2DConditionModel.from_config(config)
    if name == "vae":
        return AutoencoderKL.from_config(config)
    if not isinstance(config, CLIPTextConfig):
        config = CLIPTextConfig(**config) if isinstance(config, dict) else config
    return (CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection)(config)


def save_single_file(pipe, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """A StableDiffusionXLPipeline's weights as one `.safetensors` in the original SDXL layout, atomically."""
    from safetensors.torch import save as safetensors_bytes

    from sdxlpipe.models.sgm import sgm_checkpoint
    from sdxlpipe.cache_format.shards import default_mode, write_atomic

    state = sgm_checkpoint(pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict(),
                           pipe.text_encoder_2.state_dict(), dict(pipe.unet.config), dict(pipe.vae.config))
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    path = Path(path)
    write_atomic(path, safetensors_bytes(state, metadata={"format": "pt", **(metadata or {})}), mode=default_mode())
    return path


def fuse_lora(model, state: dict[str, torch.Tensor], config: dict) -> None:
    """Add a peft LoRA (state dict + LoraConfig dict) into `model`'s weights, in place; no peft layer remains."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import set_peft_model_state_dict

    known = LoraConfig().to_dict().keys()
    model.add_adapter(LoraConfig(**{k: v for k, v in config.items() if k in known and k != "peft_type"}),
                      adapter_name="export")
    set_peft_model_state_dict(model, state, adapter_name="export")
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer):
                child.merge(adapter_names=["export"])
                setattr(module, child_name, child.get_base_layer())
    for attr in ("peft_config",):
        if hasattr(model, attr):
            delattr(model, attr)
    model._hf_peft_config_loaded = False
