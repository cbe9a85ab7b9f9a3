"""What the `sdxlpipe` command line's modules share: the common options, logging setup, the store check.

`cli.py` (the main app) and `store_cli.py` (the `store` sub-app) import from
here; nothing here imports a command module.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sdxlpipe.errors import UserError

ConfigOpt = Annotated[Path, typer.Option("-c", "--config", help="the config file")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
DEFAULT_CONFIG = Path("sdxlpipe.toml")


def stderr_console() -> Console:
    # soft_wrap: a path in a message stays on one line, whole for copy-paste and grep in logs.
    return Console(stderr=True, soft_wrap=True)


def setup(debug_console: Console, quiet: bool = False, verbose: bool = False) -> None:
    """Logging on stderr at the level asked for (SDXLPIPE_DEBUG=1: debug), libraries' noise off."""
    from sdxlpipe.pipeline.progress import setup_logging

    # transformers warns that CLIPImageProcessor wants torchvision: harmless for us.
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    setup_logging(debug_console, debug=verbose or bool(os.environ.get("SDXLPIPE_DEBUG")), quiet=quiet)


def check_store(url: str, must_exist: bool, flag: str) -> None:
    """A local store path that is a file, or (when it must exist) no store at all: one clear error.

    `flag` is where the user set it (`--store`, `[store] url in sdxlpipe.toml`), so the hint names it.
    """
    import fsspec

    from sdxlpipe.cache_format.shards import is_http

    fs, root = fsspec.core.url_to_fs(url)
    if not is_http(fs) and fs.isfile(root):  # over HTTP any answered URL is a "file": FORMAT decides
        raise UserError(f"the store {url} is a file, not a folder",
                        f"point {flag} at a folder (a new one starts an empty store)")
    if must_exist and not fs.isfile(root.rstrip("/") + "/FORMAT"):
        raise UserError(f"no sdxlpipe store at {url}" + ("" if fs.exists(root) else " (it does not exist)"),
                        f"check {flag}; a store is made by `sdxlpipe run encode` or as the target of `sdxlpipe store pull`")
