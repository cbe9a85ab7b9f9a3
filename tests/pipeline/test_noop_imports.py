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
heavy = [m for m in ('torch', 'pyarrow.dataset', 'pandas', 'diffusers', 'transformers') if m in sys.modules]
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
