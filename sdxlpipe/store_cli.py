"""`sdxlpipe store ...`: verify, gc, compact, push/pull and du of an artifact store.

Its own typer sub-app, added to the main app in cli.py. A command works on
`--store` or the config's store, which must exist (`cli_common.check_store`);
results to stdout, exit 1 when a store is damaged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdxlpipe.cli_common import DEFAULT_CONFIG, ConfigOpt, JsonOpt, check_store, setup, stderr_console

store_app = typer.Typer(no_args_is_help=True, help="Inspect and maintain an artifact store.")


def _store_from(config: Path, url: str | None):
    from sdxlpipe.cache_format import open_store

    if url:
        check_store(url, must_exist=True, flag="--store")
        return open_store(url, create=False)
    from sdxlpipe.config import load_config

    url = load_config(config).store_url
    check_store(url, must_exist=True, flag=f"[store] url in {config} (or pass --store)")
    return open_store(url, create=False)


StoreOpt = Annotated[Optional[str], typer.Option("--store", help="a store path or URL (default: the config's)")]
SrcArg = Annotated[str, typer.Argument(help="the store to copy from (path or URL)")]
DstArg = Annotated[str, typer.Argument(help="the store to copy into (created if new)")]


@store_app.command("verify")
def store_verify(
    config: ConfigOpt = DEFAULT_CONFIG, store: StoreOpt = None, as_json: JsonOpt = False,
    repair: Annotated[bool, typer.Option("--repair", help="also mark items that break the payload schema bad, so "
                                         "the next run re-encodes them (damaged items are always marked)")] = False,
) -> None:
    """Re-hash every shard and item, check payloads against the spec; list what is wrong (exit 1 if any)."""
    setup(stderr_console())
    problems = _store_from(config, store).verify(repair=repair)
    if as_json:
        print(json.dumps({"problems": problems}, indent=2))
    else:
        for p in problems:
            print(f"{p['stage']}/{p['shard_id']}: {p.get('item_key') or 'shard'}: {p['problem']}")
        print("store is clean" if not problems else f"{len(problems)} problem(s): the next run recomputes the damaged items")
    if problems:
        raise typer.Exit(1)


@store_app.command("gc")
def store_gc(
    config: ConfigOpt = DEFAULT_CONFIG, store: StoreOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be removed")] = False,
    grace: Annotated[float, typer.Option(help="keep unreferenced shards younger than this many seconds (writers may still be indexing them)")] = 3600,
) -> None:
    """Remove shards that no index references."""
    setup(stderr_console())
    for path in _store_from(config, store).gc(dry_run=dry_run, grace_seconds=grace):
        print(("would remove " if dry_run else "removed ") + path)


@store_app.command("compact")
def store_compact(config: ConfigOpt = DEFAULT_CONFIG, store: StoreOpt = None) -> None:
    """Merge each stage's index fragments into one."""
    setup(stderr_console())
    print(json.dumps(_store_from(config, store).compact(), indent=2))


def _copy_store(src: str, dst: str, as_json: bool) -> None:
    from sdxlpipe.cache_format import open_store

    setup(stderr_console())
    check_store(src, must_exist=True, flag="SRC (the first argument)")
    check_store(dst, must_exist=False, flag="DST (the second argument)")
    source = open_store(src, create=False)
    target = open_store(dst, create=True)
    report = source.copy_missing_to(target)
    published = source.copy_datasets_to(target)  # after the shards they name
    if as_json:
        print(json.dumps({**report, "datasets": published}, indent=2))
    else:
        for stage, c in report.items():
            print(f"{stage:12} {c['items']:>8} items copied {c['shards']:>5} shards {c['bytes'] / 1e6:>10.1f} MB"
                  + (f"  {len(c['damaged'])} damaged, not copied" if c["damaged"] else ""))
        for name in published["copied"]:
            print(f"dataset {name} published in {target.url}")
        for name, why in published["left"].items():
            print(f"dataset {name} not copied: {why}")
    if any(c["damaged"] for c in report.values()) or published["left"]:
        raise typer.Exit(1)


@store_app.command("push")
def store_push(
    src: SrcArg,
    dst: DstArg,
    as_json: JsonOpt = False,
) -> None:
    """Copy the items DST lacks from SRC, checking every shard's hash on the way."""
    _copy_store(src, dst, as_json)


@store_app.command("pull")
def store_pull(
    src: SrcArg,
    dst: DstArg,
    as_json: JsonOpt = False,
) -> None:
    """Copy the items DST lacks from SRC (same as push; the name says which side you are on)."""
    _copy_store(src, dst, as_json)


@store_app.command("du")
def store_du(config: ConfigOpt = DEFAULT_CONFIG, store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Bytes per stage."""
    setup(stderr_console())
    usage = _store_from(config, store).du()
    if as_json:
        print(json.dumps(usage, indent=2))
        return
    for stage, u in usage["stages"].items():
        print(f"{stage:12} {u['items']:>8} items {u['shards']:>5} shards {u['bytes'] / 1e6:>10.1f} MB")
        for group, nbytes in sorted(u.get("groups", {}).items()):
            print(f"  {group or '(no fingerprint recorded)'}: {nbytes / 1e6:.1f} MB of items")
    print(f"{'total':12} {usage['bytes'] / 1e6:>32.1f} MB")
