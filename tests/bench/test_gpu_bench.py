"""bench/gpu.py, the one command for a GPU machine, runs on a CPU too (--smoke: the tiny architectures, 2 steps
a case), so it cannot rot between the rare GPU runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

NETWORKS = ("lora16-bf16", "lora16-fp8", "full-bf16-adafactor-fused")
SECTIONS = {"setup", "train", "vae", "text", "stage", "options", "compile"}


def bench(tmp_path, *args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--out", str(out),
                           "--dir", str(tmp_path / "work"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_every_case_runs_on_a_cpu_and_a_case_that_cannot_run_fails_alone(tmp_path):
    proc, result = bench(tmp_path)
    rows = result["rows"]
    by = {(r["section"], r["case"], r["side"]): r for r in rows}
    assert {r["section"] for r in rows} == SECTIONS
    assert len(by) == len(rows), "each case is reported once"

    for network in NETWORKS:
        for checkpointing in ("gc", "no-gc"):
            for batch in (1, 2):
                row = by[("train", f"{network} {checkpointing} b{batch}", "sdxlpipe")]
                assert row["status"] == "ok", row
                assert row["value"] > 0 and math.isfinite(row["loss"]) and 0 <= row["loader_wait"] < 1
                if network != "lora16-fp8":  # fp8 has no bare counterpart
                    assert by[("train", f"{network} {checkpointing} b{batch}", "bare")]["status"] == "ok"
    for dtype in ("float16", "bfloat16"):
        for side in ("sdxlpipe", "bare"):
            assert by[("vae", f"vae encode {dtype} w2", side)]["value"] > 0
    assert by[("text", "text encode", "sdxlpipe")]["value"] > 0 and by[("text", "text encode", "bare")]["value"] > 0
    stage = by[("stage", "lora16-bf16 train stage", "sdxlpipe")]
    assert stage["status"] == "ok" and stage["value"] > 0
    assert "SDPA: aten::_scaled_dot_product" in by[("options", "lora16-bf16 gc b2 (baseline)", "sdxlpipe")]["note"]

    # A CPU has no efficient or cuDNN attention kernel: those two cases fail with torch's error, the bench goes on.
    failed = {r["case"]: r["error"] for r in rows if r["status"] == "failed"}
    assert set(failed) == {"lora16-bf16 gc b2 sdpa efficient", "lora16-bf16 gc b2 sdpa cudnn"}, failed
    assert all("scaled_dot_product_attention" in error for error in failed.values())
    assert by[("options", "lora16-bf16 gc b2 sdpa math", "sdxlpipe")]["status"] == "ok"
    assert by[("options", "lora16-bf16 gc b2 batch fp32 on the CPU", "sdxlpipe")]["status"] == "ok"
    assert by[("compile", "lora16-bf16 gc b2 eager", "sdxlpipe")]["status"] == "ok"
    skipped = {r["case"]: r["error"] for r in rows if r["status"] == "skipped"}
    assert "minutes on a CPU" in skipped["lora16-bf16 gc b2 torch.compile"]
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert "bitsandbytes is not installed" in skipped["lora16-bf16 gc b2 adamw8bit"]

    # One table line per row, with sdxlpipe's speed over the bare loop's beside each paired row.
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    assert len(lines) == len(rows)
    paired = next(line for line in lines if "| train | lora16-bf16 gc b1 | sdxlpipe |" in line)
    assert paired.split("|")[6].strip().endswith("x")


def test_a_spent_time_budget_skips_every_section_and_still_writes_the_table(tmp_path):
    proc, result = bench(tmp_path, "--budget", "0", timeout=120)
    assert {r["section"] for r in result["rows"]} == SECTIONS
    assert all(r["status"] == "skipped" and "time budget" in r["error"] for r in result["rows"])
    assert "skipped" in proc.stdout
