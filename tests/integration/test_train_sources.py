"""Through the CLI: two weighted [[sources]] share every epoch by their weights, and the weights are in the key."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import cli_json, copy_example

pytestmark = pytest.mark.slow

EPOCHS = 3
RUN = ["--set", f"train.max_epochs={EPOCHS}", "--set", "train.batch_size=1", "--set", "train.save_every_steps=0"]


def sources(a: float, b: float) -> str:
    return f'[[sources]]\npath = "a"\nweight = {a}\n[[sources]]\npath = "b"\nweight = {b}\n'


def test_two_weighted_sources_share_each_epoch_by_weight_within_one_sample(tmp_path):
    """6 images in a and 2 in b would train 3:1; weights 1 and 2 train them 1:2. Tolerance: in every epoch
    a source's samples are within one of epoch length x weight / sum of weights (8 x 1/3 and 8 x 2/3 here),
    so over 3 epochs within 3. Changing a weight retrains (it is in the key) and recomputes nothing else."""
    config = copy_example(tmp_path / "mix")
    folder = config.parent
    for name in ("a", "b"):
        (folder / name).mkdir()
    images = sorted(p for p in (folder / "images").iterdir() if p.suffix != ".txt")[:8]
    for k, image in enumerate(images):  # 6 images in a, 2 in b, each with its caption file if it has one
        for path in (image, image.with_suffix(".txt")):
            if path.exists():
                shutil.move(path, folder / ("a" if k < 6 else "b") / path.name)
    text = config.read_text().replace('[[sources]]\npath = "images"          # relative to this file; searched recursively\nrepeats = 1\n', "")
    assert "[[sources]]" not in text
    config.write_text(text + sources(1, 2))

    report = cli_json("run", "train", "-c", str(config), *RUN)
    assert report["stages"]["ingest"]["items"] == 8
    (done,) = (json.loads(p.read_text()) for p in (folder / ".sdxlpipe" / "train").glob("*/done.json"))
    a, b = done["samples_per_source"]
    assert a + b == EPOCHS * 8 == done["steps"]
    assert abs(a - EPOCHS * 8 / 3) <= EPOCHS and abs(b - EPOCHS * 16 / 3) <= EPOCHS, (a, b)

    assert cli_json("status", "-c", str(config), *RUN)["stages"]["train"]["to_compute"] == 0
    config.write_text(text + sources(2, 1))
    status = cli_json("status", "-c", str(config), *RUN)["stages"]
    assert status["train"]["to_compute"] == 1 and "weight" in json.dumps(status["train"]["reasons"])
    assert all(status[s]["to_compute"] == 0 for s in ("ingest", "caption", "bucket", "vae_encode", "text_encode"))
