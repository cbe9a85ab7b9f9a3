"""Given a dataset, when `sdxlpipe report` writes the site, then the data it holds are inspect's, the
thumbnails are made once per image content, the first paint's files do not grow with the dataset,
and no torch is imported."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pyarrow.parquet as pq

from sdxlpipe.report.dataset import CHUNK
from tests.conftest import REPO, cli, cli_json
from tests.report.data import make_dataset, read_data, write_image


def test_report_holds_inspects_numbers_and_every_item_once(tmp_path):
    config = make_dataset(tmp_path, 40)
    inspected = cli_json("inspect", "-c", str(config))
    built = cli_json("report", "-c", str(config))
    site = tmp_path / ".sdxlpipe" / "report"
    assert built["path"] == str(site / "index.html") and (site / "runs.html").exists() and (site / "store.html").exists()
    assert cli("report", "-c", str(config)).stdout.strip() == built["path"]  # without --json: the path alone

    summary = read_data(site, "summary")
    assert summary["inspect"] == {**inspected, "rejected": len(inspected["rejected"])}
    assert summary["items"] == inspected["samples"] == 40 and summary["rejected"] == 2  # broken + duplicate
    rows = pq.read_table(tmp_path / ".sdxlpipe" / "tables" / "bucket.parquet").to_pylist()
    items = [r for i in range(summary["chunks"]) for r in read_data(site, f"items/{i:05d}")]
    fields = summary["fields"]
    assert [r[fields.index("key")] for r in items] == [r["key"] for r in rows]
    assert [r[fields.index("caption")] for r in items] == [r["caption"] for r in rows]
    by_key = {r["key"]: r for r in rows}
    for item in items:
        row = by_key[item[fields.index("key")]]
        assert summary["buckets"][item[fields.index("bucket")]] == [row["bucket_w"], row["bucket_h"]]
        assert summary["subsets"][item[fields.index("subset")]] == row["subset"]
        assert item[fields.index("variants")] == [v for v in row["caption_variants"] if v != row["caption"]]
        assert (site / "thumbs" / item[fields.index("thumb")][:2] / f"{item[fields.index('thumb')]}.jpg").stat().st_size > 0
    rejects = read_data(site, "rejects/00000")
    reasons = {r[0].rsplit("/", 1)[-1]: r[1] for r in rejects}
    assert set(reasons) == {"broken.png", "copy of img00000.png"}
    assert reasons["copy of img00000.png"].startswith("duplicate")
    thumbs = {r[0].rsplit("/", 1)[-1]: r[2] for r in rejects}
    # A duplicate shows the kept image's thumbnail; a file that does not open has none.
    original = next(i for i in items if i[fields.index("path")].endswith("/img00000.png"))
    assert thumbs["copy of img00000.png"] == original[fields.index("thumb")] and thumbs["broken.png"] == ""
    facets = read_data(site, "facets")
    assert sum(len(chunks) > 0 for chunks in facets["bucket"]) == len(summary["buckets"])


def test_a_second_report_makes_only_the_new_thumbnails(tmp_path):
    config = make_dataset(tmp_path, 30)
    first = cli_json("report", "-c", str(config))
    # 30 items (the duplicate shares its original's); the broken file gives none.
    assert first["thumbnails"] == {"items": 31, "made": 30, "reused": 0, "failed": 1, "linked": 30}
    cache = tmp_path / ".sdxlpipe" / "thumbs"
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.jpg")}

    import numpy as np

    write_image(tmp_path / "extra" / "new.png", (64, 48), np.random.default_rng(99))
    second = cli_json("report", "-c", str(config))
    # Only the new image is decoded: not the cached thumbnails, and not the broken file again.
    assert second["thumbnails"] == {"items": 32, "made": 1, "reused": 30, "failed": 1, "linked": 1}
    assert second["items"] == first["items"] + 1
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # the cached ones were not rewritten
    # The site is rebuilt in place: one data folder, no temp folders left.
    site = tmp_path / ".sdxlpipe" / "report"
    assert sorted(p.name for p in site.iterdir() if p.name.startswith(".") or p.name == "data") == ["data"]


def _first_paint_bytes(site) -> int:
    """The page and the styles and scripts it names: what the browser reads before it can paint."""
    html = (site / "index.html").read_text()
    refs = re.findall(r'<(?:script src|link rel="stylesheet" href)="([^"]+)"', html)
    assert "data/summary.js" in refs
    return len(html.encode()) + sum((site / ref).stat().st_size for ref in refs)


def test_what_the_first_paint_loads_does_not_grow_with_the_dataset(tmp_path):
    small = cli_json("report", "-c", str(make_dataset(tmp_path / "small", 60)))
    large = cli_json("report", "-c", str(make_dataset(tmp_path / "large", 2 * CHUNK + 100)))
    small_site, large_site = (tmp_path / n / ".sdxlpipe" / "report" for n in ("small", "large"))
    assert large["items"] > 15 * small["items"]
    # Same sources, buckets and tag vocabulary: only the counts' digits may differ.
    assert _first_paint_bytes(large_site) <= _first_paint_bytes(small_site) + 1024
    assert len(list((large_site / "data" / "items").iterdir())) == 3  # the items come in chunks


def test_the_report_imports_no_torch(tmp_path):
    config = make_dataset(tmp_path, 8)
    script = ("import sys; from sdxlpipe.config import load_config; from sdxlpipe.report.build import build_report; "
              f"build_report(load_config({str(config)!r})); print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('torch', 'diffusers', 'peft', 'accelerate'))))")
    out = subprocess.run([sys.executable, "-c", "import json; " + script], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_report_to_a_file_is_a_clear_error(tmp_path):
    config = make_dataset(tmp_path, 4)
    (tmp_path / "site").write_text("not a folder")
    proc = cli("report", "-c", str(config), "-o", str(tmp_path / "site"), check=False)
    assert proc.returncode == 2 and "Error:" in proc.stderr and "is a file" in proc.stderr
