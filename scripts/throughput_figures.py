#!/usr/bin/env python
"""Run the throughput table's benchmarks in one go and print the table.

    python scripts/throughput_figures.py --out_dir figures --peak_tflops 800          # on a GPU
    python scripts/throughput_figures.py --out_dir figures --rows readme-shards,readme-24gb

Each row is one ``scripts/benchmark.py`` run in its own process, most important first, all end to
end on shards but the last three:

- ``readme-adamw-shards``: the README's flags with torch's AdamW, the math the authors' script was
  timed with, which the throughput goal compares against;
- ``readme-adamw-fast-frozen-shards`` and ``readme-adamw-fast-shards``: that math with the speed
  options that keep it, with the nets that run without gradients compiled, then all of them
  (minutes of compilation before the first step), and ``readme-adamw-fast-eager-shards``, none
  compiled (what compilation gains is the difference);
- ``readme-adamw-small-shards``: the first row at the small batch (4), which says whether the
  step at batch 12 is bound by the host (then about as slow) or by the GPU (then about 3x faster);
- ``readme-shards``: the README's flags as written (8-bit Adam);
- ``fast-shards`` and ``fast-eager-shards``: from precomputed latents, compiled and not;
- ``readme-24gb``: the README's flags at batch 4 (does it fit a 24 GB card?);
- ``readme-step`` and ``fast-step``: the step alone, with the FLOP count (for the fraction of the
  floor) and a profile of 3 more steps in the log (where to look next).

All rows share one teacher folder.
``out_dir`` gets ``benchmark.log`` (every run's output), ``figures.json`` (rewritten after
each row, so a run cut short keeps what it finished) and ``table.md``; the table is also printed.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

# --total_timeout counts from here, before the imports of torch and diffusers (seconds on a GPU
# machine), so that it bounds the whole script under a time limit for the command.
STARTED = time.monotonic()
SCRIPTS = os.path.dirname(os.path.abspath(__file__))
BENCHMARK = os.path.join(SCRIPTS, "benchmark.py")
sys.path.insert(0, SCRIPTS)
from make_tiny_teacher import cached_teacher  # noqa: E402

# The authors' script at the README's flags, with only the fixes it needs to run and torch's AdamW
# (bitsandbytes was absent): 0.525 s/step at batch 12, 512 px, fp16, on an H100 80GB HBM3 (torch
# 2.11, CUDA 13.0; see the throughput issue).
AUTHORS_SAMPLES_PER_S = {"NVIDIA H100 80GB HBM3": 12 / 0.525}
# Under --total_timeout, a row is not started with less time left than this (loading alone takes longer).
MIN_ROW_SECONDS = 30


def rows(options):
    """``{name: benchmark flags}``, in the order they run."""

    def row(mode, *flags, batch_size=options.batch_size):
        return ["--preset", options.preset, "--resolution", str(options.resolution), "--batch_size", str(batch_size),
                "--mode", mode, *flags]

    shards = ("--data", "shards")
    return {
        "readme-adamw-shards": row("readme-adamw", *shards),
        "readme-adamw-fast-frozen-shards": row("readme-adamw-fast", *shards, "--torch_compile=frozen"),
        "readme-adamw-fast-shards": row("readme-adamw-fast", *shards),
        "readme-adamw-fast-eager-shards": row("readme-adamw-fast-eager", *shards),
        "readme-adamw-small-shards": row("readme-adamw", *shards, batch_size=options.small_batch_size),
        "readme-shards": row("readme", *shards),
        "fast-shards": row("fast", *shards),
        "fast-eager-shards": row("fast-eager", *shards),
        "readme-24gb": row("readme", batch_size=options.small_batch_size),
        "readme-step": row("readme", "--profile_steps", "3"),
        "fast-step": row("fast", "--profile_steps", "3"),
    }


def run_row(command, log, timeout):
    """The row's exit status, or "timeout". The row runs in a process group of its own, so that a
    timeout also ends its loader workers and compiler processes, which would otherwise go on
    taking the CPUs (and the GPU's memory) from the next row. The group is ended too when this
    script is interrupted or terminated (``main`` turns SIGTERM and SIGHUP into an exit); only a
    SIGKILL of this script leaves the row running."""
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        if process.poll() is None:  # timed out, or this script was interrupted: its own group gets no Ctrl-C
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def written_figures(path):
    """The figures a row wrote, or ``None``. A row that wrote them counts even if it then ran past
    its timeout: the benchmark writes them last, complete (``benchmark.write_figures``), and
    a run with compiled nets and 8 loader workers takes seconds to exit."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def exit_on_termination():
    """SIGTERM and SIGHUP exit this script as an exception would, so that ``run_row`` ends the row's
    process group on the way out (by default they end the script at once, and the row runs on)."""
    for signal_number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signal_number, lambda number, frame: sys.exit(128 + number))


def table_row(figures) -> str:
    versions = figures["versions"]
    version_text = (f"torch {versions['torch']}" + (f", CUDA {versions['cuda']}" if versions["cuda"] else "")
                    + f", diffusers {versions['diffusers']}, transformers {versions['transformers']}, "
                    f"accelerate {versions['accelerate']}")
    seconds = figures["s_per_step"]
    authors = AUTHORS_SAMPLES_PER_S.get(figures["device"])
    # The authors' figure is end to end at the README's shape and fp16 with torch's AdamW: only rows like it compare.
    comparable = (figures["data"] == "shards" and figures["preset"] == "sd15" and figures["batch_size"] == 12
                  and figures["resolution"] == 512 and figures["mixed_precision"] == "fp16"
                  and figures["optimizer"] == "AdamW")
    speedup = f"{figures['samples_per_s'] / authors:.2f}x" if authors and comparable else "n/a"
    memory = (f"{figures['peak_memory_gib']:.1f} GiB GPU" if "peak_memory_gib" in figures
              else f"{figures['peak_rss_gib']:.1f} GiB RSS")
    floor = f"{figures['fraction_of_floor']:.0%}" if "fraction_of_floor" in figures else "n/a"
    return (f"| {figures['device']} | {version_text} | `{figures['command']}` | {seconds['median']:.3f} "
            f"({seconds['min']:.3f}-{seconds['max']:.3f}) | {figures['samples_per_s']:.1f} | {speedup} | {memory} | {floor} |")


TABLE_HEADER = ("| card | versions | command | s/step, median (min-max) | samples/s | vs the authors' script | "
                "peak memory | of the floor |\n| --- | --- | --- | --- | --- | --- | --- | --- |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--rows", default=None, help="Comma-separated row names (default: all, in order).")
    parser.add_argument("--preset", choices=["tiny", "sd15"], default="sd15")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=12, help="The README's batch.")
    parser.add_argument("--small_batch_size", type=int, default=4, help="The batch of the 24 GB check and of the host-or-GPU check.")
    parser.add_argument("--peak_tflops", type=float, default=None, help="The card's peak rate, for the floor.")
    parser.add_argument("--teacher_dir", default=None, help="Shared by the rows (default: a folder in the temp dir).")
    parser.add_argument("--timeout", type=float, default=None, help="Seconds allowed per row.")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per row (default: benchmark.py's).")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps per row (default: benchmark.py's).")
    parser.add_argument("--total_timeout", type=float, default=None,
                        help="Seconds allowed for the whole script, its imports and the teacher's build included: each row gets at most "
                             f"what is left, and none starts with under {MIN_ROW_SECONDS} s left (for a machine "
                             "lent for a fixed time).")
    options, extra = parser.parse_known_args()
    extra = [flag for flag in extra if flag != "--"]
    exit_on_termination()
    available = rows(options)
    names = options.rows.split(",") if options.rows else list(available)
    unknown = sorted(set(names) - set(available))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(available)}")
    deadline = STARTED + options.total_timeout if options.total_timeout else None
    os.makedirs(options.out_dir, exist_ok=True)
    # Built before the rows, so that no row's timeout cuts the build short.
    teacher_dir = cached_teacher(options.preset, options.teacher_dir)
    passed_on = {"--peak_tflops": options.peak_tflops, "--steps": options.steps, "--warmup": options.warmup}
    common = [word for flag, value in passed_on.items() if value is not None for word in (flag, str(value))]
    results, failed = [], []
    with open(os.path.join(options.out_dir, "benchmark.log"), "a") as log:
        for name in names:
            out = os.path.join(options.out_dir, f"{name}.json")
            flags = [*available[name], *common, *(["--", *extra] if extra else [])]
            command = [sys.executable, BENCHMARK, "--teacher_dir", teacher_dir, "--out", out, *flags]
            timeout = options.timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left < MIN_ROW_SECONDS:
                    failed.append(f"{name} (no time left)")
                    continue
                timeout = min(timeout or left, left)
            print(f"== {name}: {' '.join(command[1:])}", file=log, flush=True)
            print(f"== {name}", flush=True)
            if os.path.exists(out):  # an earlier call's, cut short before it was merged
                os.remove(out)
            returncode = run_row(command, log, timeout)
            figures = written_figures(out)
            if figures is None:
                failed.append(f"{name} ({returncode})")
                continue
            if returncode != 0:
                print(f"== {name}: ended ({returncode}) after writing its figures, which count", file=log, flush=True)
            results.append({"row": name, "command": " ".join(["scripts/benchmark.py", *flags]), **figures})
            os.remove(out)
            with open(os.path.join(options.out_dir, "figures.json"), "w") as handle:
                json.dump(results, handle, indent=2)
    table = "\n".join([TABLE_HEADER, *(table_row(figures) for figures in results)])
    with open(os.path.join(options.out_dir, "table.md"), "w") as handle:
        handle.write(table + "\n")
    print(table)
    if failed:
        sys.exit(f"error: rows that did not finish: {', '.join(failed)}; see {options.out_dir}/benchmark.log")


if __name__ == "__main__":
    main()
