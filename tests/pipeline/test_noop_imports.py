"""The no-op path (status, a run with nothing to do) imports only what it needs."""

from __future__ import annotations

import subprocess
import sys

from sdxlpipe.cache_format import open_store
from sdxlpipe.config import load_config
from sdxlpipe.pipeline.runner import run_pipeline

PROBE = """
import sys
from sdxlpipe.cli import app
sys.argv = ['sdxlpipe', 'status', '-c', {config!r}]
try:
    app()
except SystemExit as e:
    assert e.code in (0, None, 1), e.code
# pyarrow.compute (0.45 s) and numpy.ma (0.13 s): index fragments are read as dictionaries, no np.unique
heavy = [m for m in ('torch', 'pyarrow.dataset', 'pandas', 'diffusers', 'transformers', 'pyarrow.compute',
                    'numpy.ma') if m in sys.modules]
print('HEAVY', heavy, file=sys.stderr)
"""


def test_status_over_a_store_with_fragments_imports_no_torch_pandas_or_pyarrow_dataset(example):
    run_pipeline(load_config(example), "bucket")  # stage tables and the hash memo to read back
    store = open_store(load_config(example).store_url)
    for stage in ("vae_encode", "text_encode"):
        for i in range(3):  # real fragments, so status reads and checks an index
            with store.writer(stage) as w:
                w.add(f"{i:032x}", "latent.safetensors", b"x" * 100)
    proc = subprocess.run([sys.executable, "-c", PROBE.format(config=str(example))],
                          capture_output=True, text=True, timeout=300)
    assert "HEAVY" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "HEAVY []"
    assert "vae_encode" in proc.stdout


def test_a_noop_rerun_rewrites_no_stage_table_rejected_table_or_settings_file(example):
    config = load_config(example)
    run_pipeline(config, "bucket")
    tables = config.workspace / "tables"

    def files() -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tables.iterdir()}

    before = files()
    assert {"ingest.parquet", "ingest_rejected.parquet", "caption.parquet", "bucket.parquet",
            "bucket.settings.json"} <= set(before)
    report = run_pipeline(config, "bucket")
    assert {n: s["computed"] for n, s in report["stages"].items()} == {"ingest": 0, "caption": 0, "bucket": 0}
    assert files() == before  # an atomic rewrite is a new inode; each was a parquet encode and an fsync
