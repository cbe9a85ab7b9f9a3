"""`sdxlpipe dataset list|show|rm`: what a store has published, for people and scripts."""

from __future__ import annotations

import json

from tests.cache_format.test_snapshots import dataset, publish
from tests.conftest import cli


def test_list_and_show_describe_a_published_dataset_and_rm_unpublishes_it(tmp_path):
    store, samples, _, _ = dataset(tmp_path / "store")
    snapshot, _ = publish(store, samples)
    listed = json.loads(cli("dataset", "list", "--store", str(tmp_path / "store"), "--json").stdout)
    (entry,) = listed["datasets"]
    assert entry["name"] == "cats" and entry["snapshot"] == snapshot and entry["samples"] == samples.num_rows
    assert entry["buckets"] == {"64x64": 3, "64x96": 3} and entry["config"] == "/a/sdxlpipe.toml"
    assert entry["stages"]["vae_encode"]["items"] == samples.num_rows
    shown = cli("dataset", "show", f"cats@{snapshot}", "--store", str(tmp_path / "store")).stdout
    assert "published: " in shown and f'kind = "dataset", name = "cats@{snapshot}"' in shown

    assert "removed dataset cats" in cli("dataset", "rm", "cats", "--store", str(tmp_path / "store")).stdout
    missing = cli("dataset", "show", "cats", "--store", str(tmp_path / "store"), check=False)
    assert missing.returncode == 2 and "no dataset 'cats'" in missing.stderr and "Hint:" in missing.stderr
    assert json.loads(cli("dataset", "list", "--store", str(tmp_path / "store"), "--json").stdout)["datasets"] == []


def test_a_path_that_is_no_store_is_one_error_naming_the_flag(tmp_path):
    proc = cli("dataset", "list", "--store", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2 and "--store" in proc.stderr
