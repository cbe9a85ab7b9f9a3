"""sdxlpipe's GPU work on one CUDA card: speed and memory against bare diffusers loops, in one command.

    python bench/gpu.py --out gpu.json             # one H100/A100: ~6-7 min (budget 7.5 min), nothing downloaded
    python bench/gpu.py --smoke --out smoke.json   # CPU, tiny model, 2 steps a case (the test suite runs it)
    python bench/gpu.py --only train,vae           # some sections

The models are SDXL base's architectures (tests/models/sdxl_unet.py) with random weights, written
once as a diffusers folder in --dir (the UNet's 5 GB only when the `stage` section runs); the
tokenizers are the tiny stack's (SDXL's BPE vocabulary is a download; prompts still fill 77 tokens).
Speed and memory do not depend on the weights' values. Sections, in the order they run:

- train: a training step at 1024 px on the SDXL UNet as the train stage makes it (its network,
  precision, optimizer, gradient checkpointing and loss: `training.networks`, `training.optimizers`,
  `training.loop`), its batches read by the stage's loader (`training.stream`, 2 reader threads,
  pinned memory) from a store of SDXL-shaped cached items; against a bare diffusers + peft loop (same
  UNet, batch, precision, LoRA targets and optimizer, tensors already on the GPU). LoRA r16 with a bf16
  base, LoRA r16 with an fp8 base, a full fine-tune with full_bf16 + fused Adafactor; gradient
  checkpointing on and off; batch 1 and 4.
- vae: `run encode`'s VAE stage at 1024 px (fp16 and bf16; its decode workers included; the GPU's busy
  % sampled by nvidia-smi meanwhile) against a bare `vae.encode` loop on tensors already on the GPU.
- text: the text_encode stage (both CLIPs, as it runs them: fp32) against a bare transformers loop.
- stage: the train stage itself (`stages.train.run`: model load, loader, accelerate, logging) for the
  LoRA r16 bf16 case, its step time read from its progress; it should equal the train section's row.
- options: on the LoRA r16 bf16, checkpointed, batch 4 step: channels-last, the batch made fp32 on the
  CPU before its copy (the loop's path before decision 78: compare its loader wait), each SDPA kernel
  forced (the one used by default is read from the profiler), 8-bit AdamW (bitsandbytes; skipped without it).
- compile: `train.compile` (torch.compile of the UNet): the first step's compile time and the steady step.

Columns: `value` is s/step for training (lower is better) and images/s or captions/s for encoding; `vs
bare` is sdxlpipe's speed over the bare loop's (1.00x = as fast; below 1 slower); `samples/s` = batch /
s/step; `peak GiB` = torch.cuda.max_memory_allocated / max_memory_reserved during the timed steps (the
CUDA context, ~0.5 GiB, comes on top; it is in the machine line); `loader wait` = the share of the step
the loop waited for its batch; `GPU busy` = nvidia-smi's utilization while the stage encoded;
`verdict` = peak reserved + context against kohya's bars (LoRA 8 GB, full fine-tune 24 GB).

Every case runs inside a try: one that fails prints its error and the bench goes on; each section runs
in its own process (a crash or a hang costs that section only), under one time budget (--budget):
a case that would start past it is reported as skipped. The table goes to stdout, each row as JSON to
--out. Asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 1024**3
# kohya's published bars: a LoRA in an 8 GB card, a full fine-tune (Adafactor, fused backward) in 24 GB.
BARS_GIB = {"lora": 8, "full": 24}
# Seconds for the whole bench: the issue's 8 minutes on one H100/A100, less a margin for the table.
BUDGET_S = 450
# A section not started at least this long before the budget ends is skipped whole.
SECTION_MIN_S = 20


@dataclasses.dataclass(frozen=True)
class Scale:
    smoke: bool
    size: int  # px of the training samples and of the VAE's images
    images: int  # images the VAE encodes per case
    captions: int  # texts the text encoders encode per case
    samples: int  # SDXL-shaped samples in the training store
    warmup: int  # steps before the timed ones (cuDNN autotuning, allocator, optimizer state)
    steps: int  # timed steps
    batches: tuple[int, ...]
    vae_batch: int  # images per VAE call (vae_encode.batch_size; 8 is its default)


FULL = Scale(False, 1024, 128, 2048, 64, 1, 3, (1, 4), 8)
SMOKE = Scale(True, 32, 8, 40, 8, 1, 1, (1, 2), 4)  # 2 steps a case: one warm-up, one timed

# The train stage's settings per network (LoRA on kohya's targets; AdamW for LoRA, Adafactor for full).
BASE = dict(mixed_precision="bf16", learning_rate=1e-4, seed=0, loader_workers=2, save_every_steps=1000)
NETWORKS = {
    "lora16-bf16": dict(rank=16, alpha=16.0, optimizer="adamw"),
    "lora16-fp8": dict(rank=16, alpha=16.0, optimizer="adamw", base_dtype="fp8"),
    "full-bf16-adafactor-fused": dict(network="full", optimizer="adafactor", full_bf16=True, fused_backward=True,
                                      learning_rate=1e-5),
}
# The bare loop each network is compared with: a LoRA through peft, or every weight.
BARE = {"lora16-bf16": "lora", "full-bf16-adafactor-fused": "full"}
SECTIONS = ("setup", "train", "vae", "text", "stage", "options", "compile")


# --- the machinery: rows, cases, time -------------------------------------------------------------

class Skip(Exception):
    """A case that cannot run on this machine (an optional package missing): reported as skipped, with why."""


@dataclasses.dataclass
class Env:
    work: Path
    scale: Scale
    device: str
    deadline: float  # time.time() after which no case starts

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def model(self) -> Path:
        return self.work / "model"


def emit(env: Env, row: dict) -> None:
    """Append a finished case to the rows file at once: a section that crashes later keeps its rows."""
    with open(env.work / "rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    shown = {k: v for k, v in row.items() if k not in ("section",)}
    print(f"[{row['section']}] {json.dumps(shown)}", file=sys.stderr, flush=True)


def run_case(env: Env, section: str, case: str, fn, side: str = "sdxlpipe", estimate: float = 20) -> dict:
    """Run one case and emit its row; a failure is printed and recorded, never raised."""
    row = {"section": section, "case": case, "side": side}
    left = env.deadline - time.time()
    if left < estimate:
        row.update(status="skipped", error=f"not started: {max(left, 0):.0f} s of the time budget left, "
                                           f"the case needs ~{estimate:.0f} s")
        emit(env, row)
        return row
    began = time.monotonic()
    try:
        row.update(fn())
        row["status"] = "ok"
    except Skip as e:
        row.update(status="skipped", error=str(e))
    except Exception as e:  # noqa: BLE001 (the bench reports every failure and goes on)
        traceback.print_exc()
        row.update(status="failed", error=f"{type(e).__name__}: {e}"[:600])
    finally:
        free(env)
        row["seconds"] = round(time.monotonic() - began, 2)  # the whole case: building, warm-up, timed steps
    emit(env, row)
    return row


def free(env: Env) -> None:
    gc.collect()
    if env.cuda:
        import torch

        torch.cuda.empty_cache()


def sync(env: Env) -> None:
    if env.cuda:
        import torch

        torch.cuda.synchronize()


def reset_peak(env: Env, empty: bool = True) -> None:
    """Peak memory counted from here. empty: the allocator's cache freed first, so reserved memory shows what
    this case needs, not the last one's cache (not between warm-up and timed steps: the timed steps would
    pay cudaMalloc again)."""
    if env.cuda:
        import torch

        if empty:
            gc.collect()
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(env: Env) -> dict:
    if not env.cuda:
        return {"peak_alloc_gib": None, "peak_reserved_gib": None}
    import torch

    return {"peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}


class Clock:
    """A Reporter for the runner and the stages (its `track`): records when each unit of work finished."""

    enabled = False

    def __init__(self) -> None:
        self.marks: dict[str, list[tuple[float, int]]] = {}

    @contextlib.contextmanager
    def track(self, description: str, total, **options):
        marks = self.marks.setdefault(description, [])
        yield lambda n=1, **fields: marks.append((time.monotonic(), n))


def steady_rate(marks: list[tuple[float, int]]) -> tuple[float, float, float]:
    """(units per second after the first batch, first mark, last mark): loading and warm-up left out."""
    if len(marks) < 2:
        raise RuntimeError(f"{len(marks)} batch(es) finished: a steady rate needs 2 or more (raise the count)")
    units = sum(n for _, n in marks[1:])
    return units / (marks[-1][0] - marks[0][0]), marks[0][0], marks[-1][0]


class GpuBusy:
    """nvidia-smi's utilization.gpu sampled every 100 ms in the background (None without nvidia-smi)."""

    def __init__(self, env: Env) -> None:
        self.samples: list[tuple[float, float]] = []
        self.proc = None
        if not env.cuda or not shutil.which("nvidia-smi"):
            return
        gpu = smi_id()
        if gpu is None:
            return
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-lms", "100", "-i", gpu], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append((time.monotonic(), float(line.strip())))

    def mean(self, start: float, end: float) -> float | None:
        if self.proc is not None:
            self.proc.terminate()
        inside = [v for t, v in self.samples if start <= t <= end]
        return sum(inside) / len(inside) / 100 if inside else None


@functools.cache
def smi_id() -> str | None:
    """The id nvidia-smi knows torch's cuda:0 by (its UUID: CUDA_VISIBLE_DEVICES renumbers indices), or None
    when nvidia-smi is missing or knows none of the candidates."""
    import torch

    if not shutil.which("nvidia-smi"):
        return None
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    for candidate in dict.fromkeys((uuid if uuid.startswith("GPU-") else f"GPU-{uuid}", uuid, visible)):
        try:
            probe = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", candidate],
                                   capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        if probe.returncode == 0 and probe.stdout.strip():
            return candidate
    return None


def context_gib() -> float:
    """Memory the CUDA context takes on the card (all the card's use less what torch's allocator holds)."""
    import torch

    torch.empty(1, device="cuda")
    free_b, total = torch.cuda.mem_get_info()
    return (total - free_b - torch.cuda.memory_reserved()) / GIB


# --- setup: the model folder, the images, the training store ---------------------------------------

def setup(env: Env) -> None:
    import torch

    machine = {"device": env.device, "torch": torch.__version__, "cores": usable_cores(),
               "libraries": versions(), "load_average": os.getloadavg()}
    if env.cuda:
        props = torch.cuda.get_device_properties(0)
        machine.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB, cuda=torch.version.cuda,
                       cudnn=torch.backends.cudnn.version(), context_gib=context_gib(), driver=nvidia_smi("driver_version"))
    (env.work / "machine.json").write_text(json.dumps(machine, indent=1))
    run_case(env, "setup", "model folder", lambda: write_model(env), estimate=5)
    run_case(env, "setup", "images", lambda: write_images(env), estimate=5)
    run_case(env, "setup", "training store", lambda: write_train_store(env), estimate=5)


def nvidia_smi(field: str) -> str | None:
    gpu = smi_id()
    if gpu is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader", "-i", gpu],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def usable_cores() -> int:
    from sdxlpipe.training.threads import usable_cores as cores

    return cores()


def configs(env: Env) -> dict:
    from tests.models.sdxl_unet import SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2, SDXL_UNET, SDXL_VAE
    from sdxlpipe.models.tiny_config import tiny_configs

    tiny = tiny_configs()
    if env.scale.smoke:
        return {name: tiny[name] for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    return {"unet": dict(SDXL_UNET), "vae": dict(SDXL_VAE), "text_encoder": dict(SDXL_TEXT_ENCODER),
            "text_encoder_2": dict(SDXL_TEXT_ENCODER_2)}


def write_model(env: Env) -> dict:
    """A diffusers folder: random SDXL VAE (fp32) and text encoders (fp16), the tiny tokenizers and SDXL's
    scheduler; the UNet's config only (`ensure_unet_weights` adds its 5 GB when the stage section runs).
    The smoke run writes the tiny stack's architectures the same way."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdxlpipe.models.tiny import build_tiny_component

    if env.model.exists():
        shutil.rmtree(env.model)
    cfg = configs(env)
    torch.manual_seed(0)
    for device in dict.fromkeys((env.device, "cpu")):  # random init on the GPU: seconds; the CPU if that fails
        try:
            with torch.device(device):
                AutoencoderKL.from_config(cfg["vae"]).save_pretrained(env.model / "vae")
                for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
                    cls(CLIPTextConfig(**cfg[name])).half().save_pretrained(env.model / name)
            break
        except Exception:  # noqa: BLE001
            if device == "cpu":
                raise
            traceback.print_exc()
            print(f"writing the random models on {device} failed; on the CPU instead", file=sys.stderr)
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        build_tiny_component(name).save_pretrained(env.model / name)
    (env.model / "unet").mkdir()
    (env.model / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **cfg["unet"]}))
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    (env.model / "model_index.json").write_text(json.dumps(index))
    return {}


def ensure_unet_weights(env: Env) -> None:
    """The random SDXL UNet's weights in the model folder (bf16, ~5 GB), for the train stage to load."""
    import torch
    from diffusers import UNet2DConditionModel

    folder = env.model / "unet"
    if any(folder.glob("*.safetensors")):
        return
    with torch.device(env.device):
        unet = UNet2DConditionModel.from_config(configs(env)["unet"]).to(torch.bfloat16)
    unet.save_pretrained(folder)


def caption(i: int) -> str:
    words = ["red", "quiet", "small", "ancient", "bright", "wooden", "glass", "tall", "soft", "misty"]
    things = ["house", "river", "cat", "mountain", "street", "forest", "boat", "tower", "garden", "portrait"]
    tags = ["masterpiece", "detailed", "sunset", "night", "winter", "film grain", "wide angle", "bokeh"]
    a, b, c = words[i % 10], things[i // 10 % 10], tags[i % 8]
    return f"a photo of a {a} {b} number {i}, {c}, {tags[(i // 8) % 8]}, high quality, sharp focus"


def write_images(env: Env) -> dict:
    """JPEGs at the training size (smooth colour fields plus grain: JPEG decodes at a realistic cost), a
    caption file each."""
    import numpy as np
    from PIL import Image

    folder = env.work / "images"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    s = env.scale.size
    for i in range(env.scale.images):
        field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((s, s), Image.BICUBIC)
        pixels = np.asarray(field).astype(np.int16) + rng.integers(-12, 13, (s, s, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
        (folder / f"{i:04d}.txt").write_text(caption(i))
    return {"images": env.scale.images}


def write_train_store(env: Env) -> dict:
    """SDXL-shaped cached samples (fp16 latent mean/std, prompt embeddings, pooled), one bucket, in the store
    format the encode stages write; the payloads repeat from a pool of 8 (bytes do not change read speed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from sdxlpipe.cache_format import encode_tensors, open_store
    from sdxlpipe.pipeline.keys import xxh3_hex

    cfg = configs(env)
    side, width = env.scale.size // 8, cfg["unet"]["cross_attention_dim"]
    pooled = cfg["text_encoder_2"]["projection_dim"]
    g = torch.Generator().manual_seed(0)
    latents = [encode_tensors({"mean": torch.randn(4, side, side, generator=g).half() * 4,
                               "std": torch.rand(4, side, side, generator=g).half() * 0.1},
                              {"scaling_factor": "0.13025", "shift_factor": "0.0"}) for _ in range(8)]
    texts = [encode_tensors({"prompt_embeds": torch.randn(77, width, generator=g).half(),
                             "pooled_prompt_embeds": torch.randn(pooled, generator=g).half()}) for _ in range(8)]
    store = open_store(str(env.work / "train-store"))
    rows = []
    with store.writer("vae_encode") as lw, store.writer("text_encode") as tw:
        for i in range(env.scale.samples):
            lk, tk = xxh3_hex(f"l{i}"), xxh3_hex(f"t{i}")
            lw.add(lk, "latent.safetensors", latents[i % 8])
            tw.add(tk, "text.safetensors", texts[i % 8])
            s = env.scale.size
            rows.append({"key": f"s{i}", "latent_key": lk, "latent_flip_key": None, "text_key": tk,
                         "text_variant_keys": None, "empty_text_key": None, "caption": caption(i),
                         "caption_variants": None, "repeats": 1, "is_reg": False, "width": s, "height": s,
                         "resize_w": s, "resize_h": s, "crop_top": 0, "crop_left": 0, "bucket_w": s, "bucket_h": s})
    pq.write_table(pa.Table.from_pylist(rows), env.work / "train-table.parquet")
    return {"samples": env.scale.samples}


# --- train: the stage's step against a bare diffusers + peft loop -----------------------------------

def params(env: Env, network: str, **extra):
    from sdxlpipe.stages.train import Params

    settings = {**BASE, **NETWORKS[network], **extra}
    return dataclasses.replace(Params(), **settings)


def compute_dtype(p):
    from sdxlpipe.training.precision import COMPUTE

    return COMPUTE[p.mixed_precision]


def build_unet(env: Env, p):
    """The UNet as the train stage makes it for `p`: random weights (on the device: seconds), the network
    attached, frozen weights in their storage dtype (fp8 too), trained ones in fp32 or bf16."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdxlpipe.training import networks

    torch.manual_seed(0)
    with torch.device(env.device):
        unet = UNet2DConditionModel.from_config(configs(env)["unet"])
    compute = compute_dtype(p)
    unet.to(torch.float32 if p.network == "full" and not p.full_bf16 else compute)
    unet.requires_grad_(False)
    networks.attach(unet, p)
    networks.set_precision(unet, p, compute)
    unet.train()
    return unet


def set_checkpointing(unet, p, on: bool) -> None:
    import dataclasses as dc

    from sdxlpipe.training import networks

    if on:
        networks.gradient_checkpointing(unet, dc.replace(p, gradient_checkpointing=True))
    else:
        unet.disable_gradient_checkpointing()


class Trainer:
    """The train stage's own step on a UNet built here: training.loop's setup steps (`_noise`,
    `_optimization`, `_distribute`, `_data`) and per-step ones (`_step`: the loader's batch, the loss,
    accelerate's backward, clipping, the optimizer or the fused backward; `_record`: the logged loss and
    gradient norm), batches from the stage's loader. Only the model load differs: random weights made on
    the device instead of a checkpoint read and cast on the CPU."""

    def __init__(self, env: Env, unet, p) -> None:
        import pyarrow.parquet as pq

        from sdxlpipe.training import loop, precision

        self.env, self.p = env, p
        self.ctx = hand_context(env, env.work / "loop", env.work / "train-store", "train", Clock())
        self.accelerator, self.scaler = precision.accelerate(p, env.device)
        self.table = pq.read_table(env.work / "train-table.parquet")
        self.noise = loop._noise(p, self.ctx, self.accelerator.device)
        self.model = loop.Model(unet, unet, {}, checkpointing=False)
        self.opt = loop._optimization(self.model, p, 1_000_000)
        self.distributed = False

    @property
    def unet(self):
        return self.model.bare

    def steps(self, batch_size: int) -> dict:
        """warmup + timed steps at `batch_size`; s/step, samples/s, loader wait share, the first step's
        seconds (compiling, autotuning), the last loss."""
        from sdxlpipe.training import loop, validation
        from sdxlpipe.training.feed import open_feed

        env, p = self.env, dataclasses.replace(self.p, batch_size=batch_size)
        n = env.scale.warmup + env.scale.steps
        data = loop._data(self.table, p, self.ctx, 1, self.accelerator.device)
        run = loop.Run(p, self.ctx, env.work / "loop" / "run", n, self.accelerator, self.scaler, data, self.noise,
                       self.model, self.opt)
        if not self.distributed:  # accelerate wraps the model and optimizer once
            loop._distribute(run)
            self.distributed = True
        run.logs = validation.Logs(run.run_dir / "logs", False)
        run.feed = open_feed(data.source, p, start_step=0, max_steps=n, world=1, rank=0, device=run.device)
        free(env)  # the last case's cached blocks: this one's warm-up grows the allocator's pool again
        began = first = time.perf_counter()
        with run.feed:
            for step in range(n):
                if step == env.scale.warmup:
                    sync(env)
                    first = time.perf_counter() - first
                    reset_peak(env, empty=False)
                    began, run.loader_wait = time.perf_counter(), 0.0
                loss, grad_norm = loop._step(run, step)
                loop._record(run, step + 1, loss, grad_norm, began, lambda n=1, **fields: None)
        sync(env)
        run.logs.close()
        seconds = (time.perf_counter() - began) / env.scale.steps
        return {"unit": "s/step", "value": seconds, "samples_s": batch_size / seconds,
                "loader_wait": run.loader_wait / (seconds * env.scale.steps), "first_step_s": first, "loss": loss,
                **peak(env)}


def bare_unet(env: Env, kind: str, p):
    """The same UNet the plain diffusers way: bf16 weights; a peft LoRA on the same modules (its weights fp32,
    as sdxlpipe keeps them), or every weight trained in bf16."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from sdxlpipe.training import networks

    torch.manual_seed(0)
    with torch.device(env.device):
        unet = UNet2DConditionModel.from_config(configs(env)["unet"])
    unet.to(compute_dtype(p)).requires_grad_(False)
    if kind == "lora":
        targets = sorted(networks.target_names(unet, p))
        unet.add_adapter(LoraConfig(r=p.rank, lora_alpha=p.alpha, init_lora_weights=True, target_modules=targets))
        for q in unet.parameters():
            if q.requires_grad:
                q.data = q.data.float()
    else:
        unet.requires_grad_(True)
    unet.train()
    return unet


def random_batch(env: Env, batch_size: int):
    """(latents, timesteps, prompt embeddings, added conditioning) of SDXL's shapes, on the device."""
    import torch

    cfg, device = configs(env), env.device
    side, s = env.scale.size // 8, env.scale.size
    latents = torch.randn(batch_size, 4, side, side, device=device) * 0.13025
    embeds = torch.randn(batch_size, 77, cfg["unet"]["cross_attention_dim"], device=device)
    pooled = torch.randn(batch_size, cfg["text_encoder_2"]["projection_dim"], device=device)
    time_ids = torch.tensor([[s, s, 0, 0, s, s]] * batch_size, dtype=torch.float32, device=device)
    t = torch.randint(0, 1000, (batch_size,), device=device)
    return latents, t, embeds, {"text_embeds": pooled, "time_ids": time_ids}


def bare_steps(env: Env, unet, p, batch_size: int) -> dict:
    """The plainest diffusers training loop: tensors on the GPU, noise and timesteps drawn there, MSE,
    clipping, the optimizer (AdamW, or Adafactor stepped after backward), the loss read each step."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    device = torch.device(env.device)
    compute = compute_dtype(p)
    trainable = [q for q in unet.parameters() if q.requires_grad]
    if p.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(trainable, lr=p.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    else:
        opt = torch.optim.AdamW(trainable, lr=p.learning_rate, weight_decay=p.weight_decay)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents, _, embeds, cond = random_batch(env, batch_size)
    free(env)
    began = None
    for i in range(env.scale.warmup + env.scale.steps):
        if i == env.scale.warmup:
            sync(env)
            reset_peak(env, empty=False)
            began = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch_size,), device=device)
        with torch.autocast(device.type, dtype=compute):
            pred = unet(sched.add_noise(latents, noise, t), t, embeds, added_cond_kwargs=cond).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, p.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # diffusers' examples log it every step
    sync(env)
    seconds = (time.perf_counter() - began) / env.scale.steps
    return {"unit": "s/step", "value": seconds, "samples_s": batch_size / seconds, **peak(env)}


def verdict(env: Env, row: dict, network: str) -> dict:
    if row.get("peak_reserved_gib") is None:
        return {}
    machine = json.loads((env.work / "machine.json").read_text())
    need = row["peak_reserved_gib"] + machine.get("context_gib", 0)
    bar = BARS_GIB["full" if network.startswith("full") else "lora"]
    return {"verdict": f"{bar} GB: {'met' if need <= bar else 'missed'} ({need:.1f} GiB)"}


def train_section(env: Env) -> None:
    step_estimate = 15 if not env.scale.smoke else 5
    for network in NETWORKS:
        p = params(env, network)
        holder: dict = {}

        def build(p=p, holder=holder):
            began = time.monotonic()
            holder["unet"] = build_unet(env, p)
            holder["trainer"] = Trainer(env, holder["unet"], p)
            return {"note": f"built in {time.monotonic() - began:.1f} s"}

        if run_case(env, "train", f"{network}: build", build, estimate=10)["status"] != "ok":
            holder.clear()
            continue
        for gc_on in (True, False):
            for batch in env.scale.batches:
                case = f"{network} {'gc' if gc_on else 'no-gc'} b{batch}"

                def steps(gc_on=gc_on, batch=batch, network=network, holder=holder, p=p):
                    set_checkpointing(holder["unet"], p, gc_on)
                    row = holder["trainer"].steps(batch)
                    return {**row, **verdict(env, row, network)}

                run_case(env, "train", case, steps, estimate=step_estimate)
        holder.clear()
        free(env)
        if network not in BARE:
            continue
        holder = {}

        def build_bare(p=p, network=network, holder=holder):
            holder["unet"] = bare_unet(env, BARE[network], p)
            return {}

        if run_case(env, "train", f"{network}: build", build_bare, side="bare", estimate=10)["status"] != "ok":
            continue
        for gc_on in (True, False):
            for batch in env.scale.batches:
                case = f"{network} {'gc' if gc_on else 'no-gc'} b{batch}"

                def bare(gc_on=gc_on, batch=batch, holder=holder, p=p):
                    set_checkpointing(holder["unet"], p, gc_on)
                    return bare_steps(env, holder["unet"], p, batch)

                run_case(env, "train", case, bare, side="bare", estimate=step_estimate)
        holder.clear()
        free(env)


# --- vae and text: the encode stages against bare loops --------------------------------------------

def write_config(folder: Path, env: Env, store: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    s = env.scale.size
    (folder / "sdxlpipe.toml").write_text(
        f'model = "{env.model}"\ndevice = "{env.device}"\n[store]\nurl = "{store}"\n[[sources]]\n'
        f'path = "{env.work / "images"}"\n[bucket]\nresolution = {s}\nstep = 32\nmin_side = 32\n{extra}')
    return folder / "sdxlpipe.toml"


def vae_stage(env: Env, dtype: str, workers: int) -> dict:
    """`run encode`'s VAE stage (ingest, caption and bucket first, as `run` does) on fresh store and
    workspace; images/s from its progress after the first batch (model load and autotuning left out)."""
    from sdxlpipe.config import load_config
    from sdxlpipe.pipeline.runner import run_pipeline

    folder = env.work / f"vae-{dtype}-w{workers}"
    if folder.exists():
        shutil.rmtree(folder)
    config = write_config(folder, env, folder / "store", f'[vae_encode]\ndtype = "{dtype}"\nworkers = {workers}\n'
                                                        f'batch_size = {env.scale.vae_batch}\n')
    clock, busy = Clock(), GpuBusy(env)
    reset_peak(env)
    report = run_pipeline(load_config(config), "vae_encode", reporter=clock)
    rate, start, end = steady_rate(clock.marks["vae_encode"])
    computed = report["stages"]["vae_encode"]["computed"]
    if computed != env.scale.images:
        raise RuntimeError(f"the stage computed {computed} latents of {env.scale.images}")
    return {"unit": "images/s", "value": rate, "gpu_busy": busy.mean(start, end), **peak(env),
            "note": f"{workers} decode workers, batch {env.scale.vae_batch}"}


def vae_bare(env: Env, dtype: str) -> dict:
    """diffusers' AutoencoderKL.encode over batches of tensors already on the device; latents to the CPU."""
    import torch
    from diffusers import AutoencoderKL

    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    vae = AutoencoderKL.from_pretrained(env.model / "vae", torch_dtype=torch_dtype).to(env.device)
    s = env.scale.size
    pixels = torch.rand(env.scale.images, 3, s, s, device=env.device, dtype=torch_dtype) * 2 - 1
    reset_peak(env)
    began, b = None, env.scale.vae_batch
    with torch.no_grad():
        for i in range(0, env.scale.images, b):
            if i == b:  # the first batch warms up (cuDNN autotuning)
                sync(env)
                began = time.perf_counter()
            dist = vae.encode(pixels[i:i + b]).latent_dist
            dist.mean.float().cpu(), dist.std.float().cpu()
    sync(env)
    return {"unit": "images/s", "value": (env.scale.images - b) / (time.perf_counter() - began), **peak(env)}


def vae_section(env: Env) -> None:
    cases = [("float16", 2), ("bfloat16", 2)] + ([("float16", 8)] if not env.scale.smoke else [])
    for dtype, workers in cases:
        run_case(env, "vae", f"vae encode {dtype} w{workers}", lambda d=dtype, w=workers: vae_stage(env, d, w))
        if workers == 2:
            run_case(env, "vae", f"vae encode {dtype} w{workers}", lambda d=dtype: vae_bare(env, d), side="bare")


def hand_context(env: Env, folder: Path, store: Path, stage: str, clock):
    """A Context as the runner builds it, for a stage called on its own table."""
    from sdxlpipe.cache_format import open_store
    from sdxlpipe.config import load_config
    from sdxlpipe.pipeline.context import Context, Models
    from sdxlpipe.pipeline.hashing import ContentMemo
    from sdxlpipe.pipeline.workspace import Workspace

    config = load_config(write_config(folder, env, store))
    workspace = Workspace(config.workspace)
    memo = ContentMemo(workspace.memo_path)
    return Context(config=config, store=open_store(config.store_url), workspace=workspace, memo=memo,
                   reporter=clock, models=Models(config, memo), stage=stage)


def text_stage(env: Env) -> dict:
    import pyarrow as pa

    from sdxlpipe.stages import text_encode

    folder = env.work / "text"
    if folder.exists():
        shutil.rmtree(folder)
    clock = Clock()
    ctx = hand_context(env, folder, folder / "store", "text_encode", clock)
    reset_peak(env)
    text_encode.run(pa.table({"caption": [caption(i) for i in range(env.scale.captions)]}), text_encode.Params(), ctx)
    rate, _, _ = steady_rate(clock.marks["text_encode"])
    return {"unit": "captions/s", "value": rate, **peak(env), "note": "fp32 (the stage's precision), batch 32"}


def text_bare(env: Env, dtype: str) -> dict:
    """Tokenize, run both CLIPs (penultimate layers, pooled projection) in batches of 32, embeddings to the CPU."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    encoders = [cls.from_pretrained(env.model / name, dtype=torch_dtype).to(env.device).eval()
                for cls, name in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))]
    tokenizers = [CLIPTokenizer.from_pretrained(env.model / name) for name in ("tokenizer", "tokenizer_2")]
    texts = [caption(i) for i in range(env.scale.captions)]
    reset_peak(env)
    began = None
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            if i == 32:
                sync(env)
                began = time.perf_counter()
            hidden = []
            for tok, enc in zip(tokenizers, encoders):
                ids = tok(texts[i:i + 32], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
                out = enc(ids.input_ids.to(env.device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
            torch.cat(hidden, -1).half().cpu(), out[0].half().cpu()
    sync(env)
    return {"unit": "captions/s", "value": (len(texts) - 32) / (time.perf_counter() - began), **peak(env),
            "note": f"{dtype}, batch 32"}


def text_section(env: Env) -> None:
    run_case(env, "text", "text encode", lambda: text_stage(env))
    run_case(env, "text", "text encode", lambda: text_bare(env, "float32"), side="bare")
    run_case(env, "text", "text encode fp16", lambda: text_bare(env, "float16"), side="bare")


# --- stage: the train stage itself -------------------------------------------------------------------

def train_stage(env: Env) -> dict:
    """`stages.train.run` on the training store, the UNet loaded from the model folder; s/step from the
    intervals between its progress marks after the warm-up (loading, evaluation and checkpoints left out)."""
    import pyarrow.parquet as pq

    from sdxlpipe.stages import train

    ensure_unet_weights(env)
    folder = env.work / "stage"
    if folder.exists():
        shutil.rmtree(folder)
    clock = Clock()
    ctx = hand_context(env, folder, env.work / "train-store", "train", clock)
    batch = max(env.scale.batches)
    n = env.scale.warmup + env.scale.steps
    p = params(env, "lora16-bf16", batch_size=batch, max_steps=n, save_every_steps=n)
    reset_peak(env)
    train.run(pq.read_table(env.work / "train-table.parquet"), p, ctx)
    marks = clock.marks["train"]
    seconds = (marks[-1][0] - marks[env.scale.warmup - 1][0]) / env.scale.steps
    done = json.loads((Path(ctx.outputs["train"]["dir"]) / "done.json").read_text())
    return {"unit": "s/step", "value": seconds, "samples_s": batch / seconds, **peak(env),
            "note": f"b{batch}, gradient checkpointing {'on' if done['gradient_checkpointing'] else 'off'} "
                    f"(the stage's default), {done.get('torch_threads', '?')} torch threads; "
                    f"loss {done['eval_loss_before']:.4f} -> {done['eval_loss_after']:.4f}"}


# --- options: channels-last, attention kernels, 8-bit AdamW -----------------------------------------

def attention_kernels(env: Env, unet, p, batch_size: int) -> str:
    """The attention ops one forward and backward pass dispatches to (flash, efficient, cudnn or math), from
    the profiler's names of torch's SDPA implementations."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    noisy, t, embeds, cond = random_batch(env, batch_size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.cuda else [])
    with profile(activities=activities) as prof:
        with torch.autocast(torch.device(env.device).type, dtype=compute_dtype(p)):
            out = unet(noisy, t, embeds, added_cond_kwargs=cond).sample
        out.float().mean().backward()
        sync(env)
    unet.zero_grad(set_to_none=True)
    names = sorted({e.key for e in prof.key_averages()
                    if e.key.startswith(("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention",
                                         "aten::_cudnn_attention"))})
    return ", ".join(names) or "no SDPA op seen"


def gc_trainer(env: Env, p, holder: dict) -> "Trainer":
    """A UNet for `p` with gradient checkpointing on and its Trainer, kept in `holder` for the cases after."""
    holder["unet"] = build_unet(env, p)
    set_checkpointing(holder["unet"], p, True)
    holder["trainer"] = Trainer(env, holder["unet"], p)
    return holder["trainer"]


def options_section(env: Env) -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch = max(env.scale.batches)
    p = params(env, "lora16-bf16", gradient_checkpointing=True)
    holder: dict = {}

    def build():
        gc_trainer(env, p, holder)
        return {}

    if run_case(env, "options", "lora16-bf16 gc: build", build, estimate=10)["status"] != "ok":
        return
    base = run_case(env, "options", f"lora16-bf16 gc b{batch} (baseline)", lambda: {
        **holder["trainer"].steps(batch), "note": "SDPA: " + attention_kernels(env, holder["unet"], p, batch)})

    def versus(row: dict) -> dict:
        if base.get("status") == "ok":
            row["note"] = (row.get("note", "") + f" {base['value'] / row['value']:.2f}x the baseline's speed").strip()
        return row

    def channels_last():
        from sdxlpipe.training.loop import speed_ups

        speed_ups(holder["unet"], dataclasses.replace(p, channels_last=True))  # train.channels_last
        try:
            return versus(holder["trainer"].steps(batch))
        finally:
            holder["unet"].to(memory_format=torch.contiguous_format)

    run_case(env, "options", f"lora16-bf16 gc b{batch} channels-last", channels_last)

    def cpu_fp32():
        from sdxlpipe.training import batches, loop

        # The loop's path before decision 78: the batch made fp32 on the CPU, then that copy sent to the GPU.
        kept, loop.to_device = loop.to_device, lambda batch, device: batches.as_float(batch)
        try:
            return versus(holder["trainer"].steps(batch))
        finally:
            loop.to_device = kept

    run_case(env, "options", f"lora16-bf16 gc b{batch} batch fp32 on the CPU", cpu_fp32)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        def forced(backend=backend):
            with sdpa_kernel(backend):
                return versus(holder["trainer"].steps(batch))

        run_case(env, "options", f"lora16-bf16 gc b{batch} sdpa {name}", forced)

    def adamw8bit():
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise Skip("bitsandbytes is not installed (optional: pip install bitsandbytes)")
        q = dataclasses.replace(p, optimizer="adamw8bit")
        return versus(Trainer(env, holder["unet"], q).steps(batch))

    run_case(env, "options", f"lora16-bf16 gc b{batch} adamw8bit", adamw8bit)
    holder.clear()


def compile_section(env: Env) -> None:
    batch = max(env.scale.batches)
    p = params(env, "lora16-bf16", gradient_checkpointing=True)
    holder: dict = {}

    def eager():
        return gc_trainer(env, p, holder).steps(batch)

    base = run_case(env, "compile", f"lora16-bf16 gc b{batch} eager", eager, estimate=20)
    if base["status"] != "ok":
        return

    def compiled():
        if env.scale.smoke:
            raise Skip("the smoke run does not compile: dynamo alone traces the tiny UNet for minutes on a CPU")
        from sdxlpipe.training.loop import speed_ups

        speed_ups(holder["unet"], dataclasses.replace(p, compile=True))  # train.compile: the UNet compiled in place
        row = holder["trainer"].steps(batch)
        row["note"] = (f"first step (compiling) {row['first_step_s']:.1f} s; "
                       f"{base['value'] / row['value']:.2f}x eager's speed")
        return row

    run_case(env, "compile", f"lora16-bf16 gc b{batch} torch.compile", compiled, estimate=60 if env.scale.smoke else 150)
    holder.clear()


SECTION_FUNCTIONS = {"setup": setup, "train": train_section, "vae": vae_section, "text": text_section,
                     "stage": train_stage, "options": options_section, "compile": compile_section}


def child(sections: list[str], env: Env) -> None:
    """Run sections in this process (the parent starts one process per section)."""
    import logging

    import torch

    from sdxlpipe.training import threads

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # The train stage's thread policy for the whole bench process (its loader runs 2 reader threads).
    want = threads.apply(BASE["loader_workers"], torch.get_num_threads())
    if want is not None:
        torch.set_num_threads(want)
    for name in sections:
        if name == "stage":
            run_case(env, "stage", "lora16-bf16 train stage", lambda: train_stage(env), estimate=60 if not env.scale.smoke else 10)
        else:
            SECTION_FUNCTIONS[name](env)


# --- the parent: sections in processes, the table, the JSON -----------------------------------------

def run_sections(args, env: Env, sections: list[list[str]]) -> None:
    for group in sections:
        left = env.deadline - time.time()
        if left < SECTION_MIN_S:
            for name in group:
                emit(env, {"section": name, "case": "(section)", "side": "sdxlpipe", "status": "skipped",
                           "error": f"not started: {max(left, 0):.0f} s of the time budget left"})
            continue
        cmd = [sys.executable, __file__, "--child", ",".join(group), "--dir", str(env.work),
               "--deadline", str(env.deadline), *(["--smoke"] if args.smoke else [])]
        env_vars = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "HF_HUB_OFFLINE": "1"}
        tail: list[str] = []
        proc = subprocess.Popen(cmd, env=env_vars, stderr=subprocess.PIPE, text=True, start_new_session=True)

        def forward():
            for line in proc.stderr:
                sys.stderr.write(line)
                tail.append(line)
                del tail[:-40]

        reader = threading.Thread(target=forward, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=max(left, 1) + 30)  # a case already started may finish a little late
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = "timeout"
        reader.join(timeout=5)
        if code != 0:
            why = "stopped: past the time budget" if code == "timeout" else f"the process exited with {code}"
            emit(env, {"section": ",".join(group), "case": "(section process)", "side": "sdxlpipe",
                       "status": "failed", "error": why + ": " + "".join(tail[-8:])[-600:]})


def table(rows: list[dict], machine: dict) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    bare = {(r["case"], r["section"]): r for r in rows if r.get("side") == "bare" and r.get("status") == "ok"}
    out = []
    if machine:
        gpu = machine.get("gpu") or "no GPU"
        out.append(f"machine: {gpu}, driver {machine.get('driver') or '-'}, torch {machine.get('torch')}, CUDA "
                   f"{machine.get('cuda') or '-'}, cuDNN {machine.get('cudnn') or '-'}, CUDA context "
                   f"{num(machine.get('context_gib'), '.2f')} GiB, {machine.get('cores')} usable cores, load average "
                   f"{machine.get('load_average', ['-'])[0]}; {json.dumps(machine.get('libraries', {}))}")
    out += ["| section | case | side | status | value | vs bare | samples/s | peak GiB alloc / reserved | loader wait | "
            "GPU busy | verdict | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        value = f"{r['value']:.3f} {r['unit']}" if r.get("value") is not None else "-"
        other = bare.get((r["case"], r["section"])) if r.get("side") == "sdxlpipe" else None
        versus = "-"
        if other is not None and r.get("value"):
            speed = other["value"] / r["value"] if r["unit"] == "s/step" else r["value"] / other["value"]
            versus = f"{speed:.2f}x"
        mem = "-" if r.get("peak_alloc_gib") is None else f"{r['peak_alloc_gib']:.2f} / {r['peak_reserved_gib']:.2f}"
        share = lambda k: "-" if r.get(k) is None else f"{100 * r[k]:.0f}%"  # noqa: E731
        note = r.get("note", "") if r.get("status") == "ok" else r.get("error", "")
        out.append(f"| {r['section']} | {r['case']} | {r.get('side', '')} | {r.get('status')} | {value} | {versus} | "
                   f"{num(r.get('samples_s'), '.2f')} | {mem} | {share('loader_wait')} | {share('gpu_busy')} | "
                   f"{r.get('verdict', '-')} | {note.replace('|', '/').replace(chr(10), ' ')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu.json", help="the JSON file of every row and the machine")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 steps a case: checks the bench runs")
    ap.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS[1:])} (setup always runs)")
    ap.add_argument("--dir", default="", help="work folder (model, images, stores); default: a temporary one, removed")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole bench")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    scale = SMOKE if args.smoke else FULL
    if args.child:
        import torch

        device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
        child(args.child.split(","), Env(Path(args.dir), scale, device, args.deadline))
        return
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                             "--smoke runs the CPU check")
    began = time.time()
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="sdxlpipe-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "rows.jsonl").unlink(missing_ok=True)
    env = Env(work, scale, "cpu" if args.smoke else "cuda", began + args.budget)
    wanted = [s for s in SECTIONS[1:] if not args.only or s in args.only.split(",")]
    # One process per section on a GPU (a crash or CUDA error costs that section only); the smoke run uses
    # one for all (imports cost more than its cases on a CPU).
    groups = [["setup"], *([s] for s in wanted)] if not args.smoke else [["setup", *wanted]]
    try:
        run_sections(args, env, groups)
        rows = [json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines()]
        machine_file = work / "machine.json"
        machine = json.loads(machine_file.read_text()) if machine_file.exists() else {}
        machine["load_average_end"] = os.getloadavg()
        result = {"machine": machine, "smoke": args.smoke, "budget_s": args.budget,
                  "seconds": time.time() - began, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(table(rows, machine))
        print(f"\n{len(rows)} rows in {result['seconds']:.0f} s; "
              f"{sum(r['status'] == 'failed' for r in rows)} failed, "
              f"{sum(r['status'] == 'skipped' for r in rows)} skipped; JSON in {args.out}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
