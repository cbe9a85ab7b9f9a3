"""The store's one directory lister: every listing of a store goes through here.

Fresh listings (fsspec caches them, and fragments come and go), an absent
directory as empty, and on a local disk a path that stats only the names the
caller needs (`list_entries`).
"""

from __future__ import annotations

import os
import posixpath

from .shards import is_local


def list_entries(fs, directory: str, suffix: str, detail_prefix: str = "",
                 known: dict[str, tuple] | None = None) -> dict[str, tuple]:
    """{base name: (size, modified)} of the files in `directory` ending with `suffix`.

    On a local disk only names starting with `detail_prefix` are stat'ed (the rest get
    (None, "")): a stage of a thousand immutable fragments lists in a millisecond.
    known: immutable files' signatures from an earlier listing; on a local disk every
    other name is stat'ed too (the index cache compares signatures; ~3 ms per 1,000).
    """
    if is_local(fs):
        try:
            names = sorted(n for n in os.listdir(directory) if n.endswith(suffix))
        except FileNotFoundError:
            return {}
        out = {}
        for n in names:
            if known is not None and n in known and not (detail_prefix and n.startswith(detail_prefix)):
                out[n] = known[n]
            elif known is not None or (detail_prefix and n.startswith(detail_prefix)):
                try:
                    st = os.stat(os.path.join(directory, n))
                except FileNotFoundError:
                    continue
                out[n] = (st.st_size, str(st.st_mtime_ns))
            elif detail_prefix or os.path.isfile(os.path.join(directory, n)):
                out[n] = (None, "")  # index dirs hold only files: no stat per fragment
        return out
    out = {}
    for e in list_detail(fs, directory):
        name = posixpath.basename(e["name"].rstrip("/"))
        if e.get("type") != "directory" and name.endswith(suffix):
            out[name] = (e.get("size"), str(e.get("mtime") or e.get("LastModified") or e.get("updated") or ""))
    return dict(sorted(out.items()))


def list_files(fs, directory: str, suffix: str) -> list[str]:
    """Base names in `directory` ending with `suffix`; an absent directory is empty."""
    return list(list_entries(fs, directory, suffix))


def list_names(fs, directory: str, dirs_only: bool = False) -> list[str]:
    """Sorted base names of everything in `directory` (only its subdirectories with dirs_only)."""
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in list_detail(fs, directory)
                  if not dirs_only or e.get("type") == "directory")


def list_detail(fs, directory: str) -> list[dict]:
    """fsspec's detailed listing of `directory`, fresh; an absent directory is empty.

    Every listing above goes through here (or the local fast path of list_entries).
    """
    fs.invalidate_cache(directory)  # s3fs and friends cache listings; fragments come and go.
    try:
        return fs.ls(directory, detail=True)
    except FileNotFoundError:
        return []
