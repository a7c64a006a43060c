#!/usr/bin/env python
"""Sample a distilled SPLAM pipeline in 1 to 4 steps.

``python scripts/sample.py --model DIR --prompt "..." --steps 2 --out image.png`` loads the
folder (or Hub id) with ``DiffusionPipeline`` and samples with its ``LCMScheduler`` at
``guidance_scale=1``, the setting a SPLAM model was trained for.
"""

import argparse
import time

import torch
from diffusers import DiffusionPipeline, LCMScheduler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A distilled pipeline folder or Hub id.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--steps", type=int, default=2, choices=[1, 2, 3, 4], help="Sampling steps.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="sample.png", help="Where to write the PNG.")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipeline = DiffusionPipeline.from_pretrained(args.model).to(device, dtype)
    if not isinstance(pipeline.scheduler, LCMScheduler):
        raise SystemExit(f"{args.model} has a {type(pipeline.scheduler).__name__}, not the LCMScheduler of a distilled model")
    started = time.perf_counter()
    image = pipeline(
        prompt=args.prompt,
        num_inference_steps=args.steps,
        guidance_scale=1.0,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
    ).images[0]
    seconds = time.perf_counter() - started
    image.save(args.out)
    print(f"Wrote {args.out} ({image.width}x{image.height}, {args.steps} steps, {seconds:.2f} s on {device})")


if __name__ == "__main__":
    main()
