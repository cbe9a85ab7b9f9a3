"""The training recipe: the SDXL UNet (a peft network or all of it) from cached tensors.

Recipe, top to bottom: fail early on settings the machine cannot run ->
accelerate (device, mixed precision, gradient accumulation, processes) ->
the batch source: cached latents and text embeddings stay in the store and
each batch is read when it is due (`training.stream`; memory holds the table,
the plan and a few batches, not the ~566 KiB per SDXL sample) -> the UNet
with its network -> optimizer, LR schedule, EMA -> resume from the newest
checkpoint -> for each step and each micro-batch: a batch from one bucket
(read ahead by reader threads), a fresh latent
sample from the stored distribution, noise, timesteps, the loss of
`training.losses` -> clip, step -> log, validate, checkpoint -> `done.json`.

Every random draw of batch i of the run comes from generators seeded by
(seed, i), and the global RNG (peft's dropout) is reseeded the same way, so
a resumed run continues the exact loss curve of an unbroken one
(docs/decisions.md 3). With N processes, process r takes batches s*N*A + a*N
+ r of step s (A = gradient_accumulation_steps).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from sdxlpipe.cache_format import CacheDamaged
from sdxlpipe.errors import UserError
from sdxlpipe.models import loading
from sdxlpipe.models.sdxl import encode_prompts
from sdxlpipe.training import checkpoints, losses, networks, optimizers, stream, threads, validation
from sdxlpipe.training.batches import as_float
from sdxlpipe.training.data import BatchPlan

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# Batches of epoch 0 the fixed-noise evaluation loss is measured on, before and after.
EVAL_BATCHES = 4


# Compute dtype of each mixed_precision setting.
COMPUTE = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def train(table: pa.Table, p, ctx, run_dir: Path, max_steps: int) -> dict:
    """Train to step `max_steps` (the stage computes it from max_steps or max_epochs), resuming or extending."""
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    # --- fail early -------------------------------------------------------
    # fp16's autocast and loss scaler are the loop's own (accelerate does fp16 on GPUs only, and its scaler
    # refuses fp16 gradients, which full_fp16 has): the same code on a GPU and on a CPU, where tests run it.
    fp16 = p.mixed_precision == "fp16"
    accelerator = Accelerator(mixed_precision="no" if fp16 else p.mixed_precision, cpu=ctx.config.device == "cpu",
                              gradient_accumulation_steps=p.gradient_accumulation_steps)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    scaler = _fp16_scaler(device) if fp16 else None
    main = accelerator.is_main_process
    _set_threads(p, ctx)

    # --- data ----------------------------------------------------------------
    if p.fused_backward and world > 1:
        raise UserError("train.fused_backward steps each weight before the processes average its gradient",
                        "train on one process, or set fused_backward = false")
    # The plan's columns only, not a dict per row: memory must not grow by a row's every field.
    buckets = list(zip(table.column("bucket_w").to_pylist(), table.column("bucket_h").to_pylist()))
    is_reg = table.column("is_reg").to_pylist() if "is_reg" in table.column_names else [False] * len(buckets)
    if p.train_text_encoder:
        if "caption" not in table.column_names:
            raise UserError("train.train_text_encoder needs the caption text, and this table has none",
                            "run the caption stage (sdxlpipe run all) so the table carries captions")
        ctx.log.info("train_text_encoder: captions are encoded in the loop; the cached text embeddings are not used")
    # Encode captions the way text_encode caches them.
    text_params = ctx.config.params.get("text_encode")
    text_settings = {k: getattr(text_params, k) for k in ("max_token_length", "clip_skip") if hasattr(text_params, k)}
    plan = BatchPlan(buckets, table.column("repeats").to_pylist(), p.batch_size, p.seed, [bool(r) for r in is_reg])
    source = stream.open_source(table, ctx.store, p, plan, device)  # reads batch i from the store when it is due
    per_step = p.gradient_accumulation_steps * world  # batches per optimizer step, all processes
    noise_scheduler = loading.load_noise_scheduler(ctx.config.model, allow_pickle=ctx.config.allow_pickle)
    prediction_type = p.prediction_type or noise_scheduler.config.prediction_type
    if p.zero_terminal_snr:
        if prediction_type != "v_prediction":
            raise UserError("train.zero_terminal_snr needs v-prediction, and this model's scheduler predicts "
                            f"{prediction_type}", 'set train.prediction_type = "v_prediction"')
        noise_scheduler = type(noise_scheduler).from_config(noise_scheduler.config, rescale_betas_zero_snr=True)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)

    # --- model, network, precision, optimizer, schedule, EMA -------------------
    # Loaded and given its network in fp32 on the CPU (the init is the same whatever the storage), then
    # frozen weights go to their storage dtype before the model reaches the device: the device never holds
    # an fp32 copy of a frozen SDXL UNet.
    compute = COMPUTE[p.mixed_precision]
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
    encoders: dict = {}  # the trained text stack, when train_text_encoder
    groups = optimizers.param_groups(unet, p)
    if p.train_text_encoder:
        encoders = loading.load_text_stack(ctx.config.model, allow_pickle=ctx.config.allow_pickle)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed + 1)
            for name in TEXT_ENCODERS:
                networks.attach_text_encoder(encoders[name], p)
        if p.network_weights:  # the file's text-encoder modules, if it has any
            networks.load_network_weights(p.network_weights, encoders, text_encoders=True)
        with torch.random.fork_rng(devices=[]):
            for name in TEXT_ENCODERS:
                networks.set_precision(encoders[name], p, compute)
                encoders[name].to(device)
                encoders[name].train()
        groups += optimizers.text_encoder_groups([encoders[n] for n in TEXT_ENCODERS], p)
    optimizer = optimizers.build_optimizer(groups, p)
    lr_schedule = optimizers.build_scheduler(optimizer, p, p.lr_schedule_steps or max_steps)
    trainable = [q for q in unet.parameters() if q.requires_grad]
    encoder_params = [q for n in TEXT_ENCODERS if encoders for q in encoders[n].parameters() if q.requires_grad]
    trainable += encoder_params
    ema = EMAModel(trainable, decay=p.ema_decay) if p.ema_decay else None
    fused = optimizers.fuse_into_backward(optimizer, p.max_grad_norm) if p.fused_backward else None

    # --- resume ------------------------------------------------------------------
    start = checkpoints.latest_step(run_dir)
    history: dict = {"losses": [], "eval_loss_before": None}
    if start:
        ckpt = checkpoints.checkpoint_dir(run_dir, start)
        networks.load_trained_state(unet, p, load_file(ckpt / networks.weights_file(p)))
        for name in TEXT_ENCODERS if encoders else ():
            networks.load_text_encoder_state(encoders[name], load_file(ckpt / f"{name}.safetensors"))
        state = torch.load(ckpt / "training_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        history = json.loads((ckpt / "state.json").read_text())
        ctx.log.info("resuming %s from step %d", run_dir.name[:12], start)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    bare = accelerator.unwrap_model(unet)
    if encoder_params and world > 1:
        # The encoders are not wrapped for DDP (the caption encoding reads their config); their LoRA gradients
        # are averaged over the processes by hand before each optimizer step, which is what DDP would do.
        ctx.log.info("train_text_encoder on %d processes: text-encoder gradients are averaged by all-reduce", world)

    def batch_loss(index: int, gen: torch.Generator, *, fixed: bool = False) -> torch.Tensor:
        batch, damage = None, None
        try:
            # Read in the stored dtype (fp16: half the bytes to copy); the loss is computed in fp32.
            batch = as_float(source.batch(index, fixed=True) if fixed else feed.take(index))
        except CacheDamaged as e:
            damage = e
        if not fixed:  # every process reads the same fixed batches, so meets the same damage there
            damage = stream.agree_on_damage(damage, device)  # one process's damage stops them all
        if damage is not None:
            # Keep the steps done so far: once the item is recomputed the run resumes right here.
            if main and not fixed and checkpoints.latest_step(run_dir) < index // per_step:
                save(index // per_step)
            raise damage
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            if encoders:  # in-loop encoding, with gradients into the text encoders' LoRA
                batch["embeds"], batch["pooled"] = encode_prompts(batch["captions"], encoders, **text_settings)
            return _loss(unet, batch, p, alphas_cumprod, prediction_type, gen, device, fixed)

    def eval_loss() -> float:
        """The loss on the first batches with fixed noise: comparable across steps and runs."""
        models = [bare, *(encoders[n] for n in TEXT_ENCODERS if encoders)]
        for m in models:
            m.eval()
        with torch.no_grad():
            values = [float(batch_loss(i, torch.Generator().manual_seed(p.seed + 7919 * i), fixed=True))
                      for i in range(min(EVAL_BATCHES, plan.per_epoch))]
        for m in models:
            m.train()
        return sum(values) / len(values)

    def save(step: int) -> Path:
        tmp = Path(tempfile.mkdtemp(dir=run_dir / "checkpoints", prefix=".tmp-"))
        save_file(networks.trained_state(bare, p), tmp / networks.weights_file(p))
        for name in TEXT_ENCODERS if encoders else ():
            save_file(networks.text_encoder_state(encoders[name]), tmp / f"{name}.safetensors")
        state = {"optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict()}
        if ema is not None:
            # EMA covers the UNet's and the text encoders' trained weights alike; the EMA files pair them.
            state["ema"] = ema.state_dict()
            ema.store(trainable)
            ema.copy_to(trainable)
            save_file(networks.trained_state(bare, p), tmp / networks.weights_file(p, ema=True))
            for name in TEXT_ENCODERS if encoders else ():
                save_file(networks.text_encoder_state(encoders[name]), tmp / f"{name}.ema.safetensors")
            ema.restore(trainable)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        torch.save(state, tmp / "training_state.pt")
        checkpoints.write_json(tmp / "network.json", networks.config_dict(bare, p))
        checkpoints.write_json(tmp / "state.json", {"step": step, **history})
        return checkpoints.commit_checkpoint(tmp, run_dir, step, p.max_checkpoints)

    def validate(step: int) -> None:
        if not main or not p.validation_prompts:
            return
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
        stack = {**ctx.models.text_stack(), **encoders}
        with torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
            images = validation.render(
                bare, stack, ctx.models.vae(), noise_scheduler, p.validation_prompts,
                p.validation_negative_prompts, seed=p.validation_seed, size=_validation_size(p, buckets),
                steps=p.validation_steps, guidance=p.validation_guidance, prediction_type=prediction_type,
                zero_terminal_snr=p.zero_terminal_snr)
        if ema is not None:
            ema.restore(trainable)
        validation.save(images, run_dir / "validation" / f"step-{step:08d}")
        logs.images(step, images)

    # --- train ---------------------------------------------------------------------
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    logs = validation.Logs(run_dir / "logs", p.tensorboard and main, start)
    if history["eval_loss_before"] is None:
        history["eval_loss_before"] = eval_loss()
    last = None
    began = time.monotonic()
    feed = stream.open_feed(source, p, start_step=start, max_steps=max_steps, world=world, rank=rank, device=device)
    with feed, ctx.reporter.track("train", max_steps - start) as advance:
        for step in range(start, max_steps):
            step_loss = 0.0
            for micro in range(p.gradient_accumulation_steps):
                index = (step * p.gradient_accumulation_steps + micro) * world + rank
                seed = p.seed * 1_000_003 + index
                torch.manual_seed(seed)  # the global RNG: peft's dropout
                with accelerator.accumulate(unet):
                    loss = batch_loss(index, torch.Generator().manual_seed(seed))
                    accelerator.backward(scaler.scale(loss) if scaler is not None else loss)
                    if fused is not None:  # every weight was stepped as its gradient arrived
                        grad_norm = fused.take_norm()
                    else:
                        if accelerator.sync_gradients:
                            if encoder_params and world > 1:
                                # CLIP-L's last layer gets no gradient (SDXL reads the penultimate one), on every process.
                                for q in (q for q in encoder_params if q.grad is not None):
                                    q.grad = accelerator.reduce(q.grad, reduction="mean")
                            if scaler is not None:
                                scaler.unscale_(optimizer)  # true gradients for clipping (and the inf check)
                            # max_grad_norm 0 clips nothing but still measures the norm for the logs.
                            grad_norm = accelerator.clip_grad_norm_(trainable, p.max_grad_norm or math.inf)
                        if scaler is None:
                            optimizer.step()
                        elif accelerator.sync_gradients:
                            # Skips the step when a gradient overflowed, then adapts the scale (both seeded by
                            # the gradients alone, so a resumed run skips the same steps).
                            scaler.step(optimizer)
                            scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                step_loss += float(accelerator.gather(loss.detach()).mean()) / p.gradient_accumulation_steps
            lr_schedule.step()
            if ema is not None:
                ema.step(trainable)
            history["losses"].append(step_loss)
            done = step + 1
            epoch = plan.batch_at(done * per_step - 1)[0]
            recent = history["losses"][-20:]
            rate = (done - start) / max(time.monotonic() - began, 1e-9)
            advance(1, loss=f"{sum(recent) / len(recent):.4f}", epoch=epoch, lr=f"{lr_schedule.get_last_lr()[0]:.2e}",
                    it_s=f"{rate:.2f}")
            if main:
                logs.scalars(done, {"loss": step_loss, "lr": lr_schedule.get_last_lr()[0], "grad_norm": float(grad_norm)})
            new_epoch = plan.batch_at(done * per_step)[0] > epoch
            if _every(done, p.validation_every_steps) or (new_epoch and _every(epoch + 1, p.validation_every_epochs)):
                validate(done)
            if (_every(done, p.save_every_steps) or (new_epoch and _every(epoch + 1, p.save_every_epochs))
                    or done == max_steps):
                if main:
                    last = save(done)
                accelerator.wait_for_everyone()
    logs.close()
    seconds = round(time.monotonic() - began, 3)  # the steps, checkpoints and validations

    last = checkpoints.checkpoint_dir(run_dir, max_steps)
    weights = last / networks.weights_file(p, ema=ema is not None)
    suffix = ".ema.safetensors" if ema is not None else ".safetensors"
    outputs = {
        "checkpoint": str(last), "network": p.network, "weights": str(weights),
        "network_config": str(last / "network.json"), "logs": str(run_dir / "logs"),
    }
    if p.network != "full":
        outputs.update({"adapter": str(weights), "adapter_config": str(last / "network.json")})
    if encoders:
        outputs.update({name: str(last / f"{name}{suffix}") for name in TEXT_ENCODERS})
    if p.validation_prompts:
        outputs["validation"] = str(run_dir / "validation")
    recent = history["losses"][-20:]
    result = {
        "steps": max_steps, "final_loss": history["losses"][-1] if history["losses"] else math.nan,
        "mean_loss_last_20": sum(recent) / max(1, len(recent)),
        "eval_loss_before": history["eval_loss_before"], "eval_loss_after": eval_loss(),
        "processes": world, "seconds": seconds, "outputs": outputs, "gradient_checkpointing": checkpointing,
        "torch_threads": torch.get_num_threads(),
        # Bytes of the UNet's weights by role and storage dtype after the run: what the precision settings really did.
        "weights_bytes": networks.dtype_counts(bare),
    }
    if main:
        checkpoints.write_json(run_dir / "done.json", result)
    accelerator.wait_for_everyone()
    return result


def _set_threads(p, ctx) -> None:
    """Torch's intra-op threads: the cores this process may use less the loader's reader threads (decision 64)."""
    want = threads.apply(p.loader_workers, torch.get_num_threads())
    if want is not None:
        ctx.log.info("torch threads: %d (usable cores less %d reader threads)", want, p.loader_workers)
        torch.set_num_threads(want)


def _fp16_scaler(device):
    """torch's dynamic loss scaler for `device`, allowed to unscale fp16 gradients (full_fp16 has them; torch
    refuses by default because fp16 weights lose small updates, which is what full_fp16 accepts, as kohya's
    --full_fp16 does with the same patch)."""
    scaler = torch.amp.GradScaler(device.type)
    unscale = scaler._unscale_grads_
    scaler._unscale_grads_ = lambda optimizer, inv_scale, found_inf, allow_fp16: unscale(optimizer, inv_scale, found_inf, True)
    return scaler


def _every(n: int, every: int) -> bool:
    return every > 0 and n % every == 0


def _loss(unet, b: dict, p, alphas_cumprod, prediction_type: str, gen: torch.Generator, device, fixed: bool):
    """One batch's loss; each step is a function of `training.losses` (see its docstring for the order)."""
    x0 = (b["mean"] + b["std"] * torch.randn(b["mean"].shape, generator=gen) - b["shift"]) * b["scale"]
    noise = torch.randn(x0.shape, generator=gen)
    if p.noise_offset or p.adaptive_noise_scale:
        noise = losses.offset_noise(noise, x0, p.noise_offset, gen, random_strength=p.noise_offset_random_strength,
                                    adaptive_scale=p.adaptive_noise_scale)
    if p.multires_noise_iterations:
        noise = losses.multires_noise(noise, gen, p.multires_noise_iterations, p.multires_noise_discount)
    t = losses.sample_timesteps(x0.shape[0], p.min_timestep, p.max_timestep, gen)
    input_noise = losses.perturbed(noise, p.input_perturbation, gen) if p.input_perturbation and not fixed else noise
    x0, noise, input_noise, t = x0.to(device), noise.to(device), input_noise.to(device), t.to(device)
    noisy = losses.add_noise(x0, input_noise, t, alphas_cumprod)
    pred = unet(noisy, t, b["embeds"].to(device), added_cond_kwargs={
        "text_embeds": b["pooled"].to(device), "time_ids": b["time_ids"].to(device)}).sample.float()
    tgt = losses.target(x0, noise, t, alphas_cumprod, prediction_type)
    c = losses.huber_c(t.cpu(), p.huber_schedule, p.huber_c, alphas_cumprod.cpu()) if p.loss_type in ("huber", "smooth_l1") else None
    per_sample = losses.per_sample_mean(losses.elementwise_loss(pred, tgt, p.loss_type, c), b["mask"])
    weight = torch.ones(x0.shape[0])
    snr_t = losses.snr(alphas_cumprod, t).cpu()
    if p.min_snr_gamma:
        weight = weight * losses.min_snr_weight(snr_t, p.min_snr_gamma, prediction_type)
    if p.debiased_estimation:
        weight = weight * losses.debiased_weight(snr_t, prediction_type)
    if p.scale_v_pred_loss_like_noise_pred and prediction_type == "v_prediction":
        weight = weight * losses.v_pred_like_noise_pred_weight(snr_t)
    if p.prior_loss_weight != 1.0:
        weight = weight * losses.prior_weight(b["is_reg"], p.prior_loss_weight)
    return (per_sample * weight.to(per_sample.device)).mean()


def _validation_size(p, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    if p.validation_size:
        return (p.validation_size, p.validation_size)
    # The most common bucket: a size the run actually trains at.
    counts: dict[tuple[int, int], int] = {}
    for bucket in buckets:
        counts[bucket] = counts.get(bucket, 0) + 1
    return max(counts, key=counts.get)
