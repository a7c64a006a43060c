#!/usr/bin/env python
"""Turn a distilled SPLAM pipeline into a plain Stable Diffusion pipeline.

``python scripts/fold_gamma.py --model OUT --out DIR`` folds the constant gamma = 1
conditioning into the UNet's time embedding (``splam.fold``): the UNet gets the teacher's
architecture, samples the same latents, and loads in any tool that loads SD 1.5. The result
is a ``StableDiffusionPipeline`` with ``LCMScheduler``; sample it with ``guidance_scale=1``
(no classifier-free guidance) and 1 to 4 steps.
"""

import argparse
import json
import os
import shutil
import sys

from diffusers import DiffusionPipeline, StableDiffusionPipeline

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from splam.args import one_line  # noqa: E402
from splam.cli import load_or_exit  # noqa: E402
from splam.fold import fold_gamma_embedding  # noqa: E402


def holds_a_fold(folder: str) -> bool:
    """Whether ``folder`` holds what this script writes, which a rerun may overwrite."""
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError):
        return False
    return index.get("_class_name") == "StableDiffusionPipeline" and index.get("scheduler", [None, None])[1] == "LCMScheduler"


def save_in_place_of(pipeline, out: str) -> None:
    """Save ``pipeline`` into a hidden folder beside ``out``, then rename it to ``out`` (replacing an
    earlier fold there): a run killed while it writes leaves no half-written ``out``, which a rerun
    would refuse as something else than a fold, only the hidden folder, which the rerun replaces."""
    out = os.path.abspath(out)
    staging = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        pipeline.save_pretrained(staging)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(staging, out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A distilled SPLAM pipeline folder or Hub id.")
    parser.add_argument("--out", required=True, help="Where to write the plain SD pipeline.")
    args = parser.parse_args()
    # A mistyped --out (the distilled model's folder, the teacher's) would have its model overwritten.
    if os.path.exists(args.out) and not (os.path.isdir(args.out) and (not os.listdir(args.out) or holds_a_fold(args.out))):
        parser.error(f"--out {args.out} holds something else than an earlier fold_gamma.py output (a model, other "
                     "files), which would be overwritten: give a new folder")
    source = load_or_exit(DiffusionPipeline, args.model, "a pipeline")
    if getattr(source, "unet", None) is None or source.unet.config.time_cond_proj_dim is None:
        raise SystemExit(f"error: {args.model} has no UNet with a gamma projection (time_cond_proj_dim) to fold: "
                         "give a distilled SPLAM pipeline, not a folded one or a teacher")
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
    try:
        save_in_place_of(plain, args.out)
    except OSError as error:
        raise SystemExit(f"error: cannot write the folded pipeline to {args.out}: {one_line(error)}") from error
    print(f"Wrote a StableDiffusionPipeline with a plain UNet to {args.out}; sample it with guidance_scale=1")


if __name__ == "__main__":
    main()
