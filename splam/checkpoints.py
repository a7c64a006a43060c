"""Training checkpoints: ``output_dir/checkpoint-<step>/`` with accelerate's state
(optimizer, lr scheduler, grad scaler, the RNG states of every process), the online
student in ``unet/``, the EMA target in ``unet_target/`` and ``training_state.json``
(the step, the data stream's position and counters, the optimizer's kind).

A checkpoint is written into a hidden staging folder and renamed into place once
complete, so a run killed mid-save never leaves a ``checkpoint-<step>`` that ``latest``
would pick up; older checkpoints are rotated out only after that rename.
"""

import json
import os
import re
import shutil

import torch
from accelerate.utils import broadcast_object_list
from diffusers import UNet2DConditionModel

from .args import SetupError
from .sharding import whole_student

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE = "training_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous ones are intact."""


def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoint folders in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(
        int(match.group(1)) for match in map(CHECKPOINT_PATTERN.match, os.listdir(output_dir)) if match is not None
    )
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint):
    """The checkpoint folder to resume from, or ``None`` to start fresh.

    ``"latest"`` is the newest complete checkpoint in ``output_dir`` (none: start fresh);
    any other value must be an existing checkpoint folder. With several processes, call it on
    the main one and broadcast the answer, so that all resume from the same checkpoint.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    if not os.path.isdir(resume_from_checkpoint):
        raise SetupError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such folder")
    if not os.path.isfile(os.path.join(resume_from_checkpoint, TRAINING_STATE)):
        raise SetupError(f"--resume_from_checkpoint {resume_from_checkpoint} is not a complete checkpoint of this script")
    return resume_from_checkpoint


def agree_on_resume_checkpoint(accelerator, output_dir: str, resume_from_checkpoint):
    """``resolve_resume_checkpoint`` on the main process, its answer (or its error) on all."""
    answer = [None]
    if accelerator.is_main_process:
        try:
            answer = [(resolve_resume_checkpoint(output_dir, resume_from_checkpoint), None)]
        except SetupError as error:
            answer = [(None, str(error))]
    broadcast_object_list(answer)
    path, error = answer[0]
    if error is not None:
        raise SetupError(error)
    return path


def read_training_state(checkpoint_path: str) -> dict:
    with open(os.path.join(checkpoint_path, TRAINING_STATE), encoding="utf-8") as handle:
        return json.load(handle)


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


def save_checkpoint(accelerator, output_dir: str, step: int, training_state: dict, total_limit=None) -> str:
    """Write ``checkpoint-<step>`` atomically, then keep only the newest ``total_limit``.

    On failure (disk full, no permission) the staging folder is removed, the earlier
    checkpoints are untouched, and ``CheckpointError`` names the path.
    """
    final_path = os.path.join(output_dir, f"checkpoint-{step}")
    staging_path = os.path.join(output_dir, f".checkpoint-{step}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(staging_path, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(staging_path)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(staging_path, TRAINING_STATE), "w", encoding="utf-8") as handle:
                json.dump(training_state, handle, indent=2)
            if os.path.isdir(final_path):
                shutil.rmtree(final_path)
            os.replace(staging_path, final_path)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
        if accelerator.is_main_process:
            shutil.rmtree(staging_path, ignore_errors=True)
        raise CheckpointError(f"could not write the checkpoint {final_path}: {error}") from error
    if accelerator.is_main_process and total_limit is not None:
        for old_path in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old_path)
    accelerator.wait_for_everyone()
    return final_path
