"""Every shipped config loads, and opens with the command that runs it."""

from pathlib import Path

import pytest

from sdxlpipe.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(p for p in EXAMPLES.rglob("*.toml") if p.name != "dataset.toml")  # dataset.toml is kohya's format


def test_the_examples_are_found():
    assert {p.relative_to(EXAMPLES).as_posix() for p in CONFIGS} >= {
        "tiny/sdxlpipe.toml", "sdxl-lora.toml", "kohya-folder/sdxlpipe.toml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_every_example_config_loads_and_names_its_command(config):
    first = config.read_text().splitlines()[0]
    assert first.startswith("# sdxlpipe run all -c examples/")
    assert first.endswith(config.relative_to(EXAMPLES.parent).as_posix())
    load_config(config)
