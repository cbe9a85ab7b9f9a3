"""Export: the trained network as files other tools load.

Recipe: the train stage's adapter, and the text encoders' LoRA when it
trained them -> a diffusers-format file (with the adapter metadata, so
alpha survives) and/or a kohya-format file (`.alpha` = the trained alpha;
lora_te1 / lora_te2 for the encoders) -> `<name>.export.json` beside them
records the key, so an unchanged export is skipped. LoHa and LoKr go out
as LyCORIS files in kohya naming; a full fine-tune as a diffusers UNet
folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa

from sdxlpipe.errors import UserError
from sdxlpipe.pipeline.atomic import write_json_atomic
from sdxlpipe.pipeline.keys import item_key

VERSION = 2  # 2: the text encoders' LoRA goes into the files too
OUTPUT_COLUMNS = ()
SUFFIX = {"kohya": ".safetensors", "diffusers": ".diffusers.safetensors"}
# A full fine-tune's "diffusers" output is a UNet folder, not a LoRA file.
FULL_SUFFIX = {"diffusers": "-unet"}


@dataclass(frozen=True)
class Params:
    # kohya loads in ComfyUI, A1111 and kohya; diffusers in diffusers' load_lora_weights.
    formats: tuple[Literal["kohya", "diffusers"], ...] = ("kohya", "diffusers")
    # Where the files go, relative to the config.
    output_dir: str = field(default="output", metadata={"path": True})
    # File name stem: <name>.safetensors (kohya), <name>.diffusers.safetensors.
    name: str = "lora"


def check(p: Params) -> list[tuple[str, str]]:
    problems = []
    if not p.formats:
        problems.append(("export.formats", 'name at least one format: ["kohya", "diffusers"]'))
    if not p.name or "/" in p.name:
        problems.append(("export.name", "must be a plain file name stem, e.g. \"my-lora\""))
    return problems


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    trained = ctx.outputs.get("train", {})
    out_dir = Path(params.output_dir)
    suffix = FULL_SUFFIX if ctx.config.params["train"].network == "full" else SUFFIX
    paths = {fmt: out_dir / f"{params.name}{suffix.get(fmt, SUFFIX[fmt])}" for fmt in params.formats}
    record_path = out_dir / f"{params.name}.export.json"
    key = item_key({"stage": "export", "version": VERSION, "train": trained.get("key"), "formats": sorted(params.formats)})
    ctx.outputs["lora"] = [str(p) for p in paths.values()]
    if _up_to_date(record_path, key, paths.values()):
        ctx.report(items=1, computed=0, reused=1)
        return table
    if "adapter" not in trained and "weights" not in trained:
        reason = "the train stage has not finished" if ctx.dry_run else "no trained adapter"
        ctx.report(items=1, computed=1 if ctx.dry_run else 0, reused=0, failed=0 if ctx.dry_run else 1, reasons=[reason])
        return table
    ctx.report(items=1, computed=1, reused=0, reasons=["new training result"])
    if ctx.dry_run:
        return table

    from safetensors.torch import load_file

    from sdxlpipe.lora.formats import save_diffusers_lora, save_kohya_lora, save_kohya_lycoris

    state = load_file(trained.get("weights") or trained["adapter"])
    config = json.loads(Path(trained.get("network_config") or trained["adapter_config"]).read_text())
    kind = config.get("peft_type") or config.get("network", "LORA")
    out_dir.mkdir(parents=True, exist_ok=True)
    text = _text_encoders(trained, config) if kind == "LORA" else {}
    if "text_encoder" in trained and kind != "LORA":
        ctx.log.warning("the text encoders' LoRA goes out only with network = \"lora\"; it is in %s and %s",
                        trained["text_encoder"], trained["text_encoder_2"])
    if kind == "LORA":
        if "diffusers" in paths:
            save_diffusers_lora(paths["diffusers"], state, config, text_encoders=text)
        if "kohya" in paths:
            save_kohya_lora(paths["kohya"], state, config, _kohya_metadata(table, ctx), text_encoders=text)
    elif kind in ("LOHA", "LOKR") and set(paths) == {"kohya"}:
        save_kohya_lycoris(paths["kohya"], state, config, _kohya_metadata(table, ctx))
    elif kind == "full" and set(paths) == {"diffusers"}:
        _save_unet(paths["diffusers"], state, ctx)
    else:
        can = {"LOHA": '["kohya"] (LyCORIS)', "LOKR": '["kohya"] (LyCORIS)', "full": '["diffusers"] (a UNet folder)'}
        raise UserError(
            f"export.formats {list(params.formats)}: a {kind} network cannot be written as {', '.join(params.formats)}",
            f"set export.formats = {can[kind]}" if kind in can else
            f"{kind} is not exportable yet; its peft weights are in {trained.get('weights')}")
    write_json_atomic({"key": key, "train": trained.get("key"), "files": {f: str(p) for f, p in paths.items()}}, record_path)
    return table


def _text_encoders(trained: dict, unet_config: dict) -> dict[str, tuple[dict, dict]]:
    """{"text_encoder": (peft state, LoraConfig dict), "text_encoder_2": ...} when train_text_encoder, else {}.

    The checkpoint keeps only the encoders' weights. Training gives them a
    LoRA of train.rank / train.alpha on the CLIP attention projections, and
    the UNet's network.json records that alpha as `lora_alpha`; so the config
    is rebuilt from the weights (rank, modules) and that alpha.
    """
    if "text_encoder" not in trained:
        return {}
    from peft import LoraConfig
    from safetensors.torch import load_file

    alpha = unet_config.get("lora_alpha")
    out = {}
    for name in ("text_encoder", "text_encoder_2"):
        state = load_file(trained[name])
        downs = {k.removesuffix(".lora_A.weight"): v for k, v in state.items() if k.endswith(".lora_A.weight")}
        ranks = {v.shape[0] for v in downs.values()}
        if len(ranks) != 1 or alpha is None:
            raise UserError(f"{trained[name]}: cannot tell the text encoder LoRA's rank {sorted(ranks)} and alpha {alpha}",
                            "re-run the train stage (sdxlpipe run train) with this version of sdxlpipe")
        targets = sorted({module.rpartition(".")[2] for module in downs})
        out[name] = (state, LoraConfig(r=ranks.pop(), lora_alpha=alpha, target_modules=targets).to_dict())
    return out


def _save_unet(path: Path, state: dict, ctx) -> None:
    """A full fine-tune as a diffusers UNet folder (`UNet2DConditionModel.from_pretrained` loads it)."""
    from sdxlpipe.models import loading

    unet = loading.load_unet(ctx.config.model, allow_pickle=ctx.config.allow_pickle)
    unet.load_state_dict(state)
    unet.save_pretrained(path, safe_serialization=True)


def _up_to_date(record_path: Path, key: str, paths) -> bool:
    if not record_path.exists() or not all(Path(p).exists() for p in paths):
        return False
    return json.loads(record_path.read_text()).get("key") == key


def _kohya_metadata(table: pa.Table, ctx) -> dict[str, str]:
    """The ss_* fields kohya-aware tools show (values are strings, nested data JSON)."""
    train = ctx.config.params["train"]
    subsets: dict[str, dict] = {}
    for subset, repeats in zip(table.column("subset").to_pylist(), table.column("repeats").to_pylist()):
        entry = subsets.setdefault(subset, {"n_repeats": repeats, "img_count": 0})
        entry["img_count"] += 1
    return {
        "ss_learning_rate": str(train.learning_rate),
        "ss_max_train_steps": str(train.max_steps),
        "ss_seed": str(train.seed),
        "ss_num_train_images": str(table.num_rows),
        "ss_dataset_dirs": json.dumps(subsets),
        # Set by the caption stage in this run: {subset: {tag: count}}.
        "ss_tag_frequency": json.dumps(ctx.outputs.get("tag_frequency", {})),
        "ss_sd_model_name": ctx.config.model,
        "sdxlpipe_train_key": str(ctx.outputs.get("train", {}).get("key")),
    }
