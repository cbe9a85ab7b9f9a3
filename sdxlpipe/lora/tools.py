"""`lora resize` and `lora merge`: new LoRA files from existing ones, each layer's error reported.

Works on plain LoRA/LoCon modules (`read.LoraModule`, kind "lora"). A
module's delta is scale * up @ down (a convolution as out x (in*k*k)).
- resize: SVD of each delta to a lower rank (`rank`, or per layer the
  fraction `fro` of the Frobenius norm); the effective scale is kept
  (alpha / rank stays what it was), so the file works at the same strength.
- merge: sum of weights[i] * delta_i per module. Without a rank the factors
  are stacked (rank = the sum of ranks): exact. With a rank, the SVD of the sum.
- merge into a base model: every delta added into the weight it adapts,
  saved as a single-file checkpoint.
The output keeps the input's layout (kohya names in, kohya names out;
diffusers in, diffusers out), so no module is renamed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdxlpipe.lora.extract import LayerReport, choose_rank
from sdxlpipe.lora.read import LoraFile, LoraFileError, LoraModule

KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def delta(m: LoraModule) -> torch.Tensor:
    """scale * up @ down as a matrix (out x in*k*k)."""
    down = m.tensors["down"].float().reshape(m.rank, -1)
    up = m.tensors["up"].float().reshape(-1, m.rank)
    return m.scale * (up @ down)


def _plain(lora: LoraFile) -> None:
    bad = [m for m in lora.modules if m.kind != "lora" or "mid" in m.tensors or "dora_scale" in m.tensors]
    if bad:
        raise LoraFileError(f"{lora.path}: module {bad[0].name!r} is {bad[0].kind}, not a plain LoRA/LoCon",
                            "resize and merge work on LoRA/LoCon files (kohya or diffusers), not LoHa/LoKr/DoRA")


def _factor(m: LoraModule, matrix: torch.Tensor, r: int, alpha: float) -> tuple[LoraModule, float]:
    """matrix ~= (alpha / r) * up @ down at rank r; the module and its relative error."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(r, len(s))
    scale = alpha / r
    up, down = u[:, :r] * s[:r] / scale, vh[:r]
    error = float(torch.linalg.norm(matrix - scale * (up @ down)) / torch.linalg.norm(matrix).clamp_min(1e-30))
    down_shape = (r, *m.tensors["down"].shape[1:])
    up_shape = (m.tensors["up"].shape[0], r, *m.tensors["up"].shape[2:])
    out = LoraModule(m.component, m.name, "lora", {"down": down.reshape(down_shape).contiguous(),
                                                    "up": up.reshape(up_shape).contiguous()}, float(alpha), r)
    return out, error


def resize_lora(lora: LoraFile, *, rank: int | None = None, fro: float | None = None
                ) -> tuple[list[LoraModule], list[LayerReport]]:
    _plain(lora)
    modules, reports = [], []
    for m in lora.modules:
        matrix = delta(m)
        s = torch.linalg.svdvals(matrix)
        r = choose_rank(s, rank, fro, None, None)
        out, error = _factor(m, matrix, r, m.scale * r)  # the same alpha / rank as before
        modules.append(out)
        reports.append(LayerReport(m.component, m.name, "conv" if m.conv else "linear",
                                   list(m.tensors["up"].shape[:1]) + list(m.tensors["down"].shape[1:]),
                                   out.rank, m.rank, error))
    return modules, reports


def merge_loras(loras: list[LoraFile], weights: list[float], *, rank: int | None = None
                ) -> tuple[list[LoraModule], list[LayerReport]]:
    layouts = {"kohya" if lf.format in ("kohya", "lycoris") else "diffusers" for lf in loras}
    if len(layouts) > 1:
        raise LoraFileError("the files mix kohya and diffusers layouts, whose module names differ",
                            "convert them to one layout first (e.g. merge kohya files with kohya files)")
    groups: dict[tuple[str, str], list[tuple[LoraModule, float]]] = {}
    for lf, w in zip(loras, weights):
        _plain(lf)
        for m in lf.modules:
            groups.setdefault((m.component, m.name), []).append((m, w))
    modules, reports = [], []
    for (component, name), parts in sorted(groups.items()):
        first = parts[0][0]
        if rank is None:  # stack the factors: exact
            downs = [m.tensors["down"].float() for m, _ in parts]
            ups = [m.tensors["up"].float() * (w * m.scale) for m, w in parts]
            total = sum(m.rank for m, _ in parts)
            out = LoraModule(component, name, "lora", {"down": torch.cat(downs, 0).contiguous(),
                                                       "up": torch.cat(ups, 1).contiguous()}, float(total), total)
            error = 0.0
        else:
            matrix = sum(w * delta(m) for m, w in parts)
            out, error = _factor(first, matrix, rank, float(rank))
        modules.append(out)
        reports.append(LayerReport(component, name, "conv" if first.conv else "linear", [], out.rank,
                                   sum(m.rank for m, _ in parts), error))
    return modules, reports


def save_modules(path: str | Path, modules: list[LoraModule], layout: str, metadata: dict[str, str] | None = None) -> Path:
    """Write modules under the names they were read with: `kohya` or `diffusers` layout."""
    from safetensors.torch import save as safetensors_bytes

    from sdxlpipe.lora.formats import _write_atomic, _write_kohya

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    if layout == "kohya":
        for m in modules:
            name = f"{KOHYA_PREFIX[m.component]}_{m.name.replace('.', '_')}"
            tensors[f"{name}.lora_down.weight"] = m.tensors["down"].contiguous()
            tensors[f"{name}.lora_up.weight"] = m.tensors["up"].contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
        ranks = [m.rank for m in modules]
        common = max(set(ranks), key=ranks.count)
        network = {"ss_network_module": "networks.lora", "ss_network_dim": str(common),
                   "ss_network_alpha": str(next(m.alpha for m in modules if m.rank == common)),
                   "ss_network_train_unet_only": str(all(m.component == "unet" for m in modules))}
        _write_kohya(path, tensors, network, metadata)
        return path
    config: dict = {}
    for component in sorted({m.component for m in modules}):
        mine = [m for m in modules if m.component == component]
        ranks = [m.rank for m in mine]
        r = max(set(ranks), key=ranks.count)
        alpha = next(m.alpha for m in mine if m.rank == r)
        config.update({f"{component}.r": r, f"{component}.lora_alpha": alpha,
                       f"{component}.target_modules": sorted(m.name for m in mine),
                       f"{component}.rank_pattern": {m.name: m.rank for m in mine if m.rank != r},
                       f"{component}.alpha_pattern": {m.name: m.alpha for m in mine if m.alpha != alpha}})
        for m in mine:
            tensors[f"{component}.{m.name}.lora_A.weight"] = m.tensors["down"].contiguous()
            tensors[f"{component}.{m.name}.lora_B.weight"] = m.tensors["up"].contiguous()
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True), **(metadata or {})}
    _write_atomic(path, safetensors_bytes(tensors, metadata=meta))
    return path


def merge_into(base: str, loras: list[LoraFile], weights: list[float], output: str | Path,
               dtype: str = "fp32") -> tuple[Path, int]:
    """Fold LoRAs into the base model's weights; write a single-file checkpoint. Returns (path, modules folded)."""
    from sdxlpipe.lora.read import module_names
    from sdxlpipe.models import loading
    from sdxlpipe.models.single_file import save_single_file

    pipe = loading.load_pipeline(base)
    names = {c: module_names(getattr(pipe, c), c) for c in ("unet", "text_encoder", "text_encoder_2")}
    folded = 0
    for lf, w in zip(loras, weights):
        _plain(lf)
        for m in lf.modules:
            target = names[m.component].get(m.name)
            if target is None:
                raise LoraFileError(f"{lf.path}: module {m.name!r} matches no {m.component} module of {base}",
                                    "merge a LoRA made for this model's architecture (SDXL)")
            layer = getattr(pipe, m.component).get_submodule(target)
            with torch.no_grad():
                layer.weight += (w * delta(m)).reshape(layer.weight.shape).to(layer.weight.dtype)
            folded += 1
    pipe.to(dtype=loading.torch_dtype(dtype))
    sources = ", ".join(f"{lf.path.name}*{w:g}" for lf, w in zip(loras, weights))
    return save_single_file(pipe, output, metadata={"sdxlpipe_merged": f"{base} + {sources}"}), folded
