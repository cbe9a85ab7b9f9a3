"""Whole runs of the CLI on the bundled example and the tiny model."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import cli, cli_json, copy_example

pytestmark = pytest.mark.slow

STAGES = ("ingest", "caption", "bucket", "vae_encode", "text_encode", "train", "export")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> tuple[Path, dict]:
    """examples/tiny after one full `run all`, shared read-only by the tests below."""
    config = copy_example(tmp_path_factory.mktemp("finished") / "tiny")
    proc = cli("run", "all", "-c", str(config), "--json")
    # stderr is a pipe here, as with `2>run.log`: what it holds is what a log file gets.
    (config.parent.parent / "run.log").write_text(proc.stderr)
    return config, json.loads(proc.stdout)


@pytest.fixture
def trained(finished_run, tmp_path) -> Path:
    """A private copy of the finished run (dataset, workspace, store, outputs)."""
    config, _ = finished_run
    dest = tmp_path / "tiny"
    shutil.copytree(config.parent, dest, symlinks=True)
    # Copies get new mtimes: give them old ones, as a user's files would have.
    past = time.time() - 60
    for p in dest.rglob("*"):
        import os

        os.utime(p, (past, past), follow_symlinks=False)
    return dest / "sdxlpipe.toml"


def test_first_run_computes_every_stage_and_writes_both_lora_files(finished_run):
    _, report = finished_run
    assert list(report["stages"]) == list(STAGES)
    for name in STAGES:
        stage = report["stages"][name]
        assert stage["computed"] > 0, name
        assert stage["failed"] == 0, name
    assert report["stages"]["ingest"]["items"] == 32
    assert report["stages"]["vae_encode"]["computed"] == 32
    config, _ = finished_run
    captions = {p.read_text().strip() for p in (config.parent / "images").glob("*.txt")}
    # Each distinct caption once, the two file-name captions, and the empty caption.
    assert report["stages"]["text_encode"]["computed"] == len(captions) + 2 + 1
    assert report["rejected"] == []
    assert sorted(Path(p).name for p in report["outputs"]["lora"]) == [
        "tiny-shapes.diffusers.safetensors", "tiny-shapes.safetensors"]
    assert all(Path(p).exists() for p in report["outputs"]["lora"])
    assert report["outputs"]["written"] == report["outputs"]["lora"] and report["failed_stages"] == []


def test_a_run_logging_to_a_file_shows_vae_encode_and_train_progress_with_counts(finished_run):
    config, _ = finished_run
    log = (config.parent.parent / "run.log").read_text().splitlines()
    encode = [line for line in log if "vae_encode " in line and "/32 items" in line]
    assert encode and "vae_encode 32/32 items (100%)" in encode[-1]
    steps = [line for line in log if "train step " in line]
    assert len(steps) >= 2 and "train step 20/20 (100%)" in steps[-1]
    # The first line may come before the clock has moved (no rate, no ETA yet): any line will do.
    # The rate reads "steps/s" when a step takes under a second (an idle machine), else "s/step".
    assert any(all(word in line for word in ("loss ", "lr ", "ETA")) and ("s/step" in line or "steps/s" in line)
               for line in steps)


def test_rerun_prints_up_to_date_not_wrote_and_status_check_follows_set(trained):
    proc = cli("run", "all", "-c", str(trained))
    assert "wrote" not in proc.stdout and proc.stdout.count("up to date: ") == 2
    # Each file says which tools it is for (decision 54): the diffusers file is not ComfyUI's.
    kohya = [line for line in proc.stdout.splitlines() if line.endswith("tiny-shapes.safetensors  (for ComfyUI, "
                                                                          "A1111/Forge, kohya sd-scripts, diffusers)")]
    diffusers = [line for line in proc.stdout.splitlines() if "tiny-shapes.diffusers.safetensors  (for diffusers, "
                 "peft; not ComfyUI or A1111" in line and line.endswith("give them tiny-shapes.safetensors)")]
    assert len(kohya) == len(diffusers) == 1, proc.stdout
    assert cli("status", "-c", str(trained), "--check").returncode == 0
    stale = cli("status", "-c", str(trained), "--check", "--set", "train.max_steps=21", check=False)
    assert stale.returncode == 1 and "train.max_steps 20 -> 21" in stale.stdout


def test_status_of_a_shorter_run_than_the_finished_one_says_what_is_there_and_that_run_would_fail(finished_run):
    config, _ = finished_run  # trained to step 20; status writes nothing
    shorter = ["--set", "train.max_steps=10"]
    proc = cli("status", "-c", str(config), *shorter)
    assert "Error:" not in proc.stderr and "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("train ")]
    assert "1 cannot run" in line and "trained to step 20, past the 10 asked for" in line
    assert "train.max_steps = 20" in line
    assert "would fail at train" in proc.stdout and "up to date." not in proc.stdout
    # For scripts: not up to date (`status --check || sdxlpipe run all` then shows the run's error).
    assert cli("status", "-c", str(config), "--check", *shorter, check=False).returncode == 1


def test_kohya_file_carries_the_metadata_kohya_tools_show(finished_run):
    import json

    from safetensors import safe_open

    _, report = finished_run
    (kohya,) = [p for p in report["outputs"]["lora"] if not p.endswith(".diffusers.safetensors")]
    with safe_open(kohya, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 8.0
    assert meta["ss_gradient_checkpointing"] == "False"  # unset: off for the tiny UNet (what the run did)
    assert json.loads(meta["ss_dataset_dirs"]) == {"images": {"n_repeats": 1, "img_count": 32}}
    tags = json.loads(meta["ss_tag_frequency"])["images"]
    # "a red circle on a blue background" is one comma-free tag; 30 such captions, 2 from file names.
    assert sum(tags.values()) == 32


FAST_PROBE = """
import sys
from sdxlpipe.cli import main
sys.argv = ['sdxlpipe', *{command!r}, '-c', {config!r}, '--json']
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
# pydantic: typer's parameter coercion (0.2 s), skipped when the record answers before typer parses
heavy = [m for m in ('pyarrow', 'numpy', 'fsspec', 'torch', 'pydantic') if m in sys.modules]
print('HEAVY', heavy, file=sys.stderr)
"""


def test_rerun_computes_nothing_loads_no_model_and_the_next_answers_from_its_record(trained):
    report = cli_json("run", "all", "-c", str(trained))
    assert {n: s["computed"] for n, s in report["stages"].items()} == dict.fromkeys(STAGES, 0)
    assert report["models_loaded"] == []
    # Nothing changed since that complete run: run all and status answer from its record,
    # the same answer (but the timings) without importing pyarrow, numpy, fsspec, torch or pydantic.
    for command in (["run", "all"], ["status"]):
        proc = subprocess.run([sys.executable, "-c", FAST_PROBE.format(command=command, config=str(trained))],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stderr.strip().splitlines()[-1] == "HEAVY []", proc.stderr[-3000:]
        answer = json.loads(proc.stdout)
        if command == ["status"]:
            assert answer["up_to_date"] and {n: s["up_to_date"] for n, s in answer["stages"].items()} == {
                n: s["items"] for n, s in report["stages"].items()}
        else:
            assert answer == {**report, "stages": {n: {**s, "seconds": 0.0} for n, s in report["stages"].items()}}
            assert list(answer["stages"]) == list(STAGES)
    # One edited caption: the record no longer answers, and status sees the one text to encode.
    (trained.parent / "images" / "004_orange_square.txt").write_text("an orange square, edited\n")
    status = cli_json("status", "-c", str(trained))
    assert status["stages"]["text_encode"]["to_compute"] == 1 and not status["up_to_date"]


@pytest.mark.parametrize("command", [["status"], ["run", "all"]])
def test_status_and_noop_run_do_not_import_torch(trained, command):
    probe = (
        "import sys\n"
        "from sdxlpipe.cli import app\n"
        f"sys.argv = ['sdxlpipe', *{command!r}, '-c', {str(trained)!r}]\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "NO-TORCH"
    if command == ["status"]:
        assert "Data and pipelines are up to date." in proc.stdout


def test_editing_one_caption_recomputes_one_text_item_and_no_latent(trained):
    (trained.parent / "images" / "004_orange_square.txt").write_text("an orange square, edited\n")
    status = cli_json("status", "-c", str(trained))
    assert status["stages"]["text_encode"]["to_compute"] == 1
    assert status["stages"]["vae_encode"]["to_compute"] == 0
    report = cli_json("run", "all", "-c", str(trained))
    computed = {n: s["computed"] for n, s in report["stages"].items()}
    assert computed["text_encode"] == 1
    assert computed["vae_encode"] == 0
    assert computed["train"] == 1 and computed["export"] == 1


def test_adding_one_image_computes_one_latent_and_one_text_item(trained):
    images = trained.parent / "images"
    Image.new("RGB", (150, 110), (10, 200, 200)).save(images / "new_cyan_square.png")
    (images / "new_cyan_square.txt").write_text("a cyan square\n")
    report = cli_json("run", "encode", "-c", str(trained))
    assert report["stages"]["vae_encode"]["computed"] == 1
    assert report["stages"]["text_encode"]["computed"] == 1
    assert report["stages"]["ingest"]["items"] == 33


def test_kohya_and_diffusers_files_give_the_same_unet_output(finished_run, tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    config, report = finished_run
    model_dir = tmp_path / "tiny-model"
    cli("model", "save", "tiny", str(model_dir))
    files = {Path(p).name: p for p in report["outputs"]["lora"]}

    def unet_output(lora_file: str | None) -> torch.Tensor:
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, local_files_only=True)
        if lora_file:
            pipe.load_lora_weights(lora_file)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 16, 16, generator=g)
        cond = torch.randn(1, 77, 96, generator=g)
        pooled = torch.randn(1, 32, generator=g)
        time_ids = torch.tensor([[128.0, 128, 0, 0, 128, 128]])
        with torch.no_grad():
            return pipe.unet(x, torch.tensor([500]), cond,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    base = unet_output(None)
    kohya = unet_output(files["tiny-shapes.safetensors"])
    diffusers_out = unet_output(files["tiny-shapes.diffusers.safetensors"])
    assert torch.allclose(kohya, diffusers_out, atol=1e-5)
    assert (kohya - base).abs().max() > 1e-4


# Runs `sdxlpipe run ...` and SIGKILLs it at the Nth fsync of a file in a checkpoint being written
# (checkpoints/.tmp-*): in the middle of a checkpoint, before it is renamed into place.
KILL_IN_CHECKPOINT = r"""
import os, signal, sys
real, seen, kill_at = os.fsync, [0], int(sys.argv[1])
def fsync(fd):
    if "/checkpoints/.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    real(fd)
os.fsync = fsync
sys.argv = ["sdxlpipe", *sys.argv[2:]]
from sdxlpipe.cli import main
main()
"""


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to name fsynced files")
def test_killed_training_resumes_and_ends_with_the_same_weights(finished_run, trained):
    """The finished run's step-10 checkpoint is the unbroken reference; its copy trains 10 steps again
    from the cached latents (neither save cadence nor, with a constant LR, max_steps is in the train
    key: decision 29), is SIGKILLed in the middle of writing a checkpoint (a seeded fsync within the
    2nd-3rd of 5) and resumed."""
    from safetensors.torch import load_file

    train_root = trained.parent / ".sdxlpipe" / "train"
    shutil.rmtree(train_root)
    settings = ["--set", "train.save_every_steps=2", "--set", "train.max_steps=10"]
    # A checkpoint makes 8 fsyncs in its temp folder: network.json and state.json, each written
    # atomically (the file, then the folder), then each of its 4 files before the rename.
    kill_at = random.Random(20).randrange(9, 25)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_IN_CHECKPOINT, str(kill_at), "run", "all", "-c", str(trained),
                           *settings], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not list(train_root.glob("*/done.json")), "the run finished before it was killed"
    assert list(train_root.glob("*/checkpoints/.tmp-*")), "killed outside a checkpoint write"

    resumed = cli("run", "all", "-c", str(trained), *settings)
    assert "resuming" in resumed.stderr
    assert not list(train_root.glob("*/checkpoints/.tmp-*")), "the killed checkpoint's temp folder is left"

    def final_adapter(config: Path):
        (adapter,) = (config.parent / ".sdxlpipe" / "train").glob("*/checkpoints/step-00000010/adapter.safetensors")
        return load_file(adapter)

    a, b = final_adapter(finished_run[0]), final_adapter(trained)
    assert a.keys() == b.keys()
    assert all(bool((a[k] == b[k]).all()) for k in a)


# Runs `sdxlpipe run ...` and SIGKILLs it at the Nth os.replace into the output folder, before the
# rename: the file is written and fsynced under its temp name.
KILL_AT_EXPORT_RENAME = r"""
import os, signal, sys
real, seen, kill_at = os.replace, [0], int(sys.argv[1])
def replace(src, dst, *args, **kwargs):
    if os.path.basename(os.path.dirname(os.fspath(dst))) == "output":
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = ["sdxlpipe", *sys.argv[2:]]
from sdxlpipe.cli import main
main()
"""
# The export writes the kohya file, the diffusers file, then its record: killed before one of the
# three renames (seeded), so a new file is half-way (a temp) and the old record still names the old.
EXPORT_KILL = random.Random(12).choice([1, 2, 3])


def test_an_export_killed_at_a_rename_reruns_to_the_files_of_an_unbroken_export(trained):
    """A changed export (fp16) over the finished run's fp32 files is killed at a seeded rename; the
    rerun ends with the unbroken fp16 export's files, no temp file, and trains nothing."""
    out = trained.parent / "output"
    fp16 = ["--set", "export.dtype=fp16"]
    fp32_files = {p.name: p.read_bytes() for p in out.iterdir()}
    cli("run", "export", "-c", str(trained), *fp16)
    unbroken = _contents(out)
    assert unbroken.keys() == fp32_files.keys() and unbroken != _contents(out, fp32_files)
    for p in out.iterdir():  # the finished fp32 export again: the files a changed export replaces
        p.write_bytes(fp32_files[p.name]) if p.name in fp32_files else p.unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_AT_EXPORT_RENAME, str(EXPORT_KILL), "run", "export",
                           "-c", str(trained), *fp16], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    report = cli_json("run", "export", "-c", str(trained), *fp16)
    assert {n: s["computed"] for n, s in report["stages"].items()} == {**dict.fromkeys(STAGES, 0), "export": 1}
    assert _contents(out) == unbroken, EXPORT_KILL  # the same files, no temp left beside them


def _contents(folder: Path, files: dict[str, bytes] | None = None) -> dict:
    """Every file's content by name: tensors and metadata of a safetensors file (its header's key
    order differs between processes), the bytes of any other."""
    from safetensors.torch import load as load_tensors

    files = files if files is not None else {p.name: p.read_bytes() for p in folder.iterdir()}
    out = {}
    for name, data in files.items():
        if name.endswith(".safetensors"):
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
            out[name] = (header.get("__metadata__"), {k: v.tolist() for k, v in load_tensors(data).items()})
        else:
            out[name] = data
    return out
