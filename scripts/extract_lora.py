#!/usr/bin/env python
"""Extract a LoRA that turns the teacher into the distilled student.

``python scripts/extract_lora.py --teacher T --student DIR --rank R --out LORA_DIR`` takes a
folded student (``scripts/fold_gamma.py``) and its teacher, factorises every changed layer's
weight delta at rank ``R`` (``splam.lora``), and saves a diffusers LoRA. Use it like LCM-LoRA:

    pipe = StableDiffusionPipeline.from_pretrained(T)
    pipe.scheduler = LCMScheduler.from_pretrained(DIR, subfolder="scheduler")  # the training's grid
    pipe.load_lora_weights(LORA_DIR)
    image = pipe(prompt, num_inference_steps=2, guidance_scale=1.0).images[0]
"""

import argparse
import os
import sys

import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from splam.args import one_line  # noqa: E402
from splam.cli import load_or_exit  # noqa: E402
from splam.lora import extract_lora  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="The teacher pipeline (folder or Hub id).")
    parser.add_argument("--student", required=True, help="The folded student pipeline (scripts/fold_gamma.py).")
    parser.add_argument("--rank", type=int, required=True,
                        help="LoRA rank; a layer of lower full rank is padded to it with zero directions.")
    parser.add_argument("--out", required=True, help="Where to write the LoRA.")
    parser.add_argument("--no_bias", action="store_true",
                        help="Leave the bias deltas out: a less exact LoRA that pipe.fuse_lora() can merge (with them, "
                             "fuse_lora fails on the attention layers, which have no bias).")
    parser.add_argument("--report_error", action="store_true",
                        help="Also sample 2 steps with the teacher + LoRA and with the student, same seed, and print "
                             "the mean absolute difference of the latents relative to the student's.")
    args = parser.parse_args()
    if args.rank < 1:
        parser.error(f"--rank must be at least 1, got {args.rank}")
    if os.path.isfile(args.out):
        # diffusers would only log this and write nothing.
        parser.error(f"--out {args.out} is a file: give the folder to write the LoRA into")
    teacher = load_or_exit(UNet2DConditionModel, args.teacher, "the teacher's UNet", subfolder="unet")
    student = load_or_exit(UNet2DConditionModel, args.student, "the student's UNet", subfolder="unet")
    try:
        lora = extract_lora(teacher, student, args.rank, bias=not args.no_bias)
    except ValueError as error:
        raise SystemExit(f"error: {args.student} against {args.teacher}: {error}") from error
    try:
        StableDiffusionPipeline.save_lora_weights(args.out, unet_lora_layers=lora, safe_serialization=True)
    except OSError as error:
        raise SystemExit(f"error: cannot write the LoRA to {args.out}: {one_line(error)}") from error
    ranks = [value.shape[0] for key, value in lora.items() if key.endswith("lora_A.weight")]
    # Lower than --rank where every changed layer's full rank is.
    print(f"Wrote a rank-{max(ranks, default=0)} LoRA of {len(ranks)} layers to {args.out}")
    if args.report_error:
        print(f"2-step latent error of teacher + LoRA against the student: {lora_error(args):.2e} (relative mean absolute)")


def two_step_latents(pipeline, prompt="a photograph of an astronaut riding a horse"):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(prompt, num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


def lora_error(args) -> float:
    # float32 throughout: transformers keeps a text encoder saved in float16 so, beside float32 UNets.
    student_pipeline = StableDiffusionPipeline.from_pretrained(args.student).to(dtype=torch.float32)
    student = two_step_latents(student_pipeline)
    teacher = StableDiffusionPipeline.from_pretrained(args.teacher).to(dtype=torch.float32)
    teacher.scheduler = LCMScheduler.from_config(student_pipeline.scheduler.config)
    teacher.load_lora_weights(args.out)
    return ((two_step_latents(teacher) - student).abs().mean() / student.abs().mean()).item()


if __name__ == "__main__":
    main()
