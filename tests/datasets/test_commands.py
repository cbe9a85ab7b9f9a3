"""init, inspect and import kohya: the commands that meet a user's dataset first."""

from __future__ import annotations


import pyarrow.parquet as pq

from sdxlpipe.config import load_config
from sdxlpipe.pipeline.runner import run_pipeline
from tests.conftest import cli, cli_json
from tests.datasets.files import image_bytes, write
from tests.report.data import read_data


def _kohya_folder(root):
    for i in range(3):
        write(root / "5_sks dog" / f"dog{i}.png", image_bytes("PNG", (64, 48), i))
    (root / "5_sks dog" / "dog0.txt").write_text("sks dog, running, grass, sky, ball, outdoors")
    (root / "5_sks dog" / "dog1.txt").write_text("sks dog, sitting, sofa, indoors, lamp, window")
    for i in range(2):
        write(root / "1_dog" / f"reg{i}.jpg", image_bytes("JPEG", (48, 64), 10 + i))


def test_init_writes_a_commented_config_that_runs_on_the_folder(tmp_path):
    _kohya_folder(tmp_path / "data")
    out = cli("init", str(tmp_path / "data"), "--model", "tiny", "-o", str(tmp_path / "sdxlpipe.toml")).stdout
    assert "wrote" in out
    text = (tmp_path / "sdxlpipe.toml").read_text()
    assert "kohya_folders = true" in text and "shuffle_tags = true" in text and "# " in text

    config = load_config(tmp_path / "sdxlpipe.toml")
    report = run_pipeline(config, "bucket")
    assert report["rejected"] == [] and report["stages"]["bucket"]["items"] == 5
    rows = {r["source"].rsplit("/", 1)[1]: r for r in pq.read_table(config.workspace / "tables" / "bucket.parquet").to_pylist()}
    assert rows["dog2.png"]["caption"] == "sks dog" and rows["dog2.png"]["repeats"] == 5
    assert rows["reg0.jpg"]["repeats"] == 1

    again = cli("init", str(tmp_path / "data"), "-o", str(tmp_path / "sdxlpipe.toml"), check=False)
    assert again.returncode == 2 and "--force" in again.stderr


def test_inspect_reports_sources_buckets_short_batches_tokens_and_plots(tmp_path):
    _kohya_folder(tmp_path / "data")
    (tmp_path / "data" / "5_sks dog" / "broken.png").write_bytes(b"")
    cfg = tmp_path / "sdxlpipe.toml"
    cfg.write_text('model = "tiny"\n[[sources]]\npath = "data"\nkohya_folders = true\n'
                   '[bucket]\nresolution = 128\nstep = 32\nmin_side = 64\nmax_side = 256\n')
    result = cli_json("inspect", "-c", str(cfg), "--batch-size", "4", "--plot")

    assert result["samples"] == 5 and result["samples_per_epoch"] == 3 * 5 + 2
    assert result["sources"]["5_sks dog"]["caption_from"] == {"sidecar": 2, "prompt": 1}
    assert [r["path"].rsplit("/", 1)[1] for r in result["rejected"]] == ["broken.png"]
    by_bucket = {tuple(b["bucket"]): b for b in result["buckets"]}
    landscape = next(b for (w, h), b in by_bucket.items() if w > h)
    portrait = next(b for (w, h), b in by_bucket.items() if w < h)
    assert (landscape["samples_per_epoch"], landscape["full_batches"], landscape["short_batch"]) == (15, 3, 3)
    assert (portrait["samples_per_epoch"], portrait["full_batches"], portrait["short_batch"]) == (2, 0, 2)
    assert result["captions"]["tokens"]["max"] > 0 and result["captions"]["over_token_window"] == 0
    assert result["top_tags"][0] == ["sks dog", 3]
    # --plot writes the report; its Dataset page draws these buckets.
    assert result["plot"] == str(tmp_path / ".sdxlpipe" / "report" / "index.html")
    assert read_data(tmp_path / ".sdxlpipe" / "report", "summary")["inspect"]["buckets"] == result["buckets"]


def test_import_kohya_maps_what_it_can_and_names_the_rest(tmp_path):
    _kohya_folder(tmp_path / "train")
    kohya = tmp_path / "dataset.toml"
    kohya.write_text("""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"

[[datasets]]
resolution = 128
batch_size = 2
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256
bucket_reso_steps = 32
bucket_no_upscale = true
color_aug = true

  [[datasets.subsets]]
  image_dir = "train/5_sks dog"
  class_tokens = "sks dog"
  num_repeats = 5
  caption_dropout_rate = 0.05
  face_crop_aug_range = [2.0, 4.0]
  random_crop = true
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "train/1_dog"
  class_tokens = "dog"
  is_reg = true
""")
    proc = cli("import", "kohya", str(kohya), "--model", "tiny", "-o", str(tmp_path / "sdxlpipe.toml"))
    assert "color_aug" in proc.stderr and "face_crop_aug_range" in proc.stderr
    config = load_config(tmp_path / "sdxlpipe.toml")
    caption, bucket = config.params["caption"], config.params["bucket"]
    assert (caption.shuffle_tags, caption.keep_tokens) == (True, 1)
    assert (bucket.resolution, bucket.min_side, bucket.max_side, bucket.step, bucket.no_upscale, bucket.crop) == (
        128, 64, 256, 32, True, "random")
    assert config.params["vae_encode"].flip_aug is True
    assert (config.params["train"].batch_size, config.params["train"].caption_dropout) == (2, 0.05)
    sources = config.params["ingest"].sources
    assert [(s.repeats, s.is_reg, s.prompt) for s in sources] == [(5, False, "sks dog"), (1, True, "dog")]
    run_pipeline(config, "caption")
    rows = pq.read_table(config.workspace / "tables" / "caption.parquet").to_pylist()
    assert sorted(r["caption"] for r in rows if r["is_reg"]) == ["dog", "dog"]
