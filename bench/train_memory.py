"""Peak memory of real SDXL training steps, split into frozen weights, trained state and activations.

    nice -n 10 python bench/train_memory.py           # every case, each in its own process, 512 px, 1 step
    python bench/train_memory.py --case lora16-bf16   # one case in this process
    nice -n 10 python bench/train_memory.py --size 1024 --steps 1 --cases lora8-fp8

The UNet is SDXL base's (sdxlpipe/models/sdxl_config.py) with made-up weights (a constant per tensor): no
download, and memory does not depend on the values. Each case builds it, gives it the network and precision the train stage would
(`training.networks.attach` / `set_precision`, `training.optimizers`, gradient checkpointing on as the stage
does for SDXL-sized UNets), and runs real steps of the stage's loss (`training.loop._loss`) on random cached
latents and text embeddings under bf16 autocast, batch 1. The CPU's resident memory stands in for the GPU's:

- frozen: bytes of the frozen weights as stored;
- trained: trained weights + their gradients (peak: all at once, or one tensor with the fused backward pass)
  + optimizer state + EMA copy, counted from the tensors after the steps;
- activations: the rest of the peak, = peak RSS during the last step - RSS before it - gradient bytes
  - optimizer state made during that step (the first step makes it).

Cases that cannot run on a CPU (8-bit AdamW needs CUDA's bitsandbytes) or need more RAM than a shared
24 GB machine should give are counted on the meta device (weights and optimizer state; no activations).
The machine's numbers are noisy, but memory is not time: these are bytes, measured once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

GB = 1024**3
# name: (train settings, how it is measured)
CASES = {
    "lora8-fp8": dict(rank=8, alpha=8.0, base_dtype="fp8"),
    "full-bf16-adafactor-fused": dict(network="full", optimizer="adafactor", full_bf16=True, fused_backward=True,
                                 learning_rate=1e-5),
    "lora16-bf16": dict(rank=16, alpha=16.0),
    "lora8-bf16": dict(rank=8, alpha=8.0),
    "lora16-fp8": dict(rank=16, alpha=16.0, base_dtype="fp8"),
    "lora16-bf16-ema": dict(rank=16, alpha=16.0, ema_decay=0.999),
}
# Counted on the meta device: weights and optimizer state by formula.
META_CASES = {
    "lora8-fp8 (meta)": dict(rank=8, alpha=8.0, base_dtype="fp8"),
    "lora8-bf16 (meta)": dict(rank=8, alpha=8.0),
    "lora16-fp8 (meta)": dict(rank=16, alpha=16.0, base_dtype="fp8"),
    "lora16-bf16 (meta)": dict(rank=16, alpha=16.0),
    "full-bf16-adafactor-fused (meta)": dict(network="full", optimizer="adafactor", full_bf16=True, fused_backward=True),
    "lora16-adamw8bit (meta)": dict(rank=16, alpha=16.0, optimizer="adamw8bit"),
    "lora16-adamw (meta)": dict(rank=16, alpha=16.0, optimizer="adamw"),
    "full-adamw8bit bf16 (meta)": dict(network="full", optimizer="adamw8bit", full_bf16=True),
    "full-adamw fp32 (meta)": dict(network="full", optimizer="adamw"),
    "full-adafactor-fused-ema (meta)": dict(network="full", optimizer="adafactor", full_bf16=True,
                                            fused_backward=True, ema_decay=0.999),
}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Samples this process's resident memory every 2 ms on a thread (torch frees into malloc, which keeps
    the peak in RSS only briefly)."""

    def __init__(self) -> None:
        self.peak, self.running = rss(), True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, rss())


def settings(name: str, cases: dict):
    from sdxlpipe.stages.train import Params

    base = dict(mixed_precision="bf16", batch_size=1, learning_rate=1e-4, optimizer="adafactor", seed=0)
    return dataclasses.replace(Params(), **{**base, **cases[name]})


def build_unet(p, device: str):
    """SDXL's UNet with random weights, given the network and precision as the train stage does; built in bf16
    (fp32 for trained full weights without full_bf16) so the process never holds an fp32 copy of a frozen UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdxlpipe.models.sdxl_config import SDXL_UNET
    from sdxlpipe.training import networks

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_UNET)
    dtype = torch.float32 if p.network == "full" and not p.full_bf16 else torch.bfloat16
    unet = unet.to(dtype=dtype).to_empty(device=device)
    if device != "meta":
        # Every page written (an untouched page is not resident, so it would not count); a constant per tensor
        # is as good as random weights for memory, and 2.6e9 normal draws take minutes on a shared CPU.
        with torch.no_grad():
            for i, q in enumerate(unet.parameters()):
                q.fill_(0.01 * (1 + i % 7) / 7)
    unet.requires_grad_(False)
    networks.attach(unet, p)
    networks.set_precision(unet, p, torch.bfloat16)
    return unet


def optimizer_state_bytes(p, trained: list) -> int:
    """Optimizer state by formula, for the meta count (the CPU cases measure the real state)."""
    n = sum(q.numel() for q in trained)
    if p.optimizer == "adamw":
        return n * 8  # two fp32 moments
    if p.optimizer == "adamw8bit":
        return n * 2 + n // 2048 * 8  # two 8-bit moments, blockwise fp32 scales (block 2048)
    # Adafactor without momentum: a row and a column vector per matrix, the full vector for 1-d tensors.
    return sum((q.shape[0] + q[0].numel() if q.ndim >= 2 else q.numel()) * 4 for q in trained)


def measure(name: str, size: int, steps: int) -> dict:
    import torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from sdxlpipe.training import loop, optimizers

    meta = name in META_CASES
    p = settings(name, META_CASES if meta else CASES)
    base = rss()
    unet = build_unet(p, "meta" if meta else "cpu")
    frozen = sum(q.numel() * q.element_size() for q in unet.parameters() if not q.requires_grad)
    trained = [q for q in unet.parameters() if q.requires_grad]
    weights = sum(q.numel() * q.element_size() for q in trained)
    grads = weights if not p.fused_backward else max(q.numel() * q.element_size() for q in trained)
    ema_bytes = weights if p.ema_decay else 0
    row = {"case": name, "size": size, "trained_params": sum(q.numel() for q in trained),
           "frozen_gb": frozen / GB, "weights_gb": weights / GB, "grads_gb": grads / GB, "ema_gb": ema_bytes / GB}
    if meta:
        row.update(state_gb=optimizer_state_bytes(p, trained) / GB, activations_gb=None, peak_gb=None)
        return row

    unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = optimizers.build_optimizer(optimizers.param_groups(unet, p), p)
    fused = optimizers.fuse_into_backward(optimizer, p.max_grad_norm) if p.fused_backward else None
    ema = EMAModel(trained, decay=p.ema_decay) if p.ema_decay else None
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    side = size // 8
    g = torch.Generator().manual_seed(0)
    batch = {"mean": torch.randn(1, 4, side, side, generator=g), "std": torch.full((1, 4, side, side), 0.05),
             "shift": 0.0, "scale": 0.13025, "embeds": torch.randn(1, 77, 2048, generator=g),
             "pooled": torch.randn(1, 1280, generator=g), "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32),
             "mask": None, "is_reg": torch.tensor([False])}
    def state_bytes() -> int:
        return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    seconds, peak, before, new_state = [], 0, 0, 0
    for step in range(steps):
        before, state_before = rss(), state_bytes()
        watch = PeakRSS()
        began = time.monotonic()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loop._loss(unet, batch, p, sched.alphas_cumprod, "epsilon", torch.Generator().manual_seed(step),
                              torch.device("cpu"), False)
        loss.backward()
        if fused is None:
            torch.nn.utils.clip_grad_norm_(trained, p.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(trained)
        peak = watch.stop()
        seconds.append(time.monotonic() - began)
        new_state = state_bytes() - state_before  # made during this step (the first one), so not in `before`
    state = state_bytes()
    row.update(state_gb=state / GB, peak_gb=(peak - base) / GB,
               activations_gb=max(0, peak - before - grads - new_state) / GB,
               step_seconds=[round(s, 1) for s in seconds], loss=float(loss))
    return row


def total(row: dict) -> float | None:
    if row["activations_gb"] is None:
        return None
    return row["frozen_gb"] + row["weights_gb"] + row["grads_gb"] + row["state_gb"] + row["ema_gb"] + row["activations_gb"]


def table(rows: list[dict]) -> str:
    out = ["| case | px | trained params | frozen | trained w + grads + state + EMA | activations | sum | measured peak |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["weights_gb"] + r["grads_gb"] + r["state_gb"] + r["ema_gb"]
        act = "-" if r["activations_gb"] is None else f"{r['activations_gb']:.2f}"
        s = total(r)
        s = f"{s:.2f}" if s is not None else f"{r['frozen_gb'] + t:.2f} + act."
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        out.append(f"| {r['case']} | {r['size']} | {r['trained_params'] / 1e6:.1f}M | {r['frozen_gb']:.2f} | "
                   f"{r['weights_gb']:.2f} + {r['grads_gb']:.2f} + {r['state_gb']:.2f} + {r['ema_gb']:.2f} = {t:.2f} | "
                   f"{act} | {s} | {peak} |")
    return "\n".join(out) + "\n(GiB)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help="run one case in this process and print its row as JSON")
    ap.add_argument("--cases", default=",".join([*CASES, *META_CASES]), help="comma-separated cases (default: all)")
    ap.add_argument("--size", type=int, default=512, help="image side in px (SDXL trains at 1024)")
    ap.add_argument("--steps", type=int, default=1, help="steps per case; the last one is measured")
    ap.add_argument("--out", default="", help="also append each row as JSON to this file")
    args = ap.parse_args()
    if args.case:
        import torch

        torch.manual_seed(0)
        print(json.dumps(measure(args.case, args.size, args.steps)))
        return
    rows = []
    for name in args.cases.split(","):
        # One process per case: peaks do not carry over, and torch's allocator starts empty.
        proc = subprocess.run([sys.executable, __file__, "--case", name, "--size", str(args.size),
                               "--steps", str(args.steps)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print(table(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
