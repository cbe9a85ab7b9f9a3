"""Shared test helpers: a fresh copy of the bundled example, and the CLI."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny"

# No test may reach the network or a Hub cache it did not make.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The local index cache (cache_format/index_cache.py) of every store a test makes goes to a
# directory of this test process (and its CLI subprocesses), not ~/.cache; removed at exit.
if "SDXLPIPE_INDEX_CACHE" not in os.environ:
    os.environ["SDXLPIPE_INDEX_CACHE"] = tempfile.mkdtemp(prefix="sdxlpipe-index-cache-")
    atexit.register(shutil.rmtree, os.environ["SDXLPIPE_INDEX_CACHE"], True)
# Under pytest-xdist (`-n 2`), one torch thread per worker and per CLI subprocess: two workers
# with two threads each oversubscribe a 2-core machine, and spinning OpenMP threads then made
# single tests 10-40x slower. Set before torch is imported anywhere in the worker.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def copy_example(dest: Path) -> Path:
    """examples/tiny without any workspace or output a local run left behind."""
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns(".sdxlpipe", "output"))
    return dest / "sdxlpipe.toml"


@pytest.fixture
def example(tmp_path: Path) -> Path:
    return copy_example(tmp_path / "tiny")


def cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SDXLPIPE_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "sdxlpipe", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sdxlpipe {' '.join(args)} exited {proc.returncode}\n{proc.stderr}")
    return proc


def cli_json(*args: str, cwd: Path | None = None) -> dict:
    return json.loads(cli(*args, "--json", cwd=cwd).stdout)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, with the reason, where torch sees no CUDA GPU (torch is imported only
    when such a test is collected)."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: `pytest -m cuda` on a GPU machine runs it")
    for item in marked:
        item.add_marker(skip)
