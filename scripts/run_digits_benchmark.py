#!/usr/bin/env python
"""SPLAM against LCM on the digits world, from data to table, offline, in one command.

    python scripts/run_digits_benchmark.py            # the full benchmark, into docs/benchmark/
    python scripts/run_digits_benchmark.py --quick    # a smoke test of the whole path, minutes

1. writes the real digits as webdataset shards (train split);
2. trains a small SD-architecture teacher on them (VAE, then UNet with caption dropout);
3. distils it three times with train_splam_distill_sd_wds.py, same seed, steps and lr:
   ``--gamma_sampling uniform`` (SPLAM, as specified), ``--gamma_sampling one`` (LCM) and
   SPLAM with ``--time_cond_proj_init zero`` (SPLAM-zero);
4. evaluates them against the teacher (scripts/evaluate.py, which trains a judge classifier on
   the real digits) and writes the table
   (``digits.md``), a plot of the metrics against steps (``digits.png``), a sample grid per
   method and ``results.json`` into ``--docs_dir``.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(SCRIPTS)
sys.path.insert(0, SCRIPTS)
from digits_world import digits_split, train_teacher, write_train_shards  # noqa: E402
from evaluate import TEACHER_STEPS, evaluate  # noqa: E402

SETTINGS = {
    "full": dict(vae_steps=1000, unet_steps=3000, distill_steps=500, seeds=[0, 1, 2, 3, 4]),
    "quick": dict(vae_steps=20, unet_steps=40, distill_steps=10, seeds=[0, 1]),
}
W_SCALE = 3.0
METHODS = {
    "SPLAM": ["--gamma_sampling=uniform"],
    "LCM": ["--gamma_sampling=one"],
    "SPLAM-zero": ["--gamma_sampling=uniform", "--time_cond_proj_init=zero"],
}
METRICS = [("latent_mse", "latent MSE to teacher"), ("pixel_mse", "pixel MSE to teacher"),
           ("accuracy", "digit accuracy"), ("frechet_distance", "Frechet distance")]


def distil(teacher, shards, output_dir, method_flags, steps, seed):
    shutil.rmtree(output_dir, ignore_errors=True)  # a new teacher: an earlier run's checkpoints are not this one's
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(REPO_ROOT, "train_splam_distill_sd_wds.py"),
        f"--pretrained_teacher_model={teacher}", f"--output_dir={output_dir}", f"--train_shards_path_or_url={shards}",
        "--resolution=32", "--train_batch_size=32", f"--max_train_steps={steps}", "--learning_rate=1e-4",
        "--lr_scheduler=constant", "--loss_type=huber", "--ema_decay=0.95", "--adam_weight_decay=0.0",
        f"--w_scale={W_SCALE}", *method_flags, f"--checkpointing_steps={steps}",
        f"--validation_steps={steps * 10}", "--dataloader_num_workers=1", "--shuffle_buffer_size=200",
        f"--seed={seed}", "--validation_prompts", "a handwritten digit seven",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cell(stats, metric):
    entry = stats.get(metric)
    return "" if entry is None else f"{entry['mean']:.4f} ± {entry['std']:.4f}"


def write_table(results, settings, timings, command, path):
    lines = [
        "# SPLAM vs LCM on the digits world",
        "",
        f"Produced by `{command}` on {platform.machine()} CPU ({os.cpu_count()} cores), torch {torch.__version__}, "
        f"in {timings['total']:.0f} s (data {timings['data']:.0f} s, teacher {timings['teacher']:.0f} s, "
        f"{len(METHODS)} distillations {timings['distil']:.0f} s, evaluation {timings['evaluate']:.0f} s). No GPU was used.",
        "",
        f"Teacher: trained here for {settings['vae_steps']} VAE and {settings['unet_steps']} UNet steps; sampled with "
        f"{TEACHER_STEPS}-step DDIM at guidance w = {results['w_scale']} (diffusers' guidance_scale {results['w_scale'] + 1}). "
        f"Students: {settings['distill_steps']} distillation steps each, batch 32, lr 1e-4, same seed; SPLAM draws "
        "gamma ~ U[0, 1), LCM fixes gamma = 1; SPLAM-zero is SPLAM whose new gamma projection starts at zero "
        "(`--time_cond_proj_init zero`) instead of PyTorch's random init. Sampled with LCMScheduler at guidance_scale 1.",
        f"Each cell: mean ± standard deviation over {len(results['seeds'])} seeds of {results['prompts']} prompts "
        f"(10 digits x 4 phrasings, the training captions), the same initial noise for every sampler. Judge (an MLP on the real "
        f"8x8 digits) held-out accuracy: {results['judge_heldout_accuracy']:.3f}. Lower is better for the MSEs and "
        "the Frechet distance (to the real held-out digits, in the judge's hidden features); higher for accuracy.",
        "",
        "| method | steps | " + " | ".join(label for _, label in METRICS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in METRICS) + " |",
    ]
    for name, by_steps in results["methods"].items():
        for steps, stats in by_steps.items():
            lines.append(f"| {name} | {steps} | " + " | ".join(cell(stats, metric) for metric, _ in METRICS) + " |")
    lines += ["", "![metrics against steps](digits.png)", "",
              "Samples (first seed, one phrasing per digit; rows: steps 1, 2, 4, or the teacher's 50):",
              "", *[f"- {name}: ![{name}](samples-{name.lower()}.png)" for name in results["methods"]], ""]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
    for axis, (metric, label) in zip(axes, METRICS):
        for name in METHODS:
            by_steps = results["methods"][name]
            steps = [int(n) for n in by_steps]
            means = [by_steps[n][metric]["mean"] for n in by_steps]
            spreads = [by_steps[n][metric]["std"] for n in by_steps]
            axis.errorbar(steps, means, yerr=spreads, marker="o", capsize=3, label=name)
        teacher = results["methods"]["teacher"][str(TEACHER_STEPS)].get(metric)
        if teacher is not None:
            axis.axhline(teacher["mean"], color="grey", linestyle="--", label=f"teacher ({TEACHER_STEPS} steps)")
        axis.set_xticks([1, 2, 4])
        axis.set_xlabel("steps")
        axis.set_title(label)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A few steps of everything: a smoke test.")
    parser.add_argument("--work_dir", default="digits-benchmark", help="Data, teacher and students go here.")
    parser.add_argument("--docs_dir", default=None,
                        help="Table, plot and grids go here (default: docs/benchmark, or work_dir with --quick).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = SETTINGS["quick" if args.quick else "full"]
    docs_dir = args.docs_dir or (args.work_dir if args.quick else os.path.join(REPO_ROOT, "docs", "benchmark"))
    os.makedirs(docs_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    timings, started = {}, time.perf_counter()

    train_x, _, train_y, _ = digits_split(args.seed)
    shards = write_train_shards(os.path.join(args.work_dir, "shards"), train_x, train_y, seed=args.seed)
    timings["data"] = time.perf_counter() - started

    teacher = os.path.join(args.work_dir, "teacher")
    train_teacher(teacher, train_x, train_y, settings["vae_steps"], settings["unet_steps"], args.seed)
    timings["teacher"] = time.perf_counter() - started - timings["data"]

    students = {}
    for name, method_flags in METHODS.items():
        students[name] = os.path.join(args.work_dir, name.lower())
        distil(teacher, shards, students[name], method_flags, settings["distill_steps"], args.seed)
        print(f"Distilled {name} ({' '.join(method_flags)}) into {students[name]}")
    timings["distil"] = time.perf_counter() - started - timings["data"] - timings["teacher"]

    results = evaluate(teacher, students, W_SCALE, seeds=settings["seeds"], data_seed=args.seed, grid_dir=docs_dir)
    timings["total"] = time.perf_counter() - started
    timings["evaluate"] = timings["total"] - timings["data"] - timings["teacher"] - timings["distil"]
    results["timings_s"] = timings
    with open(os.path.join(docs_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    command = "python scripts/run_digits_benchmark.py" + (" --quick" if args.quick else "")
    write_table(results, settings, timings, command, os.path.join(docs_dir, "digits.md"))
    plot(results, os.path.join(docs_dir, "digits.png"))
    print(f"Wrote {docs_dir}/digits.md, digits.png and the sample grids in {timings['total']:.0f} s")


if __name__ == "__main__":
    main()
