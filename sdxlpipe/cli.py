"""The `sdxlpipe` command line.

Results go to stdout (`--json`: one object), progress and logs to stderr.
A user error prints one `Error:` line and a `Hint:` line and exits 2; set
SDXLPIPE_DEBUG=1 for the traceback. Signal handling and exit live here only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from sdxlpipe.cli_common import DEFAULT_CONFIG, ConfigOpt, JsonOpt, check_store, setup, stderr_console
from sdxlpipe.errors import UserError
from sdxlpipe.store_cli import store_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="SDXL fine-tuning as content-cached stages.")
model_app = typer.Typer(no_args_is_help=True, help="Built-in models.")
import_app = typer.Typer(no_args_is_help=True, help="Turn another trainer's dataset config into an sdxlpipe config.")
app.add_typer(model_app, name="model")
app.add_typer(store_app, name="store")
app.add_typer(import_app, name="import")

# issue 10: the LoRA toolbox lives in its own module (torch-free at import).
from sdxlpipe.lora.cli import lora_app  # noqa: E402

app.add_typer(lora_app, name="lora")

# issue 17: published datasets (`run encode` publishes them) in their own module too.
from sdxlpipe.dataset_cli import dataset_app  # noqa: E402

app.add_typer(dataset_app, name="dataset")


def _parse_shards(text: str | None) -> tuple[int, int] | None:
    """`--shards K/N`, K counted from 1 (like Jest's and Playwright's --shard) -> the 0-based (K-1, N)."""
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shards {text!r} is not K/N", "give this machine's part as K/N with 1 <= K <= N, e.g. --shards 1/4")
    if not 1 <= k <= n:
        raise UserError(f"--shards {text}: need 1 <= K <= N (K counts from 1)",
                        f"on {max(n, 2)} machines run --shards 1/{max(n, 2)} ... --shards {max(n, 2)}/{max(n, 2)}")
    return k - 1, n


@app.command()
def run(
    target: Annotated[str, typer.Argument(help="all, encode, or a stage: ingest caption bucket vae_encode text_encode train export")] = "all",
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a config key: --set train.max_steps=5")] = None,
    shards: Annotated[Optional[str], typer.Option("--shards", help=(
        "K/N with K from 1 to N: this machine computes only part K of N of the encode items "
        "(an item's part comes from its key, so the N parts are about equal); "
        "run --shards 1/N ... --shards N/N on N machines sharing one store"))] = None,
    engine: Annotated[str, typer.Option("--engine", help="where the encoders run: local, or ray (pip install 'sdxlpipe\\[ray]')")] = "local",
    as_json: JsonOpt = False,
    strict: Annotated[bool, typer.Option("--strict", help="exit 1 if any input file was rejected or any item failed")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress and no info messages; warnings and errors still print")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also print debug messages")] = False,
) -> None:
    """Bring every stage up to TARGET up to date; compute only what changed.

    Exit code: 0 when every stage asked for did its work; 1 when a stage failed
    (e.g. train with no samples) or, with --strict, when an input was rejected;
    2 for a config or input mistake (an Error: line and a Hint:).
    """
    if target == "all" and shards is None and engine in ("local", "ray") and _answer_from_record(
            "run", config, set_, as_json, strict):
        return
    from sdxlpipe.config import load_config
    from sdxlpipe.pipeline import noop
    from sdxlpipe.pipeline.graph import stages_for
    from sdxlpipe.pipeline.progress import Reporter
    from sdxlpipe.pipeline.runner import run_pipeline
    from sdxlpipe.stages import STAGE_NAMES, declared, load_stages

    console = stderr_console()
    setup(console, quiet=quiet, verbose=verbose)
    try:
        stages = load_stages()
        chosen = stages_for(target, stages)
    except KeyError:
        import difflib

        close = difflib.get_close_matches(target, ["all", "encode", *STAGE_NAMES], n=1)
        raise UserError(f"unknown stage {target!r}" + (f"; did you mean {close[0]}?" if close else ""),
                        f"use all, encode or one of: {', '.join(STAGE_NAMES)}")
    partition = _parse_shards(shards)
    if partition is not None and any(declared(stages[name], "NEEDS_EVERY_ROW") for name in chosen):
        raise UserError(f"--shards splits the encode stages only, not `run {target}`",
                        "run `sdxlpipe run encode --shards K/N` on each machine, then `sdxlpipe run all` on one")
    cfg = load_config(config, set_)
    from sdxlpipe.engines import ENGINES

    if engine not in ENGINES:
        raise UserError(f"--engine {engine!r} is not known", f"use one of: {', '.join(ENGINES)}")
    check_store(cfg.store_url, must_exist=False, flag=f"[store] url in {config}")
    # Under accelerate launch / torchrun every process runs; only rank 0 shows progress.
    main_process = int(os.environ.get("RANK", "0")) == 0
    # What a complete run reads, walked before it starts: the record of a no-op (pipeline/noop.py).
    began = noop.begin(cfg, set_) if target == "all" and partition is None and _single_process() else None
    report = run_pipeline(cfg, target, partition=partition, reporter=Reporter(console, enabled=not quiet and main_process),
                          engine=engine)
    if not main_process:
        return  # under accelerate launch / torchrun every process runs; one reports
    noop.finish(cfg, began, report)
    _print_run_report(report, as_json, strict, config)


def _single_process() -> bool:
    """Not one of several processes of `accelerate launch` / torchrun (they must run together)."""
    return os.environ.get("WORLD_SIZE", "1") == "1" and os.environ.get("RANK", "0") == "0"


def _print_run_report(report: dict, as_json: bool, strict: bool, config: Path) -> None:
    """The run's results on stdout; exit 1 for a failed stage or, with --strict, a rejected file."""
    # Duplicates are listed for a person to see, but they lose no sample: not an error.
    failed_strict = strict and any("duplicate_of" not in r for r in report["rejected"])
    failed = report["failed_stages"]
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for name, s in report["stages"].items():
            print(f"{name:12} {s['items']:>7} {s['units']:8} {s['computed']:>7} computed  {s['reused']:>7} reused"
                  + (f"  {s['failed']} failed" if s["failed"] else "") + f"  {s['seconds']:.1f}s"
                  + (f"  ({'; '.join(s['reasons'])})" if name in failed and s["reasons"] else ""))
        for r in report["rejected"]:
            print(f"rejected: {r['path']}: {r['reason']}")
        best = report["outputs"].get("best_validation")
        if best:
            print(f"lowest validation loss: {best['val_loss']:.4f} at step {best['step']}"
                  + (f" ({best['checkpoint']})" if best.get("checkpoint") else " (checkpoint not kept)"))
        written = set(report["outputs"].get("written", []))
        for path in report["outputs"].get("lora", []):
            note = report["outputs"].get("lora_for", {}).get(path)
            print(("wrote " if path in written else "up to date: ") + path + (f"  ({note})" if note else ""))
        dataset = report["outputs"].get("dataset")
        if dataset and dataset["published"]:  # an unchanged dataset says nothing (`dataset show` does)
            print(f"published dataset {dataset['name']}@{dataset['snapshot']} ({dataset['samples']} samples)")
    if failed:
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        err.print(f"Error: stage(s) failed: {', '.join(failed)}" + (" (nothing was exported)" if "export" in failed else ""),
                  markup=False)
        err.print("Hint: the reasons are in the report above (--json: stages.*.reasons); "
                  f"`sdxlpipe inspect -c {config}` shows the dataset and its rejected files", markup=False)
        raise typer.Exit(1)
    if failed_strict:
        stderr_console().print("Error: --strict: input files were rejected (listed above)", markup=False)
        raise typer.Exit(1)


@app.command()
def status(
    config: ConfigOpt = DEFAULT_CONFIG,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="the same overrides as the run you ask about: --set train.max_steps=5")] = None,
    check: Annotated[bool, typer.Option("--check", help="exit 1 when anything is stale (for scripts: sdxlpipe status --check || sdxlpipe run all)")] = False,
    as_json: JsonOpt = False,
) -> None:
    """What is up to date, what must be computed, and why. Loads no model.

    Exit code: 0 (with --check: 0 only when everything is up to date, 1 when
    anything must be computed or a run would fail, e.g. train asked for fewer
    steps than its finished run has); 2 for a config mistake.
    """
    if _answer_from_record("status", config, set_, as_json):
        return
    from sdxlpipe.config import load_config
    from sdxlpipe.pipeline.status import format_status, status as compute_status

    setup(stderr_console())
    cfg = load_config(config, set_)
    check_store(cfg.store_url, must_exist=False, flag=f"[store] url in {config}")
    result = compute_status(cfg)
    print(json.dumps(result, indent=2) if as_json else format_status(result))
    if check and not result["up_to_date"]:
        raise typer.Exit(1)


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
    print(f"{'width':>5}   {'height':<6} aspect (width / height)")
    for w, h in found:
        print(f"{w:>5} x {h:<6} {w / h:.3f}")


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="the dataset: a folder (images and captions, kohya or EveryDream tree, img2dataset tars) or a .jsonl/.csv/.parquet manifest")],
    output: Annotated[Path, typer.Option("-o", "--output", help="where to write the config")] = DEFAULT_CONFIG,
    model: Annotated[str, typer.Option(help="base model: Hub id, diffusers folder, .safetensors file, or tiny; sets resolution and training defaults")] = "stabilityai/stable-diffusion-xl-base-1.0",
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing config")] = False,
) -> None:
    """Look at a dataset and the model, and write a commented config that runs on them."""
    from sdxlpipe.datasets.init import write_config

    if not folder.exists():
        raise UserError(f"not found: {folder}", "pass the folder that holds your images: sdxlpipe init path/to/images")
    if output.exists() and not force:
        raise UserError(f"{output} already exists", "pass --force to overwrite it, or -o NEW.toml")
    path, sources = write_config(folder, output, model)
    err = stderr_console()
    for s in sources:
        for where, reason in s.rejected:
            err.print(f"left out: {where}: {reason}", markup=False, highlight=False)
    samples = sum(s.samples for s in sources)
    rejected = sum(len(s.rejected) for s in sources)
    tars = sum(s.tars for s in sources)
    print(f"wrote {path}: {samples} {'samples in ' + str(tars) + ' tar shard(s)' if tars else 'images'}"
          + (f", {rejected} left out (listed above)" if rejected else ""))
    print(f"next: sdxlpipe inspect -c {path}   (check it), then: sdxlpipe run all -c {path}")


@app.command()
def inspect(
    config: ConfigOpt = DEFAULT_CONFIG,
    batch_size: Annotated[Optional[int], typer.Option(help="batch size for the short-batch count (default: train.batch_size)")] = None,
    plot: Annotated[bool, typer.Option("--plot", help="also write the report (`sdxlpipe report`) and print its Dataset page: bucket histogram, captions, tags, every image")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The dataset before training: sources, rejected files, buckets, caption lengths, top tags."""
    from sdxlpipe.config import load_config
    from sdxlpipe.datasets.inspect import format_inspect, inspect_dataset

    setup(stderr_console())
    cfg = load_config(config)
    check_store(cfg.store_url, must_exist=False, flag=f"[store] url in {config}")
    if plot:
        from sdxlpipe.pipeline.progress import Reporter
        from sdxlpipe.report.build import build_report

        built = build_report(cfg, reporter=Reporter(stderr_console()), batch_size=batch_size)
        result = {**built["inspect"], "plot": built["path"]}
    else:
        result = inspect_dataset(cfg, batch_size)
    print(json.dumps(result, indent=2) if as_json else format_inspect(result))
    if plot and not as_json:
        print(f"wrote {result['plot']}")


@app.command()
def report(
    config: ConfigOpt = DEFAULT_CONFIG,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="the site's folder (default: .sdxlpipe/report beside the config)")] = None,
    open_: Annotated[bool, typer.Option("--open", help="open the Dataset page in a web browser")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the report: a static site (Dataset, Runs, Store) that opens from file:// with no server; print its path."""
    from sdxlpipe.config import load_config
    from sdxlpipe.pipeline.progress import Reporter
    from sdxlpipe.report.build import build_report

    console = stderr_console()
    setup(console)
    cfg = load_config(config)
    check_store(cfg.store_url, must_exist=False, flag=f"[store] url in {config}")
    if output is not None and output.exists() and not output.is_dir():
        raise UserError(f"-o {output} is a file, not a folder", "give a folder for the site (a new one is created)")
    result = build_report(cfg, output, reporter=Reporter(console))
    result.pop("inspect")  # `inspect --json` prints it
    print(json.dumps(result, indent=2) if as_json else result["path"])
    if open_:
        import webbrowser

        webbrowser.open(Path(result["path"]).as_uri())


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
    from sdxlpipe.cache_format.shards import default_mode, write_atomic

    write_atomic(output, text.encode("utf-8"), mode=default_mode())  # --force must not leave half a config
    err = stderr_console()
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
    setup(stderr_console())
    from sdxlpipe.models.tiny import save_tiny

    print(save_tiny(directory))


def _noop_before_typer(argv: list[str]) -> int | None:
    """`run [all]` and `status` in their plain spellings answered from the no-op record before typer
    parses anything (its parameter coercion imports pydantic: ~0.2 s, half of `--help`).

    Returns the exit code, or None when typer must run: any other command, flag or spelling
    (`--config=x`, `--shards`, `--engine`, `--help`), or no record that answers.
    """
    if not argv or argv[0] not in ("run", "status"):
        return None
    command, rest = argv[0], argv[1:]
    flags = {"run": {"--json", "--strict", "-q", "--quiet", "-v", "--verbose"}, "status": {"--json", "--check"}}[command]
    config, overrides, seen, target = DEFAULT_CONFIG, [], set(), None
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("-c", "--config", "--set") and i + 1 < len(rest):
            if arg == "--set":
                overrides.append(rest[i + 1])
            else:
                config = Path(rest[i + 1])
            i += 2
        elif arg in flags:
            seen.add(arg)
            i += 1
        elif command == "run" and target is None and not arg.startswith("-"):
            target = arg
            i += 1
        else:
            return None
    if command == "run" and target not in (None, "all"):
        return None
    try:
        answered = _answer_from_record(command, config, overrides or None, "--json" in seen, "--strict" in seen)
    except typer.Exit as e:
        return e.exit_code
    return 0 if answered else None


def _answer_from_record(command: str, config: Path, overrides: list[str] | None, as_json: bool,
                        strict: bool = False) -> bool:
    """Answer `run all` or `status` from the no-op record (pipeline/noop.py) when nothing the last complete
    run read or wrote has changed: print what the command prints (typer.Exit(1) where `run` would exit 1)
    and return True; False when the record does not answer. The one place the record is tried, before typer
    parses (`_noop_before_typer`) or, for other spellings, in the commands."""
    if command == "run" and not _single_process():
        return False  # under accelerate launch / torchrun the processes must run together
    from sdxlpipe.pipeline.noop import answer, as_status

    recorded = answer(config, overrides)
    if recorded is None:
        return False
    if command == "status":
        from sdxlpipe.pipeline.status import format_status

        result = as_status(recorded)
        print(json.dumps(result, indent=2) if as_json else format_status(result))
    else:
        _print_run_report(recorded, as_json, strict, config)
    return True


def main() -> None:
    code = _noop_before_typer(sys.argv[1:])
    if code is not None:
        sys.exit(code)
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
