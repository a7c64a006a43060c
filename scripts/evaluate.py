#!/usr/bin/env python
"""Measure few-step students against their teacher on the digits world.

    python scripts/evaluate.py --teacher T --student SPLAM=DIR --student LCM=DIR2 --w_scale 3 --out results.json

For the 40 prompts (every digit in every phrasing, the training captions; the real digits
compared against are held out) and fixed seeds, with the same initial noise for every sampler,
each student samples at 1, 2 and 4 steps (``LCMScheduler``, ``guidance_scale=1``) and the
teacher at 50 DDIM steps with the distillation's guidance (diffusers' ``guidance_scale = w + 1``).
Reported, as mean and spread over seeds:

- trajectory fidelity: mean squared distance of a student's final latents (and decoded pixels,
  in [0, 1]) to the teacher's;
- conditional correctness: how often a digit classifier trained on the real digits reads the
  prompted digit from the generated image;
- distribution: the Frechet distance between generated and real held-out digits in that
  classifier's hidden-layer features, with the teacher's own as the reference.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from digits_world import NAMES, PHRASINGS, caption, digits_split, frechet_distance, judge_features, to_rgb32, to_scan8, train_judge  # noqa: E402
from splam.cli import load_or_exit  # noqa: E402
from splam.validation import image_grid  # noqa: E402

TEACHER_STEPS = 50


def evaluation_prompts():
    return [(label, caption(label, phrasing)) for label in range(len(NAMES)) for phrasing in range(len(PHRASINGS))]


def initial_noise(seed: int, count: int, shape) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((count, *shape), generator=generator)


@torch.no_grad()
def decode(pipeline, latents):
    images = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def to_pil(pixels):
    from PIL import Image

    array = (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(image) for image in array]


def sample(pipeline, prompts, noise, steps, guidance_scale):
    pipeline.set_progress_bar_config(disable=True)
    latents = pipeline(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance_scale, latents=noise.clone(),
                       output_type="latent").images
    return latents, decode(pipeline, latents)


def scores(pixels, labels, judge, real_features):
    scans = to_scan8(to_pil(pixels))
    return {
        "accuracy": float((judge.predict(scans) == np.asarray(labels)).mean()),
        "frechet_distance": frechet_distance(judge_features(judge, scans), real_features),
    }


def summarise(values: list) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": [float(v) for v in values]}


def evaluate(teacher_dir, students: dict, w_scale, steps=(1, 2, 4), seeds=(0, 1, 2), data_seed=0, grid_dir=None):
    train_x, heldout_x, train_y, heldout_y = digits_split(data_seed)
    judge = train_judge(train_x, train_y, data_seed)
    real_scans = to_scan8([to_rgb32(image) for image in heldout_x])
    real_features = judge_features(judge, real_scans)
    labels, prompts = zip(*evaluation_prompts())

    teacher = load_or_exit(StableDiffusionPipeline, teacher_dir, "the teacher")
    teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
    latent_shape = (teacher.unet.config.in_channels, teacher.unet.config.sample_size, teacher.unet.config.sample_size)
    pipelines = {name: load_or_exit(DiffusionPipeline, path, f"the student {name}") for name, path in students.items()}

    raw = {"teacher": {TEACHER_STEPS: []}}
    raw.update({name: {n: [] for n in steps} for name in students})
    grids = {name: [] for name in ["teacher", *students]}
    for seed in seeds:
        noise = initial_noise(seed, len(prompts), latent_shape)
        teacher_latents, teacher_pixels = sample(teacher, list(prompts), noise, TEACHER_STEPS, w_scale + 1.0)
        raw["teacher"][TEACHER_STEPS].append(scores(teacher_pixels, labels, judge, real_features))
        if seed == seeds[0]:
            grids["teacher"].append(to_pil(teacher_pixels[:: len(PHRASINGS)]))
        for name, pipeline in pipelines.items():
            for n in steps:
                latents, pixels = sample(pipeline, list(prompts), noise, n, 1.0)
                record = scores(pixels, labels, judge, real_features)
                record["latent_mse"] = float(((latents - teacher_latents) ** 2).mean())
                record["pixel_mse"] = float(((pixels - teacher_pixels) ** 2).mean())
                raw[name][n].append(record)
                if seed == seeds[0]:
                    grids[name].append(to_pil(pixels[:: len(PHRASINGS)]))
    if grid_dir is not None:
        os.makedirs(grid_dir, exist_ok=True)
        for name, rows in grids.items():
            image_grid(rows).save(os.path.join(grid_dir, f"samples-{name.lower()}.png"))

    results = {"judge_heldout_accuracy": float(judge.score(real_scans, heldout_y)), "seeds": list(seeds),
               "prompts": len(prompts), "w_scale": w_scale, "teacher_steps": TEACHER_STEPS, "methods": {}}
    for name, by_steps in raw.items():
        results["methods"][name] = {
            str(n): {metric: summarise([record[metric] for record in records]) for metric in records[0]}
            for n, records in by_steps.items()
        }
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", action="append", required=True, help="NAME=DIR; repeat for several.")
    parser.add_argument("--w_scale", type=float, required=True, help="The distillation's --w_scale.")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data_seed", type=int, default=0, help="The train/held-out split's seed.")
    parser.add_argument("--grid_dir", default=None, help="Write a sample grid per method here.")
    parser.add_argument("--out", required=True, help="The JSON of results.")
    args = parser.parse_args()
    malformed = [item for item in args.student if "=" not in item]
    if malformed:
        parser.error(f"--student takes NAME=DIR, got {malformed[0]!r}")
    names = [item.split("=", 1)[0] for item in args.student]
    # Each names a row of the results, beside the teacher's: a clash would overwrite one.
    clashing = [name for name in names if not name or name == "teacher" or names.count(name) > 1]
    if clashing:
        parser.error(f"--student names must be unique, not empty and not 'teacher' (the teacher's row), got {clashing[0]!r}")
    students = dict(item.split("=", 1) for item in args.student)
    results = evaluate(args.teacher, students, args.w_scale, args.steps, args.seeds, args.data_seed, args.grid_dir)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps({name: {n: {k: round(v["mean"], 4) for k, v in m.items()} for n, m in r.items()}
                      for name, r in results["methods"].items()}, indent=1))


if __name__ == "__main__":
    main()
