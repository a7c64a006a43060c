#!/usr/bin/env python
"""Turn a distilled SPLAM pipeline into a plain Stable Diffusion pipeline.

``python scripts/fold_gamma.py --model OUT --out DIR`` folds the constant gamma = 1
conditioning into the UNet's time embedding (``splam.fold``): the UNet gets the teacher's
architecture, samples the same latents, and loads in any tool that loads SD 1.5. The result
is a ``StableDiffusionPipeline`` with ``LCMScheduler``; sample it with ``guidance_scale=1``
(no classifier-free guidance) and 1 to 4 steps.
"""

import argparse
import os
import sys

from diffusers import DiffusionPipeline, StableDiffusionPipeline

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from splam.fold import fold_gamma_embedding  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A distilled SPLAM pipeline folder or Hub id.")
    parser.add_argument("--out", required=True, help="Where to write the plain SD pipeline.")
    args = parser.parse_args()
    source = DiffusionPipeline.from_pretrained(args.model)
    plain = StableDiffusionPipeline(
        vae=source.vae,
        text_encoder=source.text_encoder,
        tokenizer=source.tokenizer,
        unet=fold_gamma_embedding(source.unet),
        scheduler=source.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    plain.save_pretrained(args.out)
    print(f"Wrote a StableDiffusionPipeline with a plain UNet to {args.out}; sample it with guidance_scale=1")


if __name__ == "__main__":
    main()
