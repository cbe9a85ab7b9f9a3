"""Build the tiny stack once per session; everything here runs offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest


@pytest.fixture(scope="session")
def tiny_components():
    from sdxlpipe.models.tiny import build_tiny_components

    return build_tiny_components(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A diffusers directory of the tiny stack (seed 0). Tests must not modify it."""
    from sdxlpipe.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
