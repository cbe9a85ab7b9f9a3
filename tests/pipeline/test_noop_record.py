"""The no-op record (pipeline/noop.py): it answers only while nothing it covers has changed.

Each test writes a record for a real folder of images, captions, a model
folder and a workspace (as a complete `run all` would, through the same
`begin`/`finish`), changes one thing, and checks that the record no longer
answers, so `run all` / `status` take the normal path and recompute.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from PIL import Image

import sdxlpipe
from sdxlpipe.config import load_config
from sdxlpipe.pipeline import noop
from sdxlpipe.pipeline.runner import run_pipeline

PAST = time.time() - 120  # files as a user's would be: not written in the last seconds (the racy rule)
REPORT = {"stages": {"ingest": {"items": 3, "units": "images", "computed": 3, "reused": 0, "failed": 0,
                                "seconds": 1.5, "reasons": []}},
          "rejected": [], "outputs": {"lora": [], "written": []}, "models_loaded": ["vae"], "damaged": {},
          "failed_stages": []}


def _age(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        os.utime(p, (PAST, PAST))


def _newest_code(package: Path) -> int:
    """The newest mtime (ns) of sdxlpipe's own files, walked as the record walks them."""
    newest = 0
    for folder, dirs, files in os.walk(package):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in files:
            if not name.startswith("."):
                newest = max(newest, os.stat(os.path.join(folder, name)).st_mtime_ns)
    return newest


def _begin(config):
    """noop.begin, once sdxlpipe's own code is out of the racy window.

    The record covers the package's files too, and rightly refuses to record while one of them
    changed in the last RACY_NS (an editor's save, a fresh checkout): the tests wait that out
    instead of failing. begin is asked again only when the code changed meanwhile, so a None
    for any other reason (these tests' files are old) still fails the test at once.
    """
    package = Path(sdxlpipe.__file__).parent
    for _ in range(10):
        newest = _newest_code(package)
        time.sleep(max(0, newest + noop.RACY_NS - time.time_ns()) / 1e9 + 0.01)
        began = noop.begin(config, [])
        if began is not None or _newest_code(package) == newest:
            return began
    return None


@pytest.fixture
def project(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (64, 48), colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"shape {i}\n")
    model = tmp_path / "model"
    for part in ("unet", "vae"):
        (model / part).mkdir(parents=True)
        (model / part / "config.json").write_text("{}")
        (model / part / "weights.safetensors").write_bytes(bytes(64))
    config = tmp_path / "sdxlpipe.toml"
    config.write_text('model = "model"\n[[sources]]\npath = "images"\n[train]\nmax_steps = 3\n[export]\noutput_dir = "output"\n')
    (tmp_path / ".sdxlpipe" / "tables").mkdir(parents=True)
    (tmp_path / ".sdxlpipe" / "tables" / "ingest.parquet").write_bytes(b"a table")
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "lora.safetensors").write_bytes(b"an export")
    _age(tmp_path)
    began = _begin(load_config(config))
    assert began is not None
    noop.finish(load_config(config), began, REPORT)
    return config


def test_the_record_answers_a_no_op_with_nothing_computed(project):
    answer = noop.answer(project, [])
    assert answer["stages"]["ingest"] == {"items": 3, "units": "images", "computed": 0, "reused": 3, "failed": 0,
                                          "seconds": 0.0, "reasons": []}
    assert answer["models_loaded"] == [] and answer["outputs"]["written"] == []
    assert noop.as_status(answer)["up_to_date"]


def _same_size_new_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("change", [
    "image bytes, same size, new mtime", "image bytes, mtime put back", "caption", "config value", "model file",
    "deleted image", "added image", "deleted export", "workspace table", "store shard"])
def test_any_change_makes_the_record_stop_answering(project, change):
    root = project.parent
    image = root / "images" / "1.png"
    if change == "image bytes, same size, new mtime":
        _same_size_new_bytes(image)
    elif change == "image bytes, mtime put back":  # only ctime (and the bytes) differ
        before = image.stat()
        _same_size_new_bytes(image)
        os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert image.stat().st_mtime_ns == before.st_mtime_ns and image.stat().st_size == before.st_size
    elif change == "caption":
        (root / "images" / "2.txt").write_text("shape 2, edited\n")
    elif change == "config value":
        project.write_text(project.read_text().replace("max_steps = 3", "max_steps = 4"))
    elif change == "model file":
        (root / "model" / "vae" / "weights.safetensors").write_bytes(bytes(range(64)))
    elif change == "deleted image":
        image.unlink()
    elif change == "added image":
        Image.new("RGB", (64, 48), (9, 9, 9)).save(root / "images" / "new.png")
    elif change == "deleted export":
        (root / "output" / "lora.safetensors").unlink()
    elif change == "workspace table":
        (root / ".sdxlpipe" / "tables" / "ingest.parquet").write_bytes(b"another table")
    elif change == "store shard":
        (root / ".sdxlpipe" / "store" / "shards").mkdir(parents=True)
        (root / ".sdxlpipe" / "store" / "shards" / "x.tar").write_bytes(b"")
    assert noop.answer(project, []) is None


def test_the_record_does_not_answer_other_overrides_a_damaged_record_or_another_version(project, monkeypatch):
    assert noop.answer(project, ["train.max_steps=5"]) is None
    monkeypatch.chdir(project.parent / "images")  # a default relative output_dir would land elsewhere
    assert noop.answer(project, []) is None
    monkeypatch.undo()
    record = noop.record_path(project)
    text = record.read_text()
    record.write_text(text.replace(f'"version": {noop.RECORD_VERSION}', '"version": 0'))
    assert noop.answer(project, []) is None
    record.write_text(text[: len(text) // 2])
    assert noop.answer(project, []) is None
    record.write_text(text)
    assert noop.answer(project, []) is not None


def test_no_record_is_written_when_a_source_file_changed_just_before_the_run(project):
    (project.parent / "images" / "0.txt").write_text("shape 0, just now\n")
    assert noop.begin(load_config(project), []) is None


def test_a_run_that_may_write_removes_the_record(example):
    config = load_config(example)
    _age(example.parent)
    noop.finish(config, _begin(config), REPORT)
    assert noop.answer(example, []) is not None
    run_pipeline(config, "ingest", dry_run=True)  # status writes nothing, the record stays
    assert noop.record_path(example).exists()
    run_pipeline(config, "ingest")
    assert not noop.record_path(example).exists()
