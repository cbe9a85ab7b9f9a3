"""Train: a network (LoRA, LoCon, LoHa, LoKr, IA3, OFT) or the whole UNet from the cached tensors.

The whole run is one item: its key covers the params that shape the weights,
the UNet and scheduler weights, the seed and every sample input in order
(latent and flipped latent, caption variants and the empty caption, repeats,
regularisation flag).
Same key and finished: skipped. Same key and unfinished: resumed from its
last checkpoint. The loop itself lives in `sdxlpipe.training.loop`.

Items held out for the validation loss (`validation_split`, or a
`kind = "validation"` source; `training.holdout`) are not trained on: the key
covers the rows that train, so a held-out set changes the key only by the
items it takes from training, and the stage passes on only the rows it
trained on (export's metadata counts those).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa

from sdxlpipe.cache_format.shards import hash_file
from sdxlpipe.errors import UserError
from sdxlpipe.pipeline.keys import item_key, xxh3_hex

VERSION = 3  # 3: kaiming-uniform LoRA init (peft's default), kohya's default targets, max_steps out of the key
# The model parts this stage's items depend on: `status` names them when their weights change.
MODELS = ("unet", "scheduler")
# Its one item is the training run.
ITEMS = "runs"
# It leaves the run in ctx.outputs["train"], which export writes out.
TRAINS = True
# It trains on every row at once: `--shards` cannot split it.
NEEDS_EVERY_ROW = True

# Params that do not change the trained weights stay out of the key: save
# cadence, validation and logging, gradient checkpointing (same math, less
# memory), the loader's threads, torch.compile and channels-last (same math,
# other kernels: rounding at most, as the thread count).
NOT_IN_KEY = (
    "save_every_steps", "save_every_epochs", "max_checkpoints", "gradient_checkpointing", "tensorboard",
    "validation_prompts", "validation_negative_prompts", "validation_every_steps", "validation_every_epochs",
    "validation_steps", "validation_guidance", "validation_size", "validation_seed",
    # Which items train enters the key through the samples (the held-out ones are left out of them).
    "validation_split",
    "loader_workers", "loader_prefetch", "shard_cache_dir", "shard_cache_gb", "compile", "channels_last",
)
# Sample columns that shape training; a table from an older run may lack the newer ones.
SAMPLE_COLUMNS = ("caption", "caption_variants", "latent_key", "latent_flip_key", "text_key", "text_variant_keys", "empty_text_key", "repeats", "is_reg")
NUM_BLOCKS = 23  # kohya's SDXL blocks (see training/networks.py)


@dataclass(frozen=True)
class Params:
    # --- what is trained ---
    # lora (with conv_rank > 0: LoCon), loha, lokr, ia3, oft (peft), or full: every UNet weight.
    network: Literal["lora", "loha", "lokr", "ia3", "oft", "full"] = "lora"
    # Network rank (OFT: block size): 4-32 covers most SDXL character/style LoRAs; higher learns more and overfits sooner.
    rank: int = 16
    # The update is scaled by alpha/rank; alpha = rank means scale 1. kohya's network_alpha defaults to 1 (scale
    # 1/rank), and its recipes' learning rates assume their alpha: copy alpha with the rate.
    alpha: float = 16.0
    # LoRA dropout (LoHa/LoKr: rank dropout); 0.1 can help small datasets. It is peft's lora_dropout, on the layer's
    # input; kohya's network_dropout drops the down projection's output instead, so the same value acts differently.
    dropout: float = 0.0
    # Linear layers to adapt: a preset, or name suffixes such as ["to_q", "to_k"]. "kohya" (as kohya's SDXL
    # LoRA): every Linear inside the UNet's transformer blocks (proj_in/out, attn1, attn2, ff) and, when the
    # text encoders train, their attention and MLP; "attention": only to_q/k/v/out.0 (q/k/v/out_proj in CLIP).
    target_modules: tuple[str, ...] = ("kohya",)
    # LoCon: rank for the resnet / up/downsampler convolutions (kohya's conv_dim); 0 leaves them out.
    conv_rank: int = 0
    # Alpha for those convolutions (kohya's conv_alpha).
    conv_alpha: float = 1.0
    # Per-block ranks, 23 values (kohya's SDXL blocks); 0 leaves a block out; empty: `rank` everywhere.
    block_dims: tuple[int, ...] = ()
    # Per-block alphas, 23 values; empty: `alpha` everywhere.
    block_alphas: tuple[float, ...] = ()
    # Per-block ranks of the LoCon convolutions, 23 values (kohya's conv_block_dims); empty: conv_rank everywhere.
    conv_block_dims: tuple[int, ...] = ()
    # Per-block alphas of those convolutions (kohya's conv_block_alphas); empty: conv_alpha everywhere.
    conv_block_alphas: tuple[float, ...] = ()
    # DoRA (peft use_dora): LoRA with a learned per-output magnitude; ~2x slower steps, often better at low rank.
    use_dora: bool = False
    # How LoRA's down projection (A) starts (B starts at zero either way). "kohya": kaiming-uniform, as kohya's
    # networks/lora.py and peft's default; "gaussian": normal with std 1/rank, as diffusers' train_*_lora scripts
    # (peft init_lora_weights="gaussian"). Set "gaussian" to reuse a learning rate tuned with diffusers' scripts.
    lora_init: Literal["kohya", "gaussian"] = "kohya"
    # LoKr's Kronecker factor (LyCORIS `factor`): -1 picks the most square split; 4-16 give smaller files.
    lokr_factor: int = -1
    # Also train both text encoders with a LoRA (rank, alpha, dropout as above). Captions are then
    # encoded in the loop from the table's caption text: the cached text embeddings are not used.
    train_text_encoder: bool = False
    # Text-encoder learning rate; 0 takes learning_rate (kohya's advice: about half the UNet's).
    text_encoder_lr: float = 0.0
    # Start from this LoRA file's weights (kohya's network_weights): any plain LoRA/LoCon file `lora info`
    # reads (kohya, diffusers, peft; its text-encoder part too with train_text_encoder). Its modules, ranks and
    # alphas must be this run's (rank, alpha, conv_rank, target_modules). "": a fresh init.
    network_weights: str = field(default="", metadata={"path": True})
    # --- loss and noise ---
    # What the UNet predicts; "" takes the model's scheduler config (SDXL base: epsilon).
    prediction_type: Literal["", "epsilon", "v_prediction"] = ""
    # l2 is the standard; huber / smooth_l1 resist outliers (kohya's scheduled pseudo-Huber).
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = "l2"
    # How Huber's c changes with the timestep: constant, exponential or snr (kohya's default).
    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"
    # Huber c; 0.1 is kohya's default.
    huber_c: float = 0.1
    # Min-SNR weighting gamma; 5 is the paper's value; 0 turns it off.
    min_snr_gamma: float = 0.0
    # Weight the loss by 1/sqrt(SNR), for v-prediction 1/(SNR+1) (kohya's debiased estimation).
    debiased_estimation: bool = False
    # Rescale the betas to zero terminal SNR (Lin et al. 2023; diffusers' rescale_betas_zero_snr): the model learns
    # pure noise -> image, for truly dark/bright images. Needs v-prediction (epsilon cannot be learned at SNR 0).
    zero_terminal_snr: bool = False
    # v-prediction: weight the loss by SNR/(SNR+1) so each timestep counts as in epsilon training (kohya's option).
    scale_v_pred_loss_like_noise_pred: bool = False
    # Noise offset; 0.0357 is the usual SDXL value (darker darks, brighter brights); 0 is off.
    noise_offset: float = 0.0
    # Draw the offset's strength uniformly in [0, noise_offset] per sample.
    noise_offset_random_strength: bool = False
    # Adds this times |latent channel mean| to the offset (kohya's adaptive_noise_scale); 0 is off.
    adaptive_noise_scale: float = 0.0
    # Multires (pyramid) noise iterations; 6-10 is typical; 0 is off.
    multires_noise_iterations: int = 0
    # How much each coarser level of multires noise counts; 0.3 is kohya's advice.
    multires_noise_discount: float = 0.3
    # Input perturbation gamma; 0.1 is the paper's value; 0 is off.
    input_perturbation: float = 0.0
    # Timesteps are drawn from [min_timestep, max_timestep); SDXL has 1000.
    min_timestep: int = 0
    max_timestep: int = 1000
    # Weight the loss by the sample's mask (cached beside the latent), normalised by the mask's area.
    masked_loss: bool = False
    # Loss weight of regularisation (prior-preservation) samples; 1 counts them like the others.
    prior_loss_weight: float = 1.0
    # --- data ---
    # Probability of training a sample on the empty caption; 0.05-0.1 helps classifier-free guidance.
    caption_dropout: float = 0.0
    # Samples per batch and process, all from one bucket (kohya's train_batch_size, 1 there by default); 4 is a
    # common SDXL LoRA batch; lower it first when memory runs out.
    batch_size: int = 4
    # Seeds the network init, the batch order and every random draw.
    seed: int = 0
    # The batch order of an epoch (docs/decisions.md 79). "global": each bucket shuffled over the whole epoch,
    # the best mixing, but each batch reads from anywhere in the store, so a run reading a remote store
    # fetches most of its shards before an epoch is far along. "shard_blocks": the epoch walks the shards its
    # latents are in, a block of about shuffle_block_gb at a time (blocks in a seeded order per epoch, samples
    # shuffled within a block, as MosaicML streaming's py1b), so a batch needs a few shards (text embeddings are
    # then read by range, every epoch); set it when the store is remote and larger than the shard cache
    # (shard_cache_gb). Same samples per epoch, another order.
    shuffle: Literal["global", "shard_blocks"] = "global"
    # shard_blocks: GiB of latent shards per block. 4 is ~16k SDXL samples (a latent ~256 KiB), enough to mix a
    # batch from many images, and the shard cache (shard_cache_gb, 64) holds this block and the next one being
    # fetched many times over. Lower it for a faster first step on a slow link; raise it towards the
    # dataset's latents for more mixing (at or above them, every batch again reads from anywhere).
    shuffle_block_gb: float = 4.0
    # Reader threads in the training process that read batches from the store while the model trains
    # (threads, not processes: reads and copies release the GIL, and a batch never crosses a process
    # boundary); 2 overlap one batch's file reads with another's header parsing and keep a GPU fed
    # from a local disk; 0 reads each batch in the training thread when it is due.
    loader_workers: int = 2
    # Batches each reader thread reads ahead; memory is about (workers x this) batches.
    loader_prefetch: int = 2
    # A store behind a URL (s3://, file://, ...) is read through whole shards copied to this local
    # directory, shared by every run on the machine; "": $XDG_CACHE_HOME/sdxlpipe/shards (~/.cache/...).
    shard_cache_dir: str = ""
    # The shard cache's size limit in GiB (least recently used shards go first): 64 holds ~110k SDXL
    # samples (latent + text ~566 KiB each); below the dataset, shards are fetched again each epoch.
    shard_cache_gb: float = 64.0
    # --- optimisation ---
    # adamw; adamw8bit (bitsandbytes, CUDA); adafactor; prodigy (prodigyopt; set learning_rate = 1.0).
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy"] = "adamw"
    # 1e-4 is the usual SDXL LoRA rate; full fine-tunes use ~1e-5.
    learning_rate: float = 1e-4
    # Decoupled weight decay (torch's AdamW default).
    weight_decay: float = 1e-2
    # Per-block learning rates, 23 values (kohya's block_lr); 0 freezes a block; empty: learning_rate.
    block_lrs: tuple[float, ...] = ()
    # LoRA+: the B matrices learn this many times faster; 16 is the paper's value; 0 is off.
    lora_plus_ratio: float = 0.0
    # LoRA+ ratio of the text encoders' B matrices (kohya's loraplus_text_encoder_lr_ratio); 0 takes lora_plus_ratio.
    text_encoder_lora_plus_ratio: float = 0.0
    # A diffusers schedule: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial.
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = "constant"
    # Warmup: below 1 a fraction of the run, else a number of steps.
    lr_warmup: float = 0.0
    # Cycles of cosine_with_restarts.
    lr_cycles: int = 1
    # Micro-batches per optimizer step and process: a larger effective batch without more memory. A run
    # continued on another process count accumulates what keeps processes x this (docs/decisions.md 71).
    gradient_accumulation_steps: int = 1
    # Clip the gradient norm to this; 1.0 is the common default; 0 clips nothing.
    max_grad_norm: float = 1.0
    # Recompute activations in the backward pass: much less memory, ~30% slower. Unset: on when the UNet is
    # SDXL-sized (over 1e9 parameters; without it a 1024 px SDXL step needs far more than a 24 GB card), off for
    # small models such as the tiny one.
    gradient_checkpointing: bool | None = None
    # torch.compile the UNet: the first steps compile (minutes for SDXL, again for validation images' shapes),
    # later ones may run faster. Off until bench/gpu.py has measured it on a GPU (docs/decisions.md 65).
    compile: bool = False
    # Keep the UNet's weights channels-last (NHWC), the layout cuDNN's convolutions prefer on recent GPUs.
    # Off until bench/gpu.py has measured it on a GPU (decision 65).
    channels_last: bool = False
    # bf16 on recent GPUs and CPUs; fp16 (with a dynamic loss scaler) on GPUs without bf16 (before Ampere);
    # no = fp32. "no" is the default because it is exact on any device; on a GPU set bf16 (kohya users: their
    # mixed_precision = "bf16" / "fp16" is this setting).
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # How the frozen weights (the UNet under a network, text encoders that do not train) are stored. auto: the
    # mixed_precision dtype (bf16/fp16; fp32 with "no"), half the memory of fp32 as kohya and diffusers do;
    # fp8: float8 storage upcast per layer to the mixed_precision dtype (kohya's fp8_base; needs bf16 or fp16).
    base_dtype: Literal["auto", "fp32", "fp8"] = "auto"
    # Keep the trained weights, gradients and optimizer state in bf16 too (kohya's full_bf16; needs
    # mixed_precision = "bf16"): the way a full fine-tune fits 24 GB; fp32 otherwise, which is more exact.
    full_bf16: bool = False
    # Keep the trained weights and gradients in fp16 (kohya's full_fp16; needs mixed_precision = "fp16"; the loss
    # scaler skips steps whose gradients overflow). For GPUs without bf16; optimizer adafactor or adamw8bit, whose
    # state stays fp32 (torch's AdamW state in fp16 underflows: its 1e-8 epsilon is 0 in fp16, so steps go NaN).
    full_fp16: bool = False
    # Adafactor only: step each weight as soon as its gradient is ready and free the gradient (kohya's
    # fused_backward_pass), so a full fine-tune never holds all gradients at once. Clipping is then per tensor.
    fused_backward: bool = False
    # EMA of the trained weights with this decay (0.999 for long runs); the EMA weights are the result. 0 is off.
    ema_decay: float = 0.0
    # Optimizer steps to take; ignored when max_epochs is set. Raising it on a finished run continues that run.
    max_steps: int = 500
    # Train this many passes over the data instead (0: use max_steps).
    max_epochs: int = 0
    # Steps a decaying LR schedule (linear, cosine...) and a fractional warmup span; 0: the run's length (then
    # raising max_steps starts a new run). Set it to make such a run extendable; past it the LR stays at its end.
    lr_schedule_steps: int = 0
    # --- checkpoints, validation, logs (not in the key) ---
    # Checkpoint this often (and at the end) so a killed run resumes; 0 is off.
    save_every_steps: int = 100
    # Also checkpoint at the end of every N-th epoch; 0 is off.
    save_every_epochs: int = 0
    # Older checkpoints are deleted beyond this many.
    max_checkpoints: int = 2
    # Prompts rendered at each validation; none: no validation.
    validation_prompts: tuple[str, ...] = ()
    # Negative prompt(s): one for all prompts, or one per prompt.
    validation_negative_prompts: tuple[str, ...] = ()
    # Validate every N steps / at the end of every N-th epoch; 0 is off.
    validation_every_steps: int = 0
    validation_every_epochs: int = 0
    # Sampler steps and guidance of validation images (SDXL: 25-30 steps, guidance 5-7).
    validation_steps: int = 20
    validation_guidance: float = 5.0
    # Square side of validation images; 0: the most common training bucket.
    validation_size: int = 0
    # Prompt i is drawn from validation_seed + i, the same at every validation; it also seeds the validation
    # loss's fixed noise, so runs with different `seed`s are compared on the same noise.
    validation_seed: int = 0
    # Hold this fraction of the items out of training and measure the validation loss on them at each
    # validation (validation_every_steps / _epochs, and the last step); the lowest one's step is named at
    # the end. Items are picked by their sample key (subset + path), so the set is stable as the dataset
    # grows. 0.05-0.1 of a few hundred images is plenty; a `kind = "validation"` source holds out its own.
    validation_split: float = 0.0
    # Also log loss, LR, grad norm and validation images to TensorBoard (needs `pip install tensorboard`).
    tensorboard: bool = False


def check(p: Params) -> list[tuple[str, str]]:
    problems = []
    for name in ("rank", "batch_size", "max_checkpoints", "gradient_accumulation_steps", "lr_cycles",
                 "validation_steps"):
        if getattr(p, name) < 1:
            problems.append((f"train.{name}", "must be >= 1"))
    if p.loader_prefetch < 1:
        problems.append(("train.loader_prefetch", "must be >= 1"))
    if p.shuffle_block_gb <= 0:
        problems.append(("train.shuffle_block_gb", "must be > 0: the GiB of latent shards a shard_blocks block holds"))
    if p.shard_cache_gb <= 0:
        problems.append(("train.shard_cache_gb", "must be > 0: the local shard cache's size limit in GiB"))
    for name in ("loader_workers", "max_steps", "max_epochs", "save_every_steps", "save_every_epochs", "conv_rank",
                 "multires_noise_iterations", "validation_every_steps", "validation_every_epochs", "validation_size"):
        if getattr(p, name) < 0:
            problems.append((f"train.{name}", "must be >= 0"))
    if p.max_steps < 1 and p.max_epochs < 1:
        problems.append(("train.max_steps", "set max_steps or max_epochs to at least 1"))
    if p.learning_rate <= 0:
        problems.append(("train.learning_rate", "must be > 0"))
    for name in ("alpha", "conv_alpha", "huber_c"):
        if getattr(p, name) <= 0:
            problems.append((f"train.{name}", "must be > 0"))
    for name in ("dropout", "caption_dropout"):
        if not 0 <= getattr(p, name) < 1:
            problems.append((f"train.{name}", "must be in [0, 1)"))
    for name in ("text_encoder_lr", "min_snr_gamma", "noise_offset", "adaptive_noise_scale", "input_perturbation", "weight_decay",
                 "max_grad_norm", "lora_plus_ratio", "lr_warmup", "prior_loss_weight"):
        if getattr(p, name) < 0:
            problems.append((f"train.{name}", "must be >= 0"))
    if not 0 <= p.ema_decay < 1:
        problems.append(("train.ema_decay", "must be in [0, 1): 0.999 is typical, 0 turns EMA off"))
    if not 0 <= p.min_timestep < p.max_timestep <= 1000:
        problems.append(("train.min_timestep", "need 0 <= min_timestep < max_timestep <= 1000"))
    if p.huber_schedule == "exponential" and p.huber_c >= 1:
        problems.append(("train.huber_c", "the exponential schedule needs huber_c < 1"))
    for name in ("block_dims", "block_alphas", "block_lrs"):
        if getattr(p, name) and len(getattr(p, name)) != NUM_BLOCKS:
            problems.append((f"train.{name}", f"needs {NUM_BLOCKS} values (kohya's SDXL blocks), got {len(getattr(p, name))}"))
    if p.block_dims and p.network not in ("lora", "loha", "lokr"):
        problems.append(("train.block_dims", "only lora, loha and lokr have ranks per block"))
    if p.conv_rank and p.network not in ("lora", "loha", "lokr"):
        problems.append(("train.conv_rank", "only lora (LoCon), loha and lokr adapt convolutions here"))
    if p.lora_plus_ratio and p.network != "lora":
        problems.append(("train.lora_plus_ratio", "LoRA+ applies to network = \"lora\" only"))
    if p.lr_warmup >= 1 and p.lr_warmup != int(p.lr_warmup):
        problems.append(("train.lr_warmup", "a number of steps must be whole; a fraction must be below 1"))
    for name in ("conv_block_dims", "conv_block_alphas"):
        if getattr(p, name) and len(getattr(p, name)) != NUM_BLOCKS:
            problems.append((f"train.{name}", f"needs {NUM_BLOCKS} values (kohya's SDXL blocks), got {len(getattr(p, name))}"))
    if p.conv_block_dims and p.network not in ("lora", "loha", "lokr"):
        problems.append(("train.conv_block_dims", "only lora (LoCon), loha and lokr adapt convolutions here"))
    if p.use_dora and p.network != "lora":
        problems.append(("train.use_dora", "DoRA applies to network = \"lora\" only"))
    if p.lora_init != "kohya" and p.network != "lora":
        problems.append(("train.lora_init", "chooses the init of network = \"lora\" only"))
    if p.lokr_factor != -1 and (p.lokr_factor < 1 or p.network != "lokr"):
        problems.append(("train.lokr_factor", "a positive factor, for network = \"lokr\" only (-1: the most square split)"))
    if p.text_encoder_lora_plus_ratio < 0:
        problems.append(("train.text_encoder_lora_plus_ratio", "must be >= 0"))
    if p.zero_terminal_snr and p.prediction_type == "epsilon":
        problems.append(("train.zero_terminal_snr", "needs prediction_type = \"v_prediction\" (epsilon is not learnable at SNR 0)"))
    if p.scale_v_pred_loss_like_noise_pred and p.prediction_type == "epsilon":
        problems.append(("train.scale_v_pred_loss_like_noise_pred", "applies to prediction_type = \"v_prediction\" only"))
    if p.base_dtype == "fp8" and p.mixed_precision == "no":
        problems.append(("train.base_dtype", "fp8 weights are computed in the mixed precision: set mixed_precision = \"bf16\""))
    if p.base_dtype == "fp8" and p.network == "full":
        problems.append(("train.base_dtype", "a full fine-tune trains every weight, so none is a frozen fp8 base"))
    if p.base_dtype == "fp8" and p.use_dora:
        problems.append(("train.use_dora", "DoRA reads the frozen weights directly, which fp8 storage does not support: use base_dtype = \"auto\""))
    if p.full_bf16 and p.mixed_precision != "bf16":
        problems.append(("train.full_bf16", "needs mixed_precision = \"bf16\""))
    if p.full_fp16 and p.mixed_precision != "fp16":
        problems.append(("train.full_fp16", "needs mixed_precision = \"fp16\""))
    if p.full_fp16 and p.optimizer not in ("adafactor", "adamw8bit"):
        problems.append(("train.full_fp16", f"optimizer = \"{p.optimizer}\" keeps its state in fp16, where it underflows "
                         "to NaN: use optimizer = \"adafactor\" or \"adamw8bit\" (or full_bf16 on a GPU with bf16)"))
    if p.fused_backward and p.mixed_precision == "fp16":
        problems.append(("train.fused_backward", "steps each weight before fp16's loss scaler has seen every gradient: "
                         "use mixed_precision = \"bf16\", or fused_backward = false"))
    if p.fused_backward and p.optimizer != "adafactor":
        problems.append(("train.fused_backward", "is implemented for optimizer = \"adafactor\" only"))
    if p.fused_backward and p.gradient_accumulation_steps > 1:
        problems.append(("train.fused_backward", "steps each weight during backward, so it cannot accumulate: set gradient_accumulation_steps = 1"))
    if p.lr_schedule_steps < 0:
        problems.append(("train.lr_schedule_steps", "must be >= 0"))
    if p.network_weights and p.network != "lora":
        problems.append(("train.network_weights", "starting from a LoRA file applies to network = \"lora\" only"))
    if not 0 <= p.validation_split < 1:
        problems.append(("train.validation_split", "must be in [0, 1): the fraction of items held out, e.g. 0.05"))
    if len(p.validation_negative_prompts) > 1 and len(p.validation_negative_prompts) != len(p.validation_prompts):
        problems.append(("train.validation_negative_prompts", "give one negative prompt, or one per validation prompt"))
    return problems


def export_metadata(settings: dict, rows: pa.Table, ctx) -> dict[str, str]:
    """kohya's ss_* fields of the run (its settings, the steps it took, when) and sdxlpipe's provenance, from
    the run's folder (`ctx.outputs["train"]["dir"]`: key.json, done.json) and the rows it trained on."""
    import time

    trained = ctx.outputs.get("train", {})
    run_dir = Path(trained.get("dir", "."))
    done = _read_json(run_dir / "done.json")
    key = _read_json(run_dir / "key.json")
    steps = int(done.get("steps") or settings["max_steps"])  # the steps taken: max_epochs may have decided them
    started = _mtime(run_dir / "key.json")
    finished = _mtime(run_dir / "done.json") or started
    warmup = settings["lr_warmup"]
    v_pred = settings["prediction_type"] == "v_prediction"
    meta = {
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(finished),
        "ss_learning_rate": str(settings["learning_rate"]),
        "ss_unet_lr": str(settings["learning_rate"]),
        "ss_text_encoder_lr": str(settings["text_encoder_lr"] or settings["learning_rate"]),
        "ss_max_train_steps": str(steps),
        "ss_steps": str(steps),
        "ss_num_epochs": str(_epochs(rows, settings, steps, key.get("processes", 1))),
        "ss_batch_size_per_device": str(settings["batch_size"]),
        "ss_gradient_accumulation_steps": str(settings["gradient_accumulation_steps"]),
        # What the run did (unset: on for SDXL-sized UNets); done.json records it.
        "ss_gradient_checkpointing": str(bool(done.get("gradient_checkpointing", settings["gradient_checkpointing"]))),
        "ss_lr_scheduler": settings["lr_scheduler"],
        "ss_lr_warmup_steps": str(warmup if warmup >= 1 else round(warmup * steps)),
        "ss_optimizer": settings["optimizer"],
        "ss_max_grad_norm": str(settings["max_grad_norm"]),
        "ss_mixed_precision": settings["mixed_precision"],
        "ss_full_fp16": str(settings["full_fp16"]),
        "ss_seed": str(settings["seed"]),
        "ss_network_dropout": str(settings["dropout"]),
        "ss_noise_offset": str(settings["noise_offset"]),
        "ss_noise_offset_random_strength": str(settings["noise_offset_random_strength"]),
        "ss_adaptive_noise_scale": str(settings["adaptive_noise_scale"]),
        "ss_multires_noise_iterations": str(settings["multires_noise_iterations"]),
        "ss_multires_noise_discount": str(settings["multires_noise_discount"]),
        "ss_ip_noise_gamma": str(settings["input_perturbation"]),
        "ss_min_snr_gamma": str(settings["min_snr_gamma"]),
        "ss_debiased_estimation": str(settings["debiased_estimation"]),
        "ss_loss_type": settings["loss_type"],
        "ss_huber_schedule": settings["huber_schedule"],
        "ss_huber_c": str(settings["huber_c"]),
        "ss_prior_loss_weight": str(settings["prior_loss_weight"]),
        "ss_caption_dropout_rate": str(settings["caption_dropout"]),
        "ss_min_timestep": str(settings["min_timestep"]),
        "ss_max_timestep": str(settings["max_timestep"]),
        "ss_v_parameterization": str(v_pred),
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(finished)),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.timestep_range": f"{settings['min_timestep']},{settings['max_timestep']}",
        # How LoRA's A started (train.lora_init): "gaussian" (diffusers' scripts) needs other learning rates.
        "sdxlpipe_lora_init": settings["lora_init"] if settings["network"] == "lora" else "",
        "sdxlpipe_train_key": str(trained.get("key")),
        "sdxlpipe_dataset_fingerprint": str(key.get("samples", "")),
        "sdxlpipe_base_fingerprint": json.dumps({k: key.get(k) for k in ("unet", "scheduler") if k in key}
                                                or ctx.models.fingerprints(), sort_keys=True),
    }
    best = done.get("best_validation")
    if best:  # the lowest validation loss on held-out items: which checkpoint to prefer when the last overfits
        meta.update({"sdxlpipe_best_validation_step": str(best["step"]),
                     "sdxlpipe_best_validation_loss": f"{best['val_loss']:.6g}",
                     "sdxlpipe_validation_items": str(done.get("validation_items", ""))})
    return meta


def _epochs(rows: pa.Table, settings: dict, steps: int, processes: int) -> int:
    """The epochs the run's steps cover (kohya's ss_num_epochs: ceil(steps / update steps per epoch)): max_epochs
    when that set the length, else counted from the batches of `rows` (bucket-pure, as training plans them)."""
    if settings["max_epochs"]:
        return settings["max_epochs"]
    import math

    from sdxlpipe.training.data import plan_of

    if "bucket_w" not in rows.column_names or not rows.num_rows:
        return 0
    plan = plan_of(rows, settings["batch_size"], settings["seed"])
    return math.ceil(steps * settings["gradient_accumulation_steps"] * processes / max(1, plan.per_epoch))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _mtime(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def key_doc(table: pa.Table, params: Params, fp: dict[str, str], processes: int = 1, sources=()) -> dict:
    """Everything that shapes the trained weights: settings, UNet and scheduler weights, every sample input.

    With N processes step s trains on the same global batches whatever N is (docs/decisions.md 12), so
    what shapes the weights is the micro-batches per optimizer step, N x gradient_accumulation_steps: the
    key holds that product as gradient_accumulation_steps (one process's keys stay as they were), and a
    run keeps its key on any process count with the same product (decision 71). `sources`: the
    [[sources]] entries, whose weight and max_samples enter when set (decision 70).
    """
    present = [c for c in SAMPLE_COLUMNS if c in table.column_names]
    cols = table.select(present).to_pydict()
    lines = []
    for i in range(table.num_rows):
        # An absent column reads as None: a table from an older run still gets a key.
        lines.append(json.dumps([cols[c][i] if c in cols else None for c in SAMPLE_COLUMNS], separators=(",", ":")))
    settings = {k: v for k, v in dataclasses.asdict(params).items() if k not in NOT_IN_KEY}
    settings["gradient_accumulation_steps"] = params.gradient_accumulation_steps * processes
    if not settings["full_fp16"]:
        del settings["full_fp16"]  # added after VERSION 3: keys of runs without it stay as they were
    if not length_shapes_schedule(params):
        # Where the run stops is not in the key: a longer run passes through the same weights, so raising
        # max_steps (or max_epochs) continues the finished run (docs/decisions.md, "Extending a finished run").
        del settings["max_steps"], settings["max_epochs"]
    if settings["shuffle"] == "global":
        # Added after VERSION 3: keys of runs in the global order stay as they were (decision 79).
        del settings["shuffle"], settings["shuffle_block_gb"]
    if settings["lora_init"] == "kohya":
        del settings["lora_init"]  # added after VERSION 3: keys of runs with the default init stay as they were
    if params.conv_rank:
        # LoCon adapts kohya's modules since decision 53 (resnets' time-embedding projections; 1x1 skip convolutions
        # at the linear rank): a LoCon network of the same settings is another network than before.
        settings["locon_targets"] = "kohya"
    if params.network_weights:
        # The starting LoRA by its bytes, not its path.
        settings["network_weights"] = hash_file(params.network_weights)
    mixing = _mixing(table, sources)
    return {
        "stage": "train", "version": VERSION, "params": settings,
        "unet": fp["unet"], "scheduler": fp["scheduler"],
        "samples": xxh3_hex("\n".join(lines)), "sample_count": table.num_rows,
        **({"sources": mixing} if mixing else {}),
        # Trained text encoders start from these weights; cached embeddings already carry them in text_key.
        **({"text_encoders": [fp["text_encoder"], fp["text_encoder_2"]]} if params.train_text_encoder else {}),
    }


def _mixing(table: pa.Table, sources) -> dict | None:
    """The sources' weights and max_samples, and which source each row is from; None when none is set
    (then the key is what it was before sources could be weighted)."""
    weights, caps = [s.weight for s in sources], [s.max_samples for s in sources]
    if not any(weights) and not any(caps):
        return None
    rows = table.column("source_index").to_pylist() if "source_index" in table.column_names else []
    return {"weights": weights, "max_samples": caps, "rows": xxh3_hex(json.dumps(rows, separators=(",", ":")))}


def length_shapes_schedule(p: Params) -> bool:
    """Whether the LR at some step depends on the run's length (a decaying schedule or a fractional warmup)."""
    if p.lr_schedule_steps:
        return False
    fractional_warmup = 0 < p.lr_warmup < 1
    return p.lr_scheduler not in ("constant", "constant_with_warmup") or fractional_warmup


def run_steps(table: pa.Table, p: Params, processes: int, sources=()) -> int:
    """Optimizer steps of the run: max_steps, or max_epochs passes over the batches of `table`."""
    if not p.max_epochs:
        return p.max_steps
    import math

    from sdxlpipe.training.data import plan_of

    plan = plan_of(table, p.batch_size, p.seed, sources)
    return math.ceil(p.max_epochs * plan.per_epoch / (p.gradient_accumulation_steps * processes))


def run(table: pa.Table, params: Params, ctx) -> pa.Table:
    from sdxlpipe.training import checkpoints, holdout

    # accelerate launch / torchrun set WORLD_SIZE; reading it needs no torch.
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if params.network_weights and not os.path.isfile(params.network_weights):
        raise UserError(f"train.network_weights: {params.network_weights} is not a file",
                        "give the path of a LoRA .safetensors file (kohya, diffusers or peft format)")
    table, held_out = holdout.split(table, params.validation_split)
    _check_validation(params, held_out)
    sources = ctx.config.params["ingest"].sources  # their weight and max_samples mix the run
    doc = key_doc(table, params, ctx.models.fingerprints(), processes, sources)
    key = item_key(doc)
    run_dir = ctx.workspace.train_dir(key)
    continued = None if checkpoints.latest_step(run_dir) else continued_run(ctx.workspace.root / "train", doc, processes)
    if continued is not None:
        # The same run at the same micro-batches per step, this process count accumulating the rest.
        run_dir, doc, accumulate = continued
        key = run_dir.name
        ctx.log.info("continuing run %s on %d process(es) x gradient_accumulation_steps %d: its %d micro-batches "
                     "per optimizer step", key[:12], processes, accumulate, processes * accumulate)
        params = dataclasses.replace(params, gradient_accumulation_steps=accumulate)
    # What export needs of this run: which network, and the alpha the text encoders' LoRA was trained at.
    ctx.outputs["train"] = {"key": key, "dir": str(run_dir), "network": params.network, "use_dora": params.use_dora,
                            "alpha": params.alpha}
    if table.num_rows == 0:
        ctx.report(items=1, computed=0, reused=0, failed=1, reasons=["no samples to train on"])
        return table
    steps = run_steps(table, params, processes, sources)
    done = checkpoints.read_done(run_dir)
    if done is not None and done["steps"] == steps:
        ctx.report(items=1, computed=0, reused=1)
        ctx.outputs["train"].update(done["outputs"], steps=done["steps"], best_validation=done.get("best_validation"))
        return table
    if done is not None and done["steps"] > steps:
        # The run's checkpoints are past the asked length (max_steps is not in the key): `run` refuses, and
        # `status` says so in the train line (a run that cannot do what was asked), not as an error.
        what = f"this run ({run_dir}) already trained to step {done['steps']}, past the {steps} asked for"
        fix = (f"set train.max_steps = {done['steps']} to use it (its weights are in {done['outputs']['weights']})"
               ", or train the shorter run in another workspace")
        if ctx.dry_run:
            ctx.report(items=1, computed=0, reused=0, failed=1,
                       reasons=[f"trained to step {done['steps']}, past the {steps} asked for: `run` stops here; {fix}"])
            return table
        raise UserError(f"train: {what}", fix)
    latest = checkpoints.latest_step(run_dir)
    if done is not None:
        reason = f"extending from step {latest} to {steps}"
    else:
        reason = f"resuming from step {latest}" if latest else _why_new(ctx, doc)
    if continued is not None:
        reason += f" on {processes} process(es) x {params.gradient_accumulation_steps} micro-batches, as it was trained"
    ctx.report(items=1, computed=1, reused=0, reasons=[reason])
    if ctx.dry_run:
        return table

    from sdxlpipe.training.loop import train

    if continued is None:  # a continued run keeps the key document it was started with
        checkpoints.write_json(run_dir / "key.json", doc)
    checkpoints.write_json(run_dir / "config.json", ctx.config.to_record())
    result = train(table, params, ctx, run_dir, steps, held_out=held_out)
    ctx.outputs["train"].update(result["outputs"], steps=result["steps"], best_validation=result.get("best_validation"))
    ctx.workspace.write_record("train-last", {"key": key, **result})
    return table


def _check_validation(p: Params, held_out: pa.Table) -> None:
    """A validation scheduled with nothing to validate: no prompts to draw and no item held out."""
    if (p.validation_every_steps or p.validation_every_epochs) and not p.validation_prompts and not held_out.num_rows:
        raise UserError("train: validation is scheduled (validation_every_steps / validation_every_epochs) but "
                        "there are no validation prompts and no held-out items",
                        'set train.validation_prompts = ["..."], or hold items out: train.validation_split = 0.05 '
                        'or a [[sources]] entry with kind = "validation"')


def continued_run(root, doc: dict, processes: int):
    """(run dir, key document, gradient_accumulation_steps) of the newest run under `root` with checkpoints
    that differs from `doc` only in its micro-batches per step, when `processes` divides them; else None.

    So a run started on 2 processes continues on 1 accumulating 2 micro-batches, and one started on 1
    process accumulating 2 continues on 2, with no edit to the config (docs/decisions.md 71). A run keyed
    before then (with a `processes` field) is recognised too.
    """
    from sdxlpipe.training import checkpoints

    if not root.exists():
        return None
    mine = _but_step_size(doc)
    found = []
    for path in root.glob("*/key.json"):
        try:
            old = json.loads(path.read_text())
            per_step = int(old["params"]["gradient_accumulation_steps"]) * int(old.get("processes", 1))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a run record this version can read
        latest = checkpoints.latest_step(path.parent)
        if per_step % processes or not latest or _but_step_size(old) != mine:
            continue
        when = (checkpoints.checkpoint_dir(path.parent, latest) / "state.json").stat().st_mtime
        found.append((when, path.parent.name, path.parent, old, per_step // processes))
    if not found:
        return None
    _, _, run_dir, old, accumulate = max(found)
    return run_dir, old, accumulate


def _but_step_size(doc: dict) -> dict:
    """A key document without its micro-batches per step (either form), as key.json holds it."""
    doc = json.loads(json.dumps(doc))
    doc.pop("processes", None)
    doc["params"].pop("gradient_accumulation_steps", None)
    return doc


def report(outputs: dict, stats: dict, dry_run: bool) -> dict:
    """The run's checkpoint for the run report, once there is one, and its lowest validation loss
    ({"step", "val_loss", "checkpoint"}) when items were held out."""
    train = outputs.get("train", {})
    found = {"checkpoint": train["checkpoint"]} if "checkpoint" in train else {}
    if train.get("best_validation"):
        found["best_validation"] = train["best_validation"]
    return found


def _why_new(ctx, doc: dict) -> str:
    """Name what changed since the last finished run in this workspace."""
    root = ctx.workspace.root / "train"
    previous = sorted(root.glob("*/key.json"), key=lambda p: p.stat().st_mtime) if root.exists() else []
    if not previous:
        return "no run yet"
    old = json.loads(previous[-1].read_text())
    new = json.loads(json.dumps(doc))  # tuples as the lists key.json holds
    changed = [f"train.{k}" for k in new["params"]
               if k != "gradient_accumulation_steps" and old.get("params", {}).get(k) != new["params"][k]]
    before = old.get("params", {}).get("gradient_accumulation_steps", 1) * old.get("processes", 1)
    if before != new["params"]["gradient_accumulation_steps"]:
        changed.append(f"micro-batches per step (processes x train.gradient_accumulation_steps) {before} -> "
                       f"{new['params']['gradient_accumulation_steps']}")
    changed += [k for k in ("unet", "scheduler") if old.get(k) != doc[k]]
    if old.get("sources") != new.get("sources"):
        changed.append("the sources' weight, max_samples or rows")
    if old.get("samples") != doc["samples"]:
        before, now = old.get("sample_count"), doc["sample_count"]
        changed.append(f"samples ({before} -> {now} rows)" if before != now else f"the inputs of some of the {now} samples")
    return "changed: " + ", ".join(changed) if changed else "new run"
