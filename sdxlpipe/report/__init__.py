"""`sdxlpipe report`: a static site (Dataset, Runs, Store) from the workspace and the store.

It needs no server, CDN or network: the pages, scripts and styles are plain
files in `assets/` (copied as they are), the data are script files the pages
load, and it opens from `file://`. Built without torch.

- `build.py` — the recipe: collect, make thumbnails, write the site.
- `dataset.py` — the Dataset page's data (inspect's summary, item chunks, rejects, facets).
- `thumbs.py` — thumbnails cached by content key.
- `runs.py` — the Runs page's data from the run folders and export records.
- `store.py` — the Store page's data.
- `site.py` — data files, assets, hard-linked images; the swap of `data/`.
"""
