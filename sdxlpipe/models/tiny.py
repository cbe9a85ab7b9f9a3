"""The built-in tiny SDXL stack: SDXL's architecture, small configs, seeded weights.

`model = "tiny"` needs no download and runs every SDXL code path on a CPU in
milliseconds; it is the default for the examples and the tests. The configs
live in the torch-free `tiny_config.py` so the model fingerprint can be
computed without importing torch.

Each component draws its weights from its own seeded RNG (seed and
component index), so building one component alone gives the same weights as
building the whole stack, bit for bit, in every process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from sdxlpipe.models.spec import COMPONENTS
from sdxlpipe.models.tiny_config import TINY_VERSION, tiny_configs, tiny_tokenizer

__all__ = ["TINY_VERSION", "tiny_configs", "build_tiny_components", "build_tiny_component", "save_tiny"]


class _DropTorchvisionNotice(logging.Filter):
    # transformers says once per process that CLIPImageProcessor wants
    # torchvision; SDXL never uses an image processor, so the notice is noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def _quiet_transformers() -> None:
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionNotice) for f in logger.filters):
        logger.addFilter(_DropTorchvisionNotice())


_quiet_transformers()


def _seeded(seed: int, component: str, build: Callable[[], object]) -> object:
    # A private RNG state per component: the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + COMPONENTS.index(component))
        return build()


def build_tiny_component(name: str, seed: int = 0) -> object:
    """One component of the tiny stack, in train mode as freshly built."""
    cfg = tiny_configs(seed)[name]
    if name == "unet":
        from diffusers import UNet2DConditionModel

        return _seeded(seed, name, lambda: UNet2DConditionModel(**cfg))
    if name == "vae":
        from diffusers import AutoencoderKL

        return _seeded(seed, name, lambda: AutoencoderKL(**cfg))
    if name in ("text_encoder", "text_encoder_2"):
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cls = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
        return _seeded(seed, name, lambda: cls(CLIPTextConfig(**cfg)))
    if name in ("tokenizer", "tokenizer_2"):
        return tiny_tokenizer(name, seed)
    if name == "scheduler":
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler(**cfg)
    raise ValueError(f"unknown tiny component {name!r}; expected one of {', '.join(COMPONENTS)}")


def build_tiny_components(seed: int = 0) -> dict:
    """All seven components, keyed like StableDiffusionXLPipeline's arguments."""
    return {name: build_tiny_component(name, seed) for name in COMPONENTS}


def save_tiny(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny stack as a diffusers directory that loads offline."""
    from diffusers import StableDiffusionXLPipeline

    directory = Path(directory)
    pipe = StableDiffusionXLPipeline(**build_tiny_components(seed))
    pipe.save_pretrained(directory)
    return directory
