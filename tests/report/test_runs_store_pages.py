"""Given two training runs of the tiny example (the second with one setting changed) and their exports,
when the report opens in Chromium, then the Runs page shows log.jsonl's curves, steps through the
validation images, names the changed setting, and describes each export as `lora info` does; the
Store page shows `store du`'s numbers and the published datasets as `dataset list` does. No console error; screenshots go to the test's temp dir."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import cli, cli_json
from tests.report.browser import chromium, console_errors, screenshot, wait_for

pytestmark = pytest.mark.slow

SHORT_RUN = ["--set", "train.max_steps=4", "--set", "train.save_every_steps=2", "--set", "train.validation_every_steps=2",
             "--set", 'train.validation_prompts=["a red circle", "a blue square"]', "--set", "train.validation_steps=2",
             "--set", "train.validation_size=64"]


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "log.jsonl").read_text().splitlines()]


def test_runs_and_store_pages_in_chromium(example, tmp_path):
    first = cli_json("run", "all", "-c", str(example), *SHORT_RUN)
    second = cli_json("run", "all", "-c", str(example), *SHORT_RUN, "--set", "train.learning_rate=5e-4",
                      "--set", "export.name=second", "--set", "train.validation_split=0.2")
    # The runs published the config's dataset ("tiny", its folder's name); publish the same rows as another one.
    cli("run", "encode", "-c", str(example), "--set", 'dataset.name="shapes-b"')
    cli("report", "-c", str(example))
    site = example.parent / ".sdxlpipe" / "report"
    keys = [Path(r["outputs"]["checkpoint"]).parents[1].name for r in (first, second)]  # .sdxlpipe/train/<key>/checkpoints/...
    run_dirs = [example.parent / ".sdxlpipe" / "train" / k for k in keys]
    from selenium.webdriver.common.by import By

    with chromium() as d:
        d.get(f"{site.as_uri()}/runs.html")
        wait_for(d, "!document.getElementById('run').hidden && document.getElementById('run-key').textContent")
        assert console_errors(d) == []
        # Both runs are listed; the newest is open and names what changed.
        assert d.execute_script("return [...document.querySelectorAll('tr[data-run]')].map(r => r.dataset.run)") == keys[::-1]
        assert d.find_element(By.ID, "run-key").text == keys[1]
        assert d.execute_script("return [...document.querySelectorAll('#changed tr[data-setting]')].map(r => r.dataset.setting)") == [
            "export.name", "train.learning_rate", "train.validation_split"]
        screenshot(d, tmp_path / "runs.png")

        for n, (key, run_dir) in enumerate(zip(keys, run_dirs)):
            d.get(f"{site.as_uri()}/runs.html#{key}")
            wait_for(d, f"document.getElementById('run-key').textContent === '{key}'")
            log = _log(run_dir)
            for name in ("loss", "lr", "grad_norm", "val_loss"):
                logged = [r for r in log if name in r]
                charts = d.find_elements(By.CSS_SELECTOR, f"figure[data-chart={name}]")
                if not logged:  # the first run held nothing out
                    assert name == "val_loss" and key == keys[0] and charts == []
                    continue
                fig = charts[0]
                assert int(fig.find_element(By.CSS_SELECTOR, "[data-k=points]").text) == len(logged)
                shown = float(fig.find_element(By.CSS_SELECTOR, "[data-k=last]").text)
                assert shown == pytest.approx(logged[-1][name], rel=1e-3, abs=1e-6)
            done = json.loads((run_dir / "done.json").read_text())
            best = d.find_element(By.CSS_SELECTOR, "#run-cards [data-k=best_step]").text
            assert best == (f"step {done['best_validation']['step']}" if key == keys[1] else "–")

            # The validation images, step by step.
            label = lambda: int(d.find_element(By.ID, "v-label").get_attribute("data-step"))  # noqa: E731
            assert label() == 4
            images = d.find_elements(By.CSS_SELECTOR, "#v-grid img")
            assert [i.get_attribute("alt") for i in images] == ["a red circle", "a blue square"]
            wait_for(d, "[...document.querySelectorAll('#v-grid img')].every(i => i.complete && i.naturalWidth === 64)")
            d.find_element(By.ID, "v-prev").click()
            assert label() == 2 and d.find_element(By.ID, "v-prev").get_attribute("disabled") is not None
            assert "/step-00000002/" in d.find_element(By.CSS_SELECTOR, "#v-grid img").get_attribute("src")

            # Each exported file as `lora info` sees it.
            record = json.loads(next((example.parent / "output").glob(f"{'tiny-shapes' if key == keys[0] else 'second'}.export.json")).read_text())
            for path in record["files"].values():
                info = cli_json("lora", "info", path)
                row = d.find_element(By.CSS_SELECTOR, f"#exports tr[data-file='{path}']")
                cell = lambda k: row.find_element(By.CSS_SELECTOR, f"[data-k={k}]").text  # noqa: E731,B023
                assert int(cell("modules")) == info["modules"]
                assert cell("ranks") == ", ".join(map(str, info["ranks"]))
                assert [float(a) for a in cell("alphas").split(", ")] == info["alphas"]
            assert console_errors(d) == []
            screenshot(d, tmp_path / f"run-{n}.png")

        usage = cli_json("store", "du", "-c", str(example))
        d.get(f"{site.as_uri()}/store.html")
        wait_for(d, "document.querySelectorAll('#stages tr[data-stage]').length")
        for stage, u in usage["stages"].items():
            row = d.find_element(By.CSS_SELECTOR, f"#stages tr[data-stage={stage}]")
            assert int(row.find_element(By.CSS_SELECTOR, "[data-k=items]").text.replace(",", "")) == u["items"]
            assert int(row.find_element(By.CSS_SELECTOR, "[data-k=shards]").text) == u["shards"]
        listed = cli_json("dataset", "list", "-c", str(example))["datasets"]
        assert sorted(x["name"] for x in listed) == ["shapes-b", "tiny"]
        for want in listed:
            row = d.find_element(By.CSS_SELECTOR, f"#datasets tr[data-dataset='{want['name']}']")
            cell = lambda k: row.find_element(By.CSS_SELECTOR, f"[data-k={k}]")  # noqa: E731,B023
            assert cell("snapshot").get_attribute("title") == want["snapshot"]
            assert int(cell("samples").text.replace(",", "")) == want["samples"]
            assert int(cell("items").text.replace(",", "")) == sum(s["items"] for s in want["stages"].values())
            assert int(cell("bytes").get_attribute("title")) == sum(s["bytes"] for s in want["stages"].values())
            assert cell("published").text == time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(want["published"]))
        assert len(d.find_elements(By.CSS_SELECTOR, "#datasets tr[data-dataset]")) == len(listed)
        screenshot(d, tmp_path / "store.png")
        assert console_errors(d) == []
