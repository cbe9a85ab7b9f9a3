"""Given a config with mistakes, the user sees every one at once, by key."""

import pytest

from sdxlpipe.config import load_config
from sdxlpipe.errors import ConfigError
from tests.conftest import cli


def test_example_config_loads_with_paths_resolved(example):
    cfg = load_config(example)
    assert cfg.model == "tiny"
    assert cfg.params["ingest"].sources[0].path == str(example.parent / "images")
    assert cfg.params["train"].alpha == 8.0
    assert cfg.store_url == str(example.parent / ".sdxlpipe" / "store")


def test_every_problem_is_reported_at_once(example):
    example.write_text(example.read_text() + '\n[misc]\nfoo = 1\n')
    text = example.read_text().replace("max_steps = 20", 'max_steps = "many"').replace("step = 32", "step = 30")
    example.write_text(text.replace("[train]", "[train]\nlearning_rte = 1e-4"))
    with pytest.raises(ConfigError) as err:
        load_config(example)
    keys = [k for k, _ in err.value.problems]
    assert "misc" in keys
    assert "train.learning_rte" in keys
    assert "train.max_steps" in keys
    assert "bucket.step" in keys


def test_set_overrides_a_key(example):
    cfg = load_config(example, ["train.max_steps=7", "caption.caption_prefix=sks, "])
    assert cfg.params["train"].max_steps == 7
    assert cfg.params["caption"].caption_prefix == "sks, "


def test_cli_prints_one_error_and_a_hint_and_exits_2(example):
    example.write_text(example.read_text().replace("rank = 4", "rnak = 4"))
    proc = cli("status", "-c", str(example), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ") and "train.rnak" in lines[0]
    assert lines[1].startswith("Hint: ")
    assert "Traceback" not in proc.stderr


def test_missing_config_names_the_file_and_the_fix(tmp_path):
    proc = cli("run", "all", "-c", str(tmp_path / "nope.toml"), check=False)
    assert proc.returncode == 2
    assert "nope.toml" in proc.stderr and "sdxlpipe init" in proc.stderr


def test_weights_on_some_sources_only_are_refused_by_name(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    cfg = tmp_path / "sdxlpipe.toml"
    cfg.write_text('[[sources]]\npath = "a"\nweight = 2.0\n[[sources]]\npath = "b"\nmax_samples = -1\n')
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    text = str(e.value)
    assert "sources[1].weight" in text and "every [[sources]] entry or on none" in text
    assert "sources[1].max_samples" in text
