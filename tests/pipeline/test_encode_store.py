"""The encode stages and the shared store: partitions, damage, URLs, moved datasets."""

from __future__ import annotations

import pytest
import torch

from sdxlpipe.cache_format import decode_tensors, open_store
from sdxlpipe.config import load_config
from sdxlpipe.pipeline.runner import run_pipeline
from tests.encode_data import copy_dataset, make_dataset, payloads, tar_members

STAGES = ("vae_encode", "text_encode")


def computed(report):
    return {s: report["stages"][s]["computed"] for s in STAGES}


def test_all_partitions_one_after_another_give_the_store_of_one_run(tmp_path):
    whole = make_dataset(tmp_path / "whole", 12)
    whole_cfg = load_config(whole, ["vae_encode.flip_aug=true"])
    one = run_pipeline(whole_cfg, "encode")
    split = copy_dataset(tmp_path / "whole", tmp_path / "split")
    split_cfg = load_config(split, ["vae_encode.flip_aug=true"])
    counts = [computed(run_pipeline(split_cfg, "encode", partition=(k, 3))) for k in range(3)]
    # Every item computed exactly once across the partitions, none twice.
    for stage in STAGES:
        assert sum(c[stage] for c in counts) == one["stages"][stage]["computed"]
        assert all(c[stage] < one["stages"][stage]["computed"] for c in counts)
    assert computed(run_pipeline(split_cfg, "encode")) == dict.fromkeys(STAGES, 0)
    for stage in STAGES:
        a, b = payloads(whole_cfg.store_url, stage), payloads(split_cfg.store_url, stage)
        assert a.keys() == b.keys() and len(a) == one["stages"][stage]["items"]
        # Same items; the same numbers up to fp16 rounding (a partition batches other images
        # together, and a conv's last bit depends on its batch). Concurrent runs of the same
        # partition batch alike and write identical bytes (tests/integration/test_encode_cli.py).
        for key in a:
            ta, ma = decode_tensors(a[key], "pt")
            tb, mb = decode_tensors(b[key], "pt")
            assert ma == mb and ta.keys() == tb.keys()
            for name in ta:
                assert torch.allclose(ta[name].float(), tb[name].float(), rtol=2e-3, atol=1e-5), (stage, key, name)


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_flipped_bit_is_found_by_verify_and_exactly_that_item_is_recomputed(tmp_path):
    config = make_dataset(tmp_path, 8)
    cfg = load_config(config)
    run_pipeline(cfg, "encode")
    store = open_store(cfg.store_url)
    victim = sorted(store._index("vae_encode").rows)[3]
    flip_byte(tmp_path / ".sdxlpipe" / "store" / "shards" / "vae_encode" / f"{victim.shard_id}.tar",
              victim.offset + victim.length // 2)
    problems = open_store(cfg.store_url).verify()
    assert {(p["item_key"], p["problem"]) for p in problems if p["item_key"]} == {(victim.item_key, "checksum mismatch")}
    report = run_pipeline(cfg, "encode")
    assert computed(report) == {"vae_encode": 1, "text_encode": 0}
    assert report["damaged"] == {"vae_encode": [victim.item_key]}
    assert any("damaged" in r for r in report["stages"]["vae_encode"]["reasons"])
    assert open_store(cfg.store_url).verify() == []  # the damage is repaired
    assert victim.item_key in payloads(cfg.store_url, "vae_encode")


def test_a_truncated_shard_is_recomputed_when_a_reader_finds_it(tmp_path):
    config = make_dataset(tmp_path, 8)
    cfg = load_config(config)
    run_pipeline(cfg, "encode")
    tars = sorted((tmp_path / ".sdxlpipe" / "store" / "shards" / "text_encode").glob("*.tar"))
    lost = set()
    for tar in tars:  # cut every text shard in half
        data = tar.read_bytes()
        tar.write_bytes(data[: len(data) // 2])
    store = open_store(cfg.store_url)
    for key, data in store.read_many("text_encode", sorted(store.present("text_encode"))):
        if data is None:
            lost.add(key)
    assert lost
    report = run_pipeline(cfg, "encode")
    assert report["stages"]["text_encode"]["computed"] == len(lost)
    assert set(report["damaged"]["text_encode"]) == lost
    assert all(v is not None for v in payloads(cfg.store_url, "text_encode").values())


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_the_encode_runs_on_a_store_url(tmp_path, scheme):
    url = f"memory://sdxlpipe-test-{tmp_path.name}" if scheme == "memory" else f"file://{tmp_path / 'shared'}"
    config = make_dataset(tmp_path / "data", 4, store=url)
    cfg = load_config(config)
    assert cfg.store_url == url
    first = run_pipeline(cfg, "encode")
    assert computed(first) == {"vae_encode": 4, "text_encode": 5}
    assert computed(run_pipeline(cfg, "encode")) == dict.fromkeys(STAGES, 0)
    assert open_store(url).verify() == []
    assert len(payloads(url, "vae_encode")) == 4
    if scheme == "file":
        assert len(tar_members(tmp_path / "shared", "vae_encode")) == 4


def test_a_moved_dataset_with_a_fresh_workspace_encodes_nothing(tmp_path):
    store = tmp_path / "shared-store"
    first = make_dataset(tmp_path / "a", 8, store=str(store))
    assert computed(run_pipeline(load_config(first), "encode")) == {"vae_encode": 8, "text_encode": 6}
    moved = copy_dataset(tmp_path / "a", tmp_path / "elsewhere" / "b")  # other paths, other mtimes
    assert not (moved.parent / ".sdxlpipe").exists()
    report = run_pipeline(load_config(moved), "encode")
    assert computed(report) == dict.fromkeys(STAGES, 0)
    assert report["stages"]["vae_encode"]["reused"] == 8


def test_du_counts_bytes_per_model_fingerprint(tmp_path):
    from safetensors.torch import save_file

    from sdxlpipe.models.tiny import build_tiny_component

    config = make_dataset(tmp_path / "data", 4)
    cfg = load_config(config)
    run_pipeline(cfg, "encode")
    other = tmp_path / "other-vae.safetensors"
    save_file({k: v.contiguous() for k, v in build_tiny_component("vae", seed=3).state_dict().items()}, other)
    run_pipeline(load_config(config, [f'vae="{other}"']), "encode")
    usage = open_store(cfg.store_url).du()
    vae_groups = usage["stages"]["vae_encode"]["groups"]
    assert len(vae_groups) == 2 and all(g.startswith("vae:") and n > 0 for g, n in vae_groups.items())
    assert sum(vae_groups.values()) <= usage["stages"]["vae_encode"]["bytes"]
    (text_group,) = usage["stages"]["text_encode"]["groups"]
    assert text_group.startswith("text_encoder:")
