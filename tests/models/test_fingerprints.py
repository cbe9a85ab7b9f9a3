"""Given a model spec, when it is fingerprinted, then each component has its own key."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from sdxlpipe.models.fingerprints import model_fingerprints
from sdxlpipe.models.spec import COMPONENTS, ModelError

NO_TORCH = """
import json, sys
from pathlib import Path
from sdxlpipe.models.fingerprints import model_fingerprints
prints = model_fingerprints("tiny", None, lambda p: "unused", Path("."))
heavy = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
print(json.dumps({"prints": prints, "heavy": heavy}))
"""


class CountingHasher:
    """xxh3-128 of a file's bytes, counting the files it had to read."""

    def __init__(self) -> None:
        self.read: list[Path] = []

    def __call__(self, path: Path) -> str:
        self.read.append(path)
        return xxhash.xxh3_128_hexdigest(Path(path).read_bytes())


def test_tiny_fingerprint_is_stable_and_needs_no_torch():
    out = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["heavy"] == []
    assert result["prints"] == model_fingerprints("tiny", None, CountingHasher(), Path("."))
    assert set(result["prints"]) == set(COMPONENTS)
    assert len(set(result["prints"].values())) == len(COMPONENTS)
    assert all(len(v) == 32 for v in result["prints"].values())


def test_changing_one_vae_weight_file_changes_only_the_vae(tiny_dir, tmp_path):
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    before = model_fingerprints(str(model), None, CountingHasher(), tmp_path)
    assert before != model_fingerprints("tiny", None, CountingHasher(), tmp_path)

    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip the bits of one byte of the last tensor
    weights.write_bytes(bytes(data))
    after = model_fingerprints("model", None, CountingHasher(), tmp_path)  # relative to base_dir

    assert [k for k in COMPONENTS if before[k] != after[k]] == ["vae"]


def test_a_vae_override_changes_only_the_vae(tiny_dir, tmp_path):
    vae_dir = shutil.copytree(tiny_dir / "vae", tmp_path / "my-vae")  # a VAE repo: files at its root
    base = model_fingerprints("tiny", None, CountingHasher(), tmp_path)
    overridden = model_fingerprints("tiny", "my-vae", CountingHasher(), tmp_path)
    assert [k for k in COMPONENTS if base[k] != overridden[k]] == ["vae"]
    from_dir_vae = model_fingerprints(str(tiny_dir), None, CountingHasher(), tmp_path)["vae"]
    assert overridden["vae"] == from_dir_vae  # same files, same fingerprint
    assert vae_dir.exists()


def test_a_single_safetensors_file_keys_every_component_on_its_bytes(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"weights v1")
    first = model_fingerprints("model.safetensors", None, CountingHasher(), tmp_path)
    ckpt.write_bytes(b"weights v2")
    second = model_fingerprints("model.safetensors", None, CountingHasher(), tmp_path)
    assert all(first[k] != second[k] for k in COMPONENTS)


def test_pickle_specs_are_refused_unless_allowed(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="pickle"):
        model_fingerprints("model.ckpt", None, CountingHasher(), tmp_path)
    prints = model_fingerprints("model.ckpt", None, CountingHasher(), tmp_path, allow_pickle=True)
    assert set(prints) == set(COMPONENTS)


def fake_hub_cache(source: Path, cache: Path, repo_id: str) -> Path:
    """Lay out `source` the way huggingface_hub caches a download: blobs named by sha256, symlinked."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo


def test_a_cached_hub_model_is_fingerprinted_by_blob_names_and_loads(tiny_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from sdxlpipe.models.loading import load_unet

    fake_hub_cache(tiny_dir, tmp_path / "hub", "acme/tiny-sdxl")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hasher = CountingHasher()

    prints = model_fingerprints("acme/tiny-sdxl", None, hasher, tmp_path)

    assert hasher.read == []  # the blob names stood in for the bytes
    assert set(prints) == set(COMPONENTS)
    assert prints != model_fingerprints(str(tiny_dir), None, CountingHasher(), tmp_path)
    assert load_unet("acme/tiny-sdxl").config.cross_attention_dim == 96


def test_an_uncached_hub_id_names_the_fix(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as err:
        model_fingerprints("acme/missing", None, CountingHasher(), tmp_path)
    assert "acme/missing" in err.value.what and "hf download acme/missing" in err.value.hint


def test_folder_fingerprints_written_by_earlier_versions_are_unchanged(tmp_path):
    # Fingerprints enter every item key: pinned as computed before the canonical JSON
    # helpers were folded into one (codec.canonical_json).
    for c in COMPONENTS:
        (tmp_path / c).mkdir()
        (tmp_path / c / "config.json").write_text('{"c": "%s"}' % c)
        (tmp_path / c / "w.bin").write_bytes(c.encode() * 3)
    prints = model_fingerprints(str(tmp_path), None, CountingHasher(), tmp_path)
    assert prints == {
        "unet": "d31a98b94fd81ed4c076ad85441e5aac", "vae": "2838a5ff1aa5218d277b2df949b78b3b",
        "text_encoder": "7f5984bb7638715925619a2b10e938db", "text_encoder_2": "26874d6553cf74b95b82cdbb408e6595",
        "tokenizer": "972224b5b35ffa07b52c25084712522d", "tokenizer_2": "221e8f46de7458c947af3f5a5517ed18",
        "scheduler": "74c067e72b4c2c20ffd24e3b505c0d98",
    }
