"""Readers for the datasets users already have, and the image checks they share.

One module per source kind (folder, manifest, webdataset), plus the image
probe/opener every stage uses, caption sidecars, tag handling, and the
commands that look at a dataset (init, inspect, import kohya). Nothing here
imports torch at top level.
"""

from sdxlpipe.datasets.open_image import open_source_alpha, open_source_image, read_source_bytes

__all__ = ["open_source_alpha", "open_source_image", "read_source_bytes"]
