"""Peak memory of real SDXL training steps, split into frozen weights, trained state and activations.

    nice -n 10 python bench/train_memory.py           # every case, each in its own process, 512 px, 1 step
    python bench/train_memory.py --case lora16-bf16   # one case in this process
    nice -n 10 python bench/train_memory.py --size 1024 --steps 1 --cases lora8-fp8
    python bench/train_memory.py --unet-scale 16 --size 256,512,1024 --cases lora8-bf16   # activation growth, fast

The UNet is SDXL base's (tests/models/sdxl_unet.py) with made-up weights (a constant per tensor): no
download, and memory does not depend on the values. Each case builds it, gives it the network and precision the train stage would
(`training.networks.attach` / `set_precision`, `training.optimizers`, gradient checkpointing on as the stage
does for SDXL-sized UNets), and runs real steps of the stage's loss (`training.losses.batch_loss`) on random cached
latents and text embeddings under bf16 autocast, batch 1. The CPU's resident memory stands in for the GPU's:

- frozen: bytes of the frozen weights as stored;
- trained: trained weights + their gradients (peak: all at once, or one tensor with the fused backward pass)
  + optimizer state + EMA copy, counted from the tensors after the steps;
- activations: peak RSS during the last step - RSS before it - gradient bytes - optimizer state made during
  that step (the first step makes it); freed heap is given back to the system (malloc_trim) before each step,
  so "before" is what is live;
  the script runs with glibc's mmap threshold fixed at 128 KiB (it re-executes itself so), so a freed
  tensor leaves RSS at once and the peak is live bytes, not heap glibc kept;
- other: the rest of the peak (the batch, peft's and the optimizer's bookkeeping, heap the allocator kept), so
  frozen + trained + activations + other = the measured peak over the RSS after the imports. A large "other"
  would mean the split is wrong.

Rows measured below 1024 px get a 1024 px estimate: activations x `--act-ratio` per doubling of the side (4: the
latent has 4x the pixels, and with memory-efficient attention, as torch's CPU and GPU attention kernels are,
every activation grows with the pixels). `--unet-scale K` divides SDXL's channels by K (same blocks, depths and
attention layout): steps K^2 times cheaper, to measure that growth at several sizes in minutes
(`--size 256,512,1024`); the table then prints each case's measured ratio. On a CPU without AVX512-BF16 a bf16
step is ~30x slower than fp32 (emulated): the real UNet at 1024 px takes hours per step there.

Cases that cannot run on a CPU (8-bit AdamW needs CUDA's bitsandbytes) or need more RAM than a shared
24 GB machine should give are counted on the meta device (weights and optimizer state; no activations).
The machine's numbers are noisy, but memory is not time: these are bytes, measured once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

GB = 1024**3
MMAP_THRESHOLD = "131072"  # bytes; see main(): glibc's default start value, held fixed
# Activations grow ~4x per doubling of the image side (see the docstring); --act-ratio sets a measured figure.
ACT_RATIO = 4.0
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


def trim() -> None:
    """Give freed heap back to the system, so RSS is live memory (glibc keeps freed small blocks)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS may then include freed memory
        pass


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


def unet_config(scale: int) -> dict:
    """SDXL base's UNet config, its channels divided by `scale` (1, 2, 4, 8 or 16; 1: the real one). Blocks,
    transformer depths and head counts stay, so activations keep their layout and grow with the pixels alike."""
    from tests.models.sdxl_unet import SDXL_UNET

    if scale == 1:
        return dict(SDXL_UNET)
    if scale not in (2, 4, 8, 16):
        raise SystemExit("--unet-scale: 1, 2, 4, 8 or 16 (the channels must split into SDXL's heads and groups)")
    return {**SDXL_UNET, "block_out_channels": [c // scale for c in SDXL_UNET["block_out_channels"]],
            "norm_num_groups": 32 // scale}


def build_unet(p, device: str, scale: int = 1):
    """SDXL's UNet with random weights, given the network and precision as the train stage does; built in bf16
    (fp32 for trained full weights without full_bf16) so the process never holds an fp32 copy of a frozen UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdxlpipe.training import networks

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config(scale))
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


def measure(name: str, size: int, steps: int, scale: int = 1, fp32: bool = False) -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: F401 (imported before `base`)
    from diffusers.training_utils import EMAModel

    from sdxlpipe.training import losses, networks, optimizers

    meta = name in META_CASES
    p = settings(name, META_CASES if meta else CASES)
    if fp32:  # growth measurements only: ~30x faster steps on a CPU without bf16 instructions
        p = dataclasses.replace(p, mixed_precision="no", base_dtype="fp32", full_bf16=False)
    trim()
    base = rss()  # after the imports: the split below covers what training holds
    unet = build_unet(p, "meta" if meta else "cpu", scale)
    frozen = sum(q.numel() * q.element_size() for q in unet.parameters() if not q.requires_grad)
    trained = [q for q in unet.parameters() if q.requires_grad]
    weights = sum(q.numel() * q.element_size() for q in trained)
    grads = weights if not p.fused_backward else max(q.numel() * q.element_size() for q in trained)
    ema_bytes = weights if p.ema_decay else 0
    row = {"case": name + (" fp32" if fp32 else ""), "size": size, "unet_scale": scale, "trained_params": sum(q.numel() for q in trained),
           "frozen_gb": frozen / GB, "weights_gb": weights / GB, "grads_gb": grads / GB, "ema_gb": ema_bytes / GB}
    if meta:
        row.update(state_gb=optimizer_state_bytes(p, trained) / GB, activations_gb=None, peak_gb=None, other_gb=None)
        return row

    networks.gradient_checkpointing(unet, dataclasses.replace(p, gradient_checkpointing=True))  # as for SDXL
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
        trim()
        before, state_before = rss(), state_bytes()
        watch = PeakRSS()
        began = time.monotonic()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not fp32):
            loss = losses.batch_loss(unet, batch, p, sched.alphas_cumprod, "epsilon", torch.Generator().manual_seed(step),
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
    activations = max(0, peak - before - grads - new_state)
    held = frozen + weights + grads + state + ema_bytes + activations
    row.update(state_gb=state / GB, peak_gb=(peak - base) / GB, activations_gb=activations / GB,
               other_gb=(peak - base - held) / GB, step_seconds=[round(s, 1) for s in seconds], loss=float(loss))
    return row


def trained_gb(r: dict) -> float:
    return r["weights_gb"] + r["grads_gb"] + r["state_gb"] + r["ema_gb"]


def at_1024(r: dict, ratio: float) -> str:
    """The 1024 px figure: measured there, else the activations grown by `ratio` per doubling of the side."""
    if r["activations_gb"] is None:
        return f"{r['frozen_gb'] + trained_gb(r):.2f} + act."
    doublings = math.log2(1024 / r["size"])
    est = r["frozen_gb"] + trained_gb(r) + r["other_gb"] + r["activations_gb"] * ratio**doublings
    return f"{est:.2f} measured" if r["size"] == 1024 else f"{est:.2f} est. (act. x {ratio:g}^{doublings:g})"


def table(rows: list[dict], ratio: float = ACT_RATIO) -> str:
    out = ["| case | measured at px | UNet | trained params | frozen | trained w + grads + state + EMA | activations | "
           "other | measured peak | at 1024 px |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        act = "-" if r["activations_gb"] is None else f"{r['activations_gb']:.3f}"
        other = "-" if r.get("other_gb") is None else f"{r['other_gb']:.3f}"
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        unet = "meta count" if r["peak_gb"] is None else ("SDXL" if r.get("unet_scale", 1) == 1 else f"SDXL/{r['unet_scale']}")
        out.append(f"| {r['case']} | {r['size'] if r['peak_gb'] is not None else '-'} | {unet} | "
                   f"{r['trained_params'] / 1e6:.1f}M | {r['frozen_gb']:.2f} | "
                   f"{r['weights_gb']:.2f} + {r['grads_gb']:.2f} + {r['state_gb']:.2f} + {r['ema_gb']:.2f} = {trained_gb(r):.2f} | "
                   f"{act} | {other} | {peak} | {at_1024(r, ratio)} |")
    out.append("(GiB; frozen + trained + activations + other = measured peak)")
    # Measured growth: a case at several sizes of one UNet.
    by_case: dict = {}
    for r in rows:
        if r["activations_gb"]:
            by_case.setdefault((r["case"], r.get("unet_scale", 1)), []).append(r)
    for (case, scale), rs in by_case.items():
        rs.sort(key=lambda r: r["size"])
        steps = [f"{a['size']}->{b['size']} px: x{b['activations_gb'] / a['activations_gb']:.2f}" for a, b in zip(rs, rs[1:])]
        if steps:
            out.append(f"activations of {case} (UNet scale 1/{scale}) per doubling of the side: " + ", ".join(steps))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help="run one case in this process and print its row as JSON")
    ap.add_argument("--cases", default=",".join([*CASES, *META_CASES]), help="comma-separated cases (default: all)")
    ap.add_argument("--size", default="512", help="image side(s) in px, comma-separated (SDXL trains at 1024)")
    ap.add_argument("--unet-scale", type=int, default=1, help="divide SDXL's channels by this (2/4/8/16): cheap steps "
                    "for measuring how activations grow with the size")
    ap.add_argument("--fp32", action="store_true", help="compute and frozen weights in fp32 (not what training "
                    "does): for how activations grow with the size, ~30x faster on a CPU without bf16 instructions")
    ap.add_argument("--act-ratio", type=float, default=ACT_RATIO, help="activation growth per doubling of the side, "
                    "for the 1024 px estimate of rows measured smaller")
    ap.add_argument("--steps", type=int, default=1, help="steps per case; the last one is measured")
    ap.add_argument("--out", default="", help="also append each row as JSON to this file")
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        # glibc raises its mmap threshold after the first big free and then serves big tensors from the heap,
        # whose freed blocks stay resident: RSS then counts freed activations (2.96 GiB instead of 0.20 at
        # 512 px on the real UNet). A fixed threshold maps every tensor over 128 KiB on its own and unmaps it
        # when freed, so RSS follows live bytes, as a GPU's allocated-memory figure does. glibc reads it at
        # start-up: run this script again with it set.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})
    if args.case:
        import torch

        torch.manual_seed(0)
        print(json.dumps(measure(args.case, int(args.size), args.steps, args.unet_scale, args.fp32)))
        return
    rows = []
    jobs = [(name, size) for name in args.cases.split(",") for size in args.size.split(",")
            if name not in META_CASES or size == args.size.split(",")[0]]
    for name, size in jobs:
        # One process per case: peaks do not carry over, and torch's allocator starts empty.
        proc = subprocess.run([sys.executable, __file__, "--case", name, "--size", size, "--steps", str(args.steps),
                               "--unet-scale", str(args.unet_scale), *(["--fp32"] if args.fp32 else [])],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print(table(rows, args.act_ratio))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
