"""Train anywhere from the store alone: machine A encodes and publishes, machine B (no images) trains
on the published dataset, from a copied store or over plain HTTP, and gets A's LoRA."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdxlpipe.cache_format import encode_json
from tests.conftest import cli, copy_example

pytestmark = pytest.mark.slow

# A's example settings, two steps of two samples: what B repeats to get A's LoRA.
TRAIN = """[train]
rank = 4
alpha = 8.0
learning_rate = 1e-3
batch_size = 2
seed = 0
save_every_steps = 1
max_steps = {steps}

[export]
output_dir = "output"
name = "tiny-shapes"
"""
A_SETTINGS = ["--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "train.save_every_steps=1"]
BEFORE_TRAIN = ("ingest", "caption", "bucket", "vae_encode", "text_encode")


@pytest.fixture(scope="module")
def machine_a(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A: four images, `run all` (encode, publish as "a", train, export); its LoRA's tensors."""
    config = copy_example(tmp_path_factory.mktemp("machine") / "a")
    for image in sorted((config.parent / "images").glob("*.*"))[8:]:
        image.unlink()  # four images and their captions
    report = json.loads(cli("run", "all", "-c", str(config), "--json", *A_SETTINGS).stdout)
    return config, report, load_file(config.parent / "output" / "tiny-shapes.safetensors")


def _machine_b(root: Path, store: str, steps: int = 2, extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "sdxlpipe.toml"
    config.write_text(f'model = "tiny"\n{extra}\n[[sources]]\nkind = "dataset"\nname = "a"\nstore = "{store}"\n\n'
                      + TRAIN.format(steps=steps))
    return config


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_machine_without_images_trains_a_copied_store_to_the_same_lora_and_resumes(machine_a, tmp_path):
    config_a, report_a, lora_a = machine_a
    published = report_a["outputs"]["dataset"]
    assert published["name"] == "a" and published["samples"] == 4 and published["published"]
    store = tmp_path / "copied-store"
    shutil.copytree(config_a.parent / ".sdxlpipe" / "store", store)  # "copy the store to machine B"

    # B trains one step, then is asked for two: the run resumes from its checkpoint (max_steps is out of the key).
    config_b = _machine_b(tmp_path / "b", str(store), steps=1)
    first = json.loads(cli("run", "all", "-c", str(config_b), "--json").stdout)
    for stage in BEFORE_TRAIN:
        assert first["stages"][stage]["computed"] == 0, stage
    assert first["models_loaded"] == [], "no VAE or text encoder is loaded to train from cached items"
    assert first["outputs"]["datasets"][0]["snapshot"] == published["snapshot"]
    config_b.write_text(config_b.read_text().replace("max_steps = 1", "max_steps = 2"))
    second = cli("run", "all", "-c", str(config_b), "--json")
    assert "extending from step 1 to 2" in second.stdout
    assert _same_tensors(lora_a, load_file(config_b.parent / "output" / "tiny-shapes.safetensors"))

    # A's images are not needed any more, and the unchanged run is a no-op answered from its record.
    shutil.rmtree(config_a.parent / "images", ignore_errors=True)
    assert cli("status", "-c", str(config_b), "--check").returncode == 0
    assert (config_b.parent / ".sdxlpipe" / ".noop.json").exists()
    # B's report names its source by the dataset and its store: B has no folder of images to name.
    site = tmp_path / "report-b"
    cli("report", "-c", str(config_b), "-o", str(site))
    assert f'"dataset a ({store})"' in "".join(p.read_text() for p in (site / "data").glob("*.js"))
    # Un-publishing the dataset is seen by the next run, which must not answer from that record.
    cli("dataset", "rm", "a", "--store", str(store))
    gone = cli("run", "all", "-c", str(config_b), check=False)
    assert gone.returncode == 2 and "no dataset 'a'" in gone.stderr


@pytest.fixture
def served(tmp_path):
    """Start `python -m http.server` on 127.0.0.1 for a folder; yields (url of it, the request log so far)."""
    procs = []

    def serve(folder: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                import time

                time.sleep(0.05)
        return f"http://127.0.0.1:{port}", proc

    yield serve
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def test_over_plain_http_the_store_is_read_by_name_never_listed_and_gives_the_same_lora(machine_a, tmp_path,
                                                                                       served, monkeypatch):
    config_a, _, lora_a = machine_a
    folder = tmp_path / "www"
    shutil.copytree(config_a.parent / ".sdxlpipe" / "store", folder)
    url, server = served(folder)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-b"))  # machine B's empty shard cache
    config_b = _machine_b(tmp_path / "b", url)
    report = json.loads(cli("run", "all", "-c", str(config_b), "--json").stdout)
    assert report["models_loaded"] == [] and all(report["stages"][s]["computed"] == 0 for s in BEFORE_TRAIN)
    assert _same_tensors(lora_a, load_file(config_b.parent / "output" / "tiny-shapes.safetensors"))
    assert not (config_b.parent / ".sdxlpipe" / ".noop.json").exists(), "a remote dataset changes unseen: no record"

    server.terminate()
    requests = [line.split('"')[1] for line in server.stderr.read().splitlines() if line.count('"') >= 2]
    paths = [r.split()[1] for r in requests]
    assert paths and not [p for p in paths if p.endswith("/") or p.startswith("/index/")], "no listing, no index"
    assert {r.split()[0] for r in requests} <= {"GET", "HEAD"}, "read-only"
    # http.server answers a range request with the whole file: that answer is kept as the cached shard, and
    # later reads fetch whole shards once each, instead of a whole shard per item read.
    shard_gets = [r.split()[1] for r in requests if r.startswith("GET /shards/")]
    assert len(shard_gets) <= 2 * len(set(shard_gets)), shard_gets

    # The shards the snapshot names are deleted on a server: met when read (no request per shard before
    # training), then counted, and the error names the stage and the command.
    lacking = tmp_path / "www-lacking"
    shutil.copytree(folder, lacking)
    for tar in (lacking / "shards" / "vae_encode").glob("*.tar"):
        tar.unlink()
    url, _ = served(lacking)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-c"))
    lost = cli("run", "all", "-c", str(_machine_b(tmp_path / "c", url)), check=False)
    assert lost.returncode == 2, lost.stderr
    assert "4 vae_encode item(s)" in lost.stderr and "sdxlpipe run encode -c" in lost.stderr


def test_a_snapshot_with_deleted_shards_or_crafted_rows_is_refused_before_training(machine_a, tmp_path):
    config_a, _, _ = machine_a
    store = tmp_path / "store"
    shutil.copytree(config_a.parent / ".sdxlpipe" / "store", store)
    config_b = _machine_b(tmp_path / "b", str(store))
    for tar in (store / "shards" / "text_encode").glob("*.tar"):
        tar.unlink()
    proc = cli("run", "all", "-c", str(config_b), check=False)
    assert proc.returncode == 2
    assert "text_encode item(s)" in proc.stderr and "are missing" in proc.stderr
    assert f"sdxlpipe run encode -c {config_a}" in proc.stderr
    assert not (config_b.parent / ".sdxlpipe" / "train").exists()

    # A ref naming a snapshot whose item rows name a path for a shard, every hash consistent: refused whole
    # before any row names a file, as a crafted index fragment is.
    import pyarrow as pa
    import pyarrow.parquet as pq
    import xxhash

    snapshots = store / "datasets" / "snapshots"
    ref = store / "datasets" / "refs" / "a.json"
    doc = json.loads(ref.read_text())
    manifest = json.loads((snapshots / f"{doc['snapshot']}.json").read_text())
    entry = manifest["items"]["vae_encode"]
    rows = pq.read_table(snapshots / f"{entry['xxh3']}.parquet")
    rows = rows.set_column(rows.column_names.index("shard_id"), "shard_id",
                           pa.array(["../../../../etc/passwd"] * rows.num_rows))
    crafted = tmp_path / "crafted.parquet"
    pq.write_table(rows, crafted)
    data = crafted.read_bytes()
    entry.update(xxh3=xxhash.xxh3_128_hexdigest(data), bytes=len(data))
    (snapshots / f"{entry['xxh3']}.parquet").write_bytes(data)
    data = encode_json(manifest)
    (snapshots / f"{xxhash.xxh3_128_hexdigest(data)}.json").write_bytes(data)
    ref.write_bytes(encode_json({**doc, "snapshot": xxhash.xxh3_128_hexdigest(data)}))
    proc = cli("status", "-c", str(config_b), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "refused" in proc.stderr and "shard_id" in proc.stderr, proc.stderr


def test_image_sources_and_a_dataset_source_train_together(machine_a, tmp_path):
    config_a, _, _ = machine_a
    root = tmp_path / "mixed"
    (root / "images").mkdir(parents=True)
    example = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "images"
    for image in sorted(example.iterdir())[20:24]:  # two other images and their captions
        shutil.copy(image, root / "images" / image.name)
    config = _machine_b(root, str(config_a.parent / ".sdxlpipe" / "store"), steps=1,
                        extra='[[sources]]\npath = "images"\n\n[bucket]\nresolution = 128\nstep = 32\nmin_side = 64\nmax_side = 256\n')
    report = json.loads(cli("run", "all", "-c", str(config), "--json").stdout)
    assert report["stages"]["ingest"]["items"] == 2 and report["stages"]["vae_encode"]["computed"] == 2
    run = Path(report["outputs"]["checkpoint"]).parent.parent
    assert json.loads((run / "key.json").read_text())["sample_count"] == 2 + 4
    assert report["outputs"]["dataset"]["samples"] == 2, "it publishes its own rows only"
    # The file describes each group of rows with the settings that made it, and counts every caption's tags.
    meta = _metadata(root / "output" / "tiny-shapes.safetensors")
    groups = json.loads(meta["sdxlpipe_sources"])  # in [[sources]] order: the images come first in this config
    snapshot = report["outputs"]["datasets"][0]["snapshot"]
    assert [(g["sources"], g["dataset"], g["samples"]) for g in groups] == [([0], None, 2), ([1], f"a@{snapshot}", 4)]
    added: dict[str, int] = {}
    for group in groups:
        for tags in json.loads(group["ss_tag_frequency"]).values():
            for tag, n in tags.items():
                added[tag] = added.get(tag, 0) + n
    assert {t: n for tags in json.loads(meta["ss_tag_frequency"]).values() for t, n in tags.items()} == added


# The export metadata each stage up to the publish point declares (bucket, caption, text_encode).
ROW_SETTINGS = ("ss_resolution", "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_bucket_no_upscale", "modelspec.resolution",
                "ss_caption_tag_dropout_rate", "ss_shuffle_caption", "ss_keep_tokens", "ss_tag_frequency",
                "ss_max_token_length", "ss_clip_skip")


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()


def test_a_lora_trained_from_a_dataset_says_the_settings_the_snapshot_records_not_the_trainers(machine_a, tmp_path):
    """B's config keeps the default bucket resolution (1024) and sets other caption and text-encoder settings; its
    rows are A's, bucketed at 128 and encoded with A's settings, so the file must say A's (docs/decisions.md 73)."""
    config_a, _, _ = machine_a
    config = _machine_b(tmp_path / "b", str(config_a.parent / ".sdxlpipe" / "store"), steps=1,
                        extra="[caption]\nkeep_tokens = 2\nshuffle_tags = true\n[text_encode]\nclip_skip = 2\n")
    cli("run", "all", "-c", str(config), "--json")
    a = _metadata(config_a.parent / "output" / "tiny-shapes.safetensors")
    b = _metadata(config.parent / "output" / "tiny-shapes.safetensors")
    assert b["ss_resolution"] == "(128, 128)" and b["ss_keep_tokens"] == "0" and "ss_clip_skip" not in b
    assert {k: b.get(k) for k in ROW_SETTINGS} == {k: a.get(k) for k in ROW_SETTINGS}
    assert "sdxlpipe_sources" not in b, "one group of rows"
    assert json.loads(b["sdxlpipe_config"])["caption"]["keep_tokens"] == 2, "the config as given is still recorded"


def test_a_stage_error_in_a_run_on_a_dataset_alone_is_an_error_with_a_hint_not_a_traceback(machine_a, tmp_path):
    """The runner looks for damaged items of the config's own rows after any stage error; with a dataset source
    alone those rows are none, and that empty filter was a pyarrow traceback that hid the stage's own error."""
    config_a, _, _ = machine_a
    config = _machine_b(tmp_path / "b", str(config_a.parent / ".sdxlpipe" / "store"), steps=1)
    proc = cli("run", "all", "-c", str(config), "--set", "train.validation_every_steps=1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "no held-out items" in proc.stderr and "Hint:" in proc.stderr


def test_a_server_that_fails_each_file_once_is_retried_not_taken_for_damage(machine_a, tmp_path, monkeypatch):
    """HTTP 503 and a dropped connection are transient: B retries them and trains A's LoRA, marking nothing bad.

    fsspec's HTTP filesystem raises aiohttp's errors for them (fsspec/implementations/http.py,
    `_raise_not_found_for_status` -> `ClientResponse.raise_for_status`), which are not OSErrors."""
    import http.server
    import threading
    from functools import partial

    config_a, _, lora_a = machine_a
    folder = tmp_path / "www"
    shutil.copytree(config_a.parent / ".sdxlpipe" / "store", folder)
    failed: set[str] = set()
    lock = threading.Lock()

    class Flaky(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            with lock:
                first = self.path not in failed
                failed.add(self.path)
            if not first:
                return super().do_GET()
            if self.path.startswith("/shards/"):
                self.close_connection = True  # dropped without an answer
                return
            self.send_error(503, "busy")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Flaky, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-b"))
        config_b = _machine_b(tmp_path / "b", f"http://127.0.0.1:{server.server_address[1]}")
        run = cli("run", "all", "-c", str(config_b), "--json", check=False)
    finally:
        server.shutdown()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "retrying" in run.stderr and "Traceback" not in run.stderr
    assert any(p.startswith("/shards/") for p in failed) and any(p.startswith("/datasets/") for p in failed), failed
    assert _same_tensors(lora_a, load_file(config_b.parent / "output" / "tiny-shapes.safetensors"))
