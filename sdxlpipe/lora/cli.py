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
    print(f"for:      {summary['loads_in']}" + (f" ({summary['not_for']})" if summary["not_for"] else ""))
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


def _print_layers(reports, as_json: bool, path, extra: dict | None = None) -> None:
    if as_json:
        print(json.dumps({"file": str(path), **(extra or {}), "modules": len(reports),
                          "layers": [r.to_json() for r in reports]}, indent=2))
        return
    for r in reports:
        print(f"{(r.component + ':' + r.module)[-72:]:72} rank {r.rank:>4} (was {r.full_rank:>4})  rel.err {r.rel_error:.2e}")
    print(f"wrote {path}")


@lora_app.command("resize")
def resize(
    file: Annotated[Path, typer.Argument(help="a LoRA/LoCon file (kohya or diffusers)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the resized file")],
    rank: Annotated[Optional[int], typer.Option("--rank", help="the new rank (the cap with --fro)")] = None,
    fro: Annotated[Optional[float], typer.Option("--fro", help="per layer, keep this fraction of the Frobenius norm (0-1]")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A lower-rank copy of a LoRA at the same strength; each layer's error."""
    from sdxlpipe.errors import UserError
    from sdxlpipe.lora.read import read_lora
    from sdxlpipe.lora.tools import resize_lora, save_modules

    if rank is None and fro is None:
        raise UserError("no new rank given", "give --rank R or --fro F (e.g. --fro 0.9)")
    if (rank is not None and rank < 1) or (fro is not None and not 0 < fro <= 1):
        raise UserError(f"--rank {rank} / --fro {fro} out of range", "--rank >= 1, --fro in (0, 1]")
    lora = read_lora(file)
    modules, reports = resize_lora(lora, rank=rank, fro=fro)
    layout = "kohya" if lora.format in ("kohya", "lycoris") else "diffusers"
    path = save_modules(output, modules, layout, {k: v for k, v in lora.metadata.items()
                                                  if k.startswith(("ss_", "modelspec.")) and k not in
                                                  ("ss_network_dim", "ss_network_alpha")})
    _print_layers(reports, as_json, path)


@lora_app.command("merge")
def merge(
    files: Annotated[list[Path], typer.Argument(help="LoRA files (all kohya or all diffusers layout)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the merged LoRA, or the checkpoint with --into")],
    weights: Annotated[Optional[str], typer.Option("--weights", help="one weight per file, e.g. 1,0.5 (default: all 1)")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="SVD the sum to this rank (default: stack, exact)")] = None,
    into: Annotated[Optional[str], typer.Option("--into", help="fold the LoRAs into this base model and save a single file")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="precision of the --into checkpoint: fp32, fp16, bf16")] = "fp32",
    as_json: JsonOpt = False,
) -> None:
    """Merge LoRAs into one (exact, or SVD to --rank), or into a base model with --into BASE."""
    from sdxlpipe.errors import UserError
    from sdxlpipe.lora.read import read_lora
    from sdxlpipe.lora.tools import merge_into, merge_loras, save_modules

    try:
        w = [float(x) for x in weights.split(",")] if weights else [1.0] * len(files)
    except ValueError:
        raise UserError(f"--weights {weights!r} is not a list of numbers", "e.g. --weights 1,0.5") from None
    if len(w) != len(files):
        raise UserError(f"--weights has {len(w)} value(s) for {len(files)} file(s)", "give one weight per file")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise UserError(f"--dtype {dtype!r} is not known", "use fp32, fp16 or bf16")
    loras = [read_lora(f) for f in files]
    if into:
        path, folded = merge_into(into, loras, w, output, dtype)
        if as_json:
            print(json.dumps({"file": str(path), "modules_folded": folded}, indent=2))
        else:
            print(f"folded {folded} modules into {into}\nwrote {path}")
        return
    modules, reports = merge_loras(loras, w, rank=rank)
    layout = "kohya" if loras[0].format in ("kohya", "lycoris") else "diffusers"
    path = save_modules(output, modules, layout, {"ss_training_comment": "merged by sdxlpipe: " + ", ".join(
        f"{f.name}*{x:g}" for f, x in zip(files, w))})
    _print_layers(reports, as_json, path)
