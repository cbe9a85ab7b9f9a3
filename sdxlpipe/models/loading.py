"""Load SDXL components from a model spec, offline, frozen and in eval mode.

A spec is `tiny`, a diffusers directory, a Hub id already in the local
Hugging Face cache (loaded from its snapshot directory, so it goes through
the same code as a directory), or a single checkpoint file in the original
SDXL layout (`models/single_file.py`: its architecture configs come from a
diffusers folder beside it, the HF cache, or the built-in tiny stack). Each
loader builds only the component it returns.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdxlpipe.models import tiny
from sdxlpipe.models.spec import ModelError, ModelSpec, resolve_spec

__all__ = [
    "ModelError",
    "load_vae",
    "load_text_stack",
    "load_unet",
    "load_unet_config",
    "load_noise_scheduler",
    "load_pipeline",
    "torch_dtype",
]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelError(f"dtype {dtype!r} is not known", f"use one of {', '.join(_DTYPES)}") from None


def load_unet(spec: str, dtype="float32", device="cpu", *, allow_pickle: bool = False, base_dir: Path | None = None):
    from diffusers import UNet2DConditionModel

    model = _resolve(spec, base_dir, allow_pickle)
    if model.kind == "tiny":
        unet = tiny.build_tiny_component("unet")
    elif model.kind == "file":
        unet = _from_file(model, "unet")
    else:
        unet = _from_dir(UNet2DConditionModel, model, "unet", dtype)
    return _frozen(unet, dtype, device)


def load_unet_config(spec: str, *, allow_pickle: bool = False, base_dir: Path | None = None) -> dict:
    """The UNet's config alone (no weights): what module names such as kohya's SGM names derive from."""
    from diffusers import UNet2DConditionModel

    return dict(_component_config(spec, "unet", UNet2DConditionModel.load_config, base_dir, allow_pickle))


def load_vae(
    spec: str,
    vae_override: str | None = None,
    dtype="float32",
    device="cpu",
    *,
    allow_pickle: bool = False,
    base_dir: Path | None = None,
):
    from diffusers import AutoencoderKL

    if vae_override:
        single = resolve_spec(vae_override, base_dir, allow_pickle)
        if single.kind == "file":
            return _frozen(_vae_from_file(single, spec, base_dir, allow_pickle), dtype, device)
        model = _resolve(vae_override, base_dir, allow_pickle)
        if model.kind == "tiny":
            raise ModelError(f"vae {vae_override!r}: `tiny` names a whole model, not a VAE", "give a VAE directory or Hub id")
        # A VAE repo (e.g. madebyollin/sdxl-vae-fp16-fix) keeps its files at the root.
        subfolder = "vae" if (model.path / "vae").is_dir() else None
        return _frozen(_from_dir(AutoencoderKL, model, subfolder, dtype), dtype, device)
    model = _resolve(spec, base_dir, allow_pickle)
    if model.kind == "tiny":
        return _frozen(tiny.build_tiny_component("vae"), dtype, device)
    if model.kind == "file":
        return _frozen(_from_file(model, "vae"), dtype, device)
    return _frozen(_from_dir(AutoencoderKL, model, "vae", dtype), dtype, device)


def _vae_from_file(file: ModelSpec, base_spec: str, base_dir: Path | None, allow_pickle: bool):
    """A VAE from one weights file (e.g. sdxl_vae.safetensors, diffusers or original layout).

    The architecture comes from the base model's VAE config, so nothing is downloaded.
    """
    from diffusers import AutoencoderKL

    if file.path.suffix.lower() in (".safetensors", ".sft"):
        from safetensors.torch import load_file

        state = load_file(str(file.path))
    else:  # allowed pickle: tensors only, nothing executed
        state = torch.load(str(file.path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    # A whole original-layout checkpoint given as the VAE: take its first_stage_model.
    if any(k.startswith("first_stage_model.") for k in state):
        state = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    config = _component_config(base_spec, "vae", AutoencoderKL.load_config, base_dir, allow_pickle)
    if "encoder.down.0.block.0.conv1.weight" in state:  # original (SGM/LDM) layout
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = convert_ldm_vae_checkpoint(state, dict(config))
    vae = AutoencoderKL.from_config(config)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(
            f"vae {file.spec!r} does not fit the model's VAE: {len(missing)} weight(s) missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})",
            "give a VAE for this model (SDXL's VAE for SDXL), in diffusers or original layout",
        )
    return vae


def load_text_stack(spec: str, dtype="float32", device="cpu", *, allow_pickle: bool = False, base_dir: Path | None = None) -> dict:
    """{"tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"}."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model = _resolve(spec, base_dir, allow_pickle)
    if model.kind == "file":
        from sdxlpipe.models.single_file import config_source

        configs = config_source(model)
        stack = {name: _from_file(model, name) for name in ("text_encoder", "text_encoder_2")}
        for name in ("tokenizer", "tokenizer_2"):
            stack[name] = (tiny.build_tiny_component(name) if configs.kind == "tiny"
                           else _from_dir(CLIPTokenizer, configs, name))
    elif model.kind == "tiny":
        stack = {name: tiny.build_tiny_component(name) for name in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")}
    else:
        stack = {
            "tokenizer": _from_dir(CLIPTokenizer, model, "tokenizer"),
            "tokenizer_2": _from_dir(CLIPTokenizer, model, "tokenizer_2"),
            "text_encoder": _from_dir(CLIPTextModel, model, "text_encoder", dtype),
            "text_encoder_2": _from_dir(CLIPTextModelWithProjection, model, "text_encoder_2", dtype),
        }
    for name in ("text_encoder", "text_encoder_2"):
        stack[name] = _frozen(stack[name], dtype, device)
    return stack


def load_noise_scheduler(spec: str, *, allow_pickle: bool = False, base_dir: Path | None = None):
    """A DDPMScheduler for training noise, with the model's schedule (SDXL's values)."""
    from diffusers import DDPMScheduler

    config = _component_config(spec, "scheduler", DDPMScheduler.load_config, base_dir, allow_pickle)
    # Sampler-only keys (e.g. Euler's interpolation_type) mean nothing to DDPM.
    accepted = DDPMScheduler.from_config({}).config.keys()
    return DDPMScheduler.from_config({k: v for k, v in dict(config).items() if k in accepted})


def load_pipeline(
    spec: str,
    vae_override: str | None = None,
    dtype="float32",
    device="cpu",
    *,
    allow_pickle: bool = False,
    base_dir: Path | None = None,
):
    """A StableDiffusionXLPipeline (for validation images and export checks)."""
    from diffusers import StableDiffusionXLPipeline

    model = _configs_of(spec, base_dir, allow_pickle)
    if model.kind == "tiny":
        scheduler = tiny.build_tiny_component("scheduler")
    else:
        scheduler = _from_dir(_scheduler_class(model).from_pretrained, model, "scheduler")
    return StableDiffusionXLPipeline(
        unet=load_unet(spec, dtype, device, allow_pickle=allow_pickle, base_dir=base_dir),
        vae=load_vae(spec, vae_override, dtype, device, allow_pickle=allow_pickle, base_dir=base_dir),
        scheduler=scheduler,
        **load_text_stack(spec, dtype, device, allow_pickle=allow_pickle, base_dir=base_dir),
    )


def _resolve(spec: str, base_dir: Path | None, allow_pickle: bool) -> ModelSpec:
    return resolve_spec(spec, base_dir, allow_pickle)


def _configs_of(spec: str, base_dir: Path | None, allow_pickle: bool) -> ModelSpec:
    """Where a spec's component configs come from: the spec itself, or for a single file the folder (or
    tiny) `single_file.config_source` finds."""
    model = _resolve(spec, base_dir, allow_pickle)
    if model.kind == "file":
        from sdxlpipe.models.single_file import config_source

        model = config_source(model)
    return model


def _component_config(spec: str, component: str, load_config, base_dir: Path | None, allow_pickle: bool):
    """One component's config, no weights: tiny's, or `load_config` on the component's subfolder."""
    model = _configs_of(spec, base_dir, allow_pickle)
    if model.kind == "tiny":
        return tiny.tiny_configs()[component]
    return _from_dir(load_config, model, component)


def _from_file(model: ModelSpec, name: str):
    """One component of a single-file checkpoint, its architecture from `single_file.config_source`."""
    from sdxlpipe.models.single_file import config_source, load_component

    return load_component(model, name, config_source(model))


def _from_dir(load, model: ModelSpec, subfolder: str | None, dtype=None):
    """Call `load` (a class or a from_pretrained-like function) on one subfolder, offline."""
    if isinstance(load, type):
        load = load.from_pretrained
    kwargs: dict = {"local_files_only": True}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if dtype is not None:
        # diffusers takes torch_dtype, transformers 5 takes dtype.
        key = "torch_dtype" if getattr(load, "__module__", "").startswith("diffusers") else "dtype"
        kwargs[key] = torch_dtype(dtype)
    where = model.path / subfolder if subfolder else model.path
    try:
        return load(str(model.path), **kwargs)
    except (OSError, ValueError) as exc:
        hint = "check that the directory is a complete diffusers SDXL model"
        if model.hub_id:
            hint += f" (a Hub model must be fully downloaded: `hf download {model.hub_id}`)"
        raise ModelError(f"model {model.spec!r}: could not load {subfolder or 'the VAE'} from {where}: {exc}", hint) from exc


def _scheduler_class(model: ModelSpec):
    import json

    import diffusers

    index = model.path / "model_index.json"
    name = json.loads(index.read_text()).get("scheduler", [None, None])[1] if index.is_file() else None
    return getattr(diffusers, name or "EulerDiscreteScheduler", diffusers.EulerDiscreteScheduler)


def _frozen(module, dtype, device):
    dtype, device = torch_dtype(dtype), torch.device(device)
    first = next(module.parameters())
    if first.dtype != dtype or first.device != device:  # diffusers warns on every .to() cast
        module = module.to(device=device, dtype=dtype)
    module.eval()
    module.requires_grad_(False)
    return module
