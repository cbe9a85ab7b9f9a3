"""Validation images and training logs.

`render` draws the validation prompts with the UNet being trained, each from
its own fixed seed, so the images of step 100 and step 200 differ only by
what was learned. `save` writes one PNG per prompt and one contact sheet per
validation. `Logs` appends scalars to `log.jsonl` (always; no dependency) and
to TensorBoard when asked (it needs the `tensorboard` package).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sdxlpipe.errors import UserError


def render(unet, text_stack: dict, vae, noise_scheduler, prompts, negatives, *, seed: int, size: tuple[int, int],
           steps: int, guidance: float, prediction_type: str = "", zero_terminal_snr: bool = False) -> list:
    """One PIL image per prompt; prompt i is drawn from seed + i.

    No negative prompt means the "" prompt's embedding, as training's caption dropout and A1111/ComfyUI
    sampling use (diffusers would use zeros). `prediction_type` (the run's, which may override the model's
    scheduler config) and zero terminal SNR (with "trailing" timesteps, which reach t = T-1) go to the sampler.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    overrides: dict = {"prediction_type": prediction_type} if prediction_type else {}
    if zero_terminal_snr:
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, scheduler=EulerDiscreteScheduler.from_config(noise_scheduler.config, **overrides),
        **text_stack)
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    images = []
    try:
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                negative = negatives[i] if len(negatives) > 1 else (negatives[0] if negatives else "")
                gen = torch.Generator().manual_seed(seed + i)
                images.append(pipe(prompt, negative_prompt=negative, width=size[0], height=size[1],
                                   num_inference_steps=steps, guidance_scale=guidance, generator=gen).images[0])
    finally:
        unet.train(was_training)
    return images


def grid(images: list):
    """A contact sheet: the images in rows of up to four."""
    from PIL import Image

    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        sheet.paste(img, ((i % cols) * w, (i // cols) * h))
    return sheet


def save(images: list, directory: Path) -> list[Path]:
    """prompt-NN.png per image and grid.png; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(directory / f"prompt-{i:02d}.png")
        img.save(paths[-1])
    paths.append(directory / "grid.png")
    grid(images).save(paths[-1])
    return paths


class Logs:
    """Scalars per step to log.jsonl and, with `tensorboard`, to TensorBoard event files."""

    def __init__(self, directory: Path, tensorboard: bool, resume_step: int = 0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "log.jsonl"
        if self.path.exists():
            # A killed run logged steps past its last checkpoint; they are run again.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("train.tensorboard = true needs the tensorboard package",
                                "pip install tensorboard, or set train.tensorboard = false") from None
            self.writer = SummaryWriter(str(directory / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def images(self, step: int, images: list) -> None:
        if self.writer is not None:
            import numpy as np

            for i, img in enumerate(images):
                self.writer.add_image(f"validation/{i:02d}", np.asarray(img), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
