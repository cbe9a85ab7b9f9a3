"""Export: the trained network as files other tools load.

Recipe: which files this network makes (`formats`, else the network's
default) -> skip when `<name>.export.json` records this export's key and
every file exists (`up to date`) -> load the train stage's weights ->
write each file atomically, readable by others (0644 under the usual umask):

- LoRA / LoCon: a kohya file (SGM module names, `.alpha` = the trained
  alpha, kohya's ss_* metadata and hashes, modelspec.*) and a diffusers file
  (the adapter config inside, so alpha survives); the text encoders' LoRA
  goes into both when it was trained.
- LoHa / LoKr: a LyCORIS file in kohya naming.
- IA3 / OFT: no LoRA format carries them to ComfyUI/A1111 exactly, so a peft
  adapter folder (adapter_config.json + adapter_model.safetensors) that
  peft's `inject_adapter_in_model` + `set_peft_model_state_dict` load.
- full: a whole diffusers pipeline folder with the trained UNet (and any
  trained text-encoder LoRA fused in), the UNet folder alone, and a
  single-file checkpoint in the original SDXL layout; `dtype` sets the
  precision.

`<name>.export.json` records the key, the files and the metadata.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa

from sdxlpipe.cache_format.shards import write_atomic
from sdxlpipe.errors import UserError
from sdxlpipe.pipeline.keys import item_key

VERSION = 3  # 3: SGM kohya names, kohya's metadata and hashes, per-network formats, full-model files
OUTPUT_COLUMNS = ()
# Its one item is the set of exported files.
ITEMS = "exports"
# What each network can be written as, its default first.
NETWORK_FORMATS = {
    "lora": ("kohya", "diffusers"),
    "loha": ("kohya",),
    "lokr": ("kohya",),
    "ia3": ("peft",),
    "oft": ("peft",),
    "full": ("diffusers", "single_file", "unet"),
}
DEFAULT_FORMATS = {"lora": ("kohya", "diffusers"), "loha": ("kohya",), "lokr": ("kohya",), "ia3": ("peft",),
                   "oft": ("peft",), "full": ("diffusers", "single_file")}
MODELSPEC_ARCH = "stable-diffusion-xl-v1-base"  # SAI model spec's name for SDXL base
MODELSPEC_IMPL = "https://github.com/Stability-AI/generative-models"


@dataclass(frozen=True)
class Params:
    # Files to write; empty = the network's default: lora -> kohya + diffusers (DoRA: diffusers); loha/lokr -> kohya (LyCORIS);
    # ia3/oft -> peft; full -> diffusers (a whole pipeline folder) + single_file. full also has "unet".
    formats: tuple[Literal["kohya", "diffusers", "peft", "single_file", "unet"], ...] = ()
    # Precision of the written weights. fp32 keeps exactly what was trained; fp16 halves the files
    # (what most SDXL checkpoints ship as); bf16 keeps fp32's range.
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    # Where the files go, relative to the config (written: what a run leaves, for the no-op record).
    output_dir: str = field(default="output", metadata={"path": True, "written": True})
    # File name stem: <name>.safetensors (kohya / single file), <name>.diffusers.safetensors, <name>-pipeline/ ...
    name: str = "lora"
    # After a full fine-tune, also extract a LoRA of this rank (0: don't) as <name>-extracted.safetensors.
    extract_rank: int = 0


def check(p: Params) -> list[tuple[str, str]]:
    problems = []
    if not p.name or "/" in p.name or p.name.startswith("."):
        problems.append(("export.name", "must be a plain file name stem, e.g. \"my-lora\""))
    if p.extract_rank < 0:
        problems.append(("export.extract_rank", "must be 0 (no extraction) or a rank such as 32"))
    return problems


def report(outputs: dict, stats: dict, dry_run: bool) -> dict:
    """The exported files for the run report: those that exist; `written`, those this run wrote (a reused
    export wrote nothing). Nothing when the export failed."""
    if "lora" not in outputs or stats["failed"]:
        return {}
    files = [p for p in outputs["lora"] if Path(p).exists()]
    return {"lora": files, "written": files if stats["computed"] and not dry_run else [],
            # Which tools each file is for, printed beside its `wrote` line (decision 54).
            "lora_for": {p: outputs.get("lora_for", {}).get(p, "") for p in files}}


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    from sdxlpipe.stages import trained_run

    trained = trained_run(ctx)
    network = trained.get("network", "lora")
    formats = _formats(params, network, trained.get("use_dora", False))
    out_dir = Path(params.output_dir)
    paths = {fmt: out_dir / _file_name(params.name, network, fmt) for fmt in formats}
    if network == "full" and params.extract_rank:
        paths["extracted"] = out_dir / f"{params.name}-extracted.safetensors"
    record_path = out_dir / f"{params.name}.export.json"
    key = item_key({"stage": "export", "version": VERSION, "train": trained.get("key"),
                    # The run's length: an extended run keeps its train key (docs/decisions.md 29) but not its weights.
                    "steps": trained.get("steps"), "formats": sorted(formats),
                    "dtype": params.dtype, "name": params.name, "extract_rank": params.extract_rank})
    ctx.outputs["lora"] = [str(p) for p in paths.values()]
    # Which tool each file is for, printed beside `wrote` (a user who drops the diffusers file into ComfyUI gets
    # part of the LoRA and no error: decision 54).
    ctx.outputs["lora_for"] = {str(p): _loads_in(network, fmt, paths) for fmt, p in paths.items()}
    if _up_to_date(record_path, key, paths.values()):
        ctx.outputs["lora_up_to_date"] = True
        ctx.report(items=1, computed=0, reused=1)
        return table
    if "weights" not in trained:
        reason = "the train stage has not finished" if ctx.dry_run else "no trained weights"
        ctx.report(items=1, computed=1 if ctx.dry_run else 0, reused=0, failed=0 if ctx.dry_run else 1, reasons=[reason])
        return table
    ctx.report(items=1, computed=1, reused=0, reasons=["new training result"])
    if ctx.dry_run:
        return table

    from safetensors.torch import load_file

    from sdxlpipe.lora import formats as lora_formats
    from sdxlpipe.models import loading

    state = load_file(trained["weights"])
    config = json.loads(Path(trained["network_config"]).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = _kohya_metadata(table, ctx, params)
    text = _text_encoders(trained)
    if text and network not in ("lora", "full"):
        ctx.log.warning("the text encoders' LoRA goes into the files only with network = \"lora\" or \"full\"; "
                        "it is in %s and %s", trained["text_encoder"], trained["text_encoder_2"])
    dtype = loading.torch_dtype(params.dtype)
    cast = lambda sd: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    if network in ("lora", "loha", "lokr"):
        unet_config = dict(loading.load_unet_config(ctx.config.model, allow_pickle=ctx.config.allow_pickle,
                                                    base_dir=ctx.config.base_dir))
        text_cast = {n: (cast(s), c) for n, (s, c) in text.items()} if network == "lora" else {}
        if "kohya" in paths and network == "lora":
            lora_formats.save_kohya_lora(paths["kohya"], cast(state), config, metadata, text_encoders=text_cast,
                                         unet_config=unet_config)
        elif "kohya" in paths:
            lora_formats.save_kohya_lycoris(paths["kohya"], cast(state), config, metadata, unet_config=unet_config)
        if "diffusers" in paths:
            lora_formats.save_diffusers_lora(paths["diffusers"], cast(state), config, text_encoders=text_cast)
    elif network in ("ia3", "oft"):
        note = (f"ComfyUI and A1111 load no {network.upper()} file exactly (LyCORIS' {network.upper()} is parameterised "
                "differently), so this is a peft adapter folder: load it with peft.get_peft_config(adapter_config.json), "
                "inject_adapter_in_model and set_peft_model_state_dict")
        ctx.log.warning("%s: %s", paths["peft"], note)
        lora_formats.save_peft_adapter(paths["peft"], cast(state), config)
        metadata = {**metadata, "sdxlpipe_note": note}
    else:
        _save_full(paths, state, text, params, metadata, ctx)
    write_atomic(record_path, (json.dumps({"key": key, "train": trained.get("key"), "network": network,
                                           "files": {f: str(p) for f, p in paths.items()}, "metadata": metadata},
                                          indent=2, sort_keys=True) + "\n").encode(),
                 mode=lora_formats.default_mode())
    _remove_leftovers([*paths.values(), record_path])
    return table


def _formats(params: Params, network: str, dora: bool = False) -> tuple[str, ...]:
    if dora and network == "lora":
        # No kohya-style DoRA file loads exactly where such files go (docs/decisions.md 57): A1111 decomposes on
        # the input axis only, ComfyUI divides output-axis magnitudes by the base weight's norm, diffusers drops them.
        if "kohya" in params.formats:
            raise UserError(
                "export.formats: a DoRA run (train.use_dora) cannot be written as kohya: ComfyUI and A1111 would "
                "load its magnitudes with another formula than the one trained, and diffusers drops them",
                'use export.formats = ["diffusers"] (diffusers and peft load it exactly), or train without use_dora '
                "for a file ComfyUI and A1111 load")
        return tuple(dict.fromkeys(params.formats or ("diffusers",)))
    formats = params.formats or DEFAULT_FORMATS[network]
    wrong = [f for f in formats if f not in NETWORK_FORMATS[network]]
    if wrong:
        raise UserError(
            f"export.formats {list(params.formats)}: a {network} network cannot be written as {', '.join(wrong)}",
            f"for network = \"{network}\" use export.formats = {json.dumps(list(NETWORK_FORMATS[network]))} "
            "(or leave it out for the default)")
    return tuple(dict.fromkeys(formats))


def _file_name(name: str, network: str, fmt: str) -> str:
    if network == "full":
        return {"diffusers": f"{name}-pipeline", "unet": f"{name}-unet", "single_file": f"{name}.safetensors"}[fmt]
    return {"kohya": f"{name}.safetensors", "diffusers": f"{name}.diffusers.safetensors", "peft": f"{name}-peft"}[fmt]


def _loads_in(network: str, fmt: str, paths: dict) -> str:
    from sdxlpipe.lora.read import LOADS_IN

    if network == "full":
        return {"diffusers": "a diffusers pipeline folder (from_pretrained)", "unet": "a diffusers UNet folder",
                "single_file": "for ComfyUI, A1111/Forge, diffusers from_single_file",
                "extracted": f"for {LOADS_IN['kohya'][0]}"}[fmt]
    layout = {"kohya": "kohya" if network == "lora" else "lycoris", "diffusers": "diffusers", "peft": "peft"}[fmt]
    loads_in, not_for = LOADS_IN[layout]
    if layout == "diffusers" and "kohya" in paths:
        not_for = f"{not_for.split(';')[0]}; give them {paths['kohya'].name}"
    return f"for {loads_in}" + (f"; {not_for}" if not_for else "")


def _up_to_date(record_path: Path, key: str, paths) -> bool:
    if not record_path.exists() or not all(Path(p).exists() for p in paths):
        return False
    try:
        return json.loads(record_path.read_text()).get("key") == key
    except ValueError:  # a damaged record: write the files again
        return False


def _text_encoders(trained: dict) -> dict[str, tuple[dict, dict]]:
    """{"text_encoder": (peft state, LoraConfig dict), "text_encoder_2": ...} when train_text_encoder, else {}.

    The checkpoint keeps only the encoders' weights. Training gives them a
    LoRA of train.rank / train.alpha on the CLIP attention projections; the
    rank is read from the weights, the alpha from what the train stage says it trained at.
    """
    if "text_encoder" not in trained:
        return {}
    from peft import LoraConfig
    from safetensors.torch import load_file

    out = {}
    for name in ("text_encoder", "text_encoder_2"):
        state = load_file(trained[name])
        downs = {k.removesuffix(".lora_A.weight"): v for k, v in state.items() if k.endswith(".lora_A.weight")}
        ranks = {v.shape[0] for v in downs.values()}
        if len(ranks) != 1:
            raise UserError(f"{trained[name]}: the text encoder LoRA has ranks {sorted(ranks)}, expected one",
                            "re-run the train stage (sdxlpipe run train) with this version of sdxlpipe")
        targets = sorted({module.rpartition(".")[2] for module in downs})
        out[name] = (state, LoraConfig(r=ranks.pop(), lora_alpha=trained["alpha"], target_modules=targets).to_dict())
    return out


def _save_full(paths: dict[str, Path], state: dict, text: dict, params: Params, metadata: dict, ctx) -> None:
    """A full fine-tune: pipeline folder, UNet folder, single file (and an extracted LoRA), as asked."""
    from sdxlpipe.lora import formats as lora_formats
    from sdxlpipe.models import loading, single_file

    pipe = loading.load_pipeline(ctx.config.model, ctx.config.vae, allow_pickle=ctx.config.allow_pickle,
                                 base_dir=ctx.config.base_dir)
    base_unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()} if "extracted" in paths else None
    pipe.unet.load_state_dict(state)
    for name, (te_state, te_config) in text.items():
        single_file.fuse_lora(getattr(pipe, name), te_state, te_config)
    dtype = loading.torch_dtype(params.dtype)
    pipe.to(dtype=dtype)
    if "diffusers" in paths:
        _save_dir(paths["diffusers"], pipe.save_pretrained)
    if "unet" in paths:
        _save_dir(paths["unet"], pipe.unet.save_pretrained)
    if "single_file" in paths:
        full_meta = {k: v for k, v in metadata.items() if not k.startswith("ss_")}
        full_meta["modelspec.architecture"] = MODELSPEC_ARCH
        single_file.save_single_file(pipe, paths["single_file"], metadata=full_meta)
    if "extracted" in paths:
        from sdxlpipe.lora.extract import extract_lora

        result = extract_lora({"unet": base_unet}, {"unet": state}, {"unet": pipe.unet}, rank=params.extract_rank)
        ctx.log.info("extracted a rank-%d LoRA: mean relative error %.2e over %d layers", params.extract_rank,
                     sum(r.rel_error for r in result.layers) / max(1, len(result.layers)), len(result.layers))
        lora_formats.save_kohya_modules(paths["extracted"], result.modules, unet_config=dict(pipe.unet.config),
                                        metadata={**metadata, "ss_network_dim": str(params.extract_rank),
                                                  "ss_network_alpha": str(params.extract_rank)})


def _save_dir(target: Path, save) -> None:
    """`save(tmp)` into a fresh folder beside `target`, files made readable, then swapped in."""
    from sdxlpipe.lora.formats import default_mode

    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save(str(tmp), safe_serialization=True)
        for path in tmp.rglob("*"):
            os.chmod(path, 0o777 & ~_umask() if path.is_dir() else default_mode())
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_leftovers(paths: list[Path]) -> None:
    """Temp files and folders an export killed mid-write left beside (or in) these outputs.

    Every write is temp + rename, so a kill never leaves a half file under an output's name,
    but it leaves the temp (`.NAME.*`, hidden, as large as the file: GBs for a full model).
    Called once this export's record is written: another export of the same name into the
    same folder at the same time would race on the files themselves anyway.
    """
    for path in paths:
        stale = list(path.parent.glob(f".{path.name}.*"))
        if path.is_dir():  # peft folders: their files are written in place, each atomically
            stale += path.glob(".*.tmp")
        for leftover in stale:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _kohya_metadata(table: pa.Table, ctx, params: Params) -> dict[str, str]:
    """kohya's ss_* fields, SAI modelspec.* and sdxlpipe's provenance (all strings, nested data as JSON).

    Each stage declares what it adds (`export_metadata`); this stage adds the file's own fields and counts
    the rows that trained. A stage up to the publish point describes the rows its settings made, group by
    group (`_row_groups`): the config's own rows with the config's settings, a dataset source's rows with
    the settings its snapshot records. Where groups disagree, counts of tags add up and any other field is
    the first group's ([[sources]] order); `sdxlpipe_sources` then lists every group's (docs/decisions.md 73).
    """
    from sdxlpipe.pipeline.graph import publish_point, stages_for
    from sdxlpipe.stages import declared, recorded

    stages = ctx.config.stages
    made_rows = set(stages_for(publish_point(stages), stages)) if publish_point(stages) else set()
    groups = _row_groups(table, ctx)
    per_group: list[dict[str, str]] = [{} for _ in groups]
    run_wide: dict[str, str] = {}
    for name, module in stages.items():
        declare = declared(module, "export_metadata")
        if declare is None:
            continue
        if name not in made_rows:  # the run's own settings (train), over every row it trained on
            run_wide.update(declare(recorded(module, ctx.config.to_record()[name]), table, ctx))
            continue
        for group, found in zip(groups, per_group):
            found.update(declare(recorded(module, group["settings"].get(name)), group["rows"], ctx))
    cols = table.select([c for c in ("subset", "repeats", "is_reg") if c in table.column_names]).to_pydict()
    is_reg = cols.get("is_reg", [False] * table.num_rows)
    subsets: dict[str, dict] = {}
    reg_subsets: dict[str, dict] = {}
    for subset, repeats, reg in zip(cols.get("subset", []), cols.get("repeats", []), is_reg):
        entry = (reg_subsets if reg else subsets).setdefault(subset, {"n_repeats": repeats, "img_count": 0})
        entry["img_count"] += 1
    meta = {
        "ss_output_name": params.name,
        "ss_num_train_images": str(sum(r for r, reg in zip(cols.get("repeats", []), is_reg) if not reg)),
        "ss_num_reg_images": str(sum(1 for r in is_reg if r)),
        "ss_v2": "False",
        "ss_cache_latents": "True",
        "ss_dataset_dirs": json.dumps(subsets),
        "ss_reg_dataset_dirs": json.dumps(reg_subsets),
        "ss_sd_model_name": ctx.config.model,
        "ss_vae_name": ctx.config.vae or "",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCH}/lora",
        "modelspec.implementation": MODELSPEC_IMPL,
        "modelspec.title": params.name,
        "sdxlpipe_config": json.dumps(ctx.config.to_record(), sort_keys=True, default=str),
        **run_wide, **_merged(per_group),
    }
    if len(groups) > 1:
        meta["sdxlpipe_sources"] = json.dumps([{"sources": g["sources"], "dataset": g["dataset"],
                                                "samples": g["rows"].num_rows, **found}
                                               for g, found in zip(groups, per_group)])
    return {k: v for k, v in meta.items() if v != ""}


def _row_groups(table: pa.Table, ctx) -> list[dict]:
    """The training rows by the settings that made them, in [[sources]] order: the config's own rows (its
    settings) and each dataset source's (the settings its snapshot records). Groups with no training row
    are left out; without dataset sources, one group of every row."""
    own_settings = ctx.config.to_record()
    if not ctx.datasets or "source_index" not in table.column_names:
        return [{"sources": None, "dataset": None, "settings": own_settings, "rows": table}]
    index = table.column("source_index").to_pylist()
    theirs = {d.index: d for d in ctx.datasets}
    groups = []
    own = [i for i, s in enumerate(index) if s not in theirs]
    if own:
        groups.append({"sources": sorted({index[i] for i in own}), "dataset": None, "settings": own_settings,
                       "rows": table.take(pa.array(own, pa.int64()))})
    for d in ctx.datasets:
        mine = [i for i, s in enumerate(index) if s == d.index]
        if mine:
            groups.append({"sources": [d.index], "dataset": f"{d.spec.partition('@')[0]}@{d.snapshot.id}",
                           "settings": d.settings(), "rows": table.take(pa.array(mine, pa.int64()))})
    return sorted(groups, key=lambda g: g["sources"][0]) or [
        {"sources": None, "dataset": None, "settings": own_settings, "rows": table}]


def _merged(per_group: list[dict[str, str]]) -> dict[str, str]:
    """One value per key from the groups' values: the shared one; counts (JSON objects of numbers, such as
    ss_tag_frequency's per subset) added up; else the first group's."""
    out: dict[str, str] = {}
    for found in per_group:
        for key, value in found.items():
            if key not in out:
                out[key] = value
            elif out[key] != value:
                added = _add_counts(_json_object(out[key]), _json_object(value))
                if added is not None:
                    out[key] = json.dumps(added)
    return out


def _json_object(text: str):
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _add_counts(a, b):
    """Two JSON objects whose leaves are counts, added key by key (a key of one only: its value); None when
    they hold anything else."""
    if a is None or b is None:
        return None
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _add_counts(out[key], value)
        elif type(out[key]) is int and type(value) is int:
            out[key] = out[key] + value
        else:
            return None
        if out[key] is None:
            return None
    return out
