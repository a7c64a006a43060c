#!/usr/bin/env python
"""FID and CLIP score on COCO captions, the paper's protocol, for any diffusers pipeline.

    accelerate launch scripts/evaluate_coco.py --model path/to/splam --captions captions_val2014.json \\
        --reference_images val2014/ --num_images 30000 --steps 1 2 4 --out results.json

Distilled models (an ``LCMScheduler`` pipeline) sample at ``guidance_scale=1``; ``--teacher_steps``
instead evaluates a teacher with DDIM and ``--guidance_scale``, for the reference rows. One
caption per image is chosen with a fixed seed; image ``i`` is sampled with seed ``seed + i``
and written with its prompt and seed under ``--work_dir``, so an interrupted evaluation resumes
where it stopped, and processes under ``accelerate launch`` split the images between them. Each
row's folder records the model and settings its images were made with (``settings.json``): a
rerun with another model or settings in the same ``--work_dir`` is refused, and an image whose
prompt or seed differ from this run's (another ``--num_images`` or ``--seed``) is made again.
Generated and reference images are resized (shorter side, bicubic) and centre-cropped to
``--resolution`` before either metric sees them. FID: torchmetrics' ``FrechetInceptionDistance``
(Inception-v3 pool features, weights from torch-fidelity on first use, or ``--fid_feature_extractor``);
the reference statistics are saved to ``--work_dir`` and can be reused with ``--reference_stats``.
CLIP score: torchmetrics' ``CLIPScore`` with ``--clip_model``.
"""

import argparse
import glob
import json
import os
import platform
import random
import sys
import time

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from diffusers import DDIMScheduler, DiffusionPipeline, LCMScheduler
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from splam.args import one_line  # noqa: E402
from splam.checkpoints import READ_ERRORS  # noqa: E402
from splam.cli import IMAGE_EXTENSIONS, SAMPLING_DTYPES, batched, load_or_exit, read_prompt_file, sampling_dtype  # noqa: E402


def load_prompts(path: str, num_images: int, seed: int) -> list:
    """``num_images`` prompts: from a COCO captions file, one seeded choice of caption per image and a
    seeded choice of images; from a text file, a seeded choice of its lines."""
    rng = random.Random(seed)
    if path.endswith(".json"):
        by_image = {}
        try:
            with open(path, encoding="utf-8") as handle:
                annotations = json.load(handle)["annotations"]
            for annotation in annotations:
                by_image.setdefault(annotation["image_id"], []).append(annotation["caption"].strip())
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # not JSON, or another COCO file
            raise SystemExit(f"error: --captions {path} is no COCO captions file (captions_*.json, whose annotations "
                             f"each have an image_id and a caption): {one_line(error)}") from error
        prompts = [rng.choice(sorted(by_image[image_id])) for image_id in sorted(by_image)]
    else:
        prompts = read_prompt_file(path, "--captions")
    if num_images > len(prompts):
        raise SystemExit(f"error: --num_images {num_images} is more than the {len(prompts)} captioned images in {path}")
    chosen = sorted(rng.sample(range(len(prompts)), num_images))
    return [prompts[index] for index in chosen]


def resize_and_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """Shorter side to ``resolution`` (bicubic), centre crop; ``uint8 [3, R, R]``."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution))).transpose(2, 0, 1).copy()


def configurations(args) -> list:
    """``(name, sampler, steps, guidance_scale)`` of every row to evaluate."""
    if args.teacher_steps:
        return [(f"ddim-{steps}-cfg{args.guidance_scale:g}", "ddim", steps, args.guidance_scale) for steps in args.teacher_steps]
    return [(f"lcm-{steps}", "lcm", steps, 1.0) for steps in args.steps]


def check_row_settings(args, name, dtype) -> None:
    """Record in the row's folder what its images are made with, or refuse a folder whose
    images were made otherwise (they would be scored as this model's)."""
    folder = os.path.join(args.work_dir, name)
    os.makedirs(folder, exist_ok=True)
    settings = {"model": args.model, "resolution": args.resolution, "dtype": str(dtype)}
    path = os.path.join(folder, "settings.json")
    if os.path.exists(path) and glob.glob(os.path.join(folder, "[0-9]*.json")):
        with open(path, encoding="utf-8") as handle:
            recorded = json.load(handle)
        changed = [key for key in settings if recorded.get(key) != settings[key]]
        if changed:
            raise SystemExit(f"error: {folder} holds images made with another {', '.join(changed)} "
                             f"({', '.join(str(recorded.get(key)) for key in changed)}): use another --work_dir or --out")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(settings, handle)


def already_made(folder, index, prompt, seed) -> bool:
    """Whether image ``index`` is there with its record of ``prompt`` and ``seed``, which is written
    after the image: a record cut short (a run killed while it wrote it) means the image is made again."""
    try:
        with open(os.path.join(folder, f"{index:06d}.json"), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):  # none, or cut short
        return False
    return record.get("prompt") == prompt and record.get("seed") == seed


def row_scheduler(pipeline, sampler: str):
    return (LCMScheduler if sampler == "lcm" else DDIMScheduler).from_config(pipeline.scheduler.config)


def check_row_steps(pipeline, rows) -> None:
    """Refuse, before any row is sampled, a step count its scheduler cannot take (LCMScheduler's at
    most the model's ``original_inference_steps``), which would stop the run after the rows before it."""
    for name, sampler, steps, _ in rows:
        try:
            row_scheduler(pipeline, sampler).set_timesteps(steps)
        except ValueError as error:
            raise SystemExit(f"error: the row {name} cannot be sampled: {one_line(error)}") from error


def generate(args, pipeline, prompts, name, sampler, steps, guidance_scale, state) -> None:
    """Write the images this process owns and has not written yet, with their prompt, seed and time."""
    folder = os.path.join(args.work_dir, name)
    mine = [index for index in range(state.process_index, len(prompts), state.num_processes)
            if not already_made(folder, index, prompts[index], args.seed + index)]
    pipeline.scheduler = row_scheduler(pipeline, sampler)
    for start in range(0, len(mine), args.batch_size):
        batch = mine[start:start + args.batch_size]
        started = time.perf_counter()
        images = pipeline(
            prompt=[prompts[index] for index in batch],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=args.resolution,
            width=args.resolution,
            generator=[torch.Generator().manual_seed(args.seed + index) for index in batch],
        ).images
        seconds = (time.perf_counter() - started) / len(batch)
        for index, image in zip(batch, images):
            image.save(os.path.join(folder, f"{index:06d}.png"))
            with open(os.path.join(folder, f"{index:06d}.json"), "w", encoding="utf-8") as handle:
                json.dump({"prompt": prompts[index], "seed": args.seed + index, "seconds": seconds}, handle)
    print(f"[process {state.process_index}] {name}: {len(mine)} new images")


def read_generated(args, name, indices):
    """The records and ``uint8 [N, 3, R, R]`` pixels of the row's images ``indices``."""
    folder = os.path.join(args.work_dir, name)
    records = [json.load(open(os.path.join(folder, f"{index:06d}.json"), encoding="utf-8")) for index in indices]
    pixels = np.stack([resize_and_crop(Image.open(os.path.join(folder, f"{index:06d}.png")), args.resolution)
                       for index in indices])
    return records, pixels


def make_fid(args):
    from torchmetrics.image.fid import FrechetInceptionDistance

    feature = torch.jit.load(args.fid_feature_extractor) if args.fid_feature_extractor else 2048
    # Only the main process scores: no syncing of metric states between processes.
    return FrechetInceptionDistance(feature=feature, reset_real_features=False, sync_on_compute=False)


def reference_image_paths(folder: str) -> list:
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.lower().endswith(IMAGE_EXTENSIONS))


REFERENCE_STATS_KEYS = ("sum", "cov_sum", "num_samples")


def read_reference_stats(path: str) -> dict:
    """A ``reference_stats.pt`` of ``load_reference``, or ``SystemExit`` with one line: read before any
    sampling, as the scoring reads it after hours of it."""
    try:
        stats = torch.load(path, map_location="cpu")
    except READ_ERRORS as error:
        raise SystemExit(f"error: cannot read --reference_stats {path}: {one_line(error)}") from error
    if not isinstance(stats, dict) or not all(key in stats for key in REFERENCE_STATS_KEYS):
        raise SystemExit(f"error: --reference_stats {path} is no reference_stats.pt of this script (one holds "
                         f"{', '.join(REFERENCE_STATS_KEYS)})")
    return stats


def load_reference(args, fid, stats=None) -> None:
    """Feed the reference images, or ``stats`` (``read_reference_stats``), to ``fid``; the images'
    statistics are saved (into a staging file renamed when complete: a run killed while it wrote it
    leaves none for ``--reference_stats`` to be given cut short)."""
    if stats is not None:
        fid.real_features_sum, fid.real_features_cov_sum, fid.real_features_num_samples = (
            stats[key].to(fid.device) for key in REFERENCE_STATS_KEYS)
        return
    stats_path = os.path.join(args.work_dir, "reference_stats.pt")
    paths = reference_image_paths(args.reference_images)
    for chunk in batched(paths, 64):
        pixels = np.stack([resize_and_crop(Image.open(path), args.resolution) for path in chunk])
        fid.update(torch.from_numpy(pixels).to(fid.device), real=True)
    torch.save({"sum": fid.real_features_sum.cpu(), "cov_sum": fid.real_features_cov_sum.cpu(),
                "num_samples": fid.real_features_num_samples.cpu(), "images": len(paths)}, stats_path + ".partial")
    os.replace(stats_path + ".partial", stats_path)


def projected(features):
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class ProjectedCLIP(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features``/``get_text_features`` return the projected
    embeddings as tensors, as torchmetrics' ``CLIPScore`` expects: transformers 5 returns them
    inside a ``BaseModelOutputWithPooling`` (as its ``pooler_output``)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    def get_image_features(self, *args, **kwargs):
        return projected(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return projected(self.clip.get_text_features(*args, **kwargs))


def clip_scorer(args):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    return CLIPScore(model_name_or_path=lambda: (ProjectedCLIP(CLIPModel.from_pretrained(args.clip_model)),
                                                 CLIPProcessor.from_pretrained(args.clip_model)),
                     sync_on_compute=False)


def score(args, fid, clip, name, count) -> dict:
    """FID and CLIP score of the row's ``count`` images, read 64 at a time (30,000 at 512 px
    would take 24 GB at once)."""
    fid.reset()
    clip.reset()
    seconds = []
    for indices in batched(range(count), 64):
        records, pixels = read_generated(args, name, indices)
        pixels = torch.from_numpy(pixels).to(fid.device)
        fid.update(pixels, real=False)
        clip.update(pixels, [record["prompt"] for record in records])
        seconds += [record["seconds"] for record in records]
    return {"fid": float(fid.compute()), "clip_score": float(clip.compute()), "images": count,
            "seconds_per_image": float(np.mean(seconds))}


def markdown_table(model, rows) -> str:
    lines = [f"Model: `{model}`", "", "| sampler | steps | guidance | FID | CLIP score | images | s / image |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {row['sampler']} | {row['steps']} | {row['guidance_scale']:g} | {row['fid']:.2f} | {row['clip_score']:.2f} "
              f"| {row['images']} | {row['seconds_per_image']:.3f} |" for row in rows]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A diffusers pipeline folder or Hub id.")
    parser.add_argument("--captions", required=True, help="COCO captions JSON, or a text file with one prompt per line.")
    reference = parser.add_mutually_exclusive_group(required=True)
    reference.add_argument("--reference_images", help="Folder of the real images (e.g. COCO val2014).")
    reference.add_argument("--reference_stats", help="reference_stats.pt saved by an earlier run.")
    parser.add_argument("--num_images", type=int, default=30000, help="30000 (COCO 2014) or 5000 (COCO 2017), as in the paper.")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="Steps of a distilled model (LCMScheduler).")
    parser.add_argument("--teacher_steps", type=int, nargs="+", default=None, help="Evaluate as a teacher: DDIM steps.")
    parser.add_argument("--guidance_scale", type=float, default=8.5, help="The teacher's CFG scale (with --teacher_steps).")
    parser.add_argument("--resolution", type=int, default=512, help="Generation size, and the size both metrics see.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="Seeds the caption choice; image i uses seed + i.")
    parser.add_argument("--clip_model", default="openai/clip-vit-large-patch14", help="CLIP model for the CLIP score.")
    parser.add_argument("--fid_feature_extractor", default=None,
                        help="A TorchScript module (uint8 [N, 3, H, W] -> [N, D]) to replace Inception-v3 features.")
    parser.add_argument("--dtype", choices=sorted(SAMPLING_DTYPES), default=None, help="Default: fp16 on CUDA, else fp32.")
    parser.add_argument("--work_dir", default=None, help="Generated images and reference statistics (default: next to --out).")
    parser.add_argument("--out", required=True, help="results.json; the table goes next to it as .md.")
    args = parser.parse_args()
    if args.num_images < 2:
        parser.error(f"--num_images must be at least 2 (FID compares two distributions), got {args.num_images}")
    # Checked now: each would stop the sampling at its first batch, with a traceback.
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.resolution < 8 or args.resolution % 8:
        parser.error(f"--resolution must be a multiple of 8, at least 8 (the VAE's factor), got {args.resolution}")
    if min(args.teacher_steps or args.steps) < 1:
        parser.error(f"--steps and --teacher_steps must be at least 1, got {args.teacher_steps or args.steps}")
    args.work_dir = args.work_dir or os.path.splitext(args.out)[0] + "-images"
    # Checked now: the scoring reads them after hours of sampling.
    if args.reference_images is not None and (not os.path.isdir(args.reference_images)
                                              or len(reference_image_paths(args.reference_images)) < 2):
        parser.error(f"--reference_images {args.reference_images} is not a folder of at least 2 images "
                     f"({', '.join(IMAGE_EXTENSIONS)})")
    for flag, path in (("--reference_stats", args.reference_stats), ("--captions", args.captions),
                       ("--fid_feature_extractor", args.fid_feature_extractor)):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{flag} {path}: no such file")

    # Like Accelerator, honour accelerate's CPU flag (accelerate launch --cpu, or torchrun on CPUs).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    prompts = load_prompts(args.captions, args.num_images, args.seed)
    dtype = sampling_dtype(args.dtype, state.device)
    rows = configurations(args)
    if state.is_main_process:
        for name, *_ in rows:
            check_row_settings(args, name, dtype)
        # Before hours of sampling: the metrics' packages and weights (Inception from torch-fidelity
        # on first use, CLIP from the Hub), on the GPU where there is one (hours on a CPU for 30k).
        try:
            fid, clip = make_fid(args).to(state.device), clip_scorer(args).to(state.device)
        except (ImportError, OSError) as error:
            raise SystemExit(f"error: cannot build the metrics: {' '.join(str(error).split())}") from error
        reference_stats = read_reference_stats(args.reference_stats) if args.reference_stats else None
    state.wait_for_everyone()
    pipeline = load_or_exit(DiffusionPipeline, args.model, "a pipeline").to(state.device, dtype)
    pipeline.set_progress_bar_config(disable=True)
    check_row_steps(pipeline, rows)
    for name, sampler, steps, guidance_scale in rows:
        generate(args, pipeline, prompts, name, sampler, steps, guidance_scale, state)
    state.wait_for_everyone()
    if not state.is_main_process:
        return

    load_reference(args, fid, reference_stats)  # after sampling: the other processes would wait on it at a barrier
    results = []
    for name, sampler, steps, guidance_scale in rows:
        results.append({"name": name, "sampler": sampler, "steps": steps, "guidance_scale": guidance_scale,
                        **score(args, fid, clip, name, len(prompts))})
    import diffusers
    import torchmetrics
    import transformers

    report = {
        "model": args.model, "results": results,
        "settings": {key: value for key, value in vars(args).items()},
        "seeds": {"caption_choice": args.seed, "images": [args.seed, args.seed + len(prompts) - 1]},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "torchmetrics": torchmetrics.__version__},
        "device": str(state.device),
    }
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    table = markdown_table(args.model, results)
    with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as handle:
        handle.write(table)
    print(table)


if __name__ == "__main__":
    main()
