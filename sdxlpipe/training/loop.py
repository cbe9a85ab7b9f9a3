"""The training recipe: the SDXL UNet (a peft network or all of it) from cached tensors.

`train` reads top to bottom as the recipe; each step is a function below it
(or in a module of its own: `precision`, `resume`, `losses`, `feed`):
accelerate and mixed precision (`precision.accelerate`) -> fail early on
settings the run cannot use (`_check_settings`) -> the data: cached latents
and text embeddings stay in the store and each batch is read when it is due
(`_data`, `training.stream`; memory holds the table, the plan and a few
batches, not the ~566 KiB per SDXL sample) -> the noise schedule (`_noise`)
-> the UNet with its network (`_model`) -> optimizer, LR schedule, EMA
(`_optimization`) -> resume from the newest checkpoint (`resume.restore`) ->
accelerate's wrapping (`_distribute`) -> the evaluation loss before ->
for each step (`_step`) and each micro-batch: a batch from one bucket (read
ahead by reader threads), its loss (`loss_at`, `losses.batch_loss`), backward
and the optimizer step (`_apply_gradients`) -> log (`_record`), validate
(the held-out items' loss, `validation_loss`, and the prompts' images),
checkpoint (`resume.save`) when due -> `done.json` (`_finish`). What every
step shares is one `Run`; a new setup step is a function called from `train`
in its place, setting what it builds on the `Run`.

Every random draw of batch i of the run comes from generators seeded by
(seed, i), and the global RNG (peft's dropout) is reseeded the same way, so
a resumed run continues the exact loss curve of an unbroken one
(docs/decisions.md 3). With N processes, process r takes batches s*N*A + a*N
+ r of step s (A = gradient_accumulation_steps).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from sdxlpipe.cache_format import CacheDamaged
from sdxlpipe.cache_format.payloads import PayloadRefused
from sdxlpipe.errors import UserError
from sdxlpipe.models import loading
from sdxlpipe.models.sdxl import encode_prompts
from sdxlpipe.training import (checkpoints, layout, losses, networks, optimizers, precision, resume, stream,
                               threads, validation, validation_loss)
from sdxlpipe.training.batches import to_device
from sdxlpipe.training.data import BatchPlan, plan_of
from sdxlpipe.training.feed import open_feed

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# Batches of epoch 0 the fixed-noise evaluation loss is measured on, before and after.
EVAL_BATCHES = 4


@dataclass
class Data:
    """The run's batches: the plan and the store they are read from."""

    plan: BatchPlan
    source: stream.BatchSource
    buckets: list[tuple[int, int]]  # each sample's bucket (the validation images' default size)
    per_step: int  # batches per optimizer step, all processes
    text_settings: dict  # text_encode's settings, to encode captions in the loop as it caches them
    source_of: list[int] | None  # each sample's [[sources]] entry (the table's source_index), with several


@dataclass
class Noise:
    """The noise schedule the loss samples timesteps and noisy latents from."""

    scheduler: Any
    prediction_type: str
    alphas_cumprod: torch.Tensor  # on the run's device


@dataclass
class Model:
    """What the run trains: the UNet with its network (and both text encoders' with train_text_encoder)."""

    unet: Any  # as accelerate wraps it once `_distribute` ran; `bare` is the module itself
    bare: Any
    text_stack: dict  # tokenizers and text encoders that encode captions in the loop; empty unless trained
    checkpointing: bool  # gradient checkpointing is on

    @property
    def text_encoders(self) -> dict:
        """The trained text encoders by component name, in TEXT_ENCODERS order; empty unless trained."""
        return {name: self.text_stack[name] for name in TEXT_ENCODERS} if self.text_stack else {}


@dataclass
class Optimization:
    """The optimizer (accelerate's wrapper once `_distribute` ran), its LR schedule and EMA."""

    optimizer: Any
    lr_schedule: Any
    ema: Any  # diffusers' EMAModel, or None
    fused: optimizers.FusedBackward | None  # the optimizer stepped inside backward (fused_backward)
    params: list  # every trained parameter: the UNet's, then the text encoders'
    encoder_params: list  # the text encoders' trained parameters


@dataclass
class Run:
    """One training run: its settings and what `train`'s setup steps built, shared by the steps."""

    p: Any
    ctx: Any
    run_dir: Path
    max_steps: int
    accelerator: Any
    scaler: Any  # fp16's loss scaler (precision.py), else None
    data: Data
    noise: Noise
    model: Model
    opt: Optimization
    start: int = 0  # the step this run starts at: the newest checkpoint's (resume.restore)
    history: dict = field(default_factory=lambda: {"losses": [], "eval_loss_before": None, "validation": []})
    held: Any = None  # the held-out items the validation loss is measured on (validation_loss.HeldOut), or None
    feed: Any = None  # this process's batches, while the steps run (feed.Feed)
    loader_wait: float = 0.0  # seconds the steps waited for their batches (this session)
    logs: Any = None  # log.jsonl and TensorBoard (validation.Logs)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(table: pa.Table, p, ctx, run_dir: Path, max_steps: int, held_out: pa.Table | None = None) -> dict:
    """Train to step `max_steps` (the stage computes it from max_steps or max_epochs), resuming or extending.

    `held_out`: the rows the validation loss is measured on (`training.validation_loss`), or None.
    """
    # --- set up ----------------------------------------------------------------------------------------
    accelerator, scaler = precision.accelerate(p, ctx.config.device)
    _check_settings(table, p, accelerator.num_processes, ctx.log)
    _set_threads(p, ctx.log)
    data = _data(table, p, ctx, accelerator.num_processes, accelerator.device, run_dir, accelerator.is_main_process)
    noise = _noise(p, ctx, accelerator.device)
    model = _model(p, ctx, accelerator.device)
    run = Run(p, ctx, run_dir, max_steps, accelerator, scaler, data, noise, model, _optimization(model, p, max_steps))
    run.held = validation_loss.open_held_out(held_out, ctx.train_store, p, accelerator.device, stages=ctx.config.stages)
    resume.restore(run)
    run.history.setdefault("validation", [])  # a checkpoint from before the validation loss
    _distribute(run)

    # --- train -----------------------------------------------------------------------------------------
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    run.logs = validation.Logs(run_dir / "logs", p.tensorboard and run.main, run.start)
    if run.history["eval_loss_before"] is None:
        run.history["eval_loss_before"] = eval_loss(run)
    began = time.monotonic()
    run.feed = open_feed(data.source, p, start_step=run.start, max_steps=max_steps, world=run.world, rank=run.rank,
                         device=run.device)
    with run.feed, ctx.reporter.track("train", max_steps - run.start, unit="step") as advance:
        for step in range(run.start, max_steps):
            loss, grad_norm = _step(run, step)
            done = step + 1
            epoch = _record(run, done, loss, grad_norm, began, advance)
            new_epoch = data.plan.batch_at(done * data.per_step)[0] > epoch
            if (_every(done, p.validation_every_steps) or (new_epoch and _every(epoch + 1, p.validation_every_epochs))
                    or (run.held is not None and done == max_steps)):  # the held-out loss of the final weights too
                validate(run, done)
            if (_every(done, p.save_every_steps) or (new_epoch and _every(epoch + 1, p.save_every_epochs))
                    or done == max_steps):
                if run.main:
                    resume.save(run, done)
                accelerator.wait_for_everyone()
    run.logs.close()
    seconds = round(time.monotonic() - began, 3)  # the steps, checkpoints and validations
    return _finish(run, seconds)


# -- setting up -----------------------------------------------------------------------------------------


def _check_settings(table: pa.Table, p, world: int, log) -> None:
    """Settings this run cannot use, before anything is loaded."""
    if p.fused_backward and world > 1:
        raise UserError("train.fused_backward steps each weight before the processes average its gradient",
                        "train on one process, or set fused_backward = false")
    if p.train_text_encoder:
        if "caption" not in table.column_names:
            raise UserError("train.train_text_encoder needs the caption text, and this table has none",
                            "run the caption stage (sdxlpipe run all) so the table carries captions")
        log.info("train_text_encoder: captions are encoded in the loop; the cached text embeddings are not used")


def _set_threads(p, log) -> None:
    """Torch's intra-op threads: the cores this process may use less the loader's reader threads (decision 64)."""
    want = threads.apply(p.loader_workers, torch.get_num_threads())
    if want is not None:
        log.info("torch threads: %d (usable cores less %d reader threads)", want, p.loader_workers)
        torch.set_num_threads(want)


def _data(table: pa.Table, p, ctx, world: int, device, run_dir: Path | None = None, main: bool = True) -> Data:
    """The batch plan and the source that reads batch i from the store when it is due; `run_dir`: where the
    run keeps the layout shard_blocks orders by (None: not kept)."""
    # The plan's columns only, not a dict per row: memory must not grow by a row's every field.
    buckets = list(zip(table.column("bucket_w").to_pylist(), table.column("bucket_h").to_pylist()))
    # Encode captions the way text_encode caches them.
    text_params = ctx.config.params.get("text_encode")
    text_settings = {k: getattr(text_params, k) for k in ("max_token_length", "clip_skip") if hasattr(text_params, k)}
    # shard_blocks orders by where the latents live, as this run first found them (decision 79).
    where, recorded = (layout.of_run(table, ctx.train_store, ctx.config.stages, run_dir)
                       if p.shuffle == "shard_blocks" else (None, True))
    plan = plan_of(table, p.batch_size, p.seed, ctx.config.params["ingest"].sources,  # sources mix by weight
                   where, int(p.shuffle_block_gb * (1 << 30)))
    source = stream.open_source(table, ctx.train_store, p, plan, device, stages=ctx.config.stages)
    if not recorded and main and run_dir is not None:
        layout.record(where, run_dir)  # the source found every item: the run starts with this layout
    # Counted at the end for runs that mix sources (a walk over the run's samples, not worth it for one).
    source_of = table.column("source_index").to_pylist() if "source_index" in table.column_names else None
    source_of = source_of if source_of and max(source_of) > 0 else None
    return Data(plan, source, buckets, p.gradient_accumulation_steps * world, text_settings, source_of)


def _noise(p, ctx, device) -> Noise:
    """The model's noise scheduler (zero terminal SNR when asked) and the prediction type trained."""
    scheduler = loading.load_noise_scheduler(ctx.config.model, allow_pickle=ctx.config.allow_pickle)
    prediction_type = p.prediction_type or scheduler.config.prediction_type
    if p.zero_terminal_snr:
        if prediction_type != "v_prediction":
            raise UserError("train.zero_terminal_snr needs v-prediction, and this model's scheduler predicts "
                            f"{prediction_type}", 'set train.prediction_type = "v_prediction"')
        scheduler = type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)
    return Noise(scheduler, prediction_type, scheduler.alphas_cumprod.to(device))


def _model(p, ctx, device) -> Model:
    """The UNet with its network, each weight in its storage dtype, on the device (and the text encoders').

    Loaded and given its network in fp32 on the CPU (the init is the same whatever the storage), then
    frozen weights go to their storage dtype before the model reaches the device: the device never holds
    an fp32 copy of a frozen SDXL UNet.
    """
    compute = precision.COMPUTE[p.mixed_precision]
    unet = loading.load_unet(ctx.config.model, allow_pickle=ctx.config.allow_pickle)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)  # the network's initial weights
        networks.attach(unet, p)
    if p.network_weights:  # before set_precision: the file's weights enter in fp32, like a fresh init
        networks.load_network_weights(p.network_weights, {"unet": unet}, text_encoders=p.train_text_encoder)
    networks.set_precision(unet, p, compute)
    unet.to(device)
    unet.train()
    checkpointing = networks.gradient_checkpointing(unet, p)  # on for SDXL-sized UNets unless set
    speed_ups(unet, p)
    stack: dict = {}
    if p.train_text_encoder:
        stack = loading.load_text_stack(ctx.config.model, allow_pickle=ctx.config.allow_pickle)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed + 1)
            for name in TEXT_ENCODERS:
                networks.attach_text_encoder(stack[name], p)
        if p.network_weights:  # the file's text-encoder modules, if it has any
            networks.load_network_weights(p.network_weights, stack, text_encoders=True)
        with torch.random.fork_rng(devices=[]):
            for name in TEXT_ENCODERS:
                networks.set_precision(stack[name], p, compute)
                stack[name].to(device)
                stack[name].train()
    return Model(unet, unet, stack, checkpointing)


def speed_ups(unet, p) -> None:
    """The UNet channels-last and its forward compiled, when set (decision 65): other kernels, the same math.

    `Module.compile` compiles in place: the module, its parameters and state-dict names stay as they are,
    so accelerate, checkpoints and EMA see the UNet they always did.
    """
    if p.channels_last:
        unet.to(memory_format=torch.channels_last)
    if p.compile:
        unet.compile()


def _optimization(model: Model, p, max_steps: int) -> Optimization:
    """Optimizer over the parameter groups, LR schedule, EMA; the optimizer fused into backward when asked."""
    groups = optimizers.param_groups(model.bare, p)  # freezes the blocks whose rate is 0: before `params`
    groups += optimizers.text_encoder_groups(list(model.text_encoders.values()), p) if model.text_stack else []
    optimizer = optimizers.build_optimizer(groups, p)
    lr_schedule = optimizers.build_scheduler(optimizer, p, p.lr_schedule_steps or max_steps)
    encoder_params = [q for e in model.text_encoders.values() for q in e.parameters() if q.requires_grad]
    params = [q for q in model.bare.parameters() if q.requires_grad] + encoder_params
    ema = None
    if p.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=p.ema_decay)
    fused = optimizers.fuse_into_backward(optimizer, p.max_grad_norm) if p.fused_backward else None
    return Optimization(optimizer, lr_schedule, ema, fused, params, encoder_params)


def _distribute(run: Run) -> None:
    """accelerate's wrapping of the UNet and optimizer (DDP with several processes)."""
    run.model.unet, run.opt.optimizer = run.accelerator.prepare(run.model.unet, run.opt.optimizer)
    run.model.bare = run.accelerator.unwrap_model(run.model.unet)
    if run.opt.encoder_params and run.world > 1:
        # The encoders are not wrapped for DDP (the caption encoding reads their config); their LoRA gradients
        # are averaged over the processes by hand before each optimizer step, which is what DDP would do.
        run.ctx.log.info("train_text_encoder on %d processes: text-encoder gradients are averaged by all-reduce",
                         run.world)


# -- the steps ------------------------------------------------------------------------------------------


def _step(run: Run, step: int) -> tuple[float, Any]:
    """One optimizer step: each micro-batch's loss and backward, then the step; (its mean loss, gradient norm)."""
    p, accelerator = run.p, run.accelerator
    step_loss, grad_norm = 0.0, None
    for micro in range(p.gradient_accumulation_steps):
        index = (step * p.gradient_accumulation_steps + micro) * run.world + run.rank
        seed = p.seed * 1_000_003 + index
        torch.manual_seed(seed)  # the global RNG: peft's dropout
        with accelerator.accumulate(run.model.unet):
            loss = loss_at(run, index, torch.Generator().manual_seed(seed))
            accelerator.backward(run.scaler.scale(loss) if run.scaler is not None else loss)
            norm = _apply_gradients(run)
            if norm is not None:
                grad_norm = norm
        step_loss += float(accelerator.gather(loss.detach()).mean()) / p.gradient_accumulation_steps
    run.opt.lr_schedule.step()
    if run.opt.ema is not None:
        run.opt.ema.step(run.opt.params)
    return step_loss, grad_norm


def _apply_gradients(run: Run):
    """After a micro-batch's backward: on the last of a step, text-encoder gradients averaged, unscaled and
    clipped; the optimizer step (accelerate's optimizer skips it on the others). The gradient norm, or None
    where this micro-batch did not measure it."""
    accelerator, opt, scaler = run.accelerator, run.opt, run.scaler
    if opt.fused is not None:  # every weight was stepped as its gradient arrived
        return opt.fused.take_norm()
    grad_norm = None
    if accelerator.sync_gradients:
        if opt.encoder_params and run.world > 1:
            # CLIP-L's last layer gets no gradient (SDXL reads the penultimate one), on every process.
            for q in (q for q in opt.encoder_params if q.grad is not None):
                q.grad = accelerator.reduce(q.grad, reduction="mean")
        if scaler is not None:
            scaler.unscale_(opt.optimizer)  # true gradients for clipping (and the inf check)
        # max_grad_norm 0 clips nothing but still measures the norm for the logs.
        grad_norm = accelerator.clip_grad_norm_(opt.params, run.p.max_grad_norm or math.inf)
    if scaler is None:
        opt.optimizer.step()
    elif accelerator.sync_gradients:
        # Skips the step when a gradient overflowed, then adapts the scale (both seeded by
        # the gradients alone, so a resumed run skips the same steps).
        scaler.step(opt.optimizer)
        scaler.update()
    opt.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def loss_at(run: Run, index: int, gen: torch.Generator, *, fixed: bool = False) -> torch.Tensor:
    """The loss of batch `index` of the run; fixed: an evaluation batch, read in this process.

    A damaged item stops the run with CacheDamaged on every process, after saving the steps done; so does an
    item that breaks the payload schema (PayloadRefused: not recomputed, decision 76).
    """
    batch, damage = None, None
    try:
        # Read in the stored dtype (fp16: half the bytes to copy); the loss is computed in fp32.
        batch = to_device(run.data.source.batch(index, fixed=True), run.device) if fixed else _take(run, index)
    except (CacheDamaged, PayloadRefused) as e:
        damage = e
    if not fixed:  # every process reads the same fixed batches, so meets the same damage there
        damage = stream.agree_on_damage(damage, run.device)  # one process's damage stops them all
    if damage is not None:
        # Keep the steps done so far: once the item is recomputed the run resumes right here.
        step = index // run.data.per_step
        if run.main and not fixed and checkpoints.latest_step(run.run_dir) < step:
            resume.save(run, step)
        raise damage
    with torch.autocast(run.device.type, dtype=torch.float16, enabled=run.p.mixed_precision == "fp16"):
        if run.model.text_stack:  # in-loop encoding, with gradients into the text encoders' LoRA
            batch["embeds"], batch["pooled"] = encode_prompts(batch["captions"], run.model.text_stack,
                                                              **run.data.text_settings)
        return losses.batch_loss(run.model.unet, batch, run.p, run.noise.alphas_cumprod, run.noise.prediction_type,
                                 gen, run.device, fixed)


def _take(run: Run, index: int) -> dict:
    """Batch `index` from the feed, its payloads copied out in fp32 (`to_device`: onto a GPU in the stored dtype,
    converted there) so its buffers go back to the feed's ring (on a GPU once the copies are done); the seconds
    the loop waited for it are counted (`done.json`)."""
    began = time.perf_counter()
    batch = run.feed.take(index)
    run.loader_wait += time.perf_counter() - began
    floats = to_device(batch, run.device)
    copied = torch.cuda.Event() if run.device.type == "cuda" else None
    if copied is not None:
        copied.record(torch.cuda.current_stream(run.device))  # after the copies, on the stream they run on
    run.feed.release(index, after=copied)
    return floats


def eval_loss(run: Run) -> float:
    """The loss on the first batches with fixed noise: comparable across steps and runs."""
    models = [run.model.bare, *run.model.text_encoders.values()]
    for m in models:
        m.eval()
    with torch.no_grad():
        values = [float(loss_at(run, i, torch.Generator().manual_seed(run.p.seed + 7919 * i), fixed=True))
                  for i in range(min(EVAL_BATCHES, run.data.plan.per_epoch))]
    for m in models:
        m.train()
    return sum(values) / len(values)


def _record(run: Run, done: int, loss: float, grad_norm, began: float, advance) -> int:
    """The step's loss into the history, the progress line and the logs; returns the epoch it ended in."""
    run.history["losses"].append(loss)
    epoch = run.data.plan.batch_at(done * run.data.per_step - 1)[0]
    recent = run.history["losses"][-20:]
    rate = (done - run.start) / max(time.monotonic() - began, 1e-9)
    lr = run.opt.lr_schedule.get_last_lr()[0]
    advance(1, loss=f"{sum(recent) / len(recent):.4f}", epoch=epoch, lr=f"{lr:.2e}", it_s=f"{rate:.2f}",
            **_last_validation(run.history))
    if run.main:
        run.logs.scalars(done, {"loss": loss, "lr": lr, "grad_norm": float(grad_norm)})
    return epoch


def validate(run: Run, step: int) -> None:
    """The held-out items' loss and the prompts' validation images at this step (with the EMA weights when
    there are any)."""
    p, ema, params = run.p, run.opt.ema, run.opt.params
    if not run.main or (not p.validation_prompts and run.held is None):
        return
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    compute = precision.COMPUTE[p.mixed_precision]
    images = None
    try:
        if run.held is not None:
            _validation_loss(run, step, compute)
        if p.validation_prompts:
            stack = {**run.ctx.models.text_stack(), **run.model.text_stack}
            with torch.autocast(run.device.type, dtype=compute, enabled=compute != torch.float32):
                images = validation.render(
                    run.model.bare, stack, run.ctx.models.vae(), run.noise.scheduler, p.validation_prompts,
                    p.validation_negative_prompts, seed=p.validation_seed, size=_validation_size(p, run.data.buckets),
                    steps=p.validation_steps, guidance=p.validation_guidance, prediction_type=run.noise.prediction_type,
                    zero_terminal_snr=p.zero_terminal_snr)
    finally:
        if ema is not None:
            ema.restore(params)
    if images is not None:
        validation.save(images, run.run_dir / "validation" / f"step-{step:08d}")
        run.logs.images(step, images)


def _finish(run: Run, seconds: float) -> dict:
    """The run's result (the train stage's report): the final checkpoint's files and the losses; `done.json`."""
    p, ema, run_dir, max_steps, history = run.p, run.opt.ema, run.run_dir, run.max_steps, run.history
    last = checkpoints.checkpoint_dir(run_dir, max_steps)
    weights = last / networks.weights_file(p, ema=ema is not None)
    suffix = ".ema.safetensors" if ema is not None else ".safetensors"
    outputs = {
        "checkpoint": str(last), "network": p.network, "weights": str(weights),
        "network_config": str(last / "network.json"), "logs": str(run_dir / "logs"),
    }
    if p.network != "full":
        outputs.update({"adapter": str(weights), "adapter_config": str(last / "network.json")})
    if run.model.text_stack:
        outputs.update({name: str(last / f"{name}{suffix}") for name in TEXT_ENCODERS})
    if p.validation_prompts:
        outputs["validation"] = str(run_dir / "validation")
    recent = history["losses"][-20:]
    best = _name_best_validation(history, run_dir, run.ctx.log)
    result = {
        "steps": max_steps, "final_loss": history["losses"][-1] if history["losses"] else math.nan,
        "mean_loss_last_20": sum(recent) / max(1, len(recent)),
        "eval_loss_before": history["eval_loss_before"], "eval_loss_after": eval_loss(run),
        "processes": run.world, "seconds": seconds, "outputs": outputs, "gradient_checkpointing": run.model.checkpointing,
        "torch_threads": torch.get_num_threads(),
        # The steps' share of `seconds` spent waiting for batches: above a few % the loader is what limits the run.
        "loader_wait_seconds": round(run.loader_wait, 3),
        # What the speed-ups really did to the UNet (decision 65): its first convolution's memory layout, compiled.
        "unet_layout": ("channels_last" if run.model.bare.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
                        and not run.model.bare.conv_in.weight.is_contiguous() else "contiguous"),
        "unet_compiled": getattr(run.model.bare, "_compiled_call_impl", None) is not None,
        # Bytes of the UNet's weights by role and storage dtype after the run: what the precision settings really did.
        "weights_bytes": networks.dtype_counts(run.model.bare),
        **({"best_validation": best, "validation_items": run.held.items} if best else {}),
    }
    if run.data.source_of is not None:  # what each [[sources]] entry gave the run, so weights can be checked
        result["samples_per_source"] = run.data.plan.samples_per_source(max_steps * run.data.per_step, run.data.source_of)
    if run.main:
        checkpoints.write_json(run_dir / "done.json", result)
    run.accelerator.wait_for_everyone()
    return result


def _validation_loss(run: Run, step: int, compute) -> float:
    """The held-out items' loss at this step: into the history (a checkpoint keeps it), log.jsonl and TensorBoard."""
    value = run.held.loss(run.model.bare, run.noise.alphas_cumprod, run.noise.prediction_type, run.device,
                          text_stack=run.model.text_stack or None, text_settings=run.data.text_settings, compute=compute)
    run.history["validation"] = [sv for sv in run.history["validation"] if sv[0] != step] + [[step, value]]
    run.logs.scalars(step, {"val_loss": value})
    return value


def _last_validation(history: dict) -> dict:
    """The progress line's field for the latest validation loss, once there is one."""
    return {"val_loss": f"{history['validation'][-1][1]:.4f}"} if history.get("validation") else {}


def _name_best_validation(history: dict, run_dir: Path, log) -> dict | None:
    """The step with the lowest validation loss, said at the end of the run, with its checkpoint if kept."""
    best = validation_loss.best(history.get("validation") or [])
    if best is None:
        return None
    folder = checkpoints.checkpoint_dir(run_dir, best["step"])
    best["checkpoint"] = str(folder) if folder.is_dir() else None
    log.info("lowest validation loss %.4f at step %d%s", best["val_loss"], best["step"],
             f" ({folder})" if folder.is_dir() else
             " (its checkpoint was not kept: save_every_steps / max_checkpoints decide which are)")
    return best


def _every(n: int, every: int) -> bool:
    return every > 0 and n % every == 0


def _validation_size(p, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    if p.validation_size:
        return (p.validation_size, p.validation_size)
    # The most common bucket: a size the run actually trains at.
    counts: dict[tuple[int, int], int] = {}
    for bucket in buckets:
        counts[bucket] = counts.get(bucket, 0) + 1
    return max(counts, key=counts.get)
