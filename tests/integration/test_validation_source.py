"""Through the CLI on the bundled example plus a `kind = "validation"` folder: the held-out images are
encoded but never trained on, the validation loss reaches log.jsonl, TensorBoard, the progress lines and
the run's output, the lowest one's step reaches the exported LoRA's metadata, and the held-out source
stays out of the train key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cli, cli_json
from tests.report.data import write_image

pytestmark = pytest.mark.slow

RUN = ["--set", "train.max_steps=4", "--set", "train.save_every_steps=2", "--set", "train.max_checkpoints=3",
       "--set", "train.validation_every_steps=2", "--set", "train.tensorboard=true"]


def test_a_validation_source_is_held_out_and_its_loss_reported(example):
    root = example.parent
    arrays = np.random.default_rng(5)
    for i in range(3):
        write_image(root / "held" / f"val{i}.png", (128, 128), arrays)
        (root / "held" / f"val{i}.txt").write_text(f"a held out shape number {i}")
    plain = example.read_text()
    example.write_text(plain.replace('[caption]', '[[sources]]\npath = "held"\nkind = "validation"\n\n[caption]', 1))

    inspected = cli_json("inspect", "-c", str(example))
    assert inspected["held_out"] == {"items": 3, "from_sources": 3, "validation_split": 0.0}
    assert inspected["sources"]["held"]["validation"] and inspected["samples"] == 35
    assert inspected["samples_per_epoch"] == 32  # the held-out images do not train

    proc = cli("run", "all", "-c", str(example), *RUN)
    assert "val_loss" in proc.stderr  # the progress line carries it once measured
    (run_dir,) = (root / ".sdxlpipe" / "train").iterdir()
    done = json.loads((run_dir / "done.json").read_text())
    log = [json.loads(line) for line in (run_dir / "logs" / "log.jsonl").read_text().splitlines()]
    measured = [[r["step"], r["val_loss"]] for r in log if "val_loss" in r]
    assert [s for s, _ in measured] == [2, 4] and done["validation_items"] == 3
    best = min(measured, key=lambda sv: sv[1])
    assert [done["best_validation"]["step"], done["best_validation"]["val_loss"]] == best
    assert f"lowest validation loss: {best[1]:.4f} at step {best[0]}" in proc.stdout
    key = json.loads((run_dir / "key.json").read_text())
    assert key["sample_count"] == 32

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("val_loss")] == [tuple(sv) for sv in measured]

    metadata = cli_json("lora", "info", str(root / "output" / "tiny-shapes.safetensors"))["metadata"]
    assert metadata["sdxlpipe_best_validation_step"] == str(best[0])
    assert float(metadata["sdxlpipe_best_validation_loss"]) == pytest.approx(best[1], rel=1e-5)

    # Without the held-out source (and its validation) the same items train with the same settings: the same
    # run, up to date.
    example.write_text(plain)
    status = cli_json("status", "-c", str(example), *RUN[:6])["stages"]
    assert status["train"]["to_compute"] == 0 and status["train"]["up_to_date"] == 1, status["train"]
    assert Path(done["outputs"]["checkpoint"]).parent.parent == run_dir


def test_a_published_datasets_held_out_items_stay_held_out_where_it_trains_from_the_store(example, tmp_path):
    """Machine A publishes its dataset with a `kind = "validation"` folder; machine B, with no images and no
    validation source of its own, trains from the store: the snapshot's `validation` column holds the same
    items out there (measured, never trained on), and `inspect` on B counts the dataset's rows."""
    root = example.parent
    arrays = np.random.default_rng(5)
    for i in range(3):
        write_image(root / "held" / f"val{i}.png", (128, 128), arrays)
        (root / "held" / f"val{i}.txt").write_text(f"a held out shape number {i}")
    example.write_text(example.read_text().replace('[caption]', '[[sources]]\npath = "held"\nkind = "validation"\n\n[caption]', 1))
    published = cli_json("run", "encode", "-c", str(example))["outputs"]["dataset"]
    assert published["samples"] == 35

    b = tmp_path / "b" / "sdxlpipe.toml"
    b.parent.mkdir(parents=True)
    b.write_text(f'model = "tiny"\n\n[[sources]]\nkind = "dataset"\nname = "{published["name"]}"\n'
                 f'store = "{root / ".sdxlpipe" / "store"}"\n\n[train]\nmax_steps = 2\nsave_every_steps = 2\n'
                 'validation_every_steps = 2\n\n[export]\noutput_dir = "output"\n')
    inspected = cli_json("inspect", "-c", str(b))
    assert inspected["samples"] == 35 and inspected["samples_per_epoch"] == 32
    assert inspected["held_out"] == {"items": 3, "from_sources": 3, "validation_split": 0.0}
    dataset = f"{published['name']}@{published['snapshot'][:12]}"
    assert sum(s["images"] for s in inspected["sources"].values()) == 35
    assert all(s["dataset"] == dataset for s in inspected["sources"].values())

    cli("run", "all", "-c", str(b))
    (run_dir,) = (b.parent / ".sdxlpipe" / "train").iterdir()
    assert json.loads((run_dir / "key.json").read_text())["sample_count"] == 32, "the held-out items do not train"
    assert json.loads((run_dir / "done.json").read_text())["validation_items"] == 3
