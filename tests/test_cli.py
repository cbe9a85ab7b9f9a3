"""The command line's contract: exit codes, `Error:`/`Hint:` for every mistake, --shards, status --check.

Commands run in this process through `sdxlpipe.cli.main` (the console
script's entry point), so a mistake costs no interpreter start.
"""

from __future__ import annotations

import json
import logging
import sys

import pytest

from sdxlpipe.cli import main
from tests.encode_data import make_dataset


def sdxlpipe(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `sdxlpipe ARGS`; (exit code, stdout, stderr)."""
    monkeypatch.delenv("SDXLPIPE_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["sdxlpipe", *args])
    logger = logging.getLogger("sdxlpipe")
    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        with pytest.raises(SystemExit) as done:
            main()
    finally:  # the CLI wires sdxlpipe's logger to this test's stderr: leave it as it was
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
    out = capsys.readouterr()
    return done.value.code or 0, out.out, out.err


def assert_user_error(result: tuple[int, str, str], *words: str) -> str:
    """Exit 2, exactly one `Error:` line and a `Hint:` line, no traceback; returns the two lines."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, err
    hint = lines[lines.index(errors[0]) + 1]
    assert hint.startswith("Hint: "), err
    text = errors[0] + "\n" + hint
    for word in words:
        assert word in text, (word, text)
    return text


@pytest.fixture
def store_is_a_file(example):
    (example.parent / "store-file").write_text("not a folder")
    example.write_text(example.read_text() + '\n[store]\nurl = "store-file"\n')
    return example


@pytest.mark.parametrize("command", [["run", "encode"], ["status"], ["inspect"], ["store", "du"], ["store", "verify"]])
def test_a_store_path_that_is_a_file_is_one_error_naming_it(store_is_a_file, monkeypatch, capsys, command):
    text = assert_user_error(sdxlpipe(monkeypatch, capsys, *command, "-c", str(store_is_a_file)),
                             "store-file", "is a file", "[store] url")
    assert "NotADirectoryError" not in text


def test_store_verify_of_a_file_or_a_missing_store_names_it_and_the_flag(tmp_path, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_user_error(sdxlpipe(monkeypatch, capsys, "store", "verify", "--store", str(afile)), "is a file", "--store")
    assert_user_error(sdxlpipe(monkeypatch, capsys, "store", "gc", "--store", str(tmp_path / "nope")),
                      "no sdxlpipe store", "--store")


def test_store_push_from_a_missing_store_hints_at_the_argument_not_python(tmp_path, monkeypatch, capsys):
    text = assert_user_error(sdxlpipe(monkeypatch, capsys, "store", "push", str(tmp_path / "nope"), str(tmp_path / "dst")),
                             "no sdxlpipe store", "SRC")
    assert "create=True" not in text
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("shards, words", [("0/2", ["1 <= K <= N", "--shards 1/2"]), ("3/2", ["1 <= K <= N"]),
                                           ("half", ["K/N", "--shards 1/4"])])
def test_shards_count_from_one_and_a_zero_is_an_error_with_the_fix(example, monkeypatch, capsys, shards, words):
    assert_user_error(sdxlpipe(monkeypatch, capsys, "run", "encode", "-c", str(example), "--shards", shards), *words)


def test_shards_with_training_is_refused_with_the_two_commands_to_run(example, monkeypatch, capsys):
    assert_user_error(sdxlpipe(monkeypatch, capsys, "run", "all", "-c", str(example), "--shards", "1/2"),
                      "sdxlpipe run encode --shards K/N", "sdxlpipe run all")


def test_status_names_rows_gone_when_an_image_is_deleted(example, monkeypatch, capsys):
    from sdxlpipe.config import load_config
    from sdxlpipe.pipeline.runner import run_pipeline

    run_pipeline(load_config(example), "ingest")
    (example.parent / "images" / "000_yellow_circle.png").unlink()
    code, out, _ = sdxlpipe(monkeypatch, capsys, "status", "-c", str(example), "--json")
    assert json.loads(out)["stages"]["ingest"]["reasons"] == ["1 row(s) gone since the last run"]


def test_shards_help_says_k_counts_from_one(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = sdxlpipe(monkeypatch, capsys, "run", "--help")
    assert code == 0
    assert "K from 1 to N" in out and "--shards 1/N ... --shards N/N" in out
    assert "sdxlpipe[ray]" in out  # rich markup must not eat the extra's name


def test_an_unknown_key_lists_the_close_matches_only(example, monkeypatch, capsys):
    example.write_text(example.read_text().replace("max_steps = 20", "max_stesp = 20"))
    text = assert_user_error(sdxlpipe(monkeypatch, capsys, "status", "-c", str(example)), "train.max_stesp", "max_steps")
    assert "adaptive_noise_scale" not in text and "gradient_checkpointing" not in text


def test_a_bad_set_value_is_blamed_on_set_not_on_the_file(example, monkeypatch, capsys):
    text = assert_user_error(sdxlpipe(monkeypatch, capsys, "run", "all", "-c", str(example), "--set", "train.max_steps=many"),
                             "--set train.max_steps=many", "must be int")
    assert str(example) not in text.splitlines()[0] and "--set" in text.splitlines()[1]


def test_a_string_where_a_list_belongs_is_an_error(example, monkeypatch, capsys):
    example.write_text(example.read_text().replace('formats = ["kohya", "diffusers"]', 'formats = "kohya"'))
    assert_user_error(sdxlpipe(monkeypatch, capsys, "status", "-c", str(example)),
                      "export.formats", "must be a list", 'formats = ["kohya"]')


def test_a_source_with_no_image_files_is_an_error_naming_the_kind_to_set(tmp_path, monkeypatch, capsys):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "notes.md").write_text("the tars are elsewhere")
    (tmp_path / "sdxlpipe.toml").write_text('model = "tiny"\n[[sources]]\npath = "shards"\n')
    assert_user_error(sdxlpipe(monkeypatch, capsys, "run", "ingest", "-c", str(tmp_path / "sdxlpipe.toml")),
                      "sources[0]", "no image files", 'kind = "webdataset"')


def test_a_misspelt_stage_suggests_the_right_one(example, monkeypatch, capsys):
    assert_user_error(sdxlpipe(monkeypatch, capsys, "run", "vae_encod", "-c", str(example)), "did you mean vae_encode")


def test_status_check_exits_1_when_stale_and_status_takes_set(example, monkeypatch, capsys):
    code, out, _ = sdxlpipe(monkeypatch, capsys, "status", "-c", str(example), "--check")
    assert code == 1 and "to compute" in out
    code, out, _ = sdxlpipe(monkeypatch, capsys, "status", "-c", str(example), "--json")
    assert code == 0 and json.loads(out)["up_to_date"] is False  # without --check, stale is no failure
    bad = sdxlpipe(monkeypatch, capsys, "status", "-c", str(example), "--set", "bucket.step=0")
    assert_user_error(bad, "--set bucket.step=0")


def test_a_run_with_nothing_to_train_on_exits_1_and_writes_nothing(tmp_path, monkeypatch, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    config = tmp_path / "sdxlpipe.toml"
    config.write_text('model = "tiny"\n[[sources]]\npath = "images"\n[export]\nname = "x"\n')
    code, out, err = sdxlpipe(monkeypatch, capsys, "run", "all", "-c", str(config))
    assert code == 1, err
    assert "wrote" not in out and "no samples to train on" in out
    assert "Error: stage(s) failed: train, export" in err and "Hint: " in err
    assert not (tmp_path / "output").exists()
    code, out, _ = sdxlpipe(monkeypatch, capsys, "run", "all", "-c", str(config), "--json")
    report = json.loads(out)
    assert code == 1 and report["failed_stages"] == ["train", "export"] and "written" not in report["outputs"]


@pytest.mark.slow  # two real encodes with the tiny model: ~16 s on 2 idle cores
def test_shards_1_of_2_then_2_of_2_encode_everything_between_them(tmp_path, monkeypatch, capsys):
    config = make_dataset(tmp_path, 8)
    reports = []
    for part in ("1/2", "2/2"):
        code, out, err = sdxlpipe(monkeypatch, capsys, "run", "encode", "-c", str(config), "--shards", part, "--json")
        assert code == 0, err
        reports.append(json.loads(out)["stages"])
    first, second = reports
    for stage, total in (("vae_encode", 8), ("text_encode", 6)):
        assert first[stage]["items"] == second[stage]["items"] == total
        assert 0 < first[stage]["computed"] < total, "partition 1 of 2 took all or nothing"
        assert first[stage]["computed"] + second[stage]["computed"] == total
        assert second[stage]["reused"] == first[stage]["computed"]
    assert any("left to other partitions (--shards 1/2)" in r for r in first["vae_encode"]["reasons"])
    code, out, _ = sdxlpipe(monkeypatch, capsys, "status", "-c", str(config), "--json")
    stages = json.loads(out)["stages"]
    assert stages["vae_encode"]["to_compute"] == stages["text_encode"]["to_compute"] == 0


def test_buckets_output_says_which_number_is_the_width(monkeypatch, capsys):
    code, out, _ = sdxlpipe(monkeypatch, capsys, "buckets", "--resolution", "128", "--step", "32",
                            "--min-side", "64", "--max-side", "256")
    header, first, *_ = out.splitlines()
    assert code == 0 and header.split()[:2] == ["width", "height"]
    assert first.split()[:3] == ["64", "x", "256"]  # width 64, height 256: a tall bucket
