"""`sdxlpipe dataset list|show|rm`: the datasets published in a store.

Its own typer sub-app, added to the main app in sdxlpipe/cli.py. `run encode`
and `run all` publish a config's training-ready rows as `[dataset] name`
(pipeline/publish.py); these commands look at them in any store, local or
behind a URL (`show` reads by name, so it works over plain HTTP too; `list`
lists the store's datasets/refs/ folder). Results to stdout (`--json`: one
object); a missing store or dataset raises an error with a hint (exit 2).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdxlpipe.cli_common import DEFAULT_CONFIG, JsonOpt, check_store, setup, stderr_console

dataset_app = typer.Typer(no_args_is_help=True, help="The datasets published in a store: list, show, rm.")

ConfigOpt = Annotated[Path, typer.Option("-c", "--config", help="the config whose store to use (when --store is not given)")]
StoreOpt = Annotated[Optional[str], typer.Option("--store", help="a store path or URL (default: the config's)")]


def _open(config: Path, url: str | None, write: bool = False):
    from sdxlpipe.cache_format import open_store

    setup(stderr_console())
    flag = "--store"
    if url is None:
        from sdxlpipe.config import load_config

        url, flag = load_config(config).store_url, f"[store] url in {config} (or pass --store)"
    check_store(url, must_exist=True, flag=flag)
    return open_store(url, create=False, read_only=not write)


def _when(seconds) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if isinstance(seconds, int) else "?"


@dataset_app.command("list")
def list_(config: ConfigOpt = DEFAULT_CONFIG, store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Every dataset published in the store: samples, buckets, items, bytes, when, from which config and model."""
    from sdxlpipe.cache_format.snapshots import describe_all

    opened = _open(config, store)
    found = describe_all(opened)
    if as_json:
        print(json.dumps({"store": opened.url, "datasets": [{k: v for k, v in d.items() if k != "settings"}
                                                             for d in found]}, indent=2))
        return
    if not found:
        print(f"no dataset published in {opened.url}; `sdxlpipe run encode` publishes a config's dataset")
    for d in found:
        if "error" in d:
            print(f"{d['name']:20} unreadable: {d['error']}")
            continue
        items = sum(s.get("items", 0) for s in d["stages"].values())
        megabytes = sum(s.get("bytes", 0) for s in d["stages"].values()) / 1e6
        print(f"{d['name']:20} {d['snapshot'][:12]}  {d['samples']:>8} samples {len(d['buckets']):>3} buckets "
              f"{items:>8} items {megabytes:>9.1f} MB  {_when(d['published'])}  {d['model']}  {d['config']}")


@dataset_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="the dataset's name, or NAME@SNAPSHOT for one snapshot")],
    config: ConfigOpt = DEFAULT_CONFIG, store: StoreOpt = None, as_json: JsonOpt = False,
) -> None:
    """One dataset: its snapshot, samples per bucket, items and bytes per stage, the settings that made it."""
    from sdxlpipe.cache_format.snapshots import describe

    opened = _open(config, store)
    d = describe(opened, name)
    if as_json:
        print(json.dumps(d, indent=2))
        return
    print(f"dataset:   {d['name']}")
    print(f"snapshot:  {d['snapshot']}")
    if d["published"] is not None:
        print(f"published: {_when(d['published'])} from {d['config']} (model {d['model']}"
              + (f", vae {d['vae']})" if d["vae"] else ")"))
    else:
        print(f"published: no ref names this snapshot now (`dataset show {d['name']}` shows the current one)")
    print(f"samples:   {d['samples']} in {len(d['buckets'])} bucket(s): "
          + ", ".join(f"{b} x{n}" for b, n in d["buckets"].items()))
    for stage, s in d["stages"].items():
        print(f"{stage:12} {s.get('items', 0):>8} items {s.get('shards', 0):>5} shards {s.get('bytes', 0) / 1e6:>10.1f} MB")
    print(f"train on it: [[sources]] {d['source']}")


@dataset_app.command("rm")
def rm(
    name: Annotated[str, typer.Argument(help="the dataset to un-publish")],
    config: ConfigOpt = DEFAULT_CONFIG, store: StoreOpt = None,
) -> None:
    """Un-publish a dataset: its ref goes; its snapshot, and shards nothing else keeps, become collectable by gc."""
    opened = _open(config, store, write=True)
    ref = opened.remove_dataset(name)
    print(f"removed dataset {name} (snapshot {ref['snapshot']}); `sdxlpipe store gc` removes what only it kept, "
          "once older than the grace period")
