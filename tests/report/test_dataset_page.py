"""Given a dataset of more items than one data chunk, when its report opens in Chromium from file://,
then the page shows inspect's numbers, pages through every item in order, and each filter finds
exactly the items Python finds, with no console error. Screenshots go to the test's temp dir."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from sdxlpipe.datasets.tags import split_tags
from sdxlpipe.report.dataset import CHUNK
from tests.conftest import cli_json
from tests.report.browser import chromium, console_errors, screenshot, wait_for
from tests.report.data import make_dataset

pytestmark = pytest.mark.slow

PAGE = 60  # dataset.js's cards per page


def _settled(d) -> int:
    """Wait until the gallery has shown the URL's state and finished its search; the total it counted."""
    wait_for(d, "document.getElementById('status').dataset.done === '1' && "
                "document.getElementById('status').dataset.hash === location.hash.slice(1)", 60)
    return int(d.execute_script("return document.getElementById('status').dataset.total"))


def _keys(d) -> list[str]:
    return d.execute_script("return [...document.querySelectorAll('#grid .card')].map(c => c.dataset.key)")


def _go(d, site, fragment: str) -> int:
    d.get(f"{site.as_uri()}/index.html#{fragment}")
    return _settled(d)


def _click(d, element) -> None:
    """Scroll it to the middle first: the sticky header and filter bar cover what a plain click scrolls to."""
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def test_dataset_page_numbers_paging_and_filters_in_chromium(tmp_path):
    config = make_dataset(tmp_path, 2 * CHUNK + 150)
    inspected = cli_json("inspect", "-c", str(config))
    cli_json("report", "-c", str(config))
    site = tmp_path / ".sdxlpipe" / "report"
    rows = pq.read_table(tmp_path / ".sdxlpipe" / "tables" / "bucket.parquet").to_pylist()
    keys = [r["key"] for r in rows]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with chromium() as d:
        total = _go(d, site, "")
        assert console_errors(d) == []
        screenshot(d, tmp_path / "dataset.png")

        # The numbers are inspect's.
        k = lambda name: d.find_element(By.CSS_SELECTOR, f"#overview [data-k={name}]").text  # noqa: E731
        assert _int(k("samples")) == inspected["samples"] == total == len(rows)
        assert _int(k("samples_per_epoch")) == inspected["samples_per_epoch"]
        assert _int(k("rejected")) == len(inspected["rejected"]) == 2
        assert _int(k("samples_in_short_batches")) == inspected["samples_in_short_batches"]
        for b in inspected["buckets"]:
            row = d.find_element(By.CSS_SELECTOR, f"tr[data-bucket='{b['bucket'][0]}x{b['bucket'][1]}']")
            cell = lambda name: _int(row.find_element(By.CSS_SELECTOR, f"[data-k={name}]").text)  # noqa: E731,B023
            assert (cell("images"), cell("samples_per_epoch"), cell("full_batches")) == (
                b["images"], b["samples_per_epoch"], b["full_batches"])
        for name, s in inspected["sources"].items():
            row = d.find_element(By.CSS_SELECTOR, f"#subsets tr[data-subset='{name}']")
            assert _int(row.find_element(By.CSS_SELECTOR, "[data-k=images]").text) == s["images"]
        for tag, n in inspected["top_tags"]:
            assert _int(d.find_element(By.CSS_SELECTOR, f"#tags [data-tag='{tag}']").text) == n

        # Paging: every item once, in the table's order, across chunk boundaries.
        assert _keys(d) == keys[:PAGE]
        _click(d, d.find_element(By.ID, "next"))
        _settled(d)
        assert _keys(d) == keys[PAGE:2 * PAGE]
        last = (len(keys) - 1) // PAGE
        _go(d, site, f"page={last + 1}")
        assert _keys(d) == keys[last * PAGE:] and d.find_element(By.ID, "next").get_attribute("disabled") is not None
        page_across = CHUNK // PAGE  # the page that straddles the first two chunks
        _go(d, site, f"page={page_across + 1}")
        assert _keys(d) == keys[page_across * PAGE:(page_across + 1) * PAGE]

        # Filters through the controls, each count as Python counts it.
        _go(d, site, "")
        bucket = max(range(len(inspected["buckets"])), key=lambda i: inspected["buckets"][i]["images"])
        Select(d.find_element(By.ID, "f-bucket")).select_by_value(str(bucket))
        assert _settled(d) == inspected["buckets"][bucket]["images"]
        w, h = inspected["buckets"][bucket]["bucket"]
        assert _keys(d) == [r["key"] for r in rows if (r["bucket_w"], r["bucket_h"]) == (w, h)][:PAGE]
        _click(d, d.find_element(By.ID, "f-clear"))
        assert _settled(d) == len(rows)

        d.find_element(By.ID, "f-q").send_keys("SOFA")
        wait_for(d, "location.hash === '#q=SOFA'")
        assert _settled(d) == sum("sofa" in r["caption"].lower() or any("sofa" in v.lower() for v in r["caption_variants"])
                                  for r in rows)
        screenshot(d, tmp_path / "dataset-search.png")

        tag = inspected["top_tags"][3][0]
        _click(d, d.find_element(By.CSS_SELECTOR, f"#tags a[title='{tag}']"))  # a tag of the chart filters the gallery
        assert _settled(d) == sum(tag in split_tags(r["caption"], ",") for r in rows) == inspected["top_tags"][3][1]

        option = "return [...document.querySelectorAll('#f-subset option')].find(o => o.textContent === arguments[0]).value"
        for name in sorted({r["subset"] for r in rows}):
            assert _go(d, site, f"subset={d.execute_script(option, name)}") == inspected["sources"][name]["images"]
        assert _go(d, site, "source=1") == sum(r["subset"] == "extra" for r in rows)
        cat = d.execute_script(option, "1_cat")  # a kohya folder's subset
        assert _go(d, site, f"subset={cat}&bucket={bucket}&tag=cat") == sum(
            r["subset"] == "1_cat" and (r["bucket_w"], r["bucket_h"]) == (w, h) and "cat" in split_tags(r["caption"], ",")
            for r in rows) > 0

        # Rejected files, with their reasons.
        assert _go(d, site, "rejected=1") == 2
        reasons = d.execute_script("return [...document.querySelectorAll('#grid [data-k=reason]')].map(e => e.textContent)")
        assert sorted(reasons) == sorted(r["reason"] for r in inspected["rejected"])
        d.execute_script("document.getElementById('gallery').scrollIntoView()")
        screenshot(d, tmp_path / "dataset-rejected.png")
        assert console_errors(d) == []
