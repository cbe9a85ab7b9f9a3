"""The site's files: pages and scripts from the package, data as script files, replaced whole.

Data go into `data/*.js` files of the form `SDXLPIPE.put("name", {...});`
rather than JSON, because a page opened from `file://` may not `fetch` a
file next to it, but it may always load a `<script>`: the site works from a
folder, a static host, or a zip extracted anywhere, with no server.

A rebuild writes the new `data/` beside the old one and swaps them, so a
page open during the build reads either the old data or the new, never
half of each.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

PAGES = ("index.html", "runs.html", "store.html")


def data_js(name: str, obj: Any) -> bytes:
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_plain)
    return f"SDXLPIPE.put({json.dumps(name)},{payload});\n".encode("utf-8")


def _plain(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON")


class DataWriter:
    """Collects data files in a fresh folder; `commit` swaps it in as `data/`. Counts bytes per file."""

    def __init__(self, site: Path):
        self.site = site
        site.mkdir(parents=True, exist_ok=True)
        self.root = site / f".data-{secrets.token_hex(4)}"
        self.root.mkdir()
        self.sizes: dict[str, int] = {}

    def put(self, name: str, obj: Any, floats: bool = True) -> None:
        """floats: the data may hold NaN or infinities (losses), written as null; False for data
        without floats (items), which skips the walk over every value."""
        data = data_js(name, _finite(obj) if floats else obj)
        path = self.root / f"{name}.js"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.sizes[name] = len(data)

    def commit(self) -> None:
        final = self.site / "data"
        old = self.site / f".data-old-{secrets.token_hex(4)}"
        if final.exists():
            os.replace(final, old)
        os.replace(self.root, final)
        shutil.rmtree(old, ignore_errors=True)
        for leftover in self.site.glob(".data-*"):  # a build killed before its swap
            shutil.rmtree(leftover, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _finite(obj: Any) -> Any:
    """NaN and infinities (a diverged loss) become null: JSON has no spelling for them."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def copy_assets(site: Path) -> None:
    """The pages at the top of the site, scripts and styles under `assets/`."""
    assets = resources.files("sdxlpipe.report") / "assets"
    (site / "assets").mkdir(parents=True, exist_ok=True)
    for entry in assets.iterdir():
        if entry.name.startswith(".") or not entry.is_file():
            continue
        dest = site / entry.name if entry.name in PAGES else site / "assets" / entry.name
        data = entry.read_bytes()
        if not dest.exists() or dest.read_bytes() != data:
            dest.write_bytes(data)


def place_files(site: Path, files: list[tuple[Path, str]]) -> None:
    """Hard-link (else copy) each (file, path in the site); files of a run folder that are gone are removed."""
    wanted = {rel for _, rel in files}
    for src, rel in files:
        dest = site / rel
        if dest.exists():
            a, b = src.stat(), dest.stat()
            if (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) or (a.st_size == b.st_size and b.st_mtime_ns >= a.st_mtime_ns):
                continue  # the same file, or a copy made after it
        dest.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(dest):
            os.remove(dest)
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)
    runs = site / "runs"
    if runs.is_dir():
        for path in [p for p in runs.rglob("*") if p.is_file()]:
            if path.relative_to(site).as_posix() not in wanted:
                path.unlink()
