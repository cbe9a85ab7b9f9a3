"""The `sdxlpipe` command line.

Results go to stdout (`--json`: one object), progress and logs to stderr.
A user error prints one `Error:` line and a `Hint:` line and exits 2; set
SDXLPIPE_DEBUG=1 for the traceback. Signal handling and exit live here only.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from sdxlpipe.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="SDXL fine-tuning as content-cached stages.")
model_app = typer.Typer(no_args_is_help=True, help="Built-in models.")
store_app = typer.Typer(no_args_is_help=True, help="Inspect and maintain an artifact store.")
import_app = typer.Typer(no_args_is_help=True, help="Turn another trainer's dataset config into an sdxlpipe config.")
app.add_typer(model_app, name="model")
app.add_typer(store_app, name="store")
app.add_typer(import_app, name="import")

# issue 10: the LoRA toolbox lives in its own module (torch-free at import).
from sdxlpipe.lora.cli import lora_app  # noqa: E402

app.add_typer(lora_app, name="lora")

ConfigOpt = Annotated[Path, typer.Option("-c", "--config", help="the config file")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
DEFAULT_CONFIG = Path("sdxlpipe.toml")


def _stderr() -> Console:
    return Console(stderr=True)


def _setup(debug_console: Console) -> None:
    from sdxlpipe.pipeline.progress import setup_logging

    # transformers warns that CLIPImageProcessor wants torchvision: harmless for us.
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    setup_logging(debug_console, debug=bool(os.environ.get("SDXLPIPE_DEBUG")))


def _parse_shards(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shards {text!r} is not K/N", "give the partition as K/N with 0 <= K < N, e.g. --shards 0/4")
    if not 0 <= k < n:
        raise UserError(f"--shards {text}: need 0 <= K < N", "e.g. --shards 0/4 ... --shards 3/4 on four machines")
    return k, n


@app.command()
def run(
    target: Annotated[str, typer.Argument(help="all, encode, or a stage: ingest caption bucket vae_encode text_encode train export")] = "all",
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a config key: --set train.max_steps=5")] = None,
    shards: Annotated[Optional[str], typer.Option("--shards", help="K/N: compute only partition K of N of the encode items")] = None,
    engine: Annotated[str, typer.Option("--engine", help="where the encoders run: local, or ray (pip install 'sdxlpipe[ray]')")] = "local",
    as_json: JsonOpt = False,
    strict: Annotated[bool, typer.Option("--strict", help="exit 1 if any input file was rejected")] = False,
) -> None:
    """Bring every stage up to TARGET up to date; compute only what changed."""
    from sdxlpipe.config import load_config
    from sdxlpipe.pipeline.graph import STAGE_NAMES, stages_for
    from sdxlpipe.pipeline.progress import Reporter
    from sdxlpipe.pipeline.runner import run_pipeline

    console = _stderr()
    _setup(console)
    try:
        stages_for(target)
    except KeyError:
        raise UserError(f"unknown stage {target!r}", f"use all, encode or one of: {', '.join(STAGE_NAMES)}")
    cfg = load_config(config, set_)
    from sdxlpipe.engines import ENGINES

    if engine not in ENGINES:
        raise UserError(f"--engine {engine!r} is not known", f"use one of: {', '.join(ENGINES)}")
    report = run_pipeline(cfg, target, partition=_parse_shards(shards), reporter=Reporter(console), engine=engine)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under accelerate launch / torchrun every process runs; one reports
    # Duplicates are listed for a person to see, but they lose no sample: not an error.
    failed_strict = strict and any("duplicate_of" not in r for r in report["rejected"])
    if as_json:
        print(json.dumps(report, indent=2))
        if failed_strict:
            raise typer.Exit(1)
        return
    for name, s in report["stages"].items():
        print(f"{name:12} {s['items']:>7} items  {s['computed']:>7} computed  {s['reused']:>7} reused"
              + (f"  {s['failed']} failed" if s["failed"] else "") + f"  {s['seconds']:.1f}s")
    for r in report["rejected"]:
        print(f"rejected: {r['path']}: {r['reason']}")
    for path in report["outputs"].get("lora", []):
        print(f"up to date: {path}" if report["outputs"].get("lora_up_to_date") else f"wrote {path}")
    if failed_strict:
        _stderr().print("Error: --strict: input files were rejected (listed above)", markup=False)
        raise typer.Exit(1)


@app.command()
def status(config: ConfigOpt = DEFAULT_CONFIG, as_json: JsonOpt = False) -> None:
    """What is up to date, what must be computed, and why. Loads no model."""
    from sdxlpipe.config import load_config
    from sdxlpipe.pipeline.status import format_status, status as compute_status

    _setup(_stderr())
    result = compute_status(load_config(config))
    print(json.dumps(result, indent=2) if as_json else format_status(result))


@app.command()
def buckets(
    resolution: Annotated[int, typer.Option(help="side of the square whose area buckets keep")] = 1024,
    step: Annotated[int, typer.Option(help="bucket sides are multiples of this")] = 64,
    min_side: Annotated[int, typer.Option(help="narrowest bucket side")] = 256,
    max_side: Annotated[int, typer.Option(help="widest bucket side")] = 2048,
    preset: Annotated[Optional[str], typer.Option(help="a fixed bucket list: sdxl (the SDXL paper's App. I)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the bucket list for a resolution, or a preset's."""
    from sdxlpipe.stages.bucket import PRESETS, make_buckets

    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown bucket preset {preset!r}", f"known presets: {', '.join(PRESETS)}")
    found = list(PRESETS[preset]) if preset else make_buckets(resolution, step, min_side, max_side)
    if as_json:
        print(json.dumps([list(b) for b in found]))
        return
    for w, h in found:
        print(f"{w:>5} x {h:<5} aspect {w / h:.3f}")


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="the dataset folder (images and captions, kohya folders, or tars)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="where to write the config")] = DEFAULT_CONFIG,
    model: Annotated[str, typer.Option(help="base model: Hub id, diffusers folder, .safetensors file, or tiny")] = "stabilityai/stable-diffusion-xl-base-1.0",
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing config")] = False,
) -> None:
    """Look at a dataset folder and write a commented config that runs on it."""
    from sdxlpipe.datasets.init import write_config

    if not folder.is_dir():
        raise UserError(f"not a folder: {folder}", "pass the folder that holds your images: sdxlpipe init path/to/images")
    if output.exists() and not force:
        raise UserError(f"{output} already exists", "pass --force to overwrite it, or -o NEW.toml")
    path, seen = write_config(folder, output, model)
    print(f"wrote {path} ({seen['images'] or seen['tars']} {'images' if seen['images'] else 'tar shards'}); "
          f"check it, then: sdxlpipe inspect -c {path}")


@app.command()
def inspect(
    config: ConfigOpt = DEFAULT_CONFIG,
    batch_size: Annotated[Optional[int], typer.Option(help="batch size for the short-batch count (default: train.batch_size)")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="draw the bucket histogram into this PNG")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The dataset before training: sources, rejected files, buckets, caption lengths, top tags."""
    from sdxlpipe.config import load_config
    from sdxlpipe.datasets.inspect import format_inspect, inspect_dataset, plot_buckets

    _setup(_stderr())
    result = inspect_dataset(load_config(config), batch_size)
    if plot is not None:
        result["plot"] = str(plot_buckets(result, plot))
    print(json.dumps(result, indent=2) if as_json else format_inspect(result))


@import_app.command("kohya")
def import_kohya(
    dataset_toml: Annotated[Path, typer.Argument(help="kohya's dataset config (--dataset_config)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="where to write the sdxlpipe config")] = DEFAULT_CONFIG,
    model: Annotated[str, typer.Option(help="base model for the config")] = "stabilityai/stable-diffusion-xl-base-1.0",
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing config")] = False,
) -> None:
    """Map a kohya dataset .toml onto an sdxlpipe config; name what cannot be mapped."""
    from sdxlpipe.datasets.kohya import convert

    if output.exists() and not force:
        raise UserError(f"{output} already exists", "pass --force to overwrite it, or -o NEW.toml")
    text, notes = convert(dataset_toml, output, model)
    output.write_text(text, encoding="utf-8")
    err = _stderr()
    for note in notes:
        err.print(f"not mapped: {note}", markup=False, highlight=False)
    print(f"wrote {output}" + (f" ({len(notes)} option(s) not mapped, listed in its header)" if notes else ""))


@model_app.command("save")
def model_save(
    name: Annotated[str, typer.Argument(help="the built-in model to write: tiny")],
    directory: Annotated[Path, typer.Argument(help="where to write the diffusers directory")],
) -> None:
    """Write a built-in model as a diffusers directory."""
    if name != "tiny":
        raise UserError(f"no built-in model {name!r}", "the built-in model is `tiny`: sdxlpipe model save tiny DIR")
    _setup(_stderr())
    from sdxlpipe.models.tiny import save_tiny

    print(save_tiny(directory))


def _store_from(config: Path, url: str | None):
    from sdxlpipe.cache_format import open_store

    if url:
        return open_store(url, create=False)
    from sdxlpipe.config import load_config

    return open_store(load_config(config).store_url, create=False)


StoreOpt = Annotated[Optional[str], typer.Option("--store", help="a store path or URL (default: the config's)")]
SrcArg = Annotated[str, typer.Argument(help="the store to copy from (path or URL)")]
DstArg = Annotated[str, typer.Argument(help="the store to copy into (created if new)")]


@store_app.command("verify")
def store_verify(config: ConfigOpt = DEFAULT_CONFIG, store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """Re-hash every shard and item; list what is damaged (exit 1 if any)."""
    _setup(_stderr())
    problems = _store_from(config, store).verify()
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
    _setup(_stderr())
    for path in _store_from(config, store).gc(dry_run=dry_run, grace_seconds=grace):
        print(("would remove " if dry_run else "removed ") + path)


@store_app.command("compact")
def store_compact(config: ConfigOpt = DEFAULT_CONFIG, store: StoreOpt = None) -> None:
    """Merge each stage's index fragments into one."""
    _setup(_stderr())
    print(json.dumps(_store_from(config, store).compact(), indent=2))


def _copy_store(src: str, dst: str, as_json: bool) -> None:
    from sdxlpipe.cache_format import open_store

    _setup(_stderr())
    source = open_store(src, create=False)
    report = source.copy_missing_to(open_store(dst, create=True))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for stage, c in report.items():
            print(f"{stage:12} {c['items']:>8} items copied {c['shards']:>5} shards {c['bytes'] / 1e6:>10.1f} MB"
                  + (f"  {len(c['damaged'])} damaged, not copied" if c["damaged"] else ""))
    if any(c["damaged"] for c in report.values()):
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
    _setup(_stderr())
    usage = _store_from(config, store).du()
    if as_json:
        print(json.dumps(usage, indent=2))
        return
    for stage, u in usage["stages"].items():
        print(f"{stage:12} {u['items']:>8} items {u['shards']:>5} shards {u['bytes'] / 1e6:>10.1f} MB")
        for group, nbytes in sorted(u.get("groups", {}).items()):
            print(f"  {group or '(no fingerprint recorded)'}: {nbytes / 1e6:.1f} MB of items")
    print(f"{'total':12} {usage['bytes'] / 1e6:>32.1f} MB")


def main() -> None:
    try:
        app()
    except Exception as e:  # noqa: BLE001 - user errors become two lines; the rest keep their traceback
        if os.environ.get("SDXLPIPE_DEBUG") or not (hasattr(e, "what") and hasattr(e, "hint")):
            raise
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        err.print(f"Error: {e.what}", markup=False)
        if e.hint:
            err.print(f"Hint: {e.hint}", markup=False)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("Interrupted: rerun the same command to resume.", markup=False)
        sys.exit(130)
