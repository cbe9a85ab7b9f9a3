"""The no-op fast path: answer `run all` and `status` from a record of the last complete run.

A complete `run all` (every stage, no `--shards`, nothing failed) writes
`.sdxlpipe/.noop.json`: what it read (the config file's bytes and `--set`
overrides, the stat of every file in each source tree, the model files,
sdxlpipe's own code, the installed packages' names) and what it left (the
workspace, the local store and the export folder, stat for stat), plus its
report. The next `run all` or `status` walks the same paths with
`os.scandir` + stat (pure Python: no pyarrow, numpy, fsspec or torch) and,
when every stat and byte of config is the same, prints that report as a
no-op. Anything else (a stat, the record missing, unreadable or from
another version) returns None and the caller takes the normal path, which
stays the source of truth. Any run that may write removes the record first.

What is never answered here (the record is not written): manifest sources
(the files they name can live anywhere), remote stores, and dataset sources
published in a store behind a URL (it changes without a trace here).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Bump when the record's layout or what it covers changes: an old record is then ignored.
RECORD_VERSION = 2  # 2: the report's stages say what their items are (`units`)
# Hidden (a dot name) so the workspace walk never sees it, and ingest never lists it.
RECORD_NAME = ".noop.json"
# git's racy rule, with room for coarse clocks (FAT, some network file systems: 2 s): a file
# changed this close to the walk that recorded it could change again with the same stat.
RACY_NS = 2_000_000_000
# Variables that change where models or libraries are found, so what a run would read.
ENV_KEYS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE",
            "PYTHONPATH", "SDXLPIPE_DEBUG")


def record_path(config_path: Path) -> Path:
    from sdxlpipe.config import WORKSPACE_DIR

    return Path(config_path).absolute().parent / WORKSPACE_DIR / RECORD_NAME


def answer(config_path: Path, overrides: list[str] | None) -> dict[str, Any] | None:
    """The recorded no-op `run all` report, if nothing the last complete run read or wrote has changed."""
    if os.environ.get("SDXLPIPE_NO_RECORD"):  # benchmarks and debugging: always take the normal path
        return None
    try:
        record = json.loads(record_path(config_path).read_text(encoding="utf-8"))
        if record.get("version") != RECORD_VERSION:
            return None
        inputs, _ = _digest(_header(config_path, overrides), record["inputs"])
        if inputs != record["inputs_digest"]:
            return None
        outputs, _ = _digest([], record["outputs"])
        if outputs != record["outputs_digest"]:
            return None
        return record["report"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, unreadable or malformed: the normal path answers


def as_status(report: dict[str, Any]) -> dict[str, Any]:
    """The `status` answer a no-op report stands for (the shape `pipeline.status.status` returns)."""
    # A record is written only after a complete run that failed nothing, so nothing "cannot run".
    stages = {name: {"items": s["items"], "units": s["units"], "up_to_date": s["reused"], "to_compute": 0,
                     "cannot_run": 0, "reasons": []}
              for name, s in report["stages"].items()}
    return {"stages": stages, "rejected": report["rejected"], "up_to_date": True,
            **({"datasets": report["outputs"]["datasets"]} if "datasets" in report.get("outputs", {}) else {})}


def forget(workspace: Path) -> None:
    """Remove the record: a run that may write is about to start."""
    try:
        (Path(workspace) / RECORD_NAME).unlink()
    except FileNotFoundError:
        pass


def watch_inputs(config) -> list[list] | None:
    """What a run of `config` reads, as walk entries; None when the fast path cannot cover it.

    Each stage's path settings (Params fields marked `path`) are watched, whatever the stage: a file by its
    stat, a folder by its tree (`follow_links`: through links). One marked `written` is an output.
    """
    import sdxlpipe
    from sdxlpipe.config import path_settings
    from sdxlpipe.stages import declared

    code = Path(sdxlpipe.__file__).parent
    watch: list[list] = [["tree", str(code), False]]
    # Installed packages by name (an upgrade renames its dist-info): the tiny model's weights
    # depend on torch's and diffusers' versions, and code paths on every library's.
    watch += [["list", p] for p in sorted({p for p in sys.path if p.endswith("-packages") and os.path.isdir(p)})]
    # A stage module from outside sdxlpipe (a program's own stage): its code is an input too.
    watch += [["file", m.__file__] for m in config.stages.values() if not Path(m.__file__).is_relative_to(code)]
    for name, module in config.stages.items():
        params = config.params[name]
        unlisted = declared(module, "reads_unlisted_files")
        if unlisted is not None and unlisted(params):
            return None
        for value, meta in path_settings(params):
            if not meta.get("written"):
                path = Path(value).absolute()
                watch.append(["tree" if path.is_dir() else "file", str(path), bool(meta.get("follow_links"))])
    for spec in (config.model, config.vae):
        if spec:
            entries = _model_entries(spec, config)
            if entries is None:
                return None
            watch += entries
    return watch


def watch_outputs(config) -> list[list] | None:
    """What a run leaves that a later no-op relies on: the workspace, a local store, the `written` path settings."""
    from sdxlpipe.config import path_settings

    store = config.store_url[len("file://"):] if config.store_url.startswith("file://") else config.store_url
    if "://" in store:
        return None  # a remote store changes without a trace here
    watch = [["tree", str(config.workspace), False]]
    if not Path(store).absolute().is_relative_to(config.workspace):
        watch.append(["tree", str(Path(store).absolute()), False])
    watch += [["tree", str(Path(value).absolute()), False] for name in config.stages
              for value, meta in path_settings(config.params[name]) if meta.get("written")]
    return watch


def begin(config, overrides: list[str] | None) -> dict[str, Any] | None:
    """Before a `run all`: walk what it will read. None when no record can be written."""
    watch = watch_inputs(config)
    if watch is None:
        return None
    started = time.time_ns()
    digest, newest = _digest(_header(config.path, overrides), watch)
    if newest >= started - RACY_NS:
        return None  # a file changed just now may change again unseen: no record this time
    return {"inputs": watch, "inputs_digest": digest}


def finish(config, began: dict[str, Any] | None, report: dict[str, Any]) -> None:
    """After a complete `run all`: write the record, unless something failed or was damaged."""
    if began is None or report["failed_stages"] or report["damaged"]:
        return
    if any(s["failed"] for s in report["stages"].values()):
        return
    outputs = watch_outputs(config)
    if outputs is None:
        return
    from sdxlpipe.cache_format.shards import write_atomic

    noop = {
        **report,
        "stages": {name: {**s, "computed": 0, "reused": s["items"], "seconds": 0.0, "reasons": []}
                   for name, s in report["stages"].items()},
        "outputs": {**report["outputs"], **({"written": []} if "written" in report["outputs"] else {}),
                    **({"dataset": {**report["outputs"]["dataset"], "published": False}}
                       if "dataset" in report["outputs"] else {})},
        "models_loaded": [],
    }
    # Walked after the run, so what it wrote is part of the picture (the record itself is hidden,
    # and its folder is made first, so writing it changes nothing the walk sees).
    config.workspace.mkdir(parents=True, exist_ok=True)
    digest, _ = _digest([], outputs)
    record = {"version": RECORD_VERSION, **began, "outputs": outputs, "outputs_digest": digest, "report": noop}
    # Not sorted: the report keeps the stages in pipeline order, as the normal path prints them.
    write_atomic(config.workspace / RECORD_NAME, json.dumps(record, indent=1).encode())


def _header(config_path: Path, overrides: list[str] | None) -> list[str]:
    path = Path(config_path).absolute()
    # The working directory: a default relative path (export.output_dir = "output") resolves against it.
    return [str(RECORD_VERSION), sys.version, sys.executable, os.getcwd(), str(path),
            hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest(), json.dumps(list(overrides or [])),
            json.dumps({k: os.environ.get(k) for k in ENV_KEYS})]


def _model_entries(spec: str, config) -> list[list] | None:
    from sdxlpipe.models.spec import resolve_spec

    if spec == "tiny":
        return []
    entries: list[list] = []
    if not Path(spec).is_absolute():
        entries.append(["file", str(config.base_dir / spec)])  # a folder appearing there would win over a Hub id
    try:
        resolved = resolve_spec(spec, config.base_dir, config.allow_pickle)
    except Exception:  # noqa: BLE001 - the normal path reports a bad model; just do not record
        return None
    if resolved.kind == "file":
        entries.append(["file", str(resolved.path)])
    elif resolved.kind == "dir":
        # Follow links: a Hub snapshot is a folder of links into blobs/, and fingerprints follow them.
        entries.append(["tree", str(resolved.path), True])
        if resolved.hub_id:
            entries.append(["file", str(resolved.path.parent.parent / "refs" / "main")])
    else:
        return None
    return entries


def _digest(header: list[str], watch: list[list]) -> tuple[str, int]:
    """blake2b over the header and every watched entry's stat; and the newest file mtime seen."""
    lines = list(header)
    newest = 0
    for entry in watch:
        kind, path = entry[0], entry[1]
        lines.append(f"{kind}\0{path}")
        if kind == "file":
            try:
                st = os.stat(path)
            except FileNotFoundError:
                lines.append("absent")
                continue
            lines.append(_stat_line("", st))
            newest = max(newest, st.st_mtime_ns)
        elif kind == "list":
            try:
                lines.append("\0".join(sorted(os.listdir(path))))
            except FileNotFoundError:
                lines.append("absent")
        else:
            newest = max(newest, _walk(path, bool(entry[2]), lines))
    return hashlib.blake2b("\n".join(lines).encode("utf-8", "surrogateescape"), digest_size=16).hexdigest(), newest


def _walk(root: str, follow: bool, lines: list[str], rel: str = "") -> int:
    """Append one line per file under `root` (name, size, mtime, ctime, inode), sorted per folder;
    hidden names and __pycache__ are skipped, as the readers skip them. Returns the newest mtime."""
    newest = 0
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        lines.append(f"{rel}\0absent")
        return 0
    except NotADirectoryError:
        st = os.stat(root)
        lines.append(_stat_line(rel, st))
        return st.st_mtime_ns
    for e in entries:
        name = e.name
        if name[0] == "." or name == "__pycache__":
            continue
        if e.is_dir(follow_symlinks=follow):
            lines.append(f"{rel}{name}/")
            newest = max(newest, _walk(e.path, follow, lines, f"{rel}{name}/"))
            continue
        try:
            st = e.stat()
        except FileNotFoundError:  # a dangling link, or gone since the listing
            lines.append(f"{rel}{name}\0dangling")
            continue
        lines.append(_stat_line(rel + name, st))
        if st.st_mtime_ns > newest:
            newest = st.st_mtime_ns
    return newest


def _stat_line(name: str, st: os.stat_result) -> str:
    return f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
