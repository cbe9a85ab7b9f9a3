"""Read any SDXL LoRA file (kohya, LyCORIS, diffusers, peft) into one normalised structure.

`read_lora(path)` -> `LoraFile`: the file's format, network type, metadata and
one `LoraModule` per adapted module (component, module name as the file
spells it, kind, tensors, alpha, rank). `read_lora_header(path)` is the same
`LoraFile` from the safetensors header alone, without torch: its tensors are
`HeaderTensor`s (shape, and a scalar's value read on demand), enough for
`summary()` (the report's `lora info`); `read_header(path)` gives the header's
metadata and tensors as they are. `peft_state(lora, component, model)`
turns a LoRA's modules for one model into a peft state dict and LoraConfig
dict (diffusers module names, per-module rank and alpha), which is what
`set_peft_model_state_dict` and training from an existing LoRA need.

Scaling conventions, so that the numbers mean the same whatever wrote the file:
kohya and LyCORIS scale by alpha / rank, and a missing alpha means alpha = rank;
diffusers/peft files carry alpha in the `lora_adapter_metadata` JSON, and
without it alpha = rank (what diffusers' loader assumes).

Torch is imported by the functions, not at module level (`lora info` on the
no-op path stays light until it opens a file).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from sdxlpipe.errors import UserError

# kohya's key prefix -> diffusers' component name. lora_te_ is SD 1.x's single encoder.
KOHYA_PREFIXES = {"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te": "text_encoder"}
DIFFUSERS_PREFIXES = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# The tensor fields each kind of module has, as LyCORIS/kohya name them (after "<module>.").
_LORA_FIELDS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid"}
_LOHA_FIELDS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
_LOKR_FIELDS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
_OFT_FIELDS = {"oft_blocks", "oft_diag", "oft_R.weight", "rescale"}
_DIFF_FIELDS = {"diff", "diff_b"}  # LyCORIS "full" (a whole-weight difference)
_SKIP_FIELDS = {"alpha", "dora_scale", "scale", "on_input"}
# Which tools load a file of each layout whole and at its trained strength, read from their loaders
# (docs/decisions.md 54): (what it is for, the warning for the tools that accept it but load part of it).
LOADS_IN = {
    "kohya": ("ComfyUI, A1111/Forge, kohya sd-scripts, diffusers", ""),
    "lycoris": ("ComfyUI, A1111/Forge, kohya sd-scripts with LyCORIS", ""),
    # ComfyUI (comfy/lora.py model_lora_keys_unet) maps diffusers names of the UNet's attention projections only in
    # diffusers' old `processor.to_q` spelling, and reads alpha only from `.alpha` tensors: it patches the rest at
    # scale 1 and reports success.
    "diffusers": ("diffusers, peft", "not ComfyUI or A1111: they load part of it (ComfyUI skips the attention "
                  "projections and the alpha, without an error); give them the kohya-format file"),
    "peft": ("peft", "not ComfyUI, A1111 or diffusers' load_lora_weights"),
}


# safetensors dtype names -> numpy, for a header's scalars (BF16 is read as the top half of a float32).
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1"}
# A header longer than this is no LoRA (SDXL's ~2k modules need ~300 KB).
MAX_HEADER = 64 << 20


class LoraFileError(UserError):
    """A file that is not a LoRA sdxlpipe can read; `what` names the file, `hint` the fix."""


@dataclass
class LoraModule:
    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    name: str  # as the file names it: dotted (diffusers/peft) or kohya's flat name without the prefix
    kind: str  # "lora" | "loha" | "lokr" | "ia3" | "oft" | "full"
    tensors: dict = field(default_factory=dict)  # lora: down/up[/mid]; others: the file's field names
    alpha: float | None = None  # None for kinds without one (ia3, oft, full)
    rank: int | None = None

    @property
    def conv(self) -> bool:
        """Adapts a Conv2d (4-D weights), e.g. LoCon."""
        return any(t.dim() == 4 for t in self.tensors.values())

    @property
    def scale(self) -> float:
        """The factor on up @ down (LoRA): alpha / rank."""
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


@dataclass
class LoraFile:
    path: Path
    format: str  # "kohya" | "lycoris" | "diffusers" | "peft"
    network: str  # "lora" | "locon" | "loha" | "lokr" | "ia3" | "oft" | "full" | "mixed"
    modules: list[LoraModule]
    metadata: dict[str, str]
    bytes: int

    def summary(self) -> dict:
        """What `sdxlpipe lora info --json` prints."""
        ranks = sorted({m.rank for m in self.modules if m.rank is not None})
        alphas = sorted({m.alpha for m in self.modules if m.alpha is not None})
        return {
            "file": str(self.path),
            "format": self.format,
            "network": self.network,
            "modules": len(self.modules),
            "unet_modules": sum(m.component == "unet" for m in self.modules),
            "text_encoder_modules": sum(m.component in TEXT_ENCODERS for m in self.modules),
            "conv_modules": sum(m.conv for m in self.modules),
            "ranks": ranks,
            "alphas": alphas,
            "bytes": self.bytes,
            "loads_in": LOADS_IN[self.format][0],
            "not_for": LOADS_IN[self.format][1],
            "metadata": self.metadata,
        }


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA/LyCORIS `.safetensors` file (kohya, LyCORIS, diffusers or peft layout)."""
    from safetensors import SafetensorError, safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    return _lora_file(path, tensors, metadata)


def read_lora_header(path: str | Path) -> LoraFile:
    """`read_lora` from the safetensors header alone (no torch, no weights read): its modules' tensors are
    `HeaderTensor`s, so `summary()` is `lora info`'s, but nothing that needs the weights works."""
    path = _existing(path)
    metadata, tensors = read_header(path)
    return _lora_file(path, tensors, metadata)


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, "HeaderTensor"]]:
    """A .safetensors file's metadata and its tensors as `HeaderTensor`s, from the header alone (no torch)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = dict(header.pop("__metadata__", None) or {})
        tensors = {k: HeaderTensor(path, 8 + size, v) for k, v in header.items()}
    except (OSError, ValueError, TypeError, KeyError, struct.error) as exc:
        raise _unreadable(path, exc) from None
    return metadata, tensors


class HeaderTensor:
    """A tensor as a safetensors header describes it: its shape and, on demand, its value as a float (alphas
    are scalars: the first element is read from the file)."""

    def __init__(self, path: Path, start: int, entry: dict):
        self.shape = tuple(entry["shape"])
        self._path, self._dtype = path, entry["dtype"]
        self._begin, self._end = (start + entry["data_offsets"][0], start + entry["data_offsets"][1])

    def dim(self) -> int:
        return len(self.shape)

    def __float__(self) -> float:
        import numpy as np

        with open(self._path, "rb") as f:
            f.seek(self._begin)
            raw = f.read(min(self._end - self._begin, 8))
        if self._dtype == "BF16":
            return float(np.frombuffer(b"\0\0" + raw[:2], "<f4")[0])
        return float(np.frombuffer(raw, _DTYPES[self._dtype], count=1)[0])


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"LoRA file {str(path)!r} not found", "check the path")
    return path


def _unreadable(path: Path, exc: Exception) -> LoraFileError:
    return LoraFileError(f"{path}: not a readable .safetensors file ({exc})",
                         "give a LoRA .safetensors file (pickled .ckpt/.pt LoRAs are not read)")


def _lora_file(path: Path, tensors: dict, metadata: dict) -> LoraFile:
    """The file's modules, format and network type, from its tensors (torch's, or a header's) and metadata."""
    if not tensors:
        raise LoraFileError(f"{path}: the file holds no tensors", "give a LoRA .safetensors file")
    if any(k.startswith(tuple(f"{p}_" for p in KOHYA_PREFIXES)) for k in tensors):
        modules = _kohya_modules(path, tensors)
        fmt = "kohya" if all(m.kind == "lora" for m in modules) else "lycoris"
    else:
        modules, fmt = _peft_modules(path, tensors, metadata)
    kinds = {m.kind for m in modules}
    network = kinds.pop() if len(kinds) == 1 else "mixed"
    if network == "lora" and any(m.conv for m in modules if m.tensors["down"].dim() == 4
                                 and tuple(m.tensors["down"].shape[2:]) != (1, 1)):
        network = "locon"  # kohya/LyCORIS call a LoRA that adapts kxk convolutions LoCon
    return LoraFile(path, fmt, network, modules, metadata, path.stat().st_size)


def _kohya_modules(path: Path, tensors: dict) -> list[LoraModule]:
    grouped: dict[tuple[str, str], dict] = {}
    for key, value in tensors.items():
        module, _, field_name = key.partition(".")
        prefix = next((p for p in sorted(KOHYA_PREFIXES, key=len, reverse=True) if module.startswith(p + "_")), None)
        if prefix is None:
            raise LoraFileError(f"{path}: key {key!r} is neither lora_unet_*, lora_te1_* nor lora_te2_*",
                                "this is not a kohya/LyCORIS SDXL LoRA; `sdxlpipe lora info` reads kohya, LyCORIS, "
                                "diffusers and peft files")
        grouped.setdefault((KOHYA_PREFIXES[prefix], module[len(prefix) + 1:]), {})[field_name] = value
    return [_module(path, component, name, fields) for (component, name), fields in sorted(grouped.items())]


def _module(path: Path, component: str, name: str, fields: dict) -> LoraModule:
    """One kohya/LyCORIS module from its fields (lora_down.weight, hada_w1_a, alpha, ...)."""
    alpha = float(fields["alpha"]) if "alpha" in fields else None
    names = set(fields) - _SKIP_FIELDS
    if names and names <= set(_LORA_FIELDS) and {"lora_down.weight", "lora_up.weight"} <= names:
        tensors = {_LORA_FIELDS[f]: fields[f] for f in names}
        return LoraModule(component, name, "lora", tensors, alpha, int(tensors["down"].shape[0]))
    if names and names <= _LOHA_FIELDS:
        return LoraModule(component, name, "loha", {f: fields[f] for f in names}, alpha, int(fields["hada_w1_b"].shape[0]))
    if names and names <= _LOKR_FIELDS:
        rank = next((int(fields[f].shape[0]) for f in ("lokr_w2_b", "lokr_w1_b") if f in fields), None)
        return LoraModule(component, name, "lokr", {f: fields[f] for f in names}, alpha, rank)
    if names and names <= _OFT_FIELDS:
        return LoraModule(component, name, "oft", {f: fields[f] for f in names}, alpha, None)
    if names and names <= _DIFF_FIELDS:
        return LoraModule(component, name, "full", {f: fields[f] for f in names}, None, None)
    if names == {"weight"}:  # LyCORIS IA3: a per-channel scale vector
        return LoraModule(component, name, "ia3", {f: fields[f] for f in (names | ({"on_input"} & set(fields)))}, None, None)
    raise LoraFileError(f"{path}: module {name!r} has fields {sorted(fields)} that no known LoRA kind has",
                        "the file may be damaged or of a network type sdxlpipe does not read")


_PEFT_KEY = re.compile(r"^(?P<module>.+?)\.(?P<field>lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight"
                       r"|lora_A\.\w+\.weight|lora_B\.\w+\.weight|alpha|lora_magnitude_vector|hada_\w+|lokr_\w+"
                       r"|ia3_l(?:\.\w+)?|oft_R\.weight|oft_\w+)$")


def _peft_modules(path: Path, tensors: dict, metadata: dict) -> tuple[list[LoraModule], str]:
    config = json.loads(metadata["lora_adapter_metadata"]) if "lora_adapter_metadata" in metadata else {}
    grouped: dict[tuple[str, str], dict] = {}
    fmt = "diffusers"
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        if component not in DIFFUSERS_PREFIXES:
            fmt, component, rest = "peft", "unet", key.removeprefix("base_model.model.")
        m = _PEFT_KEY.match(rest)
        if not m:
            raise LoraFileError(f"{path}: key {key!r} is not a LoRA weight (kohya lora_unet_*.lora_down.weight, "
                                "diffusers unet.*.lora_A.weight or peft *.lora_A.weight)",
                                "give a LoRA .safetensors file")
        field_name = m["field"].replace("lora.down.weight", "lora_A.weight").replace("lora.up.weight", "lora_B.weight")
        field_name = re.sub(r"^(lora_[AB])\.\w+\.weight$", r"\1.weight", field_name)  # adapter-named keys
        grouped.setdefault((component, m["module"]), {})[field_name] = value
    modules = []
    for (component, name), fields in sorted(grouped.items()):
        if "lora_A.weight" in fields:
            rank = int(fields["lora_A.weight"].shape[0])
            alpha = float(fields["alpha"]) if "alpha" in fields else _config_alpha(config, component, name, rank)
            tensors_ = {"down": fields["lora_A.weight"], "up": fields["lora_B.weight"]}
            if "lora_magnitude_vector" in fields:
                tensors_["dora_scale"] = fields["lora_magnitude_vector"]
            modules.append(LoraModule(component, name, "lora", tensors_, alpha, rank))
        elif any(f.startswith("ia3_l") for f in fields):
            modules.append(LoraModule(component, name, "ia3", fields, None, None))
        elif any(f.startswith("oft_") for f in fields):
            modules.append(LoraModule(component, name, "oft", fields, None, None))
        else:
            fields = {f: v for f, v in fields.items() if f != "alpha"}
            modules.append(_module(path, component, name, fields))
    return modules, fmt


def _config_alpha(config: dict, component: str, module: str, rank: int) -> float:
    """A diffusers file's alpha for one module: its alpha_pattern, else lora_alpha, else the rank."""
    alpha = config.get(f"{component}.lora_alpha")
    pattern = config.get(f"{component}.alpha_pattern") or {}
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            alpha = value
    if alpha is None:
        return float(rank)
    if config.get(f"{component}.use_rslora"):
        return float(alpha) * rank ** 0.5  # the kohya alpha with the same scale
    return float(alpha)


# --- into a model ---------------------------------------------------------------


def module_names(model, component: str) -> dict[str, str]:
    """{every spelling a file may use for a module of `model`: its diffusers (dotted) name}.

    Spellings: the dotted name, kohya's flat name, and for the UNet the SGM
    (original SDXL) names in both forms; CLIP-L's with and without `text_model.`.
    """
    out: dict[str, str] = {}
    config = dict(model.config) if component == "unet" else None
    for name, module in model.named_modules():
        if not name or next(module.children(), None) is not None:
            continue
        spellings = {name, name.replace(".", "_")}
        if component == "unet":
            from sdxlpipe.models.sgm import sgm_unet_name

            try:
                sgm = sgm_unet_name(name, config)
                spellings |= {sgm, sgm.replace(".", "_")}
            except KeyError:
                pass
        elif not name.startswith("text_model."):
            spellings |= {f"text_model.{name}", f"text_model_{name.replace('.', '_')}"}
        for s in spellings:
            out[s] = name
    return out


def peft_state(lora: LoraFile, component: str, model) -> tuple[dict, dict]:
    """The LoRA modules of one component as (peft state dict, LoraConfig kwargs) for `model`.

    Only plain LoRA/LoCon modules (what peft's LoraConfig holds); raises
    LoraFileError naming the first module `model` has no place for.
    """
    names = module_names(model, component)
    state, ranks, alphas = {}, {}, {}
    for m in lora.modules:
        if m.component != component:
            continue
        if m.kind != "lora" or "mid" in m.tensors:
            raise LoraFileError(f"{lora.path}: module {m.name!r} is {m.kind if m.kind != 'lora' else 'a Tucker LoRA'}",
                                "only plain LoRA/LoCon files can be loaded into a peft LoRA")
        target = names.get(m.name)
        if target is None:
            raise LoraFileError(f"{lora.path}: module {m.name!r} matches no {component} module of this model",
                                "use a LoRA made for SDXL (and this model's architecture)")
        state[f"{target}.lora_A.weight"] = m.tensors["down"]
        state[f"{target}.lora_B.weight"] = m.tensors["up"]
        ranks[target], alphas[target] = m.rank, m.alpha if m.alpha is not None else float(m.rank)
    if not state:
        return {}, {}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    # Full module names as patterns: peft matches them as regexes, and a full name matches only itself.
    config = {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks),
              "rank_pattern": {n: v for n, v in ranks.items() if v != r},
              "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha}}
    return state, config
