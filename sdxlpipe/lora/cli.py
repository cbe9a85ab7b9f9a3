"""`sdxlpipe lora ...`: look at, extract, resize and merge LoRA files.

Its own typer sub-app, added to the main app in sdxlpipe/cli.py, so the main
CLI module stays small. Torch is imported inside the commands only.
Results to stdout (`--json`: one object); bad input raises UserError
(`Error:` + `Hint:`, exit 2, via sdxlpipe.cli.main).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

lora_app = typer.Typer(no_args_is_help=True, help="Look at, extract, resize and merge LoRA files.")

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]


@lora_app.command("info")
def info(
    file: Annotated[Path, typer.Argument(help="a LoRA .safetensors file (kohya, LyCORIS, diffusers or peft)")],
    as_json: JsonOpt = False,
) -> None:
    """Format, network, adapted modules, ranks, alphas, size and metadata of a LoRA file."""
    from sdxlpipe.lora.read import read_lora

    summary = read_lora(file).summary()
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return
    print(f"file:     {summary['file']}")
    print(f"format:   {summary['format']}")
    print(f"network:  {summary['network']}")
    print(f"modules:  {summary['modules']} ({summary['unet_modules']} UNet, "
          f"{summary['text_encoder_modules']} text encoder, {summary['conv_modules']} conv)")
    print(f"ranks:    {', '.join(map(str, summary['ranks'])) or '-'}")
    print(f"alphas:   {', '.join(f'{a:g}' for a in summary['alphas']) or '-'}")
    print(f"size:     {summary['bytes'] / 1e6:.2f} MB")
    for key, value in sorted(summary["metadata"].items()):
        text = value if len(value) <= 100 else value[:97] + "..."
        print(f"  {key}: {text}")
