"""Few-step samples of the student and the target during training.

Sampling uses ``LCMScheduler`` with ``guidance_scale=1``: diffusers' LCM pipeline then
embeds ``guidance_scale - 1 = 0``, which is ``E(1)``, the sub-path endpoint the model
was trained to predict there (the authors sampled at the pipeline's default guidance,
i.e. at a wrong gamma, SPEC defect 7).
"""

import logging
import os

import numpy as np
import torch
from diffusers import LatentConsistencyModelPipeline
from PIL import Image

from .args import VALIDATION_STEPS
from .training import mixed_precision_autocast

logger = logging.getLogger(__name__)

# The trackers send_to_trackers gives images to.
IMAGE_TRACKERS = ("tensorboard", "wandb")


def few_step_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> LatentConsistencyModelPipeline:
    """The pipeline a distilled SPLAM model is sampled and published with."""
    return LatentConsistencyModelPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def sample_validation_images(pipeline, prompts, resolution: int, seed: int) -> dict:
    """``{num_steps: [PIL image per prompt]}`` for 1, 2 and 4 steps, the same seed for each prompt.

    Eager even where ``--torch_compile`` compiled the UNets in place: a batch of one image, and
    the float32 target of the export, are new shapes and dtypes to the compiled code, which
    would spend minutes compiling for a few calls (measured on a CPU: 20 s for the tiny
    preset's target at the end of every run)."""
    pipeline.set_progress_bar_config(disable=True)
    images = {}
    for num_steps in VALIDATION_STEPS:
        images[num_steps] = [
            pipeline(
                prompt=prompt,
                num_inference_steps=num_steps,
                guidance_scale=1.0,
                height=resolution,
                width=resolution,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                output_type="pil",
            ).images[0]
            for prompt in prompts
        ]
    return images


def image_grid(rows) -> Image.Image:
    """Paste rows of equally sized images into one image, row after row."""
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(row) for row in rows), height * len(rows)))
    for row_index, row in enumerate(rows):
        for column, image in enumerate(row):
            grid.paste(image, (column * width, row_index * height))
    return grid


def log_validation(accelerator, models: dict, vae, text_encoder, tokenizer, scheduler, args, step: int) -> None:
    """Sample ``args.validation_prompts`` with each of ``models`` (name -> UNet), save the
    images under ``output_dir/validation/step-<step>/`` and send them to the trackers that take images
    (``IMAGE_TRACKERS``)."""
    seed = 0 if args.seed is None else args.seed
    step_dir = os.path.join(args.output_dir, "validation", f"step-{step}")
    os.makedirs(step_dir, exist_ok=True)
    for name, unet in models.items():
        pipeline = few_step_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
        # Sampling draws from its own generator; forking keeps the training RNG as it was anyway.
        with mixed_precision_autocast(accelerator)(), torch.random.fork_rng(devices=[]):
            images = sample_validation_images(pipeline, args.validation_prompts, args.resolution, seed)
        for num_steps, step_images in images.items():
            for index, image in enumerate(step_images):
                image.save(os.path.join(step_dir, f"{name}-{num_steps}step-{index}.png"))
            send_to_trackers(accelerator, f"validation/{name}/{num_steps}-step", step_images, args.validation_prompts, step)


def note_trackers_without_images(accelerator) -> None:
    """Say which trackers get the validation's scalars but not its images."""
    blind = [tracker.name for tracker in accelerator.trackers if tracker.name not in IMAGE_TRACKERS]
    if blind:
        logger.warning(f"validation images go to <output_dir>/validation/ and to {' and '.join(IMAGE_TRACKERS)} only; "
                       f"{', '.join(blind)} gets the scalars alone")


def send_to_trackers(accelerator, tag: str, images, prompts, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(image) for image in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image, caption=prompt) for image, prompt in zip(images, prompts)]}, step=step)
