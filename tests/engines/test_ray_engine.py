"""--engine ray: the same encode on Ray Data, into the same store (Ray started once per session)."""

from __future__ import annotations

import pytest
import torch

from sdxlpipe.cache_format import decode_tensors
from sdxlpipe.config import load_config
from sdxlpipe.pipeline.runner import run_pipeline
from tests.encode_data import copy_dataset, make_dataset, payloads, tar_members

# Not importorskip: Ray is in the dev extra, so CI has it, and a broken install must fail here.
import ray  # noqa: E402


pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def ray_cluster():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_the_ray_engine_fills_the_store_the_local_engine_would(tmp_path, ray_cluster):
    local_cfg = load_config(make_dataset(tmp_path / "local", 8), ["vae_encode.flip_aug=true"])
    ray_cfg = load_config(copy_dataset(tmp_path / "local", tmp_path / "ray"),
                          ["vae_encode.flip_aug=true", "vae_encode.workers=1"])
    local = run_pipeline(local_cfg, "encode")
    remote = run_pipeline(ray_cfg, "encode", engine="ray")
    for stage in ("vae_encode", "text_encode"):
        assert remote["stages"][stage]["computed"] == local["stages"][stage]["computed"] > 0
        a, b = payloads(local_cfg.store_url, stage), payloads(ray_cfg.store_url, stage)
        assert a.keys() == b.keys()
        for key in a:
            ta, _ = decode_tensors(a[key], "pt")
            tb, _ = decode_tensors(b[key], "pt")
            assert all(torch.allclose(ta[n].float(), tb[n].float(), rtol=2e-3, atol=1e-5) for n in ta)
    # Shards are content-named and grouped by bucket as the local engine writes them.
    members = tar_members(tmp_path / "ray" / ".sdxlpipe" / "store", "vae_encode")
    assert len(members) == len(set(members)) == 16
    again = run_pipeline(ray_cfg, "encode", engine="ray")
    assert again["stages"]["vae_encode"]["computed"] == 0 and again["models_loaded"] == []
