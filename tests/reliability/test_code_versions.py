"""The code that shapes an item enters its key: pixel code invalidates latents, prompt code text items."""

import pytest

from sdxlpipe.config import load_config
from sdxlpipe.datasets import open_image
from sdxlpipe.engines import images
from sdxlpipe.models import sdxl
from sdxlpipe.pipeline.runner import run_pipeline
from sdxlpipe.pipeline.status import status
from tests.datasets.files import image_bytes, write


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    for i in range(2):
        write(root / "images" / f"img{i}.png", image_bytes("PNG", size=(64, 64), seed=i))
    config = root / "sdxlpipe.toml"
    config.write_text('model = "tiny"\n[[sources]]\npath = "images"\n'
                      '[bucket]\nresolution = 64\nstep = 32\nmin_side = 32\nmax_side = 128\n'
                      '[vae_encode]\nworkers = 0\n')
    run_pipeline(load_config(config), "text_encode")
    return config


def _to_compute(config) -> dict[str, int]:
    stages = status(load_config(config), "text_encode")["stages"]
    return {name: stages[name]["to_compute"] for name in ("vae_encode", "text_encode")}


def test_nothing_is_stale_after_the_run(encoded):
    assert _to_compute(encoded) == {"vae_encode": 0, "text_encode": 0}


@pytest.mark.parametrize("module", [images, open_image], ids=["resize_and_mask", "decode"])
def test_a_new_pixel_code_version_invalidates_every_latent_and_no_text(encoded, module, monkeypatch):
    monkeypatch.setattr(module, "VERSION", module.VERSION + 1)  # as after editing the resize filter

    assert _to_compute(encoded) == {"vae_encode": 2, "text_encode": 0}


def test_a_new_prompt_encoding_version_invalidates_text_items_and_no_latent(encoded, monkeypatch):
    monkeypatch.setattr(sdxl, "VERSION", sdxl.VERSION + 1)

    to_compute = _to_compute(encoded)
    assert to_compute["vae_encode"] == 0 and to_compute["text_encode"] >= 2
