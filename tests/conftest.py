"""The tiny world shared by the tests: a random-weight SD teacher and webdataset shards,
built locally by the project's own scripts."""

import concurrent.futures
import contextlib
import glob
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))

RESOLUTION = 64


def free_disk_gib() -> float:
    return shutil.disk_usage(tempfile.gettempdir()).free / 2**30


FREE_DISK_GIB_AT_START = free_disk_gib()


def pytest_terminal_summary(terminalreporter):
    # A full disk fails launched runs in many ways at once (some only after their timeout): the
    # closing lines say whether it was full.
    terminalreporter.write_line(f"free disk space in {tempfile.gettempdir()}: {FREE_DISK_GIB_AT_START:.1f} GiB "
                                f"at the start, {free_disk_gib():.1f} GiB at the end")


def npy(array) -> bytes:
    """``array`` as the bytes of a ``.npy`` file, as latent shards store them."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def run_script(*args, env=None, timeout=600, preexec_fn=None):
    """Run a Python script of the repo in a fresh interpreter, in a process group of its own; returns
    the CompletedProcess. Past ``timeout`` the script and every process it started are killed and the
    test fails with what the script printed: ``subprocess.run`` kills only the process it started, and
    its children (training processes, loader workers) would go on, slowing later tests."""
    with subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=preexec_fn) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun starts its workers in sessions of their own, out of the group's reach; they
            # hold the output pipes.
            descendants = psutil.Process(process.pid).children(recursive=True)
            os.killpg(process.pid, signal.SIGKILL)
            for descendant in descendants:
                with contextlib.suppress(psutil.NoSuchProcess):
                    descendant.kill()
            stdout, stderr = process.communicate()
            pytest.fail(f"{shlex.join(map(str, args))}: still running after {timeout} s\n{stdout[-3000:]}{stderr[-6000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_process_ended(pid):
    """Process ``pid`` is gone or a zombie, half a second from now."""
    time.sleep(0.5)
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), f"process {pid} is still running (state {state})"


def run_scripts(*commands, env=None, timeout=600):
    """``run_script`` of each argument list, two at a time (a refused launch is mostly one process's
    imports, on one core): the CompletedProcesses, in the commands' order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda command: run_script(*command, env=env, timeout=timeout), commands))


ACCELERATE_LAUNCH = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]
LEARNING_RATE = 1e-4
WARMUP_STEPS = 8


def training_command(teacher, shards, output_dir, *flags, source="--train_shards_path_or_url"):
    """``accelerate launch`` of the training script with the seed README's flags scaled down;
    ``shards`` go to the ``source`` flag."""
    return [
        *ACCELERATE_LAUNCH,
        "train_splam_distill_sd_wds.py",
        f"--pretrained_teacher_model={teacher}",
        f"--output_dir={output_dir}",
        f"{source}={shards}",
        f"--resolution={RESOLUTION}",
        f"--learning_rate={LEARNING_RATE}", "--loss_type=huber", "--ema_decay=0.95", "--adam_weight_decay=0.0",
        "--lr_scheduler=constant_with_warmup", f"--lr_warmup_steps={WARMUP_STEPS}",
        "--train_batch_size=2", "--gradient_accumulation_steps=1", "--gradient_checkpointing",
        "--dataloader_num_workers=1", "--seed=453645634", "--validation_steps=1000",
        *flags,
    ]


def launch(teacher, shards, output_dir, *flags, env=None, source="--train_shards_path_or_url"):
    """Run a training command to the end and check that it succeeded."""
    result = run_script(*training_command(teacher, shards, output_dir, *flags, source=source), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def logged_scalars(output_dir, tag):
    """``{step: value}`` per tensorboard event file, oldest run first."""
    runs = []
    for path in sorted(glob.glob(os.path.join(output_dir, "logs", "*", "events.out.tfevents.*"))):
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        runs.append({event.step: event.value for event in accumulator.Scalars(tag)})
    return runs


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    from make_tiny_teacher import make_teacher

    path = str(tmp_path_factory.mktemp("teacher") / "tiny-sd")
    make_teacher(path, "tiny", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    from make_shards import write_shards

    directory = str(tmp_path_factory.mktemp("shards"))
    write_shards(directory, num_shards=3, samples_per_shard=12, resolution=RESOLUTION, seed=0)
    return os.path.join(directory, "{00000..00002}.tar")
