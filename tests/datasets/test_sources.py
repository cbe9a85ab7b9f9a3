"""Given the dataset layouts users already have, ingest + caption read them as users expect."""

from __future__ import annotations

import builtins
import csv
import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdxlpipe.config import load_config
from sdxlpipe.datasets.open_image import open_source_image
from sdxlpipe.pipeline.runner import run_pipeline
from tests.datasets.files import bad_files, good_and_quirky, image_bytes, noise, write


def _config(root: Path, body: str) -> object:
    cfg = root / "sdxlpipe.toml"
    cfg.write_text('model = "tiny"\n' + body)
    return load_config(cfg)


def _rows(cfg, stage="caption") -> list[dict]:
    return pq.read_table(cfg.workspace / "tables" / f"{stage}.parquet").to_pylist()


def _age(root: Path) -> None:
    """Give files an old mtime, as a user's dataset has (a fresh one is re-hashed: git's racy rule)."""
    past = time.time() - 120
    for p in root.rglob("*"):
        os.utime(p, (past, past))


def test_kohya_folders_with_every_sidecar_kind_and_everydream_multiply(tmp_path):
    data = tmp_path / "train"
    write(data / "10_sks dog" / "a.png", image_bytes("PNG", seed=1))
    (data / "10_sks dog" / "a.txt").write_text("sks dog, sitting\n")
    write(data / "10_sks dog" / "b.jpg", image_bytes("JPEG", seed=2))  # no caption: class tokens
    write(data / "3_style" / "c.webp", image_bytes("WEBP", seed=3))
    (data / "3_style" / "c.caption").write_text("a painting")
    write(data / "3_style" / "ed" / "d.png", image_bytes("PNG", seed=4))
    (data / "3_style" / "ed" / "d.yaml").write_text("main_prompt: a castle\ntags:\n  - tag: night\n  - fog\n")
    (data / "3_style" / "ed" / "multiply.txt").write_text("2\n")
    write(data / "3_style" / "e.png", image_bytes("PNG", seed=5))
    (data / "3_style" / "e.json").write_text(json.dumps({"caption": "a bridge"}))
    cfg = _config(tmp_path, '[[sources]]\npath = "train"\nkohya_folders = true\nis_reg = false\n')

    run_pipeline(cfg, "caption")

    rows = {Path(r["source"]).name: r for r in _rows(cfg)}
    assert {n: (r["caption"], r["repeats"], r["subset"]) for n, r in rows.items()} == {
        "a.png": ("sks dog, sitting", 10, "10_sks dog"),
        "b.jpg": ("sks dog", 10, "10_sks dog"),
        "c.webp": ("a painting", 3, "3_style"),
        "d.png": ("a castle, night, fog", 6, "3_style"),
        "e.png": ("a bridge", 3, "3_style"),
    }
    assert rows["b.jpg"]["caption_origin"] == "prompt" and rows["a.png"]["caption_origin"] == "sidecar"


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest_paths_are_relative_to_the_manifest(tmp_path, fmt):
    data = tmp_path / "data"
    write(data / "img" / "one.jpg", image_bytes("JPEG", seed=1))
    write(data / "img" / "two.png", image_bytes("PNG", seed=2))
    write(data / "img" / "three.webp", image_bytes("WEBP", seed=3))
    (data / "img" / "three.txt").write_text("the sidecar wins")
    records = [{"file": "img/one.jpg", "prompt": "first"}, {"file": "img/two.png", "prompt": ""},
               {"file": "img/three.webp", "prompt": "loses to the sidecar"}, {"file": "img/gone.png", "prompt": "x"}]
    manifest = data / f"meta.{fmt}"
    if fmt == "jsonl":
        manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "csv":
        with open(manifest, "w", newline="") as f:
            w = csv.DictWriter(f, ["file", "prompt"])
            w.writeheader()
            w.writerows(records)
    else:
        pq.write_table(pa.Table.from_pylist(records), manifest)
    cfg = _config(tmp_path, f'[[sources]]\npath = "data/meta.{fmt}"\nimage_column = "file"\ncaption_column = "prompt"\n')

    report = run_pipeline(cfg, "caption")

    assert {Path(r["source"]).name: r["caption"] for r in _rows(cfg)} == {
        "one.jpg": "first", "two.png": "two", "three.webp": "the sidecar wins"}
    (gone,) = report["rejected"]
    assert gone["path"].endswith("gone.png") and "does not exist" in gone["reason"]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


class _ReadCounter:
    """Counts the bytes read through open() per path: observes I/O, changes nothing."""

    def __init__(self, monkeypatch):
        self.read: dict[str, int] = {}
        self.opened: list[str] = []  # every path opened, text or binary
        real_open = builtins.open

        def counting_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, Path)):
                self.opened.append(str(file))
            if "b" in mode and isinstance(file, (str, Path)):
                name, real_read = str(file), f.read

                def read(*a):
                    data = real_read(*a)
                    self.read[name] = self.read.get(name, 0) + len(data)
                    return data
                f.read = read
            return f
        monkeypatch.setattr(builtins, "open", counting_open)
        monkeypatch.setattr(io, "open", counting_open)


def test_webdataset_tars_are_read_in_place_and_a_rerun_reads_no_image(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    shards.mkdir()
    images = {"000000000.jpg": image_bytes("JPEG", (64, 64), 1), "000000001.png": image_bytes("PNG", (48, 32), 2),
              "000000002.webp": image_bytes("WEBP", (32, 48), 3)}
    _tar(shards / "00000.tar", [
        ("000000000.jpg", images["000000000.jpg"]), ("000000000.txt", b"a jpeg caption"),
        ("000000000.json", json.dumps({"url": "http://x", "caption": "ignored: txt wins"}).encode()),
        ("000000001.png", images["000000001.png"]), ("000000001.json", json.dumps({"caption": "from json"}).encode()),
    ])
    _tar(shards / "00001.tar", [("000000002.webp", images["000000002.webp"]), ("000000002.txt", b"webp caption"),
                               ("000000003.jpg", b"\xff\xd8 not really a jpeg")])
    (shards / "00000.parquet").write_bytes(b"")  # img2dataset's per-shard metadata sits beside the tars
    _age(tmp_path)
    before = sorted(p.name for p in shards.iterdir())
    cfg = _config(tmp_path, '[[sources]]\npath = "shards"\n')

    report = run_pipeline(cfg, "caption")

    rows = _rows(cfg)
    assert sorted(r["caption"] for r in rows) == ["a jpeg caption", "from json", "webp caption"]
    assert [r["path"].rsplit("/", 2)[-2:] for r in report["rejected"]] == [["00001.tar", "000000003.jpg"]]
    assert sorted(p.name for p in shards.iterdir()) == before  # nothing unpacked
    for r in rows:  # each reference opens the right image, straight from the tar
        name = next(n for n, data in images.items() if Image.open(io.BytesIO(data)).size == (r["width"], r["height"]))
        expected = np.asarray(Image.open(io.BytesIO(images[name])).convert("RGB"))
        assert np.array_equal(np.asarray(open_source_image(r["source"])), expected)

    counter = _ReadCounter(monkeypatch)
    again = run_pipeline(cfg, "caption")
    tar_bytes = sum(n for p, n in counter.read.items() if p.endswith(".tar"))
    assert tar_bytes < min(len(b) for b in images.values())  # captions only, never an image
    assert again["stages"]["ingest"]["computed"] == 0
    assert again["rejected"] == report["rejected"]


def test_noop_rerun_of_a_folder_reads_no_image_bytes_and_no_caption_file(tmp_path, monkeypatch):
    sizes = good_and_quirky(tmp_path / "images")
    bad_files(tmp_path / "images")
    for name in sizes:
        (tmp_path / "images" / name).with_suffix(".txt").write_text(f"caption of {name}\n")
    _age(tmp_path)
    cfg = _config(tmp_path, '[[sources]]\npath = "images"\n[ingest]\nmax_pixels = 100000\n')
    first = run_pipeline(cfg, "ingest")

    counter = _ReadCounter(monkeypatch)
    again = run_pipeline(cfg, "ingest")

    image_reads = {p: n for p, n in counter.read.items() if Path(p).suffix in (".jpg", ".png", ".webp", ".gif")}
    assert image_reads == {}
    assert [p for p in counter.opened if p.endswith(".txt")] == []  # captions answered by their stat
    assert again["rejected"] == first["rejected"] and again["stages"]["ingest"]["computed"] == 0

    # One caption edited: that file alone is read, and its new text is in the table.
    edited = (tmp_path / "images" / sorted(sizes)[0]).with_suffix(".txt")
    edited.write_text("an edited caption\n")
    counter.opened.clear()
    third = run_pipeline(cfg, "ingest")
    assert [Path(p).name for p in counter.opened if p.endswith(".txt")] == [edited.name]
    assert third["stages"]["ingest"]["computed"] == 1
    assert [r["sidecar_caption"] for r in _rows(cfg, "ingest") if r["source"] == str(edited.with_suffix(
        Path(sorted(sizes)[0]).suffix).absolute())] == ["an edited caption"]


def test_every_quirky_image_is_kept_upright_and_every_bad_file_rejected_with_a_reason(tmp_path):
    sizes = good_and_quirky(tmp_path / "images")
    expected_reasons = bad_files(tmp_path / "images")
    cfg = _config(tmp_path, '[[sources]]\npath = "images"\n[ingest]\nmax_pixels = 100000\n')

    report = run_pipeline(cfg, "ingest")

    rows = {Path(r["source"]).name: r for r in _rows(cfg, "ingest")}
    assert {n: (r["width"], r["height"]) for n, r in rows.items()} == sizes
    assert {n for n, r in rows.items() if r["has_alpha"]} == {"alpha.png", "palette.png"}
    reasons = {Path(r["path"]).name: r["reason"] for r in report["rejected"]}
    assert set(reasons) == set(expected_reasons)
    for name, word in expected_reasons.items():
        assert word in reasons[name], (name, reasons[name])
    # What the encoder will see: 8-bit RGB, upright, alpha on white, 16-bit scaled rather than clipped.
    for name, (w, h) in sizes.items():
        im = open_source_image(rows[name]["source"])
        assert (im.mode, im.size) == ("RGBA" if rows[name]["has_alpha"] else "RGB", (w, h)), name
    grey = np.asarray(open_source_image(rows["sixteen.png"]["source"]))
    assert grey[:, :16].max() < 10 and grey[:, 16:].min() > 220  # scaled; a clip would make both white
    alpha = Image.open(tmp_path / "images" / "alpha.png")
    transparent = np.asarray(alpha)[..., 3] == 0
    if transparent.any():
        rgb = np.asarray(open_source_image(rows["alpha.png"]["source"]).convert("RGB"))
        assert (rgb[transparent] == 255).all()


def test_reg_sources_and_repeats_are_per_source(tmp_path):
    write(tmp_path / "inst" / "a.png", image_bytes("PNG", seed=1))
    write(tmp_path / "reg" / "b.png", image_bytes("PNG", seed=2))
    cfg = _config(tmp_path, '[[sources]]\npath = "inst"\nrepeats = 5\n'
                            '[[sources]]\npath = "reg"\nis_reg = true\nprompt = "a dog"\nstem_captions = false\n')
    run_pipeline(cfg, "caption")
    rows = {r["subset"]: r for r in _rows(cfg)}
    assert (rows["inst"]["repeats"], rows["inst"]["is_reg"], rows["inst"]["caption"]) == (5, False, "a")
    assert (rows["reg"]["repeats"], rows["reg"]["is_reg"], rows["reg"]["caption"]) == (1, True, "a dog")


def test_strict_exits_1_on_a_rejected_file(tmp_path):
    from tests.conftest import cli

    write(tmp_path / "images" / "ok.png", image_bytes("PNG", seed=1))
    (tmp_path / "images" / "broken.png").write_bytes(b"")
    (tmp_path / "sdxlpipe.toml").write_text('model = "tiny"\n[[sources]]\npath = "images"\n')
    assert cli("run", "ingest", "-c", str(tmp_path / "sdxlpipe.toml")).returncode == 0
    strict = cli("run", "ingest", "--strict", "-c", str(tmp_path / "sdxlpipe.toml"), check=False)
    assert strict.returncode == 1
    assert "broken.png: empty file (0 bytes)" in strict.stdout


def test_alpha_channel_is_available_for_a_masked_loss(tmp_path):
    from sdxlpipe.datasets import open_source_alpha

    im = noise((20, 10), 1, "RGBA")
    im.putalpha(Image.new("L", (20, 10), 0))
    im.save(tmp_path / "cut.png")
    noise((20, 10), 2).save(tmp_path / "opaque.png")
    alpha = open_source_alpha(str(tmp_path / "cut.png"))
    assert alpha.mode == "L" and alpha.size == (20, 10) and np.asarray(alpha).max() == 0
    opened = open_source_image(str(tmp_path / "cut.png"))
    assert (np.asarray(opened.convert("RGB")) == 255).all()  # fully transparent -> white
    assert np.array_equal(np.asarray(opened.getchannel("A")), np.asarray(alpha))  # alpha kept for masks
    assert open_source_alpha(str(tmp_path / "opaque.png")) is None
