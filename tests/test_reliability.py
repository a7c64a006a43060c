"""A run that survives kills, dirty data, wrong command lines and numerical faults."""

import concurrent.futures
import fcntl
import glob
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file, save_file

from splam.args import SetupError, parse_args
from splam.checkpoints import read_training_state

from conftest import REPO_ROOT, launch, logged_scalars, run_script, run_scripts, training_command


def safetensors_of(folder):
    return load_file(glob.glob(os.path.join(folder, "*.safetensors"))[0])


def assert_same_weights(first_folder, second_folder):
    first, second = safetensors_of(first_folder), safetensors_of(second_folder)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_a_run_killed_after_a_checkpoint_resumes_exactly(tiny_teacher, tiny_shards, tmp_path):
    """SIGKILL right after checkpoint-4, resume from `latest`: the losses of steps 5-12 and the
    final weights equal those of an uninterrupted run, bit for bit."""
    flags = ["--max_train_steps=12", "--checkpointing_steps=4", "--resume_from_checkpoint=latest",
             "--dataloader_num_workers=2", "--mixed_precision=no", "--random_flip", "--proportion_empty_prompts=0.2"]
    uninterrupted = str(tmp_path / "uninterrupted")
    launch(tiny_teacher, tiny_shards, uninterrupted, *flags)

    killed = str(tmp_path / "killed")
    process = subprocess.Popen(
        [sys.executable, *training_command(tiny_teacher, tiny_shards, killed, *flags)],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(killed, "checkpoint-4")):
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not os.path.exists(os.path.join(killed, "checkpoint-8")), "killed too late to test a resume from step 4"
    assert not os.path.exists(os.path.join(killed, "model_index.json"))

    resumed = launch(tiny_teacher, tiny_shards, killed, *flags)
    assert "Resuming from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    reference_losses = logged_scalars(uninterrupted, "loss")[0]
    resumed_losses = logged_scalars(killed, "loss")[-1]
    assert sorted(resumed_losses) == list(range(5, 13))
    assert resumed_losses == {step: reference_losses[step] for step in range(5, 13)}
    for folder in ("unet", "unet_online", "checkpoint-12/unet_target"):
        assert_same_weights(os.path.join(uninterrupted, folder), os.path.join(killed, folder))


def test_checkpoints_after_a_resume_with_another_interval_still_resume_exactly(tiny_teacher, tiny_shards, tmp_path):
    """A resume from checkpoint-4 with --checkpointing_steps=3 writes checkpoint-6 two steps into
    its run: that checkpoint must end a data segment, or a later resume from it (flags unchanged,
    no warning) would skip the rest of the segment and train on other batches than the run that
    went on."""
    went_on, resumed = str(tmp_path / "went_on"), str(tmp_path / "resumed")
    launch(tiny_teacher, tiny_shards, went_on, "--max_train_steps=4", "--checkpointing_steps=4")
    flags = ["--max_train_steps=9", "--checkpointing_steps=3", "--resume_from_checkpoint=latest"]
    launch(tiny_teacher, tiny_shards, went_on, *flags)
    shutil.copytree(went_on, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoint-9"))
    result = launch(tiny_teacher, tiny_shards, resumed, *flags)
    assert "Resuming from" in result.stderr and "checkpoint-6" in result.stderr and "changed since" not in result.stderr
    went_on_losses, resumed_losses = logged_scalars(went_on, "loss")[-1], logged_scalars(resumed, "loss")[-1]
    assert resumed_losses == {step: went_on_losses[step] for step in range(7, 10)}
    assert_same_weights(os.path.join(went_on, "unet"), os.path.join(resumed, "unet"))


def test_a_relaunch_while_the_run_still_trains_is_refused(tiny_teacher, tiny_shards, tmp_path):
    """``accelerate launch`` stopped by a signal leaves its training process running: a relaunch
    into the same folder is refused while that one trains, and goes ahead once it has stopped."""
    output_dir = str(tmp_path / "run")
    launcher = subprocess.Popen(
        [sys.executable, *training_command(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=100000")],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    lock_path = os.path.join(output_dir, ".training.lock")
    deadline = time.time() + 300
    while not (os.path.exists(lock_path) and open(lock_path).read().startswith("process")):
        assert launcher.poll() is None and time.time() < deadline, "the run ended before it locked its folder"
        time.sleep(0.05)
    launcher.terminate()
    launcher.wait()
    trainer = int(open(lock_path).read().split()[1])
    try:
        os.kill(trainer, 0)  # the training process outlived its launcher
        relaunch = run_script(*training_command(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=1",
                                                "--resume_from_checkpoint=latest"))
    finally:
        os.kill(trainer, signal.SIGKILL)
    errors = [line for line in relaunch.stderr.splitlines() if line.startswith("error:")]
    assert relaunch.returncode != 0 and errors, relaunch.stderr[-2000:]
    assert f"another run is training into {output_dir} (process {trainer} on" in errors[0]
    with open(lock_path, "a") as lock:  # the kernel drops a dead process's lock
        while time.time() < deadline:
            try:
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except (BlockingIOError, PermissionError):
                time.sleep(0.05)
    launch(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=1", "--resume_from_checkpoint=latest")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_run_stopped_by_sigterm_or_ctrl_c_ends_with_one_line(stop, tiny_teacher, tiny_shards, tmp_path):
    """A pre-emption's SIGTERM (Python's default: a silent death) and Ctrl-C (a traceback) end the
    run with one error line that says where a relaunch goes on from. The script runs without the
    launcher, whose own traceback on Ctrl-C is accelerate's."""
    output_dir = str(tmp_path / "run")
    command = training_command(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=100000",
                               "--checkpointing_steps=1")
    process = subprocess.Popen([sys.executable, *command[command.index("train_splam_distill_sd_wds.py"):]],
                               cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(output_dir, "checkpoint-1")):
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    os.killpg(process.pid, stop)  # the whole group, as a terminal's Ctrl-C and most schedulers do
    try:
        stderr = process.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    # Python may print an interrupt it had to ignore ("Exception ignored in" a fork hook), then the run goes on to
    # its next step, which stops it: the traceback of an uncaught one would end stderr.
    assert process.returncode == 1 and errors == stderr.strip().splitlines()[-1:], stderr[-3000:]
    assert errors[0].startswith(f"error: stopped by {stop.name}: relaunch with --resume_from_checkpoint=latest to go "
                                f"on from {output_dir}/checkpoint-"), errors[0]


def test_what_breaks_while_a_stop_signal_unwinds_the_run_ends_in_the_stop_line(monkeypatch, tmp_path):
    """A loader worker that the same Ctrl-C ended makes the DataLoader raise a RuntimeError while the
    main process handles its KeyboardInterrupt: the run ended in that traceback, not the stop's line.
    Without a stop signal, such an error keeps its traceback."""
    import train_splam_distill_sd_wds as script
    from splam.data import DataError

    args = parse_args(["--pretrained_teacher_model=teacher", "--train_shards_path_or_url=shards.tar",
                       f"--output_dir={tmp_path}", "--max_train_steps=8"])
    worker_died = RuntimeError("DataLoader worker (pid 19968) exited unexpectedly with exit code 1.")
    assert script.error_line(worker_died, args) is None
    assert script.error_line(SetupError("no teacher"), args) == "no teacher"
    assert script.error_line(DataError("Traceback ...\nsplam.data.DataError: no usable sample"), args) == "no usable sample"
    monkeypatch.setattr(script, "stop_signals", ["SIGINT"])
    stopped = "stopped by SIGINT: relaunch with --resume_from_checkpoint=latest to go on from the start (no checkpoint yet)"
    assert script.error_line(worker_died, args) == script.error_line(KeyboardInterrupt("SIGINT"), args) == stopped


def test_a_run_resumed_from_another_folder_and_stopped_says_to_resume_from_that_checkpoint_again(tmp_path):
    """Stopped before its first checkpoint in its own output_dir, it said to relaunch with latest,
    which there starts a new run from the teacher."""
    from train_splam_distill_sd_wds import stopped_message

    resumed_from, output_dir = tmp_path / "old" / "checkpoint-4", tmp_path / "new"
    args = parse_args(["--pretrained_teacher_model=teacher", "--train_shards_path_or_url=shards.tar",
                       f"--output_dir={output_dir}", f"--resume_from_checkpoint={resumed_from}", "--max_train_steps=8"])
    assert stopped_message("SIGTERM", args) == (
        f"stopped by SIGTERM: relaunch with --resume_from_checkpoint={resumed_from} to go on from it "
        f"(--output_dir {output_dir} holds no checkpoint yet)")
    (output_dir / "checkpoint-6").mkdir(parents=True)
    assert stopped_message("SIGTERM", args) == (
        f"stopped by SIGTERM: relaunch with --resume_from_checkpoint=latest to go on from {output_dir}/checkpoint-6")


def test_validation_that_fails_in_a_run_resumed_from_another_folder_says_to_resume_from_that_checkpoint(
        tmp_path, monkeypatch):
    """Its advice was --resume_from_checkpoint=latest, which in a folder without a checkpoint starts a new run."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    import train_splam_distill_sd_wds as script
    from splam.checkpoints import CheckpointError

    def full_disk(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(script, "log_validation", full_disk)
    resumed_from = tmp_path / "old" / "checkpoint-4"
    args = parse_args(["--pretrained_teacher_model=teacher", "--train_shards_path_or_url=shards.tar",
                       f"--output_dir={tmp_path / 'new'}", f"--resume_from_checkpoint={resumed_from}",
                       "--max_train_steps=8"])
    models = types.SimpleNamespace(target_unet=None, vae=None, text_encoder=None, tokenizer=None)
    with pytest.raises(CheckpointError, match=f"make room, then relaunch with --resume_from_checkpoint={resumed_from} "):
        script.validate(Accelerator(cpu=True), args, models, torch.nn.Linear(1, 1), DDPMScheduler(), 4)


def test_a_ctrl_c_that_python_ignores_in_a_fork_hook_still_stops_the_run(tiny_teacher, tiny_shards, tmp_path):
    """Python ignores an exception raised in an at-fork hook (logging registers one), and the loader
    starts its worker with a fork: a Ctrl-C landing there must still stop the run. The interrupt
    is put there on purpose: the parent's first fork (the loader's) signals itself."""
    output_dir = str(tmp_path / "run")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import os, signal\n"
        "def interrupt_once():\n"
        "    if not os.environ.get('INTERRUPTED'):\n"
        "        os.environ['INTERRUPTED'] = '1'\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "os.register_at_fork(after_in_parent=interrupt_once)\n"
    )
    command = training_command(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=6", "--checkpointing_steps=1")
    result = run_script(*command[command.index("train_splam_distill_sd_wds.py"):],
                        env=dict(os.environ, PYTHONPATH=str(shim)), timeout=300)
    assert "Exception ignored" in result.stderr, "the interrupt did not land in the fork hook"
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: stopped by SIGINT")
    assert not os.path.isdir(os.path.join(output_dir, "checkpoint-6")), "the run trained to its end"


def test_a_run_killed_while_it_validates_samples_that_step_again(tiny_teacher, tiny_shards, tmp_path):
    """With validation on a checkpoint step (the authors' command: both every 200), a kill while the
    step's prompts are sampled must not leave that step without its validation images for good."""
    output_dir = str(tmp_path / "run")
    flags = ["--max_train_steps=2", "--checkpointing_steps=2", "--validation_steps=2",
             "--resume_from_checkpoint=latest", "--validation_prompts", "a cat"]
    process = subprocess.Popen(
        [sys.executable, *training_command(tiny_teacher, tiny_shards, output_dir, *flags)],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    step_dir = os.path.join(output_dir, "validation", "step-2")
    deadline = time.time() + 300
    while not os.path.isdir(step_dir):
        assert process.poll() is None and time.time() < deadline, "the run ended before it validated"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert len(os.listdir(step_dir)) < 6, "killed too late: the validation was done"
    launch(tiny_teacher, tiny_shards, output_dir, *flags)
    assert sorted(os.listdir(step_dir)) == sorted(f"{net}-{steps}step-0.png" for net in ("target", "online")
                                                  for steps in (1, 2, 4))


def test_latest_ignores_an_incomplete_checkpoint(tiny_teacher, tiny_shards, tmp_path):
    output_dir = tmp_path / "run"
    launch(tiny_teacher, tiny_shards, str(output_dir), "--max_train_steps=2", "--checkpointing_steps=2")
    # What a kill in the middle of saving step 4 leaves behind.
    partial = output_dir / ".checkpoint-4.partial"
    shutil.copytree(output_dir / "checkpoint-2", partial)
    (partial / "optimizer.bin").write_bytes(b"cut short")
    result = launch(tiny_teacher, tiny_shards, str(output_dir), "--max_train_steps=3", "--checkpointing_steps=2",
                    "--resume_from_checkpoint=latest")
    assert "Resuming from" in result.stderr and "checkpoint-2" in result.stderr
    assert logged_scalars(str(output_dir), "loss")[-1].keys() == {3}


def test_what_a_kill_leaves_is_removed_whatever_the_resumed_flags(tiny_teacher, tiny_shards, tmp_path):
    """A staging folder (a kill mid-save) or a half-deleted one (a kill mid-rotation) is up to a
    whole checkpoint on the disk: the next run removes it even where it never saves
    that step again (another --checkpointing_steps) or has no --checkpoints_total_limit."""
    output_dir = tmp_path / "run"
    launch(tiny_teacher, tiny_shards, str(output_dir), "--max_train_steps=2", "--checkpointing_steps=2")
    for leftover in (".checkpoint-4.partial", ".checkpoint-1.deleting"):
        shutil.copytree(output_dir / "checkpoint-2", output_dir / leftover)
        (output_dir / leftover / "training_state.json").unlink()
    launch(tiny_teacher, tiny_shards, str(output_dir), "--max_train_steps=3", "--checkpointing_steps=3",
           "--resume_from_checkpoint=latest")
    assert sorted(name for name in os.listdir(output_dir) if "checkpoint" in name) == ["checkpoint-2", "checkpoint-3"]


def test_what_a_kill_left_is_removed_by_a_run_that_saves_no_checkpoint(tmp_path):
    """The first save of the next run removed them: one that saves none (resumed at its last step to
    export its pipeline) left them, up to a whole checkpoint each, in the finished folder."""
    from accelerate import Accelerator

    from splam.output_dir import claim_output_dir

    for leftover in (".checkpoint-4.partial", ".checkpoint-1.deleting"):
        (tmp_path / leftover / "unet").mkdir(parents=True)
    lock = claim_output_dir(Accelerator(cpu=True), str(tmp_path), "latest")[2]
    lock.close()
    assert os.listdir(tmp_path) == [".training.lock"]


def test_a_new_run_is_refused_where_an_earlier_one_left_its_pipeline_and_no_checkpoint(tmp_path):
    """A run shorter than --checkpointing_steps leaves a pipeline and no checkpoint: the next run there
    replaced it without a word (and a kill mid-export left neither). One with a checkpoint goes on."""
    from accelerate import Accelerator

    from splam.output_dir import claim_output_dir

    (tmp_path / "model_index.json").write_text("{}")
    for resume in (None, "latest"):
        with pytest.raises(SetupError, match=f"{tmp_path} holds the distilled pipeline of an earlier run"):
            claim_output_dir(Accelerator(cpu=True), str(tmp_path), resume)
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "training_state.json").write_text(json.dumps({"format": 4, "global_step": 2}))
    path, state, lock = claim_output_dir(Accelerator(cpu=True), str(tmp_path), "latest")
    lock.close()
    assert path == str(tmp_path / "checkpoint-2") and state["global_step"] == 2


def test_a_run_below_the_newest_checkpoint_is_refused_before_it_deletes_one(tiny_teacher, tiny_shards, tmp_path):
    """``latest`` and the rotation go by step number, so a new run in a folder with checkpoints, or
    a roll-back to an older one, would lose its own checkpoints to them: it stops at once."""
    output_dir = str(tmp_path / "run")
    launch(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=4", "--checkpointing_steps=2")
    before = sorted(os.listdir(output_dir))
    rolled_back = os.path.join(output_dir, "checkpoint-2")
    for flags, expected in [
        ([], f"{output_dir} holds checkpoints of an earlier run (checkpoint-2, checkpoint-4)"),
        ([f"--resume_from_checkpoint={rolled_back}"], f"holds checkpoints newer than {rolled_back}, which this run resumes from (checkpoint-4)"),
    ]:
        result = run_script(*training_command(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=6",
                                              "--checkpointing_steps=3", "--checkpoints_total_limit=1", *flags))
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode != 0 and len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
        assert "Loading weights" not in result.stderr
    assert sorted(os.listdir(output_dir)) == before
    # With the abandoned checkpoint moved away the roll-back goes on, and rotates out the older one,
    # past what a kill in the middle of an earlier rotation left.
    shutil.move(os.path.join(output_dir, "checkpoint-4"), str(tmp_path / "abandoned"))
    shutil.copytree(rolled_back, os.path.join(output_dir, ".checkpoint-2.deleting"))
    tracker_runs = len(logged_scalars(output_dir, "loss"))
    launch(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=3", "--checkpointing_steps=3",
           "--checkpoints_total_limit=1", f"--resume_from_checkpoint={rolled_back}", "--report_to=none")
    assert [name for name in os.listdir(output_dir) if "checkpoint" in name] == ["checkpoint-3"]
    assert len(logged_scalars(output_dir, "loss")) == tracker_runs  # --report_to=none: no tracker


def test_a_relaunch_resuming_from_another_folder_after_checkpoints_there_says_to_go_on_from_them(tmp_path):
    """A pre-empted job requeued with its command, --resume_from_checkpoint=old/checkpoint-4 into a new
    folder that now holds checkpoint-6: it was told to move checkpoint-6 out of the folder, losing it."""
    from splam.output_dir import check_no_newer_checkpoints

    resumed_from, output_dir = tmp_path / "old" / "checkpoint-4", tmp_path / "new"
    for checkpoint in (resumed_from, output_dir / "checkpoint-6"):
        checkpoint.mkdir(parents=True)
    with pytest.raises(SetupError, match="relaunch with --resume_from_checkpoint=latest to go on from checkpoint-6"):
        check_no_newer_checkpoints(str(output_dir), str(resumed_from), 4)


def refusal(result) -> str:
    """The one ``error:`` line of a run that stopped."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_relaunches_of_a_finished_run(tiny_teacher, tiny_shards, tmp_path):
    """A relaunch with --max_train_steps below the checkpoint's step trained nothing and exported the
    checkpoint's longer-trained model as this run's, under a warning that the schedule was reshaped.
    Checkpoints were rotated only when one was saved: a relaunch at the last step (export only) with
    --checkpoints_total_limit lowered left them all. And a new run where a finished one left its
    pipeline and no checkpoint replaced that pipeline."""
    output_dir = str(tmp_path / "run")
    flags = ["--checkpointing_steps=1", "--report_to=none", "--resume_from_checkpoint=latest"]
    launch(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=2", *flags)
    shutil.rmtree(os.path.join(output_dir, "unet"))
    result = run_script(*training_command(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=1", *flags))
    assert f"{output_dir}/checkpoint-2 is at step 2, past --max_train_steps=1" in refusal(result)
    assert "Loading weights" not in result.stderr and not os.path.exists(os.path.join(output_dir, "unet"))

    launch(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=2", *flags, "--checkpoints_total_limit=1")
    assert sorted(name for name in os.listdir(output_dir) if "checkpoint" in name) == ["checkpoint-2"]

    shutil.rmtree(os.path.join(output_dir, "checkpoint-2"))
    result = run_script(*training_command(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=2", *flags))
    assert f"{output_dir} holds the distilled pipeline of an earlier run" in refusal(result)
    assert "Loading weights" not in result.stderr and os.path.isfile(os.path.join(output_dir, "model_index.json"))


def test_a_checkpoint_named_as_in_diffusers_scripts_is_found_in_output_dir(tmp_path, monkeypatch):
    """diffusers' training scripts take --resume_from_checkpoint=checkpoint-500 as the folder of
    that name in output_dir: the same command finds it here, from any working directory, even one
    that holds a checkpoint of that name itself."""
    from splam.output_dir import resolve_resume_checkpoint

    output_dir = tmp_path / "run"
    checkpoint = output_dir / "checkpoint-4"
    for folder in (checkpoint, tmp_path / "checkpoint-4"):
        folder.mkdir(parents=True)
        (folder / "training_state.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_resume_checkpoint(str(output_dir), "checkpoint-4") == str(checkpoint)
    assert resolve_resume_checkpoint(str(output_dir), str(checkpoint)) == str(checkpoint)
    with pytest.raises(SetupError, match="checkpoint-9: no such folder"):
        resolve_resume_checkpoint(str(output_dir), "checkpoint-9")


def test_the_teachers_folder_as_output_dir_is_refused_before_it_is_overwritten(tiny_teacher, tiny_shards, tmp_path):
    """The export wrote the student over the teacher's unet/ and scheduler/, and later runs from that
    folder distilled the student; the folder is named two ways here (a trailing slash, a relative path)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    unet_config = (teacher / "unet" / "config.json").read_text()
    command = training_command(f"{teacher}/", tiny_shards, os.path.relpath(teacher, REPO_ROOT), "--max_train_steps=1")
    result = run_script(*command[command.index("train_splam_distill_sd_wds.py"):])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "is the teacher's folder" in result.stderr.strip().splitlines()[-1], result.stderr[-3000:]
    assert (teacher / "unet" / "config.json").read_text() == unet_config
    assert not (teacher / "unet_online").exists()


def test_a_checkpoint_from_before_the_readers_positions_resumes_with_the_readers_afresh(tiny_teacher, tiny_shards, tmp_path):
    """Format 3 checkpoints did not say where each data reader stands: they still resume, the
    readers starting over, and the log says the resume is not exact."""
    output_dir = str(tmp_path / "run")
    flags = ["--checkpointing_steps=1", "--resume_from_checkpoint=latest"]
    launch(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=1", *flags)
    state_path = os.path.join(output_dir, "checkpoint-1", "training_state.json")
    state = json.load(open(state_path))
    assert state["format"] == 4 and sorted(state["reading_positions"]) == ["0"]
    del state["reading_positions"]
    json.dump({**state, "format": 3}, open(state_path, "w"))
    resumed = launch(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=2", *flags)
    assert "predates checkpoints that say where each data reader stands" in resumed.stderr
    assert sorted(logged_scalars(output_dir, "loss")[-1]) == [2]


@pytest.mark.parametrize("content, expected", [
    ({"global_step": 4, "data_segment": 2}, "written by an earlier version of this script, in another format"),
    ({"format": 2, "global_step": 4}, "written by an earlier version of this script, in another format"),
    ("{cut short", "cannot read"),
])
def test_a_checkpoint_in_an_earlier_format_or_unreadable_is_refused(content, expected, tmp_path):
    """Refused as SetupError, which the main process passes on to the others (any other error
    would leave them waiting for its answer)."""
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "training_state.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SetupError, match=expected):
        read_training_state(str(checkpoint))


def test_a_damaged_checkpoint_is_refused_with_one_line(tiny_teacher, tiny_shards, tmp_path):
    """A checkpoint damaged after it was written (a folder deleted by hand, a file cut short by a
    full or failing disk) stops the resume with one `error:` line that names it, not a traceback
    that names another folder."""
    run = str(tmp_path / "run")
    launch(tiny_teacher, tiny_shards, run, "--max_train_steps=2", "--checkpointing_steps=2")
    # A missing weights file was reported by diffusers as a .bin file not found in the checkpoint itself.
    damages = {"no unet_target/diffusion_pytorch_model.safetensors":
                   lambda checkpoint: os.remove(checkpoint / "unet_target" / "diffusion_pytorch_model.safetensors"),
               "not a valid JSON file": lambda checkpoint: cut_in_half(checkpoint / "unet" / "config.json"),
               "diffusion_pytorch_model.safetensors":
                   lambda checkpoint: cut_in_half(checkpoint / "unet_target" / "diffusion_pytorch_model.safetensors"),
               "EOFError": lambda checkpoint: (checkpoint / "optimizer.bin").write_bytes(b"")}
    output_dirs = [tmp_path / f"damaged-{index}" for index in range(len(damages))]
    for output_dir, damage in zip(output_dirs, damages.values()):
        shutil.copytree(run, output_dir)
        damage(output_dir / "checkpoint-2")
    results = run_scripts(*[training_command(tiny_teacher, tiny_shards, str(output_dir), "--max_train_steps=4",
                                             "--checkpointing_steps=2", "--resume_from_checkpoint=latest")
                            for output_dir in output_dirs])
    for result, output_dir, named in zip(results, output_dirs, damages):
        assert result.returncode != 0
        message = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert message and f"cannot resume from {output_dir / 'checkpoint-2'}, which is damaged" in message[0] \
            and named in message[0], result.stderr[-3000:]
        assert sorted(name for name in os.listdir(output_dir) if "checkpoint" in name) == ["checkpoint-2"]


def cut_in_half(path):
    os.truncate(path, os.path.getsize(path) // 2)


def test_a_checkpoint_missing_a_unets_config_or_weights_is_told_before_loading(tmp_path):
    from splam.checkpoints import missing_unet_file

    (tmp_path / "unet").mkdir()
    assert missing_unet_file(str(tmp_path), "unet") == "unet/config.json"
    (tmp_path / "unet" / "config.json").write_text("{}")
    assert missing_unet_file(str(tmp_path), "unet") == "unet/diffusion_pytorch_model.safetensors"
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    assert missing_unet_file(str(tmp_path), "unet") is None


def test_a_resume_with_another_student_architecture_is_refused_not_called_damaged(tiny_teacher, tiny_shards, tmp_path):
    """A sound checkpoint resumed with another --unet_time_cond_proj_dim: one line that names the
    flag, before any weight is loaded, not "damaged: move it out of the folder"; the same flags as
    the checkpoint's still resume."""
    output_dir = str(tmp_path / "run")
    launch(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=2", "--checkpointing_steps=2")
    result = run_script(*training_command(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=3",
                                          "--checkpointing_steps=2", "--resume_from_checkpoint=latest",
                                          "--unet_time_cond_proj_dim=128"))
    assert result.returncode != 0
    message = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert message and "damaged" not in message[0], result.stderr[-3000:]
    assert "time_cond_proj_dim 256 -> 128" in message[0] and "--unet_time_cond_proj_dim" in message[0], message[0]
    assert "Loading weights" not in result.stderr, "failed only after loading weights"
    launch(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=3", "--checkpointing_steps=2",
           "--resume_from_checkpoint=latest")


def test_a_failed_save_names_the_path_and_keeps_the_previous_checkpoint(tiny_teacher, tiny_shards, tmp_path):
    output_dir = str(tmp_path / "run")
    launch(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=2", "--checkpointing_steps=2")
    before = {path: open(path, "rb").read() for path in glob.glob(f"{output_dir}/checkpoint-2/**/*", recursive=True) if os.path.isfile(path)}
    optimizer_size = os.path.getsize(os.path.join(output_dir, "checkpoint-2", "optimizer.bin"))

    def small_disk():
        # Files may not grow past half the optimizer state: its next write fails like a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (optimizer_size // 2, optimizer_size // 2))

    result = run_script(*training_command(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=4",
                                          "--checkpointing_steps=2", "--checkpoints_total_limit=1",
                                          "--resume_from_checkpoint=latest"), preexec_fn=small_disk)
    assert result.returncode != 0
    message = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert message and f"could not write the checkpoint {output_dir}/checkpoint-4" in message[0]
    assert sorted(name for name in os.listdir(output_dir) if "checkpoint" in name) == ["checkpoint-2"]
    after = {path: open(path, "rb").read() for path in before}
    assert after == before


def full_disk_in_safetensors():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def full_disk_in_fsdp_shards():
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException("write_data", {0: (OSError(28, "No space left on device"), None)})


@pytest.mark.parametrize("full_disk", [full_disk_in_safetensors, full_disk_in_fsdp_shards], ids=["unets", "fsdp shards"])
def test_a_full_disk_during_a_save_stops_with_the_path_and_leaves_no_partial(tmp_path, full_disk):
    """safetensors writes the UNets, most of a checkpoint's bytes and so where a disk fills up, and
    reports the failed write as SafetensorError; torch.distributed.checkpoint, which writes FSDP's
    shards, as CheckpointException (a BaseException), on every process. Neither is OSError or
    torch.save's RuntimeError: the run ended in their tracebacks, leaving the staging folder on the
    full disk."""
    from accelerate import Accelerator

    from splam.checkpoints import CheckpointError, save_checkpoint

    accelerator = Accelerator(cpu=True)

    def save_state_on_a_full_disk(path):
        os.makedirs(os.path.join(path, "unet"))
        raise full_disk()

    accelerator.save_state = save_state_on_a_full_disk
    with pytest.raises(CheckpointError, match=f"could not write the checkpoint {tmp_path}/checkpoint-2: .*No space left"
                                              r".* \(\d+(\.\d)? [MG]iB free on its disk\)"):
        save_checkpoint(accelerator, str(tmp_path), 2, {"global_step": 2})
    assert os.listdir(tmp_path) == []


def test_an_old_checkpoint_that_cannot_be_removed_is_left_with_a_warning(tmp_path, monkeypatch, caplog):
    """The new checkpoint is saved by then: a file the rotation cannot delete (another owner's, or one
    a process holds open on NFS) ended the run in a traceback."""
    from accelerate import Accelerator

    from splam.checkpoints import finish_rotation, save_checkpoint

    (tmp_path / "checkpoint-1" / "unet").mkdir(parents=True)

    def rmtree_refused(path, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted", os.path.join(path, "training_state.json"))

    monkeypatch.setattr(shutil, "rmtree", rmtree_refused)
    with caplog.at_level("WARNING"):
        path = save_checkpoint(Accelerator(cpu=True), str(tmp_path), 2, {"global_step": 2}, total_limit=1)
        finish_rotation()
    assert path == str(tmp_path / "checkpoint-2") and os.path.isfile(os.path.join(path, "training_state.json"))
    assert f"could not remove {tmp_path}/checkpoint-1 for --checkpoints_total_limit" in caplog.text


def test_an_older_checkpoint_is_removed_only_once_the_new_one_is_on_the_disk(tmp_path, monkeypatch, caplog):
    """A machine's crash loses what the page cache held: the rotation flushes every file and folder
    of the new checkpoint first, and keeps the older ones where the flush fails."""
    from accelerate import Accelerator

    from splam import checkpoints

    accelerator = Accelerator(cpu=True)
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def recorded_fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def recorded_replace(source, target):
        events.append(("replace", str(source), str(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    for step in (2, 4):
        checkpoints.save_checkpoint(accelerator, str(tmp_path), step, {"global_step": step}, total_limit=1)
    checkpoints.finish_rotation()
    assert os.listdir(tmp_path) == ["checkpoint-4"]
    deleted = events.index(("replace", str(tmp_path / "checkpoint-2"), str(tmp_path / ".checkpoint-2.deleting")))
    written = [os.path.join(folder, name) for folder, _, files in os.walk(tmp_path / "checkpoint-4") for name in files]
    assert len(written) >= 2  # the RNG state and training_state.json at least
    flushed = {path for kind, path, *_ in events[:deleted] if kind == "fsync"}
    assert flushed >= {*written, str(tmp_path / "checkpoint-4"), str(tmp_path)}

    def failing_fsync(descriptor):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with caplog.at_level("WARNING"):
        checkpoints.save_checkpoint(accelerator, str(tmp_path), 6, {"global_step": 6}, total_limit=1)
        checkpoints.finish_rotation()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-6"]
    assert f"could not flush {tmp_path}/checkpoint-6 to the disk ([Errno 5] Input/output error)" in caplog.text

    # A slow disk: the next save waits for the flush a minute at a time (between collectives).
    disk_written = threading.Event()
    monkeypatch.setattr(os, "fsync", lambda descriptor: disk_written.wait())
    checkpoints.save_checkpoint(accelerator, str(tmp_path), 8, {"global_step": 8}, total_limit=1)
    assert not checkpoints.rotation_finished(timeout=0.1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    disk_written.set()
    assert checkpoints.rotation_finished(timeout=10)
    assert os.listdir(tmp_path) == ["checkpoint-8"]


def test_a_failed_export_stops_with_one_line(tiny_teacher, tiny_shards, tmp_path):
    """A full disk at the final export ends the run with one `error:` line that says how to write it again."""
    output_dir = str(tmp_path / "run")

    def small_disk():  # files may not grow past 500 kB, less than the UNet's weights: like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))

    result = run_script(*training_command(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=1",
                                          "--checkpointing_steps=2"), preexec_fn=small_disk)
    assert result.returncode != 0
    message = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert message and f"could not write the distilled pipeline into {output_dir}" in message[0], result.stderr[-3000:]


def test_validation_images_that_cannot_be_written_stop_the_run_with_one_line(tiny_teacher, tiny_shards, tmp_path):
    """A full disk (here: a file where the validation folder goes) ended the run in a traceback."""
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "validation").write_text("")
    command = training_command(tiny_teacher, tiny_shards, str(output_dir), "--max_train_steps=1", "--validation_steps=1")
    result = run_script(*command[command.index("train_splam_distill_sd_wds.py"):])
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (f"error: could not write the validation images of step 1 into {output_dir}/validation"
            in result.stderr.strip().splitlines()[-1])


def bad_data_shard(path):
    """A shard with one sample of every kind of dirt, and good samples between them."""

    def encoded(image, image_format="PNG"):
        buffer = io.BytesIO()
        image.save(buffer, format=image_format)
        return buffer.getvalue()

    good = encoded(Image.new("RGB", (96, 80), (200, 30, 30)), "JPEG")
    dirt = [
        {"jpg": good, "txt": "a caption far longer than seventy-seven tokens " * 6},
        {"jpg": b"\xff\xd8 not an image", "txt": "undecodable"},
        {"txt": "no image at all"},
        {"jpg": good},
        {"jpg": good, "txt": ""},
        {"jpg": good, "txt": "caf\xe9".encode("latin-1")},
        {"png": encoded(Image.new("LA", (70, 70), (90, 128))), "txt": "grey with alpha"},
        {"png": encoded(Image.new("P", (70, 70), 3)), "txt": "palette"},
        {"png": encoded(Image.fromarray(np.full((70, 70), 40000, dtype=np.uint16))), "txt": "16-bit"},
        {"jpg": encoded(Image.new("CMYK", (70, 70), (10, 20, 30, 0)), "JPEG"), "txt": "cmyk"},
        {"jpg": encoded(Image.new("RGB", (9, 7), "blue"), "JPEG"), "txt": "a very small image"},
    ]
    with wds.TarWriter(str(path)) as writer:
        for index, sample in enumerate(dirt):
            writer.write({"__key__": f"dirty{index:03d}", **sample})
            writer.write({"__key__": f"good{index:03d}", "jpg": good, "txt": "a red square"})
    return str(path)


def test_dirty_data_is_counted_and_reported_not_fatal(tiny_teacher, tmp_path):
    shard = bad_data_shard(tmp_path / "dirty.tar")
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(open(shard, "rb").read()[:5000])
    output_dir = str(tmp_path / "run")
    # One segment of 32 samples: more than the dirty shard's 18 usable ones, so it is read to its end.
    result = launch(tiny_teacher, f"{shard}::{truncated}", output_dir, "--max_train_steps=4", "--checkpointing_steps=4",
                    "--shuffle_buffer_size=4", "--train_batch_size=8")
    report = [line for line in result.stderr.splitlines() if "Data in all:" in line]
    assert report, result.stderr[-3000:]
    for reason in ("undecodable_image", "no_image", "no_caption", "empty_caption", "caption_not_utf8",
                   "image_mode_converted", "image_upscaled", "caption_truncated"):
        assert reason in report[0], reason
    skipped = logged_scalars(output_dir, "data/skipped")[0]
    assert skipped[4] >= 4 and logged_scalars(output_dir, "data/repaired")[0][4] >= 4
    state = json.load(open(os.path.join(output_dir, "checkpoint-4", "training_state.json")))
    assert sum(state["data_stats"].values()) > 0


def test_a_stream_with_nothing_usable_stops_with_one_line(tiny_teacher, tmp_path):
    shard = tmp_path / "captions-only.tar"
    with wds.TarWriter(str(shard)) as writer:
        for index in range(5):
            writer.write({"__key__": f"k{index}", "txt": "a caption without an image"})
    result = run_script(*training_command(tiny_teacher, str(shard), str(tmp_path / "run"), "--max_train_steps=2"), timeout=300)
    assert result.returncode != 0
    assert ("error: no captioned image (.jpg, .jpeg, .png, .webp with .txt, .text, .caption or a .json's caption, text, prompt) "
            "in 1 shard in a row, "
            "reading from 1 shard (counted so far: no_image 5)") in result.stderr


def hidden_packages_env(tmp_path, *packages):
    """An environment in which ``import package`` fails as if it were not installed."""
    shim = tmp_path / "hide"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text("".join(f"sys.modules[{name!r}] = None\n" for name in packages).join(["import sys\n", ""]))
    return dict(os.environ, PYTHONPATH=str(shim))


def v_prediction_teacher(teacher, tmp_path):
    copy = str(tmp_path / "v-teacher")
    shutil.copytree(teacher, copy)
    config_path = os.path.join(copy, "scheduler", "scheduler_config.json")
    config = json.load(open(config_path))
    config["prediction_type"] = "v_prediction"
    json.dump(config, open(config_path, "w"))
    return copy


# Refused by the parser, the script's first call: checked in this process, as each launch spends
# seconds on its imports. "resolution" also runs in SETUP_CASES, through the whole script.
PARSER_CASES = {
    "resolution": (["--resolution=60"], "--resolution must be a multiple of 8"),
    "resolution zero": (["--resolution=0"], "--resolution must be a multiple of 8, at least 8, got 0"),
    "negative polynomial power": (["--lr_scheduler=polynomial", "--lr_power=-1", "--lr_warmup_steps=0"],
                                  "--lr_power must not be negative"),
    "checkpoint limit": (["--checkpoints_total_limit=0"], "--checkpoints_total_limit must be at least 1"),
    "ema decay": (["--ema_decay=1.0"], "--ema_decay must lie in [0, 1)"),
    "too few sub-paths to sample 4 steps": (["--num_ddim_timesteps=2"], "--num_ddim_timesteps must be at least 4"),
    "gamma embedding too narrow": (["--unet_time_cond_proj_dim=1"], "--unet_time_cond_proj_dim must be at least 4"),
    "adam beta": (["--adam_beta1=1.5"], "--adam_beta1 must lie in [0, 1)"),
    "negative warm-up": (["--lr_warmup_steps=-5"], "--lr_warmup_steps must not be negative"),
    "no clipping norm": (["--max_grad_norm=0"], "--max_grad_norm must be positive"),
    "huber c zero": (["--loss_type=huber", "--huber_c=0"], "--huber_c must be positive"),
    "negative guidance": (["--w_scale=-2"], "--w_scale must not be negative"),
    "not a number": (["--learning_rate=nan"], "argument --learning_rate: must be a finite number, got 'nan'"),
    "infinite guidance": (["--w_scale=inf"], "argument --w_scale: must be a finite number, got 'inf'"),
    "no float": (["--ema_decay=0,95"], "argument --ema_decay: invalid float value: '0,95'"),
    "empty output folder": (["--output_dir="], "--output_dir is empty"),
    "lr schedule without its rules": (["--lr_scheduler=piecewise_constant"], "--lr_scheduler: invalid choice"),
    "tracker": (["--report_to=tensorboard,none"], "--report_to takes one or more of"),
    "wandb project name": (["--report_to=wandb", "--tracker_project_name=team/splam"], "is no wandb project name"),
    "negative lr": (["--learning_rate=-1e-5"], "--learning_rate must not be negative"),
    "channels last with 8-bit adam": (["--channels_last", "--use_8bit_adam"], "--channels_last does not go with --use_8bit_adam"),
    "negative seed": (["--seed=-1"], "--seed must lie in [0, 4294901760), got -1"),
    "no lr cycles": (["--lr_scheduler=cosine_with_restarts", "--lr_num_cycles=0"], "--lr_num_cycles must be at least 1"),
    "negative shuffle buffer": (["--shuffle_buffer_size=-5"], "--shuffle_buffer_size must be at least 1"),
}

# Refused by the script's set-up (the teacher's files, the environment, the folders): each launched.
SETUP_CASES = {
    "missing teacher": (["--pretrained_teacher_model={tmp}/no-such-teacher"], "cannot load the teacher"),
    "offline hub id": (["--pretrained_teacher_model=someone/no-such-model"],
                       "from 'someone/no-such-model': it is no local folder, and the Hub (or, offline, its cache) has no such model"),
    "vae folder that is not a vae": (["--pretrained_vae_model_name_or_path={tmp}"],
                                     "cannot load the VAE"),
    "no shard matches": (["--train_shards_path_or_url={tmp}/none-{{000..009}}.tar"], "matches no file"),
    "v-prediction teacher": (["--pretrained_teacher_model={v_teacher}"], "v_prediction"),
    "ddim grid": (["--num_ddim_timesteps=1001"], "--num_ddim_timesteps 1001 exceeds the teacher's 1000 training timesteps"),
    "8-bit adam without bitsandbytes": (["--use_8bit_adam", "HIDE=bitsandbytes"], "--use_8bit_adam needs bitsandbytes"),
    "wandb missing": (["--report_to=wandb", "HIDE=wandb"], "--report_to=wandb needs wandb"),
    "resume path missing": (["--resume_from_checkpoint={tmp}/checkpoint-9"], "no such folder"),
    "output dir a file": (["--output_dir=/dev/null"], "--output_dir /dev/null exists and is not a folder"),
    "output dir read-only": (["--output_dir=/sys"], "--output_dir /sys cannot be written"),
    "resolution": PARSER_CASES["resolution"],
    "resolution too small for the unet": (["--resolution=16"], "--resolution 16 is too small for the teacher's UNet: "
                                          "its deepest feature maps would be 1x1, where GroupNorm gets one value per "
                                          "group and image (32 channels in 32 groups); use --resolution 24 or more"),
    "foreign checkpoint folder": (["MKDIR={tmp}/out/checkpoint-99", "--resume_from_checkpoint=latest"],
                                  "holds checkpoint-99, which is not a complete checkpoint of this script"),
    "polynomial schedule from its end": (["--lr_scheduler=polynomial", "--learning_rate=1e-7"],
                                         "--lr_scheduler polynomial decays the learning rate to 1e-07"),
    "tracker not installed": (["--report_to=tensorboard,mlflow"], "--report_to=mlflow needs mlflow"),
    "compile set in the accelerate config": (["ENV=ACCELERATE_DYNAMO_BACKEND=inductor"], "set dynamo_backend: 'no'"),
    "wandb without a login": (["--report_to=wandb", "ENV=WANDB_MODE=online", "ENV=WANDB_API_KEY=",
                               "ENV=NETRC={tmp}/no-netrc", "ENV=WANDB_CONFIG_DIR={tmp}"],
                              "--report_to=wandb: the trackers cannot start (No API key configured"),
}


def bad_argument_command(case, tiny_teacher, tiny_shards, case_dir):
    """The argv and environment of one of SETUP_CASES, with its folders made in ``case_dir``."""
    flags, _ = SETUP_CASES[case]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    arguments = {"--pretrained_teacher_model": tiny_teacher, "--train_shards_path_or_url": tiny_shards,
                 "--output_dir": str(case_dir / "out"), "--max_train_steps": "2"}
    for flag in flags:
        if flag.startswith("HIDE="):
            env = dict(hidden_packages_env(case_dir, flag[5:]), HF_HUB_OFFLINE="1")
            continue
        if flag.startswith("MKDIR="):
            os.makedirs(flag[6:].format(tmp=case_dir))
            continue
        if flag.startswith("ENV="):
            name, _, value = flag[4:].partition("=")
            env[name] = value.format(tmp=case_dir)
            continue
        if "{v_teacher}" in flag:
            flag = flag.format(v_teacher=v_prediction_teacher(tiny_teacher, case_dir))
        name, _, value = flag.format(tmp=case_dir).partition("=")
        arguments[name] = value if value else None
    return [f"{name}={value}" if value is not None else name for name, value in arguments.items()], env


@pytest.fixture(scope="module")
def bad_argument_runs(tiny_teacher, tiny_shards, tmp_path_factory):
    """Every case of SETUP_CASES run by the training script, two at a time (each is mostly one
    process's imports, on one core): ``{case: (result, seconds, case folder)}``."""

    def run(case):
        case_dir = tmp_path_factory.mktemp("case")
        argv, env = bad_argument_command(case, tiny_teacher, tiny_shards, case_dir)
        started = time.time()
        result = run_script("train_splam_distill_sd_wds.py", *argv, env=env, timeout=300)
        return case, (result, time.time() - started, case_dir)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, sorted(SETUP_CASES)))


def test_the_smallest_resolution_a_unet_takes_is_where_its_deepest_group_norm_gets_two_values(tiny_teacher):
    """The tiny teacher's UNet (32 channels in 32 groups before its deepest block) fails on one
    image at 16 px, whose deepest feature maps are 1x1, as validation and the export sample; at
    24 px (2x2) it runs. SD 1.5's UNet has 40 channels per group there: no size is too small."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from splam.models import resolution_too_small

    vae_config = AutoencoderKL.load_config(tiny_teacher, subfolder="vae")
    unet_config = UNet2DConditionModel.load_config(tiny_teacher, subfolder="unet")
    unet = UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet")
    prompt_embeds = torch.zeros(1, 77, unet_config["cross_attention_dim"])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        unet(torch.zeros(1, 4, 2, 2), 999, prompt_embeds)
    assert resolution_too_small(16, vae_config, unet_config).endswith("use --resolution 24 or more")
    assert unet(torch.zeros(1, 4, 3, 3), 999, prompt_embeds).sample.shape == (1, 4, 3, 3)
    assert resolution_too_small(24, vae_config, unet_config) is None
    sd15_vae, sd15_unet = {"block_out_channels": [128, 256, 512, 512]}, {"block_out_channels": [320, 640, 1280, 1280]}
    assert all(resolution_too_small(size, sd15_vae, sd15_unet) is None for size in (8, 64, 512))


@pytest.mark.parametrize("case", sorted(PARSER_CASES))
def test_bad_flag_values_are_refused_by_the_parser_with_one_line(case, capsys):
    flags, expected = PARSER_CASES[case]
    with pytest.raises(SystemExit) as stop:
        parse_args(["--pretrained_teacher_model=teacher", "--train_shards_path_or_url=shards.tar", "--output_dir=out",
                    "--max_train_steps=2", *flags])
    assert stop.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last_line and expected in last_line, last_line


@pytest.mark.parametrize("case", sorted(SETUP_CASES))
def test_bad_arguments_fail_fast_with_one_line(case, bad_argument_runs):
    result, seconds, case_dir = bad_argument_runs[case]
    _, expected = SETUP_CASES[case]
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "error:" in last_line and expected in last_line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "Loading weights" not in result.stderr, "failed only after loading weights"
    assert not os.path.exists(case_dir / "out" / "checkpoint-2")
    assert seconds < 120


def test_nonfinite_steps_are_skipped_then_stop_the_run(tiny_teacher, tiny_shards, tmp_path):
    """A teacher whose VAE encodes to NaN: every update is skipped, the run stops after
    --max_nonfinite_steps in a row, and no checkpoint holds a non-finite weight."""
    teacher = str(tmp_path / "nan-teacher")
    shutil.copytree(tiny_teacher, teacher)
    weights_path = os.path.join(teacher, "vae", "diffusion_pytorch_model.safetensors")
    weights = load_file(weights_path)
    weights["quant_conv.bias"] = torch.full_like(weights["quant_conv.bias"], float("nan"))
    save_file(weights, weights_path)
    output_dir = str(tmp_path / "run")
    result = run_script(*training_command(teacher, tiny_shards, output_dir, "--max_train_steps=8", "--checkpointing_steps=2",
                                          "--max_nonfinite_steps=3"), timeout=300)
    assert result.returncode != 0
    assert "error: 3 steps in a row had a non-finite loss or gradient" in result.stderr
    assert result.stderr.count("non-finite loss or gradient, update skipped") == 3
    # The trackers got all three steps the message counts, the one that stopped the run included.
    (losses,) = logged_scalars(output_dir, "loss")
    assert sorted(losses) == [1, 2, 3] and all(np.isnan(value) for value in losses.values()), losses
    # Nothing was learnt, nothing non-finite was saved: the checkpoint's student is the teacher's UNet.
    teacher_weights = load_file(os.path.join(tiny_teacher, "unet", "diffusion_pytorch_model.safetensors"))
    for folder in ("unet", "unet_target"):
        saved = safetensors_of(os.path.join(output_dir, "checkpoint-2", folder))
        assert all(torch.isfinite(tensor).all() for tensor in saved.values())
        assert all(torch.equal(saved[name], teacher_weights[name]) for name in teacher_weights)
    assert not os.path.exists(os.path.join(output_dir, "model_index.json"))


def test_a_checkpoint_refuses_non_finite_weights():
    from diffusers import UNet2DConditionModel

    from splam.checkpoints import CheckpointError, check_finite

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    check_finite(unet, "the student")
    with torch.no_grad():
        unet.conv_out.bias[0] = float("inf")
    with pytest.raises(CheckpointError, match="conv_out.bias holds NaN or inf"):
        check_finite(unet, "the student")
