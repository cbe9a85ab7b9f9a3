"""examples/kohya-folder: the native config and the imported kohya config read the same dataset."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq

from sdxlpipe.config import load_config
from sdxlpipe.pipeline.runner import run_pipeline
from tests.conftest import REPO, cli

EXAMPLE = REPO / "examples" / "kohya-folder"


def _samples(config) -> list[tuple]:
    run_pipeline(config, "bucket")
    rows = pq.read_table(config.workspace / "tables" / "bucket.parquet").to_pylist()
    return sorted((r["source"].rsplit("/", 1)[1], r["caption"], r["repeats"], r["is_reg"]) for r in rows)


def test_native_and_imported_configs_agree_on_every_sample(tmp_path):
    root = tmp_path / "kohya-folder"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns(".sdxlpipe", "output"))
    native = _samples(load_config(root / "sdxlpipe.toml"))
    assert native == [
        ("000_yellow_circle.png", (root / "train/10_sks shape/000_yellow_circle.txt").read_text().strip(), 10, False),
        ("001_blue_square.jpg", (root / "train/10_sks shape/001_blue_square.txt").read_text().strip(), 10, False),
        ("002_green_triangle.jpg", "sks shape", 10, False),
        ("005_purple_triangle.jpg", "sks shape", 10, False),
        ("006_blue_circle.png", "shape", 1, True),
        ("010_green_square.jpg", "shape", 1, True),
    ]
    cli("import", "kohya", str(root / "dataset.toml"), "--model", "tiny", "-o", str(root / "imported.toml"))
    assert _samples(load_config(root / "imported.toml")) == native
