"""`sdxlpipe init` on the layouts people have, then a run that needs no hand edit."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from sdxlpipe.config import load_config
from sdxlpipe.pipeline.runner import run_pipeline
from tests.datasets.files import image_bytes, noise, write
from tests.test_cli import sdxlpipe


def _img2dataset(folder, shards: int = 2, per_shard: int = 4) -> int:
    """A folder as img2dataset 1.47 writes it with output_format="webdataset": per shard
    NNNNN.tar (jpg/txt/json per sample, finished samples in completion order, not key order),
    NNNNN.parquet and NNNNN_stats.json. One sample is a 1-channel (greyscale) JPEG."""
    folder.mkdir(parents=True)
    for shard in range(shards):
        keys = [f"{shard:05d}{i:04d}" for i in range(per_shard)]
        rows = []
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tf:
            for i, key in enumerate(reversed(keys)):  # completion order: not sorted
                if shard == 0 and i == 1:
                    buf = io.BytesIO()
                    noise((40, 56), 99, "L").save(buf, "JPEG")
                    jpg = buf.getvalue()
                else:
                    jpg = image_bytes("JPEG", (64, 48), shard * 100 + i)
                meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                        "caption": f"photo {key}", "width": 64, "height": 48, "error_message": None}
                for name, data in ((f"{key}.jpg", jpg), (f"{key}.txt", f"photo {key}".encode()),
                                   (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                rows.append(meta)
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": per_shard, "successes": per_shard, "failed_to_download": 0, "start_time": 0, "end_time": 1}))
    return shards * per_shard


def test_init_then_run_ingests_every_img2dataset_sample_with_no_hand_edit(tmp_path, monkeypatch, capsys):
    total = _img2dataset(tmp_path / "laion")
    config = tmp_path / "sdxlpipe.toml"
    code, out, err = sdxlpipe(monkeypatch, capsys, "init", str(tmp_path / "laion"), "--model", "tiny", "-o", str(config))
    assert code == 0, err
    assert f"wrote {config}: {total} samples in 2 tar shard(s)" in out
    assert f"sdxlpipe run all -c {config}" in out
    assert "kind" not in config.read_text()  # auto-detection, no hand-set source kind

    report = run_pipeline(load_config(config), "caption")
    assert report["rejected"] == []
    assert report["stages"]["ingest"]["items"] == total
    rows = pq.read_table(tmp_path / ".sdxlpipe" / "tables" / "caption.parquet").to_pylist()
    assert sorted(r["caption"] for r in rows) == sorted(f"photo {s:05d}{i:04d}" for s in range(2) for i in range(4))
    assert (40, 56) in {(r["width"], r["height"]) for r in rows}  # the greyscale JPEG is kept


def test_init_takes_the_model_s_resolution_counts_only_images_that_open_and_says_what_next(
        tmp_path, monkeypatch, capsys):
    for i in range(3):
        write(tmp_path / "data" / f"{i}.png", image_bytes("PNG", (64, 48), i))
    (tmp_path / "data" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "data" / "empty.png").write_bytes(b"")
    tiny = tmp_path / "tiny.toml"
    code, out, err = sdxlpipe(monkeypatch, capsys, "init", str(tmp_path / "data"), "--model", "tiny", "-o", str(tiny))
    assert code == 0, err
    assert f"wrote {tiny}: 3 images, 2 left out" in out
    assert "broken.jpg" in err and "empty.png" in err
    cfg = load_config(tiny)
    bucket, train = cfg.params["bucket"], cfg.params["train"]
    assert (bucket.resolution, bucket.step) == (128, 32)  # the tiny model's 16-latent sample size
    assert train.max_steps <= 200 and train.learning_rate >= 1e-3  # a CPU finishes it in minutes

    sdxl = tmp_path / "sdxl.toml"
    code, out, _ = sdxlpipe(monkeypatch, capsys, "init", str(tmp_path / "data"), "-o", str(sdxl))
    cfg = load_config(sdxl)
    assert (cfg.params["bucket"].resolution, cfg.params["bucket"].step) == (1024, 64)
    assert (cfg.params["train"].rank, cfg.params["train"].learning_rate) == (32, 1e-4)


def test_init_reads_a_kohya_img_and_reg_tree_and_an_imagefolder_manifest(tmp_path, monkeypatch, capsys):
    write(tmp_path / "kohya" / "img" / "10_sks dog" / "a.png", image_bytes("PNG", (64, 48), 1))
    write(tmp_path / "kohya" / "reg" / "1_dog" / "b.png", image_bytes("PNG", (64, 48), 2))
    out = tmp_path / "kohya.toml"
    assert sdxlpipe(monkeypatch, capsys, "init", str(tmp_path / "kohya"), "--model", "tiny", "-o", str(out))[0] == 0
    sources = load_config(out).params["ingest"].sources
    assert [(s.kohya_folders, s.is_reg) for s in sources] == [(True, False), (True, True)]

    write(tmp_path / "hf" / "train" / "x.png", image_bytes("PNG", (64, 48), 3))
    (tmp_path / "hf" / "metadata.jsonl").write_text('{"file_name": "train/x.png", "text": "a caption"}\n')
    out = tmp_path / "hf.toml"
    assert sdxlpipe(monkeypatch, capsys, "init", str(tmp_path / "hf"), "--model", "tiny", "-o", str(out))[0] == 0
    config = load_config(out)
    assert config.params["ingest"].sources[0].image_column == "file_name"
    run_pipeline(config, "caption")
    rows = pq.read_table(tmp_path / ".sdxlpipe" / "tables" / "caption.parquet").to_pylist()
    assert [r["caption"] for r in rows] == ["a caption"]



def test_init_on_a_manifest_file_writes_it_as_the_source(tmp_path, monkeypatch, capsys):
    write(tmp_path / "pics" / "a.png", image_bytes("PNG", (64, 48), 1))
    (tmp_path / "list.csv").write_text("image,caption\npics/a.png,a red thing\npics/gone.png,lost\n")
    out = tmp_path / "sdxlpipe.toml"
    code, stdout, err = sdxlpipe(monkeypatch, capsys, "init", str(tmp_path / "list.csv"), "--model", "tiny", "-o", str(out))
    assert code == 0 and "1 images, 1 left out" in stdout and "gone.png" in err
    (source,) = load_config(out).params["ingest"].sources
    assert (source.path, source.image_column, source.caption_column) == (str(tmp_path / "list.csv"), "image", "caption")
