#!/usr/bin/env python
"""Sample a distilled SPLAM pipeline (or a folded one) in 1 to 4 steps into a PNG grid.

    python scripts/sample.py --model DIR --prompt "a cat" --prompt "a rocket" --steps 2 --out grid.png
    python scripts/sample.py --model DIR --prompt_file prompts.txt --num_images 4 --seed 7 --dtype fp16

The pipeline is loaded with ``DiffusionPipeline`` and sampled with its ``LCMScheduler`` at
``guidance_scale=1``, the setting SPLAM trains for. One row per prompt, ``--num_images``
columns; the device is CUDA, then Apple's MPS, then the CPU, unless ``--device`` says.
"""

import argparse
import os
import sys
import time

import torch
from diffusers import DiffusionPipeline, LCMScheduler
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from splam.args import one_line  # noqa: E402
from splam.cli import SAMPLING_DTYPES, load_or_exit, read_prompt_file, sampling_dtype  # noqa: E402
from splam.validation import image_grid  # noqa: E402


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def read_prompts(args) -> list:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file, "--prompt_file")
    if not prompts:
        raise SystemExit("error: give --prompt (several times if you like) or --prompt_file")
    return prompts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A distilled pipeline folder or Hub id.")
    parser.add_argument("--prompt", action="append", help="A prompt; repeat for several.")
    parser.add_argument("--prompt_file", help="A text file, one prompt per line.")
    parser.add_argument("--steps", type=int, default=2, choices=[1, 2, 3, 4], help="Sampling steps.")
    parser.add_argument("--num_images", type=int, default=1, help="Images per prompt.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None, help="Default: the UNet's native size.")
    parser.add_argument("--width", type=int, default=None, help="Default: the UNet's native size.")
    parser.add_argument("--dtype", choices=sorted(SAMPLING_DTYPES), default=None, help="Default: fp16 on CUDA, else fp32.")
    parser.add_argument("--device", default=None, help="Default: cuda, mps or cpu, whichever is there.")
    parser.add_argument("--out", default="samples.png", help="Where to write the PNG grid.")
    args = parser.parse_args()
    if args.num_images < 1:
        parser.error(f"--num_images must be at least 1, got {args.num_images}")
    if any(size is not None and (size < 8 or size % 8) for size in (args.height, args.width)):
        parser.error(f"--height and --width must be positive multiples of 8, got {args.height} and {args.width}")
    # Checked before sampling, which would otherwise be lost to a grid that cannot be saved.
    if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
        parser.error(f"--out {args.out}: give an image file name (.png, .jpg, ...)")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    except OSError as error:
        parser.error(f"--out {args.out}: cannot create its folder ({error.strerror or error})")

    prompts = read_prompts(args)
    device = args.device or default_device()
    try:  # a device this machine lacks (or a misspelt one) stops the script before the pipeline loads
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        parser.error(f"--device {device}: {one_line(error)}")
    dtype = sampling_dtype(args.dtype, device)
    pipeline = load_or_exit(DiffusionPipeline, args.model, "a pipeline").to(device, dtype)
    if not isinstance(pipeline.scheduler, LCMScheduler):
        raise SystemExit(f"error: {args.model} has a {type(pipeline.scheduler).__name__}, not the LCMScheduler of a "
                         "distilled model")
    pipeline.set_progress_bar_config(disable=True)

    started = time.perf_counter()
    rows = [
        pipeline(
            prompt=prompt,
            num_inference_steps=args.steps,
            guidance_scale=1.0,
            num_images_per_prompt=args.num_images,
            height=args.height,
            width=args.width,
            generator=torch.Generator(device="cpu").manual_seed(args.seed + index),
        ).images
        for index, prompt in enumerate(prompts)
    ]
    seconds = time.perf_counter() - started
    image_grid(rows).save(args.out)
    count = len(prompts) * args.num_images
    print(f"Wrote {args.out}: {count} images ({len(prompts)} prompts x {args.num_images}), {args.steps} steps, "
          f"{seconds:.2f} s in all, {seconds / count:.3f} s per image on {device} ({str(dtype).replace('torch.', '')})")


if __name__ == "__main__":
    main()
