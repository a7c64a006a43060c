"""Training checkpoints: ``output_dir/checkpoint-<step>/`` with accelerate's state
(optimizer, lr scheduler, grad scaler, the RNG states of every process), the online
student in ``unet/``, the EMA target in ``unet_target/`` and ``training_state.json``
(the step, the data stream's position and counters, the optimizer's kind, the run's length).

A checkpoint is written into a hidden staging folder and renamed into place once
complete, so a run killed mid-save never leaves a ``checkpoint-<step>`` that ``latest``
would pick up; older checkpoints are rotated out only after that rename, each renamed
to a hidden name before it is deleted, so a kill mid-delete leaves no half checkpoint either.
The rotation also waits until the new checkpoint is on the disk (fsync), beside training: a
crash of the machine loses the writes the page cache still held, up to half a minute's, and
must find an older checkpoint where the newest one is cut short.
Which checkpoint a run resumes from is ``output_dir.claim_output_dir``'s choice.
"""

import glob
import json
import logging
import os
import pickle
import re
import shutil
import threading

import torch
from accelerate.utils import RNG_STATE_NAME, SCALER_NAME, DistributedType, load
from diffusers import UNet2DConditionModel
from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException

from .args import SetupError, one_line
from .models import teacher_unet_config
from .sharding import raise_on_every_process, wait_on_every_process, whole_student

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
RNG_STATE_PATTERN = re.compile(rf"^{RNG_STATE_NAME}_(\d+)\.pkl$")
TRAINING_STATE = "training_state.json"
# Bumped when training_state.json or the checkpoint's files change meaning.
TRAINING_STATE_FORMAT = 4
# Format 3 lacks where the data readers stand (``reading_positions``): a resume from it starts them afresh.
READABLE_FORMATS = (3, TRAINING_STATE_FORMAT)
# The files that hold a saved UNet's weights, whole or sharded (save_pretrained writes safetensors).
UNET_WEIGHT_FILES = (SAFETENSORS_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
# What a failed write of weights raises (a full disk, no permission): torch.save reports it as
# RuntimeError, safetensors (the UNets, most of a checkpoint's bytes) as SafetensorError.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
# What reading a saved file that is missing, cut short or garbage raises (torch.load, pickle).
READ_ERRORS = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError)

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the previous ones are intact) or read."""


def checkpoint_step(path: str) -> int:
    return int(CHECKPOINT_PATTERN.match(os.path.basename(path)).group(1))


def list_checkpoints(output_dir: str) -> list:
    """The ``checkpoint-<step>`` folders in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(
        int(match.group(1)) for match in map(CHECKPOINT_PATTERN.match, os.listdir(output_dir)) if match is not None
    )
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


def read_training_state(checkpoint_path: str) -> dict:
    """A checkpoint's ``training_state.json``; refused, as ``SetupError``, if it cannot be read or
    an earlier version of this script wrote the checkpoint, in another format."""
    path = os.path.join(checkpoint_path, TRAINING_STATE)
    try:
        with open(path, encoding="utf-8") as handle:
            training_state = json.load(handle)
    except (OSError, ValueError) as error:  # unreadable, or not JSON
        raise SetupError(f"cannot read {path}: {error}") from error
    if not isinstance(training_state, dict) or training_state.get("format") not in READABLE_FORMATS:
        raise SetupError(f"{checkpoint_path} was written by an earlier version of this script, in another format: "
                         "resume it with that version")
    return training_state


def check_student_architecture(checkpoint_path: str, args) -> None:
    """Refuse, before any weight is loaded, a checkpoint whose student has another architecture than
    this run's would have (another teacher, or another --unet_time_cond_proj_dim): loading it fails
    on the first mismatched tensor, which would read as a damaged checkpoint. A checkpoint whose
    ``unet/config.json`` is missing or cut short is left to ``load_checkpoint``, which reports it as damaged."""
    try:
        with open(os.path.join(checkpoint_path, "unet", "config.json"), encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        return
    teacher = teacher_unet_config(args)
    expected = {**teacher, "time_cond_proj_dim": teacher.get("time_cond_proj_dim") or args.unet_time_cond_proj_dim}
    changed = [f"{key} {saved[key]} -> {value}" for key, value in sorted(expected.items())
               if not key.startswith("_") and key in saved and saved[key] != value]
    if changed:
        raise SetupError(f"{checkpoint_path} holds a student of another architecture than this run's "
                         f"({'; '.join(changed)}): resume it with the teacher and --unet_time_cond_proj_dim "
                         "it was trained with")


def check_finite(module, name: str) -> None:
    for parameter_name, parameter in module.named_parameters():
        if not torch.isfinite(parameter).all():
            raise CheckpointError(f"refusing to save {name}: {parameter_name} holds NaN or inf")


def ema_checksums(target_unet) -> torch.Tensor:
    """A float64 sum per parameter tensor of the target: equal on all processes iff they agree
    (up to a collision no real divergence produces)."""
    return torch.stack([parameter.detach().double().sum() for parameter in target_unet.parameters()])


def register_unet_hooks(accelerator, target_unet) -> None:
    """Make ``accelerator.save_state``/``load_state`` write and read both UNets as
    diffusers folders (``unet/`` and ``unet_target/``) instead of a bare state dict.
    Under FSDP and DeepSpeed accelerate also keeps the student in its own sharded files,
    which a resume reads; ``unet/`` is then the gathered copy for people and the export."""

    def save_unets(models, weights, output_dir):
        student = whole_student(accelerator, models[0])
        if accelerator.is_main_process:
            check_finite(student, "the student")
            check_finite(target_unet, "the EMA target")
            student.save_pretrained(os.path.join(output_dir, "unet"))
            target_unet.save_pretrained(os.path.join(output_dir, "unet_target"))
        if weights:  # DeepSpeed saves its engine itself and passes no weights
            weights.pop()

    def load_unets(models, input_dir):
        if models:  # FSDP and DeepSpeed load the student from their own files and pass no models
            student = accelerator.unwrap_model(models.pop())
            student.load_state_dict(UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet").state_dict())
        target_unet.load_state_dict(UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet_target").state_dict())

    accelerator.register_save_state_pre_hook(save_unets)
    accelerator.register_load_state_pre_hook(load_unets)


def distributed_checkpoint_failure(error: CheckpointException) -> str:
    """What failed in torch.distributed.checkpoint's reading or writing of FSDP's shards (it raises a
    ``CheckpointException``, a BaseException, on every process, holding each process's failure):
    the first failure, on one line."""
    failures = [failure for failure, _ in error.failures.values()]
    return one_line(failures[0]) if failures else type(error).__name__


def remove_killed_saves(output_dir: str) -> None:
    """Remove what a run killed while it saved (a staging folder) or rotated (a half-deleted
    checkpoint) left in ``output_dir``, each up to a whole checkpoint on the disk. Only while
    ``output_dir`` is locked for this run: no live run writes them then."""
    for leftover in glob.glob(os.path.join(output_dir, ".checkpoint-*.partial")) + \
            glob.glob(os.path.join(output_dir, ".checkpoint-*.deleting")):
        shutil.rmtree(leftover, ignore_errors=True)


def free_space(path: str) -> str:
    """The space left on ``path``'s filesystem, for a message."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown space"
    return f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.0f} MiB"


def fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_to_disk(path: str) -> None:
    """Flush a folder's files, its folders and its own entry in the folder that holds it from the page
    cache to the disk: a renamed folder can outlive a machine's crash with its files cut short.
    On Windows, whose ``os.open`` refuses folders, only the files are flushed."""
    flush_folders = os.name != "nt"
    for folder, _, files in os.walk(path):
        for name in files:
            fsync(os.path.join(folder, name))
        if flush_folders:
            fsync(folder)
    if flush_folders:
        fsync(os.path.dirname(path))


def sync_then_rotate(checkpoint_path: str, total_limit, kept_for_uploads) -> None:
    """``rotate_checkpoints`` once ``checkpoint_path`` is on the disk; where it cannot be flushed, the
    older checkpoints stay (a later rotation removes them)."""
    try:
        sync_to_disk(checkpoint_path)
    except OSError as error:
        logger.warning(f"could not flush {checkpoint_path} to the disk ({one_line(error)}): the older checkpoints "
                       "are kept for now")
        return
    rotate_checkpoints(os.path.dirname(checkpoint_path), total_limit, kept_for_uploads)


# The last save's sync_then_rotate, on the main process: it runs while training goes on, as the
# flush takes as long as the disk needs to write the checkpoint (seconds to minutes).
pending_rotation = None


def rotation_finished(timeout=60.0) -> bool:
    """Whether the last checkpoint's flush to the disk and the rotation after it are done, waited for
    up to ``timeout`` seconds (``None``: until they are)."""
    global pending_rotation
    if pending_rotation is not None:
        pending_rotation.join(timeout)
        if pending_rotation.is_alive():
            return False
        pending_rotation = None
    return True


def finish_rotation() -> None:
    rotation_finished(timeout=None)


def save_checkpoint(accelerator, output_dir: str, step: int, training_state: dict, total_limit=None,
                    kept_for_uploads=frozenset()) -> str:
    """Write ``checkpoint-<step>`` atomically, then, beside training (the next save waits for it, as
    does ``finish_rotation``), flush it to the disk and keep only the newest ``total_limit``
    (``sync_then_rotate``, which leaves ``kept_for_uploads``).

    On failure (disk full, no permission) the staging folder is removed, the earlier
    checkpoints are untouched, and ``CheckpointError`` names the path.
    """
    global pending_rotation
    final_path = os.path.join(output_dir, f"checkpoint-{step}")
    staging_path = os.path.join(output_dir, f".checkpoint-{step}.partial")
    # In waits of a minute: a slow disk's flush must not hold the other processes at one collective
    # past its timeout.
    wait_on_every_process(accelerator, rotation_finished)
    accelerator.wait_for_everyone()

    def write_failure(write):
        try:
            write()
        except WRITE_ERRORS as error:
            reason = one_line(error)
        except CheckpointException as error:  # FSDP's shards, written by torch.distributed.checkpoint
            reason = distributed_checkpoint_failure(error)
        else:
            return None
        # torch.save reports a full disk as a file position it did not reach: the free space tells.
        return f"could not write the checkpoint {final_path}: {reason} ({free_space(output_dir)} free on its disk)"

    def complete():  # training_state.json marks a complete checkpoint
        with open(os.path.join(staging_path, TRAINING_STATE), "w", encoding="utf-8") as handle:
            json.dump({"format": TRAINING_STATE_FORMAT, **training_state}, handle, indent=2)
        os.replace(staging_path, final_path)

    # Every process writes into the staging folder (its RNG state; the main one the UNets and the
    # optimizer too), which is completed once all have written; a failure on any process stops all.
    try:
        raise_on_every_process(write_failure(lambda: accelerator.save_state(staging_path)), CheckpointError)
        raise_on_every_process(write_failure(complete) if accelerator.is_main_process else None, CheckpointError)
    except CheckpointError:
        if accelerator.is_main_process:
            shutil.rmtree(staging_path, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        # Not a daemon: an ending interpreter waits for it.
        pending_rotation = threading.Thread(target=sync_then_rotate, args=(final_path, total_limit, kept_for_uploads),
                                            name="checkpoint-rotation")
        pending_rotation.start()
    accelerator.wait_for_everyone()
    return final_path


def rotate_checkpoints(output_dir: str, total_limit, kept_for_uploads=frozenset()) -> None:
    """Delete all but the newest ``total_limit`` checkpoints (all kept for ``None``), except those in
    ``kept_for_uploads`` (``HubPublisher.checkpoints_to_keep``): deleted under an upload, or before the
    retry of a failed one, a checkpoint would never reach the Hub. A later rotation deletes them."""
    if total_limit is None:
        return
    for old_path in list_checkpoints(output_dir)[:-total_limit]:
        if old_path in kept_for_uploads:
            logger.info(f"Keeping {old_path} past --checkpoints_total_limit for its upload to the Hub")
            continue
        doomed_path = os.path.join(output_dir, f".{os.path.basename(old_path)}.deleting")
        try:
            os.replace(old_path, doomed_path)
            shutil.rmtree(doomed_path)
        except OSError as error:  # a file of another owner, one held open on NFS (.nfs*): the new one is saved
            logger.warning(f"could not remove {old_path} for --checkpoints_total_limit ({one_line(error)}): "
                           "training goes on, and the next checkpoint or run tries again")


# Where accelerate keeps the student and the optimizer in a checkpoint, by how the run was distributed:
# each reads only its own files.
FSDP, DEEPSPEED, PLAIN = "FSDP", "DeepSpeed", "DDP or one process"


def checkpoint_layout(checkpoint_path: str):
    """How the run that wrote ``checkpoint_path`` was distributed, from its files: FSDP's student in
    ``pytorch_model_fsdp*`` or its optimizer in ``optimizer_0*`` (folders of a sharded state dict,
    files of a local one), DeepSpeed's engine folder ``pytorch_model/``, or else DDP or one process
    (any number of processes: the student is in ``unet/``, the optimizer in ``optimizer.bin``).
    ``None`` when none of them is there, a checkpoint damaged past telling, which ``load_checkpoint``
    reports. An FSDP checkpoint of a full state dict that lost its ``pytorch_model_fsdp.bin`` reads as DDP's."""
    names = os.listdir(checkpoint_path)
    if any(name.startswith(("pytorch_model_fsdp", "optimizer_0")) for name in names):
        return FSDP
    if os.path.isdir(os.path.join(checkpoint_path, "pytorch_model")):
        return DEEPSPEED
    return PLAIN if "optimizer.bin" in names else None


def check_checkpoint_layout(accelerator, checkpoint_path: str) -> None:
    """Refuse, before any weight is loaded, to resume a checkpoint that this run's kind of
    distribution cannot read (its files are not damaged: they are another launcher's)."""
    running = {DistributedType.FSDP: FSDP, DistributedType.DEEPSPEED: DEEPSPEED}.get(accelerator.distributed_type, PLAIN)
    written = checkpoint_layout(checkpoint_path)
    if written is not None and written != running:
        raise SetupError(f"{checkpoint_path} was written under {written}, whose student and optimizer files a run under "
                         f"{running} cannot read: resume it with the accelerate config it was trained with")


def check_resumable(accelerator, args, checkpoint_path: str, training_state: dict, optimizer: str) -> None:
    """Refuse, before any weight is loaded and with one line, a sound checkpoint this run cannot
    resume: written under another kind of distribution, with another optimizer (``optimizer``, this
    run's, as ``training_state`` names it) or for another student architecture. A damaged one is
    left to ``load_checkpoint``."""
    check_checkpoint_layout(accelerator, checkpoint_path)
    if training_state["optimizer"] != optimizer:
        raise SetupError(f"{checkpoint_path} was trained with {training_state['optimizer']}; resume it with the same "
                         "--use_8bit_adam setting")
    check_student_architecture(checkpoint_path, args)


# How apply_hyperparameters names the settings it reports.
HYPERPARAMETER_FLAGS = {"initial_lr": "learning rate", "weight_decay": "--adam_weight_decay",
                        "betas": "--adam_beta1, --adam_beta2", "eps": "--adam_epsilon"}


def optimizer_hyperparameters(optimizer) -> list:
    """Each param group's hyperparameters (all but its parameters), to pass to
    ``apply_hyperparameters`` after a resume."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def rng_state_damage(checkpoint_path: str, process_index: int):
    """Why the RNG state of process ``process_index`` in ``checkpoint_path`` cannot be restored, or
    ``None`` (also where the checkpoint's run had fewer processes). ``load_state`` notes a missing or
    unreadable one at the info level only, and the resume then silently draws other noise than the
    uninterrupted run would have."""
    name = f"{RNG_STATE_NAME}_{process_index}.pkl"
    path = os.path.join(checkpoint_path, name)
    if not os.path.isfile(path):
        saved = [int(match.group(1)) for match in map(RNG_STATE_PATTERN.match, os.listdir(checkpoint_path)) if match]
        return f"no {name}" if process_index <= max(saved, default=0) else None
    try:
        load(path)
    except READ_ERRORS as error:
        return f"{name}: {one_line(error)}"
    return None


def missing_unet_file(checkpoint_path: str, folder: str):
    """``folder/config.json`` or ``folder``'s weights where the checkpoint lacks them, else ``None``:
    diffusers would report missing weights as a ``.bin`` file not found in the checkpoint itself."""
    if not os.path.isfile(os.path.join(checkpoint_path, folder, "config.json")):
        return f"{folder}/config.json"
    if not any(os.path.isfile(os.path.join(checkpoint_path, folder, name)) for name in UNET_WEIGHT_FILES):
        return f"{folder}/{UNET_WEIGHT_FILES[0]}"
    return None


def load_checkpoint(accelerator, checkpoint_path: str, optimizer, lr_scheduler, hyperparameters) -> list:
    """Resume from ``checkpoint_path``: ``accelerator.load_state``, then this run's optimizer
    hyperparameters (``apply_hyperparameters``, whose list of changes it returns).

    ``load_state`` also restores accelerate's count of micro-batches, a multiple of the saved run's
    ``--gradient_accumulation_steps`` (and 0 on a process the checkpoint holds no state of). A
    checkpoint ends an update, so the count starts again from 0: otherwise, with another number
    of accumulation steps, the first update would take fewer micro-batches, and not as many on
    every process.

    A checkpoint of a bf16 or fp32 run holds no grad-scaler state, which ``load_state`` demands of
    an fp16 run (and would report as a missing file): the scaler then starts from its initial
    scale, as a new fp16 run's does, and the returned changes say so.
    """
    def damage_message(reason: str) -> str:
        return (f"cannot resume from {checkpoint_path}, which is damaged ({reason}): "
                "move it out of the folder to resume from the checkpoint before it")

    missing = [path for path in (missing_unet_file(checkpoint_path, folder) for folder in ("unet", "unet_target")) if path]
    # Each process reads its own RNG state (and on several machines its own disk's copy of the
    # checkpoint), so one process alone may find it damaged.
    damage = f"no {' or '.join(missing)}" if missing else rng_state_damage(checkpoint_path, accelerator.process_index)
    raise_on_every_process(None if damage is None else damage_message(damage), CheckpointError)
    scaler = accelerator.scaler
    new_scaler = scaler is not None and not os.path.isfile(os.path.join(checkpoint_path, SCALER_NAME))
    if new_scaler:
        accelerator.scaler = None
    try:
        accelerator.load_state(checkpoint_path)
    except READ_ERRORS as error:
        raise CheckpointError(damage_message(one_line(error))) from error
    except CheckpointException as error:  # FSDP's shards, read by torch.distributed.checkpoint
        raise CheckpointError(damage_message(distributed_checkpoint_failure(error))) from error
    finally:
        accelerator.scaler = scaler
    accelerator.step = 0
    changes = apply_hyperparameters(optimizer, lr_scheduler, hyperparameters)
    if new_scaler:
        changes.append(f"fp16's grad scaler, from its initial scale {scaler.get_scale():g} (the checkpoint's run "
                       "had none: bf16 or fp32)")
    return changes


def apply_hyperparameters(optimizer, lr_scheduler, hyperparameters) -> list:
    """After ``accelerator.load_state``: go on from the checkpoint's optimizer state (moments,
    step counts) and schedule position with this run's hyperparameters, as
    ``optimizer_hyperparameters`` read them before the load; returns the changes, as text.

    Loading restores the saved param groups, hyperparameters included, and the schedule's base
    rates, which would silently undo a changed ``--learning_rate``. diffusers' schedules are
    ``LambdaLR``: ``lr = initial_lr * lr_lambda(step)``, recomputed here from the new rates
    (unchanged, the same number the schedule's last step set).
    """
    changes = []
    for group, flags in zip(optimizer.param_groups, hyperparameters):
        for key, value in flags.items():
            if key == "lr":
                continue
            if key in group and group[key] != value:
                changes.append(f"{HYPERPARAMETER_FLAGS.get(key, key)} {group[key]} -> {value}")
            group[key] = value
    lr_scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base_lr, lr_lambda in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
        group["lr"] = base_lr * lr_lambda(lr_scheduler.last_epoch)
    return changes
