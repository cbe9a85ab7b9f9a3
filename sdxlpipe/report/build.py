"""`sdxlpipe report`: the recipe that writes the site.

1. The dataset: run the data stages as `inspect` does (cached), lay out
   the summary, the item chunks, the rejects and the facets.
2. Thumbnails: make those not in the workspace's cache (worker processes).
3. Runs and store: read the run folders, the exports and the store.
4. Write: data files in a fresh folder swapped in whole, the pages and
   scripts, hard links to the thumbnails and validation images.

Returns what it wrote and counted, for `--json`. Imports no torch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("sdxlpipe")

# Thumbnail failures named one by one in the log, before "and N more".
LOG_FAILURES = 5


def build_report(config, out: Path | None = None, reporter=None, batch_size: int | None = None) -> dict[str, Any]:
    """Write the site into `out` (default: `.sdxlpipe/report`); `batch_size` for the short-batch counts
    (default: train.batch_size, as `inspect`)."""
    from sdxlpipe.pipeline.progress import Reporter
    from sdxlpipe.report import dataset, runs, site, store, thumbs

    began = time.monotonic()
    reporter = reporter or Reporter(enabled=False)
    site_dir = Path(out) if out is not None else Path(config.workspace) / "report"
    cache = Path(config.workspace) / "thumbs"

    data = dataset.collect(config, batch_size)
    wanted = len(data.thumbs)
    have, bad = thumbs.scan(cache)
    made_before = len(have & set(data.thumbs))
    with reporter.track("thumbnails", len(set(data.thumbs) - have - bad)) as advance:
        failed = thumbs.make_missing(data.thumbs, cache, advance)
    dataset.drop_thumbs(data, set(failed))
    for key, reason in list(failed.items())[:LOG_FAILURES]:
        log.warning("no thumbnail for %s: %s", data.thumbs[key], reason)
    if len(failed) > LOG_FAILURES:
        log.warning("... and %d more images without a thumbnail", len(failed) - LOG_FAILURES)

    run_list, run_details, run_files = runs.collect(Path(config.workspace))
    store_data = store.collect(config.store_url, Path(config.workspace), list(config.stages))

    writer = site.DataWriter(site_dir)
    try:
        meta = {"config": str(config.path), "title": Path(config.base_dir).name, "built": time.time(),
                "store": config.store_url}
        writer.put("summary", {**data.summary, "meta": meta, "thumb_failures": len(failed)})
        for i, chunk in enumerate(data.items):
            writer.put(f"items/{i:05d}", chunk, floats=False)
        for i, chunk in enumerate(data.rejects):
            writer.put(f"rejects/{i:05d}", chunk, floats=False)
        writer.put("facets", data.facets)
        writer.put("runs", {"meta": meta, "runs": run_list})
        for key, detail in run_details.items():
            writer.put(f"run/{key}", detail)
        writer.put("store", {"meta": meta, **store_data})
        site.copy_assets(site_dir)
        added = thumbs.link_into(data.thumbs, cache, site_dir / "thumbs")
        site.place_files(site_dir, [f for files in run_files.values() for f in files])
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return {
        "path": str((site_dir / "index.html").absolute()),
        "inspect": data.inspect,
        "pages": {p: str((site_dir / p).absolute()) for p in site.PAGES},
        "items": data.summary["items"], "rejected": data.summary["rejected"], "runs": len(run_list),
        "thumbnails": {"items": wanted, "made": wanted - made_before - len(failed), "reused": made_before,
                       "failed": len(failed), "linked": added},
        "data_bytes": sum(writer.sizes.values()),
        "seconds": round(time.monotonic() - began, 3),
    }
