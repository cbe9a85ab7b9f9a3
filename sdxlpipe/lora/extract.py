"""LoRA extraction: the SVD of (tuned - base) for every Linear and Conv2d, kept to a chosen rank.

Per layer: delta = tuned - base as a matrix (a kxk convolution as
out x (in*k*k)), U S Vh = svd(delta), keep r singular values: up = U_r S_r,
down = Vh_r (a convolution's down is kxk, its up 1x1, as kohya's LoCon),
alpha = r so the scale is 1. r is `rank` (`conv_rank` for kxk convolutions),
or chosen per layer as kohya's resize_lora does: `fro` keeps the fraction
of the Frobenius norm, `sv_ratio` the singular values above max/ratio,
`sv_cumulative` the fraction of the sum of singular values (capped by
`rank` when both are given). `clamp_quantile` clips up and down at that
quantile of their absolute values (kohya's extract_lora_from_models; off by
default, so full rank reproduces the tuned weights). Each layer's report
carries the relative error of what is written: |delta - up @ down| / |delta|.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdxlpipe.lora.read import LoraModule

UNCHANGED = 1e-12  # a layer whose largest change is below this is left out (float noise, not training)


@dataclass
class LayerReport:
    component: str
    module: str
    kind: str  # "linear" | "conv" (kxk) | "conv1x1"
    shape: list[int]
    rank: int  # kept
    full_rank: int  # min(out, in*k*k): the rank that reproduces the layer
    rel_error: float  # |delta - up @ down|_F / |delta|_F of what is written

    def to_json(self) -> dict:
        return {"component": self.component, "module": self.module, "kind": self.kind, "shape": self.shape,
                "rank": self.rank, "full_rank": self.full_rank, "rel_error": self.rel_error}


@dataclass
class Extracted:
    modules: list[LoraModule]
    layers: list[LayerReport]
    unchanged: int  # Linear/Conv2d layers with no change, left out


def extract_lora(base: dict[str, dict], tuned: dict[str, dict], models: dict[str, torch.nn.Module], *,
                 rank: int | None = None, conv_rank: int | None = None, fro: float | None = None,
                 sv_ratio: float | None = None, sv_cumulative: float | None = None,
                 clamp_quantile: float | None = None) -> Extracted:
    """`base`/`tuned`: {component: diffusers state dict}; `models`: {component: a module of that
    architecture (meta is fine)} naming which weights belong to Linear and Conv2d layers."""
    modules, layers, unchanged = [], [], 0
    for component, model in models.items():
        for name, layer in model.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            key = f"{name}.weight"
            if key not in base[component] or key not in tuned[component]:
                continue
            delta = tuned[component][key].float() - base[component][key].float()
            if delta.abs().max() <= UNCHANGED:
                unchanged += 1
                continue
            kxk = delta.dim() == 4 and tuple(delta.shape[2:]) != (1, 1)
            limit = conv_rank if kxk and conv_rank else rank
            module, report = _extract_layer(component, name, delta, limit, fro, sv_ratio, sv_cumulative, clamp_quantile)
            modules.append(module)
            layers.append(report)
    return Extracted(modules, layers, unchanged)


def _extract_layer(component: str, name: str, delta: torch.Tensor, limit: int | None, fro: float | None,
                   sv_ratio: float | None, sv_cumulative: float | None,
                   clamp_quantile: float | None) -> tuple[LoraModule, LayerReport]:
    matrix = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = choose_rank(s, limit, fro, sv_ratio, sv_cumulative)
    up, down = u[:, :r] * s[:r], vh[:r]
    if clamp_quantile is not None and clamp_quantile < 1:
        hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]).abs(), clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    error = float(torch.linalg.norm(matrix - up @ down) / torch.linalg.norm(matrix))
    if delta.dim() == 4:
        down = down.reshape(r, *delta.shape[1:])
        up = up.reshape(delta.shape[0], r, 1, 1)
    kind = "linear" if delta.dim() == 2 else ("conv" if tuple(delta.shape[2:]) != (1, 1) else "conv1x1")
    module = LoraModule(component, name, "lora", {"down": down.contiguous(), "up": up.contiguous()}, float(r), r)
    return module, LayerReport(component, name, kind, list(delta.shape), r, len(s), error)


def choose_rank(s: torch.Tensor, limit: int | None, fro: float | None, sv_ratio: float | None,
                sv_cumulative: float | None) -> int:
    """How many singular values (s, descending) to keep; at least 1."""
    full = len(s)
    if fro is not None:
        energy = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
        r = int((energy < fro - 1e-12).sum()) + 1
    elif sv_ratio is not None:
        r = int((s >= s[0] / sv_ratio).sum())
    elif sv_cumulative is not None:
        total = torch.cumsum(s.double(), 0) / s.double().sum()
        r = int((total < sv_cumulative - 1e-12).sum()) + 1
    else:
        r = full
    if limit:
        r = min(r, limit)
    return max(1, min(r, full))


def relative_error(delta: torch.Tensor, module: LoraModule) -> float:
    """|delta - scale * up @ down|_F / |delta|_F for a written module: what a test or a user can re-measure."""
    down = module.tensors["down"].float().reshape(module.rank, -1)
    up = module.tensors["up"].float().reshape(-1, module.rank)
    matrix = delta.float().reshape(delta.shape[0], -1)
    return float(torch.linalg.norm(matrix - module.scale * (up @ down)) / torch.linalg.norm(matrix))


def summary_table(result: Extracted) -> list[str]:
    """The per-layer report as text lines (the CLI's table)."""
    lines = [f"{'layer':72} {'kind':8} {'rank':>9} {'rel.err':>9}"]
    for r in result.layers:
        name = f"{r.component}:{r.module}"
        lines.append(f"{name[-72:]:72} {r.kind:8} {r.rank:>4}/{r.full_rank:<4} {r.rel_error:>9.2e}")
    if result.layers:
        worst = max(result.layers, key=lambda r: r.rel_error)
        mean = sum(r.rel_error for r in result.layers) / len(result.layers)
        lines.append(f"{len(result.layers)} layers, mean rel. error {mean:.2e}, worst {worst.rel_error:.2e} "
                     f"({worst.module}); {result.unchanged} unchanged layers left out")
    return lines



def load_weights(spec: str, *, text_encoders: bool = True) -> dict[str, torch.nn.Module]:
    """{component: model} of a diffusers pipeline folder, a UNet folder, a single-file checkpoint or `tiny`."""
    from pathlib import Path

    from sdxlpipe.models import loading

    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        from diffusers import UNet2DConditionModel

        try:
            return {"unet": UNet2DConditionModel.from_pretrained(str(path), local_files_only=True)}
        except (OSError, ValueError) as exc:
            raise loading.ModelError(f"{spec!r}: not a diffusers UNet folder ({exc})",
                                     "give a diffusers pipeline folder, a UNet folder, a .safetensors checkpoint or tiny")
    models = {"unet": loading.load_unet(spec)}
    if text_encoders:
        stack = loading.load_text_stack(spec)
        models.update({n: stack[n] for n in ("text_encoder", "text_encoder_2")})
    return models
