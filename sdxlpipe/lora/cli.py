"""`sdxlpipe lora ...`: look at, extract, resize and merge LoRA files.

Its own typer sub-app, added to the main app in sdxlpipe/cli.py, so the main
CLI module stays small. Torch is imported inside the commands only.
Results to stdout (`--json`: one object); bad input raises UserError
(`Error:` + `Hint:`, exit 2, via sdxlpipe.cli.main).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

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


@lora_app.command("extract")
def extract(
    base: Annotated[str, typer.Option("--base", help="the model before fine-tuning: pipeline folder, UNet folder, .safetensors or tiny")],
    tuned: Annotated[str, typer.Option("--tuned", help="the fine-tuned model, in any of the same forms")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the LoRA file to write (kohya format)")],
    rank: Annotated[Optional[int], typer.Option("--rank", help="keep this rank (the cap when a dynamic mode is given too)")] = None,
    fro: Annotated[Optional[float], typer.Option("--fro", help="per layer, keep this fraction of the Frobenius norm (0-1]")] = None,
    sv_ratio: Annotated[Optional[float], typer.Option("--sv-ratio", help="per layer, keep singular values above max / this")] = None,
    sv_cumulative: Annotated[Optional[float], typer.Option("--sv-cumulative", help="per layer, keep this fraction of the sum of singular values")] = None,
    conv_rank: Annotated[Optional[int], typer.Option("--conv-rank", help="rank for 3x3 convolutions (default: as --rank)")] = None,
    clamp_quantile: Annotated[Optional[float], typer.Option("--clamp-quantile", help="clip up/down at this quantile of |values| (kohya: 0.99); off by default")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A LoRA from a full fine-tune: SVD of (tuned - base) per Linear/Conv2d, with each layer's kept rank and error."""
    from sdxlpipe.errors import UserError

    dynamic = [n for n, v in (("--fro", fro), ("--sv-ratio", sv_ratio), ("--sv-cumulative", sv_cumulative)) if v is not None]
    if len(dynamic) > 1:
        raise UserError(f"{' and '.join(dynamic)} both choose the rank", "give one of --fro, --sv-ratio, --sv-cumulative")
    if rank is None and not dynamic:
        raise UserError("no rank given", "give --rank R, or a per-layer choice: --fro 0.9, --sv-ratio 20 or --sv-cumulative 0.9")
    for flag, value, ok in (("--rank", rank, rank is None or rank >= 1), ("--conv-rank", conv_rank, conv_rank is None or conv_rank >= 1),
                            ("--fro", fro, fro is None or 0 < fro <= 1), ("--sv-cumulative", sv_cumulative, sv_cumulative is None or 0 < sv_cumulative <= 1),
                            ("--sv-ratio", sv_ratio, sv_ratio is None or sv_ratio >= 1),
                            ("--clamp-quantile", clamp_quantile, clamp_quantile is None or 0 < clamp_quantile <= 1)):
        if not ok:
            raise UserError(f"{flag} {value} is out of range",
                            "--rank/--conv-rank >= 1; --fro, --sv-cumulative, --clamp-quantile in (0, 1]; --sv-ratio >= 1")
    from sdxlpipe.lora.extract import extract_lora, load_weights, summary_table
    from sdxlpipe.lora.formats import save_kohya_modules

    base_models = load_weights(base)
    tuned_models = load_weights(tuned, text_encoders=set(base_models) != {"unet"})
    components = [c for c in tuned_models if c in base_models]
    result = extract_lora({c: base_models[c].state_dict() for c in components},
                          {c: tuned_models[c].state_dict() for c in components},
                          {c: tuned_models[c] for c in components}, rank=rank, conv_rank=conv_rank, fro=fro,
                          sv_ratio=sv_ratio, sv_cumulative=sv_cumulative, clamp_quantile=clamp_quantile)
    if not result.modules:
        raise UserError(f"{tuned} and {base} have the same Linear/Conv2d weights: nothing to extract",
                        "check that --tuned is the fine-tuned model and --base the model it started from")
    path = save_kohya_modules(output, result.modules, unet_config=dict(tuned_models["unet"].config),
                              metadata={"ss_training_comment": f"extracted by sdxlpipe from {tuned} - {base}"})
    if as_json:
        print(json.dumps({"file": str(path), "modules": len(result.modules), "unchanged": result.unchanged,
                          "layers": [r.to_json() for r in result.layers]}, indent=2))
        return
    for line in summary_table(result):
        print(line)
    print(f"wrote {path}")
