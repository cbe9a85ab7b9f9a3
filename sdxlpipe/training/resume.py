"""What a training checkpoint holds: `save` writes one, `restore` resumes a run from the newest.

A checkpoint directory (`checkpoints.py` places it atomically) holds the
trained weights (`networks.weights_file`; the text encoders' with
train_text_encoder), with EMA also the EMA weights (`*.ema.safetensors`),
`training_state.pt` (optimizer, LR schedule, EMA, fp16 loss scaler),
`network.json` and `state.json` (the step and the loss history). Restoring all
of it is what lets a resumed run continue the exact loss curve of an unbroken
one (docs/decisions.md 3).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from sdxlpipe.training import checkpoints, networks

if TYPE_CHECKING:
    from sdxlpipe.training.loop import Run


def restore(run: Run) -> None:
    """Load the newest checkpoint of the run directory into the run (before accelerate wraps the model),
    and set `run.start` and `run.history` from it; a run without one starts at step 0."""
    start = checkpoints.latest_step(run.run_dir)
    if not start:
        return
    model, opt = run.model, run.opt
    ckpt = checkpoints.checkpoint_dir(run.run_dir, start)
    networks.load_trained_state(model.bare, run.p, load_file(ckpt / networks.weights_file(run.p)))
    for name, encoder in model.text_encoders.items():
        networks.load_text_encoder_state(encoder, load_file(ckpt / f"{name}.safetensors"))
    state = torch.load(ckpt / "training_state.pt", weights_only=True)
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.lr_schedule.load_state_dict(state["lr_schedule"])
    if opt.ema is not None:
        opt.ema.load_state_dict(state["ema"])
    if run.scaler is not None and "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    run.history = json.loads((ckpt / "state.json").read_text())
    run.start = start
    run.ctx.log.info("resuming %s from step %d", run.run_dir.name[:12], start)


def save(run: Run, step: int) -> Path:
    """Write the checkpoint of `step` (main process only); returns its directory."""
    p, model, opt = run.p, run.model, run.opt
    tmp = Path(tempfile.mkdtemp(dir=run.run_dir / "checkpoints", prefix=".tmp-"))
    save_file(networks.trained_state(model.bare, p), tmp / networks.weights_file(p))
    for name, encoder in model.text_encoders.items():
        save_file(networks.text_encoder_state(encoder), tmp / f"{name}.safetensors")
    state = {"optimizer": opt.optimizer.state_dict(), "lr_schedule": opt.lr_schedule.state_dict()}
    if opt.ema is not None:
        # EMA covers the UNet's and the text encoders' trained weights alike; the EMA files pair them.
        state["ema"] = opt.ema.state_dict()
        opt.ema.store(opt.params)
        opt.ema.copy_to(opt.params)
        save_file(networks.trained_state(model.bare, p), tmp / networks.weights_file(p, ema=True))
        for name, encoder in model.text_encoders.items():
            save_file(networks.text_encoder_state(encoder), tmp / f"{name}.ema.safetensors")
        opt.ema.restore(opt.params)
    if run.scaler is not None:
        state["scaler"] = run.scaler.state_dict()
    torch.save(state, tmp / "training_state.pt")
    checkpoints.write_json(tmp / "network.json", networks.config_dict(model.bare, p))
    checkpoints.write_json(tmp / "state.json", {"step": step, **run.history})
    return checkpoints.commit_checkpoint(tmp, run.run_dir, step, p.max_checkpoints)
