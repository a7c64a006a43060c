#!/usr/bin/env python
"""Throughput of the real SPLAM training step, on synthetic data.

    python scripts/benchmark.py --preset sd15 --batch_size 12 --resolution 512 --mode readme
    python scripts/benchmark.py --preset tiny --batch_size 4 --resolution 64 --steps 5      # a CPU check

Builds the teacher offline (``scripts/make_tiny_teacher.py --preset``: ``sd15`` is the full
SD 1.5 architecture with random weights), then runs the training script's own step
(``splam.training.encode_batch`` and ``splam_loss``, backward, clipping, optimizer, EMA) for
``--warmup`` plus ``--steps`` timed steps on a random batch already on the device, and prints
s/step (median, min, max), samples/s, peak memory, the FLOPs of a step (counted by
``torch.utils.flop_counter`` on the first step), achieved TFLOP/s and, given
``--peak_tflops``, the fraction of the floor (the step's FLOPs at the card's peak rate).

Modes: ``readme`` is the seed README's command (fp16, gradient checkpointing, 8-bit Adam) on
images and token ids; ``fast`` trains from precomputed latents and prompt embeddings
(``--train_latents_path_or_url``: no VAE encode or text encoder in the step), drops
checkpointing and 8-bit Adam and adds a half-precision teacher, channels-last and
torch.compile. Any training flag can be added after ``--``.
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, SCRIPTS)
sys.path.insert(0, os.path.dirname(SCRIPTS))
from make_tiny_teacher import make_teacher  # noqa: E402

from splam import update_ema  # noqa: E402
from splam.args import parse_args  # noqa: E402
from splam.models import load_teacher_scheduler  # noqa: E402
from splam.training import (  # noqa: E402
    build_distillation_models,
    encode_batch,
    encode_prompts,
    make_optimizer,
    posterior_moments,
    splam_loss,
)

MODES = {
    "readme": ["--train_shards_path_or_url=synthetic", "--gradient_checkpointing", "--use_8bit_adam"],
    "fast": ["--train_latents_path_or_url=synthetic", "--cast_teacher_unet", "--channels_last", "--torch_compile"],
}


def training_args(teacher_dir, options, extra):
    flags = [
        f"--pretrained_teacher_model={teacher_dir}", "--max_train_steps=1",
        f"--resolution={options.resolution}", f"--train_batch_size={options.batch_size}", "--learning_rate=8e-6",
        "--loss_type=huber", "--adam_weight_decay=0.0", *MODES[options.mode], *extra,
    ]
    if options.mixed_precision:
        flags.append(f"--mixed_precision={options.mixed_precision}")
    return parse_args(flags)


def synthetic_batch(args, models, device):
    """Random images (on the device) and token ids (on the CPU, where the loader leaves them), or
    with ``--train_latents_path_or_url`` what the latent shards would hold for them (float16
    moments and prompt embeddings, on the device)."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand((args.train_batch_size, 3, args.resolution, args.resolution), generator=generator) * 2 - 1
    input_ids = torch.randint(0, len(models.tokenizer), (args.train_batch_size, models.tokenizer.model_max_length),
                              generator=generator)
    if not args.train_latents_path_or_url:
        return pixels.to(device), input_ids
    with torch.no_grad():
        moments = posterior_moments(pixels, models.vae, args.vae_encode_batch_size)
        prompt_embeds = encode_prompts(input_ids, models.text_encoder)
    return moments.half(), prompt_embeds.half()


class Timer:
    """Wall time of a step: CUDA events on a GPU, the host clock (after the work is done) elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.started = time.perf_counter()
        return self

    def __exit__(self, *exc_info):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self.started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--mode", choices=sorted(MODES), default="readme")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="Default: fp16 on CUDA, no on a CPU.")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first (compilation, allocator, cuDNN).")
    parser.add_argument("--peak_tflops", type=float, default=None, help="The card's peak rate, for the floor.")
    parser.add_argument("--teacher_dir", default=None, help="Reuse a teacher folder (built there if missing).")
    parser.add_argument("--out", default=None, help="Also write the figures as JSON.")
    options, extra = parser.parse_known_args()
    extra = [flag for flag in extra if flag != "--"]

    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=options.mixed_precision or ("fp16" if torch.cuda.is_available() else "no"))
    teacher_dir = options.teacher_dir or os.path.join(tempfile.gettempdir(), f"splam-benchmark-{options.preset}")
    if not os.path.exists(os.path.join(teacher_dir, "model_index.json")):
        make_teacher(teacher_dir, options.preset)
    args = training_args(teacher_dir, options, extra)
    teacher_scheduler = load_teacher_scheduler(args)
    torch.manual_seed(0)
    models = build_distillation_models(args, accelerator, teacher_scheduler)
    optimizer = make_optimizer(args, models.unet.parameters())
    models.unet, optimizer = accelerator.prepare(models.unet, optimizer)
    inputs, conditioning = synthetic_batch(args, models, accelerator.device)

    def step(count_flops=False):
        counter = torch.utils.flop_counter.FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
        with counter:
            latents, prompt_embeds = encode_batch(inputs, conditioning, models, args)
            loss = splam_loss(latents, prompt_embeds, models, args, accelerator.autocast)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(models.unet.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(models.target_unet.parameters(), accelerator.unwrap_model(models.unet).parameters(), args.ema_decay)
        return counter.get_total_flops() if count_flops else None

    flops_per_step = step(count_flops=not args.torch_compile)
    for _ in range(options.warmup):
        step()
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(options.steps):
        with Timer(accelerator.device) as timer:
            step()
        times.append(timer.seconds)

    median = statistics.median(times)
    figures = {
        "preset": options.preset, "mode": options.mode, "batch_size": args.train_batch_size, "resolution": args.resolution,
        "mixed_precision": accelerator.mixed_precision, "flags": sys.argv[1:],
        "s_per_step": {"median": median, "min": min(times), "max": max(times)},
        "samples_per_s": args.train_batch_size / median,
        "device": torch.cuda.get_device_name() if accelerator.device.type == "cuda" else f"{platform.machine()} CPU",
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
    }
    if accelerator.device.type == "cuda":
        figures["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if flops_per_step:
        figures["tflop_per_step"] = flops_per_step / 1e12
        figures["achieved_tflops"] = flops_per_step / median / 1e12
        if options.peak_tflops:
            figures["fraction_of_floor"] = (flops_per_step / (options.peak_tflops * 1e12)) / median
    memory = figures.get("peak_memory_gib", figures.get("peak_rss_gib"))
    print(f"{figures['device']}, torch {torch.__version__}, {options.preset} preset, {options.mode} mode, "
          f"batch {args.train_batch_size} at {args.resolution} px, {accelerator.mixed_precision}")
    print(f"s/step: median {median:.4f}, min {min(times):.4f}, max {max(times):.4f} over {len(times)} steps")
    print(f"samples/s: {figures['samples_per_s']:.2f}")
    print(f"peak memory: {memory:.2f} GiB ({'GPU allocated' if 'peak_memory_gib' in figures else 'process RSS'})")
    if flops_per_step:
        print(f"FLOPs: {flops_per_step / 1e12:.3f} TFLOP per step, achieved {figures['achieved_tflops']:.3f} TFLOP/s"
              + (f", {figures['fraction_of_floor']:.1%} of the floor" if "fraction_of_floor" in figures else ""))
    if options.out:
        with open(options.out, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
