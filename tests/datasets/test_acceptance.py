"""Issue 3's promises, end to end on real files the tests make."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from sdxlpipe.config import load_config
from sdxlpipe.pipeline.runner import run_pipeline
from tests.conftest import cli_json, copy_example
from tests.datasets.files import bad_files, good_and_quirky

TINY = """model = "tiny"
[[sources]]
path = "images"
[ingest]
max_pixels = 100000
[bucket]
resolution = 128
step = 32
min_side = 64
max_side = 256
[train]
rank = 4
max_steps = 4
batch_size = 2
save_every_steps = 4
[export]
formats = ["kohya"]
output_dir = "output"
name = "mixed"
"""


@pytest.mark.slow
def test_a_folder_of_good_quirky_and_broken_files_runs_through_run_all(tmp_path):
    sizes = good_and_quirky(tmp_path / "images")
    expected = bad_files(tmp_path / "images")
    (tmp_path / "sdxlpipe.toml").write_text(TINY)

    report = cli_json("run", "all", "-c", str(tmp_path / "sdxlpipe.toml"))

    reasons = {r["path"].rsplit("/", 1)[1]: r["reason"] for r in report["rejected"]}
    assert set(reasons) == set(expected)
    for name, word in expected.items():
        assert word in reasons[name]
    for name in ("vae_encode", "text_encode", "train", "export"):
        assert report["stages"][name]["failed"] == 0, name
    assert report["stages"]["train"]["computed"] == 1
    # The table the train stage read holds every good image, with a latent and a text key.
    trained = pq.read_table(tmp_path / ".sdxlpipe" / "tables" / "text_encode.parquet").to_pylist()
    assert sorted(r["source"].rsplit("/", 1)[1] for r in trained) == sorted(sizes)
    assert all(r["latent_key"] and r["text_key"] for r in trained)


def _bucket_rows(config) -> dict[str, tuple]:
    t = pq.read_table(config.workspace / "tables" / "bucket.parquet")
    cols = ["key", "bucket_w", "bucket_h", "resize_w", "resize_h", "crop_top", "crop_left"]
    return {r[0]: r[1:] for r in zip(*t.select(cols).to_pydict().values())}


def test_bucket_changes_recompute_only_moved_latents_and_caption_changes_none(tmp_path):
    config_path = copy_example(tmp_path / "tiny")
    before_cfg = load_config(config_path)
    run_pipeline(before_cfg, "vae_encode")
    before = _bucket_rows(before_cfg)

    cfg = load_config(config_path, ["bucket.crop=random"])
    status = run_pipeline(cfg, "vae_encode", dry_run=True)["stages"]["vae_encode"]
    report = run_pipeline(cfg, "vae_encode")["stages"]
    after = _bucket_rows(cfg)
    moved = sum(1 for k in after if after[k] != before[k])
    assert 0 < moved < len(after)  # square images have no slack to crop differently
    assert status["computed"] == report["vae_encode"]["computed"] == moved

    captions = load_config(config_path, ["bucket.crop=random", "caption.caption_prefix='sks, '",
                                         "caption.shuffle_tags=true"])
    again = run_pipeline(captions, "vae_encode")["stages"]
    assert again["caption"]["computed"] == len(after)
    assert again["vae_encode"]["computed"] == 0
