"""Configs generated from the schema with one or more mistakes (wrong types, out of range,
unknown keys, missing paths): always one `Error:` line, exit 2, no traceback, no model loaded."""

import contextlib
import dataclasses
import io
import json
import sys
import types
import typing
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdxlpipe.stages import STAGE_NAMES, load_stages
from tests.datasets.files import image_bytes, write

# Range checks the stages make (`check`), as (table, key, a strategy of refused values).
OUT_OF_RANGE = [
    ("vae_encode", "batch_size", st.integers(max_value=0)),
    ("text_encode", "batch_size", st.integers(max_value=0)),
    ("vae_encode", "workers", st.integers(max_value=-1)),
    ("vae_encode", "images_per_shard", st.integers(max_value=-1)),
    ("text_encode", "clip_skip", st.integers(max_value=-1)),
    (None, "device", st.sampled_from(["tpu", "gpu", ""])),
]
IDENT = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(lambda k: k[0] != "_")

def _fields(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _wrong_values(hint) -> list:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _wrong_values([a for a in args if a is not type(None)][0])
    if origin is Literal:
        return ["not-a-choice", [args[0]], {"x": 1}]
    if origin is tuple:
        return [[[1]], [{"x": [1]}] if args[0] is str else [[[1]]]]
    if dataclasses.is_dataclass(hint):
        return [5, "text", [1]]
    return {
        bool: [1, "yes", [True]],
        int: ["3", 2.5, True, [1]],
        float: ["1e-3", True, [0.5]],
        str: [1, True, ["a"], {"x": 1}],
    }.get(hint, [])


def _schema() -> list[tuple[str, str, object]]:
    fields = []
    for stage in STAGE_NAMES:
        for name, hint in _fields(load_stages()[stage].Params).items():
            if _wrong_values(hint):
                fields.append((stage, name, hint))
    return fields


SCHEMA = _schema()


@st.composite
def mistakes(draw):
    """One mistake: (table or None for the top level, key, value)."""
    kind = draw(st.sampled_from(["wrong_type", "out_of_range", "unknown_top", "unknown_key", "missing_path"]))
    if kind == "wrong_type":
        stage, name, hint = draw(st.sampled_from(SCHEMA))
        return stage, name, draw(st.sampled_from(_wrong_values(hint)))
    if kind == "out_of_range":
        table, name, values = draw(st.sampled_from(OUT_OF_RANGE))
        return table, name, draw(values)
    if kind == "unknown_top":
        known = {"model", "vae", "allow_pickle", "device", "store", "sources", *STAGE_NAMES}
        return None, draw(IDENT.filter(lambda k: k not in known)), draw(st.integers() | st.text(max_size=5))
    if kind == "unknown_key":
        stage = draw(st.sampled_from(STAGE_NAMES))
        known = set(_fields(load_stages()[stage].Params))
        return stage, draw(IDENT.filter(lambda k: k not in known)), 1
    return None, "sources", [{"path": draw(st.sampled_from(["no-such-folder", "/no/such/abs/folder"]))}]


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


def _config(found: list[tuple]) -> str:
    doc: dict = {"model": "tiny", "sources": [{"path": "images"}]}
    for table, key, value in found:
        if table is None or (table, key) == ("ingest", "sources"):  # sources live at the top
            doc[key] = value
        else:
            doc.setdefault(table, {})[key] = value
    return "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in doc.items()) + "\n"


def _run_cli(config: Path) -> tuple[object, str]:
    """`sdxlpipe run ingest -c config` in this process: (exit code, stderr). Every stage's
    settings are validated whatever the target; ingest keeps a config that wrongly passes cheap."""
    from sdxlpipe import cli

    err, argv = io.StringIO(), sys.argv
    sys.argv = ["sdxlpipe", "run", "ingest", "-c", str(config)]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.main()
        return 0, err.getvalue()
    except SystemExit as e:
        return e.code, err.getvalue()
    finally:
        sys.argv = argv


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    write(folder / "images" / "a.png", image_bytes("PNG", seed=1))
    return folder


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(found=st.lists(mistakes(), min_size=1, max_size=3))
def test_every_broken_config_gives_one_error_line_exit_2_and_loads_no_model(folder, found):
    config = folder / "sdxlpipe.toml"
    config.write_text(_config(found))

    code, stderr = _run_cli(config)

    lines = stderr.splitlines()
    assert code == 2, (config.read_text(), stderr)
    assert lines and [l for l in lines if l.startswith("Error:")] == [lines[0]], stderr
    assert "Traceback" not in stderr
    # Validation stopped it before the pipeline: no workspace, so no stage ran and no model loaded.
    assert not (folder / ".sdxlpipe").exists(), config.read_text()
