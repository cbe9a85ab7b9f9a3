"""`sdxlpipe report` at two dataset sizes 10x apart: build time, and what the browser does before first paint.

    python bench/report.py                      # 1,000 and 10,000 images
    python bench/report.py --sizes 10000 100000 # the 100k figure (~15 min on a 2-core machine)

For each size: a dataset of real PNG files with tag captions (tests/report/data.py) is made and
ingested (`inspect`, the baseline: the data stages the report runs too), then the report is built twice:
the first build makes every thumbnail, the second finds them in the cache. Then the site is opened in
headless Chromium (Debian's, through selenium; tests/report/browser.py): from file:// for the time to
first paint, and from a static HTTP server on 127.0.0.1 for the bytes of every file loaded before first
paint (resource timing does not cover file:// loads). Each page load is a fresh navigation; the median
of 5 is printed. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOADS = 5  # page loads per figure; the median is printed


def sdxlpipe(*args: str) -> tuple[float, dict]:
    began = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "sdxlpipe", *args, "--json"], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    return time.perf_counter() - began, json.loads(out)


def serve(site: Path):
    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def page_figures(driver, url: str) -> dict:
    """Median first paint (ms), time until the first gallery page is shown (ms), bytes loaded before first paint."""
    from tests.report.browser import paint_timing, wait_for

    paints, ready, before = [], [], []
    for _ in range(LOADS):
        driver.get("about:blank")
        driver.get(url)
        wait_for(driver, "document.getElementById('status').dataset.done === '1'", 120)
        paints.append(paint_timing(driver)["first-paint"])
        ready.append(driver.execute_script("return performance.now()"))
        if url.startswith("http"):
            fp = paints[-1]
            before.append(driver.execute_script("""
                const nav = performance.getEntriesByType('navigation')[0];
                return nav.encodedBodySize + performance.getEntriesByType('resource')
                    .filter(e => e.responseEnd <= arguments[0]).reduce((n, e) => n + e.encodedBodySize, 0);""", fp))
    return {"first_paint_ms": statistics.median(paints), "gallery_ms": statistics.median(ready),
            "bytes_before_paint": statistics.median(before) if before else None}


def search_ms(driver, url: str) -> float:
    """A caption search that scans every item chunk (no facet narrows it), from a fresh page load until its
    count is final."""
    from tests.report.browser import wait_for

    driver.get("about:blank")  # a fresh page: no chunk already in its cache
    began = time.perf_counter()
    driver.get(url + "#q=window")
    wait_for(driver, "document.getElementById('status').dataset.done === '1'", 300)
    return 1000 * (time.perf_counter() - began)


def measure(size: int, root: Path, driver) -> dict:
    from tests.report.data import make_dataset

    config = make_dataset(root, size)
    inspect_s, _ = sdxlpipe("inspect", "-c", str(config))
    first_s, first = sdxlpipe("report", "-c", str(config))
    second_s, second = sdxlpipe("report", "-c", str(config))
    site = Path(first["path"]).parent
    server = serve(site)
    try:
        over_http = page_figures(driver, f"http://127.0.0.1:{server.server_port}/index.html")
    finally:
        server.shutdown()
    from_file = page_figures(driver, (site / "index.html").as_uri())
    return {
        "size": size, "items": first["items"], "inspect_s": inspect_s, "first_s": first_s, "second_s": second_s,
        "thumbs_made": [first["thumbnails"]["made"], second["thumbnails"]["made"]],
        "site_bytes": sum(p.stat().st_size for p in site.rglob("*") if p.is_file()),
        "data_bytes": first["data_bytes"], "bytes_before_paint": over_http["bytes_before_paint"],
        "paint_file_ms": from_file["first_paint_ms"], "gallery_file_ms": from_file["gallery_ms"],
        "paint_http_ms": over_http["first_paint_ms"], "search_ms": search_ms(driver, (site / "index.html").as_uri()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 10000], help="two dataset sizes (images)")
    args = parser.parse_args()
    from tests.report.browser import chromium

    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp, chromium() as driver:
        for size in args.sizes:
            rows.append(measure(size, Path(tmp) / str(size), driver))
            r = rows[-1]
            print(f"\n{r['items']:,} items (load average {os.getloadavg()[0]:.1f})", flush=True)
            print(f"  inspect (data stages, the baseline)  {r['inspect_s']:7.1f} s")
            print(f"  report, first build                   {r['first_s']:7.1f} s  ({r['thumbs_made'][0]:,} thumbnails made)")
            print(f"  report, second build                  {r['second_s']:7.1f} s  ({r['thumbs_made'][1]:,} made)"
                  f"  = {r['second_s'] / r['first_s']:.2f} x the first")
            print(f"  site {r['site_bytes'] / 1e6:.1f} MB, of it data files {r['data_bytes'] / 1e6:.2f} MB")
            print(f"  HTML + scripts + data loaded before first paint  {r['bytes_before_paint'] / 1e3:8.1f} KB")
            print(f"  first paint: file:// {r['paint_file_ms']:.0f} ms, http {r['paint_http_ms']:.0f} ms;"
                  f" first gallery page shown {r['gallery_file_ms']:.0f} ms")
            print(f"  search scanning every chunk: {r['search_ms']:.0f} ms")
    small, large = rows
    ratio = large["items"] / small["items"]
    print(f"\n{ratio:.0f}x the items:")
    for label, key in (("first build", "first_s"), ("second build", "second_s"), ("inspect", "inspect_s"),
                       ("bytes before first paint", "bytes_before_paint"), ("first paint (file://)", "paint_file_ms"),
                       ("first gallery page", "gallery_file_ms"), ("full search", "search_ms")):
        print(f"  {label:26} {large[key] / small[key]:6.2f} x")


if __name__ == "__main__":
    main()
