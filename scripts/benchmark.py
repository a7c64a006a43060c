#!/usr/bin/env python
"""Throughput of SPLAM training: the real step on synthetic data, or the training script end to end.

    python scripts/benchmark.py --preset sd15 --batch_size 12 --resolution 512 --mode readme
    python scripts/benchmark.py --preset sd15 --batch_size 12 --resolution 512 --mode readme --data shards
    python scripts/benchmark.py --preset tiny --batch_size 4 --resolution 64 --steps 5      # a CPU check

Builds the teacher offline (``scripts/make_tiny_teacher.py --preset``: ``sd15`` is the full
SD 1.5 architecture with random weights), then measures ``--steps`` steps after a first step
and ``--warmup`` more that are not timed, and prints s/step (median, min, max), samples/s and
peak memory.
``--profile_steps N`` (synthetic data) also profiles N more steps: the costliest operators, and
the time of a step by kind of work (convolution, attention, matrix products, the compiler's fused
kernels, ...), on a GPU with how much of the step the device was busy and each kind's TFLOP/s.

``--data synthetic`` (the default) runs the training script's own step
(``splam.training.encode_batch``, ``splam_loss``, backward, clipping,
``read_step_values``, ``take_optimizer_step``, EMA) on a random batch already on the
device, timed with CUDA events on a GPU; it also prints the FLOPs of a step (counted by
``torch.utils.flop_counter`` on the first step, run eagerly under ``--torch_compile``), the
achieved TFLOP/s and, given ``--peak_tflops``, the fraction of the floor (the step's FLOPs at
the card's peak), and, without ``--torch_compile``, the operators a step dispatches (views
aside), by UNet call, backward pass and the rest: eager PyTorch spends host time on each,
whatever the device.

``--data shards`` is the end-to-end figure: it writes JPEG shards at the resolution
(``scripts/make_shards.py``; for ``--mode fast`` also their latents,
``scripts/precompute_latents.py``) and runs the training script itself on them, with its
loader workers, host-to-device copies, logging and progress bar. The time of a step is the
interval between the wall times of consecutive steps in its tensorboard log (the loss is
read back on every step, so those follow the device).

Modes: ``readme`` is the seed README's command (fp16, gradient checkpointing, 8-bit Adam, 8
loader workers) on images and token ids, ``readme-adamw`` the same with torch's AdamW,
``readme-adamw-fast`` that math without checkpointing, with channels-last and torch.compile;
``fast`` trains from precomputed latents and prompt embeddings
(``--train_latents_path_or_url``: no VAE encode or text encoder in the step), drops
checkpointing and 8-bit Adam and adds channels-last and torch.compile; ``fast-eager`` is
``fast`` without torch.compile. Any training flag can be added after ``--`` (for instance
``--torch_compile=frozen``, which compiles all but the student).
"""

import argparse
import collections
import contextlib
import glob
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

import accelerate
import diffusers
import torch
import transformers
from diffusers.optimization import get_scheduler
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils._python_dispatch import TorchDispatchMode

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, SCRIPTS)
sys.path.insert(0, os.path.dirname(SCRIPTS))
import precompute_latents  # noqa: E402
from make_shards import write_shards  # noqa: E402
from make_tiny_teacher import cached_teacher  # noqa: E402

import train_splam_distill_sd_wds  # noqa: E402
from splam import update_ema  # noqa: E402
from splam.args import parse_args  # noqa: E402
from splam.models import load_teacher_scheduler  # noqa: E402
from splam.training import (  # noqa: E402
    build_distillation_models,
    encode_batch,
    encode_prompts,
    make_optimizer,
    mixed_precision_autocast,
    optimizer_name,
    posterior_moments,
    read_step_values,
    splam_loss,
    take_optimizer_step,
)

# Per mode: the flag that names the training data, and the speed flags. ``readme-adamw`` is the
# README's command with torch's AdamW, as the authors' script was timed (without bitsandbytes):
# the mode whose math matches that baseline. ``readme-adamw-fast`` is that math with every speed
# option that leaves it unchanged (no gradient checkpointing, which only saves memory), and
# ``readme-adamw-fast-eager`` the same without torch.compile (which spends minutes compiling), the
# baseline that says what compilation gains. The fast modes train from precomputed latents, whose
# crop and flip are fixed per sample; ``fast-eager`` is the fast mode without torch.compile.
MODES = {
    "readme": ("--train_shards_path_or_url", ["--gradient_checkpointing", "--use_8bit_adam"]),
    "readme-adamw": ("--train_shards_path_or_url", ["--gradient_checkpointing"]),
    "readme-adamw-fast": ("--train_shards_path_or_url", ["--channels_last", "--torch_compile"]),
    "readme-adamw-fast-eager": ("--train_shards_path_or_url", ["--channels_last"]),
    "fast": ("--train_latents_path_or_url", ["--channels_last", "--torch_compile"]),
    "fast-eager": ("--train_latents_path_or_url", ["--channels_last"]),
}
README_LOADER_WORKERS = 8


def training_args(teacher_dir, options, data_url, *flags):
    source_flag, speed_flags = MODES[options.mode]
    return parse_args([
        f"--pretrained_teacher_model={teacher_dir}", f"{source_flag}={data_url}",
        f"--resolution={options.resolution}", f"--train_batch_size={options.batch_size}",
        f"--mixed_precision={options.mixed_precision}", "--learning_rate=8e-6", "--loss_type=huber",
        "--ema_decay=0.95", "--adam_weight_decay=0.0", *speed_flags, *flags,
    ])


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


class OperatorCounter(TorchDispatchMode):
    """Counts the operators dispatched inside it, views aside (they queue no kernel): in the
    forward call of each of the named UNets, in the backward pass (with the recomputation of
    gradient checkpointing) and in the rest of the step. Eager PyTorch spends host time on each,
    so the counts say where a host-bound step's time goes, on any device."""

    PHASES = ("teacher forward", "target forward", "student forward", "backward", "the rest")

    def __init__(self, unets: dict):
        super().__init__()
        self.counts = collections.Counter()
        self.forward_of = None
        self.hooks = [hook for name, unet in unets.items() for hook in (
            unet.register_forward_pre_hook(lambda *_, name=name: setattr(self, "forward_of", name)),
            unet.register_forward_hook(lambda *_: setattr(self, "forward_of", None)),
        )]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            if torch._C._current_graph_task_id() != -1:
                self.counts["backward"] += 1
            else:
                self.counts[f"{self.forward_of} forward" if self.forward_of else "the rest"] += 1
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc_info):
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc_info)


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


def measure_step(options, extra, teacher_dir):
    """Step times on a synthetic batch, and the FLOPs and operator counts of a step (the operators
    None under torch.compile, which dispatches fewer than the eager step they would count)."""
    accelerator = accelerate.Accelerator(mixed_precision=options.mixed_precision)
    args = training_args(teacher_dir, options, "synthetic", "--max_train_steps=1", *extra)
    torch.manual_seed(0)
    models = build_distillation_models(args, accelerator, load_teacher_scheduler(args))
    optimizer = make_optimizer(args, models.unet.parameters(), args.learning_rate)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    models.unet, optimizer, lr_scheduler = accelerator.prepare(models.unet, optimizer, lr_scheduler)
    inputs, conditioning = synthetic_batch(args, models, accelerator.device)
    autocast = mixed_precision_autocast(accelerator)

    def step(count_flops=False):
        """One training step; with ``count_flops``, returns its FLOPs by operator."""
        counter = torch.utils.flop_counter.FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
        with counter:
            latents, prompt_embeds = encode_batch(inputs, conditioning, models, args)
            loss = splam_loss(latents, prompt_embeds, models, args, autocast)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(models.unet.parameters(), args.max_grad_norm)
            # (0, 0, 0): the data counters the training loop sends along (skipped, repaired, bad shards).
            loss_value, grad_norm_value, _ = read_step_values(accelerator, loss, grad_norm, (0, 0, 0))
            if take_optimizer_step(accelerator, optimizer, lr_scheduler, loss_value, grad_norm_value):
                update_ema(models.target_unet.parameters(), accelerator.unwrap_model(models.unet).parameters(),
                           args.ema_decay)
        return {str(operator): flops for operator, flops in counter.get_flop_counts()["Global"].items()} if count_flops else None

    # Eager, as the compiled step does the same arithmetic: compiled code hides its operators from
    # the counter, and a first call under the counter's dispatch mode leaves the nets uncompiled for good.
    with torch.compiler.set_stance("force_eager"):
        flops_by_operator = step(count_flops=True)
    if args.torch_compile:
        step()  # the first compiled step, untimed as the first step is: it compiles
    for _ in range(options.warmup):
        step()
    operators = None
    if not args.torch_compile:  # on a step after the first, which also creates the optimizer's state
        unets = {"teacher": models.teacher_unet, "target": models.target_unet,
                 "student": accelerator.unwrap_model(models.unet)}
        with OperatorCounter(unets) as counter:
            step()
        operators = {phase: counter.counts[phase] for phase in OperatorCounter.PHASES}
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(options.steps):
        with Timer(accelerator.device) as timer:
            step()
        times.append(timer.seconds)
    profile = profile_steps(step, options.profile_steps, accelerator.device) if options.profile_steps else None
    return {"times": times, "flops_by_operator": flops_by_operator, "operators": operators, "profile": profile}


# Kinds of work in a step, told apart by the names of the kernels (on a GPU) or operators (on a
# CPU) that do it, the first kind whose pattern a lowercased name contains. The compiler's kernels
# come first, as inductor names them after the operators they fuse ("triton_poi_fused_convolution_...");
# attention before convolution, as cuDNN's attention kernels are "..._sdpa_..._fprop_...".
WORK_KINDS = (
    ("fused by the compiler", ("triton",)),
    ("attention", ("attention", "sdpa", "fmha", "flash")),
    ("convolution", ("convol", "conv2d", "fprop", "dgrad", "wgrad", "winograd", "nchwtonhwc", "nhwctonchw")),
    ("optimizer and EMA", ("adam", "optimizer", "quantize", "multi_tensor", "foreach", "lerp")),
    ("matrix product", ("gemm", "nvjet", "mm")),
    ("normalisation", ("group_norm", "layer_norm", "groupnorm", "layernorm", "moments", "gammabeta")),
    ("copy", ("memcpy", "memset", "copy")),
)
OTHER_WORK = "other"


def work_kind(name: str) -> str:
    """The kind of work (``WORK_KINDS``) a kernel or operator named ``name`` does."""
    lowered = name.lower()
    return next((kind for kind, patterns in WORK_KINDS if any(pattern in lowered for pattern in patterns)), OTHER_WORK)


def by_work_kind(amounts: dict) -> dict:
    """``{name: amount}`` summed by kind of work, costliest first."""
    totals = collections.Counter()
    for name, amount in amounts.items():
        totals[work_kind(name)] += amount
    return dict(totals.most_common())


def busy_seconds(intervals) -> float:
    """The length of the union of ``(start, end)`` intervals: how long something ran."""
    busy, covered_until = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > covered_until:
            busy += end - max(start, covered_until)
            covered_until = end
    return busy


def profile_steps(step, num_steps: int, device) -> dict:
    """Profile ``num_steps`` more steps with ``torch.profiler`` and print the costliest operators.

    Returns, per step, the seconds of each kind of work (``seconds_by_kind``) and of the costliest
    kernels or operators left as "other": on a GPU the device time of the kernels and copies in the
    profiler's trace, with ``busy_seconds`` (the time some kernel ran) and ``span_seconds`` (from
    the first kernel's start to the last one's end), so that ``span - busy`` is the time the device
    waited for the host (an upper bound: tracing slows the host); elsewhere, or where the trace
    holds no kernels, the host's self time of each operator."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(num_steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    averages = profiler.key_averages()
    print(averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=25))
    profile = {"steps": num_steps}
    seconds = collections.Counter()
    if cuda:
        with tempfile.TemporaryDirectory() as trace_dir:
            trace_path = os.path.join(trace_dir, "trace.json")
            profiler.export_chrome_trace(trace_path)
            with open(trace_path) as handle:
                seconds, busy, span = device_time(json.load(handle)["traceEvents"])
        if seconds:  # none where the profiler could not trace the device
            profile["busy_seconds"], profile["span_seconds"] = busy / num_steps, span / num_steps
    if not seconds:
        for average in averages:
            seconds[average.key] += average.self_cpu_time_total / 1e6
    seconds = collections.Counter({name: total / num_steps for name, total in seconds.items()})
    profile["seconds_by_kind"] = by_work_kind(seconds)
    profile["costliest_other"] = [[name, time] for name, time in seconds.most_common() if work_kind(name) == OTHER_WORK][:10]
    return profile


def device_time(trace_events):
    """From the events of a ``torch.profiler`` trace (Chrome's format, times in microseconds): the
    device's seconds by kernel name (copies and fills included), the seconds some kernel ran and
    the seconds from the first kernel's start to the last one's end."""
    kernels = [event for event in trace_events if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    seconds = collections.Counter()
    for kernel in kernels:
        seconds[kernel["name"]] += kernel["dur"] / 1e6
    intervals = [(kernel["ts"] / 1e6, (kernel["ts"] + kernel["dur"]) / 1e6) for kernel in kernels]
    span = max(end for _, end in intervals) - min(start for start, _ in intervals) if intervals else 0.0
    return seconds, busy_seconds(intervals), span


def logged_run(logging_dir: str, warmup: int):
    """From the run's tensorboard log: the intervals between the wall times of consecutive steps,
    without the first ``warmup`` ones, the last logged peak GPU memory (GiB; None off CUDA), the
    wall time of the first step and the loss and gradient norm of each step (the norm None where
    the step logged none)."""
    (path,) = glob.glob(os.path.join(logging_dir, "*", "events.out.tfevents.*"))
    accumulator = EventAccumulator(path)
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    losses = sorted(accumulator.Scalars("loss"), key=lambda event: event.step)
    wall_times = [event.wall_time for event in losses]
    intervals = [later - earlier for earlier, later in zip(wall_times, wall_times[1:])]
    memory = accumulator.Scalars("memory/peak_gib") if "memory/peak_gib" in scalars else []
    grad_norms = {event.step: event.value for event in accumulator.Scalars("grad_norm")} if "grad_norm" in scalars else {}
    steps = [{"step": event.step, "loss": event.value, "grad_norm": grad_norms.get(event.step)} for event in losses]
    return intervals[warmup:], max((event.value for event in memory), default=None), wall_times[0], steps


def measure_training(options, extra, teacher_dir, work_dir):
    """Step times, peak GPU memory (None off CUDA) and the seconds until the first step is done of
    the training script itself, run in this process on JPEG shards (or on the latent shards made from
    them), with the README's 8 loader workers unless ``extra`` says otherwise. The first step
    (which has no interval) and the ``warmup`` after it are not timed; the memory is the
    training's own, without the export. The time until the first step is done counts from the
    call of the script (after the shards, and latents, are written) to the logging of the first
    loss: loading the nets, starting the loader, the first batch, the first step and, with
    ``--torch_compile``, compiling the nets. The run is seeded, so that runs of the same math
    (``readme-adamw`` and ``readme-adamw-fast``) log the same losses and gradient norms up to
    rounding: a compiled net that computed other gradients would show there."""
    num_shards = 8
    write_shards(os.path.join(work_dir, "shards"), num_shards, samples_per_shard=32, resolution=options.resolution)
    data_url = os.path.join(work_dir, "shards", f"{{00000..{num_shards - 1:05d}}}.tar")
    if MODES[options.mode][0] == "--train_latents_path_or_url":
        precompute_latents.main(precompute_latents.parse_args([
            f"--pretrained_teacher_model={teacher_dir}", f"--train_shards_path_or_url={data_url}",
            f"--output_dir={os.path.join(work_dir, 'latents')}", f"--resolution={options.resolution}",
            f"--mixed_precision={options.mixed_precision}",
        ]))
        data_url = os.path.join(work_dir, "latents", f"{{00000..{num_shards - 1:05d}}}.tar")
    output_dir = os.path.join(work_dir, "run")
    never = str(10**9)
    args = training_args(
        teacher_dir, options, data_url,
        f"--output_dir={output_dir}", f"--max_train_steps={1 + options.warmup + options.steps}",
        f"--dataloader_num_workers={README_LOADER_WORKERS}", "--report_to=tensorboard",
        f"--checkpointing_steps={never}", f"--validation_steps={never}", "--seed=0", *extra,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.time()  # the clock of tensorboard's wall times
    train_splam_distill_sd_wds.main(args)
    times, peak_gpu_memory, first_step, steps = logged_run(os.path.join(output_dir, args.logging_dir), options.warmup)
    return times, peak_gpu_memory, first_step - started, steps


def profile_summary(profile: dict, tflop_by_kind: dict) -> str:
    """The lines that say where a profiled step's time went, by kind of work, with each kind's
    TFLOP/s where its FLOPs were counted."""
    traced_device = "busy_seconds" in profile
    where = "device" if traced_device else "host (self time)"
    lines = [f"time per step by kind of work, {where}, over {profile['steps']} profiled steps:"]
    if traced_device:
        lines[0] += (f" the device busy {profile['busy_seconds']:.4f} s of {profile['span_seconds']:.4f} s "
                     f"({profile['busy_seconds'] / profile['span_seconds']:.0%})")
    total = sum(profile["seconds_by_kind"].values())
    for kind, seconds in profile["seconds_by_kind"].items():
        line = f"  {kind}: {seconds:.4f} s ({seconds / total:.0%})"
        if tflop_by_kind.get(kind):
            line += f", {tflop_by_kind[kind]:.4g} TFLOP, {tflop_by_kind[kind] / seconds:.4g} TFLOP/s"
        lines.append(line)
    lines.append("  costliest of the other: " + "; ".join(f"{name[:80]} {seconds:.4f} s" for name, seconds in profile["costliest_other"][:5]))
    return "\n".join(lines)


def write_figures(figures: dict, path: str) -> None:
    """Write ``figures`` as JSON to ``path`` whole or not at all: ``throughput_figures.py`` takes
    them from a row it had to stop."""
    staging = f"{path}.partial"
    with open(staging, "w") as handle:
        json.dump(figures, handle, indent=2)
    os.replace(staging, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--mode", choices=sorted(MODES), default="readme")
    parser.add_argument("--data", choices=["synthetic", "shards"], default="synthetic",
                        help="synthetic: the step alone on a batch on the device; shards: the training script end to end.")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="Default: fp16 on CUDA, no on a CPU.")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps after the first one (compilation, allocator, cuDNN).")
    parser.add_argument("--peak_tflops", type=float, default=None, help="The card's peak rate, for the floor.")
    parser.add_argument("--profile_steps", type=int, default=0,
                        help="With --data synthetic: profile this many more steps and print the costliest operators.")
    parser.add_argument("--teacher_dir", default=None, help="A teacher folder to reuse, built there if it does not exist.")
    parser.add_argument("--out", default=None, help="Also write the figures as JSON.")
    options, extra = parser.parse_known_args()
    extra = [flag for flag in extra if flag != "--"]
    if options.steps < 1 or options.warmup < 0 or options.profile_steps < 0:
        parser.error(f"--steps must be at least 1, --warmup and --profile_steps not negative; got {options.steps}, "
                     f"{options.warmup} and {options.profile_steps}")
    if options.profile_steps and options.data != "synthetic":
        parser.error("--profile_steps needs --data synthetic")
    cuda = torch.cuda.is_available()
    options.mixed_precision = options.mixed_precision or ("fp16" if cuda else "no")

    teacher_dir = cached_teacher(options.preset, options.teacher_dir)
    flops_by_operator = operators = profile = seconds_to_first_step_done = steps = None
    if options.data == "synthetic":
        measured = measure_step(options, extra, teacher_dir)
        times, flops_by_operator, operators, profile = (
            measured["times"], measured["flops_by_operator"], measured["operators"], measured["profile"])
        peak_gpu_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    else:
        work_dir = tempfile.mkdtemp(prefix="splam-benchmark-run-")
        try:
            times, peak_gpu_memory, seconds_to_first_step_done, steps = measure_training(
                options, extra, teacher_dir, work_dir)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    median = statistics.median(times)
    flops_per_step = sum(flops_by_operator.values()) if flops_by_operator else None
    device = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU"
    figures = {
        "preset": options.preset, "mode": options.mode, "data": options.data, "batch_size": options.batch_size,
        "resolution": options.resolution, "mixed_precision": options.mixed_precision, "flags": sys.argv[1:],
        "s_per_step": {"median": median, "min": min(times), "max": max(times)}, "timed_steps": len(times),
        "step_seconds": times,
        "samples_per_s": options.batch_size / median,
        "optimizer": optimizer_name(training_args(teacher_dir, options, "unused", "--max_train_steps=1", *extra)),
        "device": device,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                     "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__},
    }
    if cuda:
        figures["peak_memory_gib"] = peak_gpu_memory
    else:
        figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if flops_per_step:
        figures["tflop_per_step"] = flops_per_step / 1e12
        figures["tflop_per_step_by_kind"] = {kind: flops / 1e12 for kind, flops in by_work_kind(flops_by_operator).items()}
        figures["achieved_tflops"] = flops_per_step / median / 1e12
        if options.peak_tflops:
            figures["fraction_of_floor"] = (flops_per_step / (options.peak_tflops * 1e12)) / median
    if operators:
        figures["operators_per_step"] = operators
    if profile:
        figures["profile"] = profile
    if seconds_to_first_step_done is not None:
        figures["seconds_to_first_step_done"] = seconds_to_first_step_done
        figures["steps"] = steps
    memory = figures.get("peak_memory_gib", figures.get("peak_rss_gib"))
    print(f"{device}, torch {torch.__version__}, {options.preset} preset, {options.mode} mode, {options.data} data, "
          f"batch {options.batch_size} at {options.resolution} px, {options.mixed_precision}")
    print(f"s/step: median {median:.4f}, min {min(times):.4f}, max {max(times):.4f} over {len(times)} steps")
    print(f"samples/s: {figures['samples_per_s']:.2f}")
    print(f"peak memory: {memory:.2f} GiB ({'GPU allocated' if cuda else 'process RSS'})")
    if seconds_to_first_step_done is not None:
        print(f"first step done after {seconds_to_first_step_done:.1f} s (loading, loader start, any compilation)")
        print("loss, gradient norm of the first steps: " + ", ".join(
            f"{step['loss']:.6g}, {step['grad_norm']}" for step in steps[:4]))
    if flops_per_step:
        print(f"FLOPs: {flops_per_step / 1e12:.3f} TFLOP per step, achieved {figures['achieved_tflops']:.3f} TFLOP/s"
              + (f", {figures['fraction_of_floor']:.1%} of the floor" if "fraction_of_floor" in figures else ""))
    if operators:
        print(f"operators per step, views aside: {sum(operators.values())} ("
              + ", ".join(f"{phase} {count}" for phase, count in operators.items()) + ")")
    if profile:
        print(profile_summary(profile, figures.get("tflop_per_step_by_kind", {})))
    if options.out:
        write_figures(figures, options.out)


if __name__ == "__main__":
    main()
