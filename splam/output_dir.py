"""The run's claim on ``output_dir``: the folder is writable, no other run trains into it, its
checkpoints are one history (and a new run replaces no earlier run's pipeline), and the
checkpoint to resume from, if any.

``latest`` and the checkpoint rotation go by step number, so the checkpoints in ``output_dir``
must all be this run's history: a run refuses to start where ``output_dir`` holds checkpoints
newer than its own starting step (another run's, or those after the one it rolls back to).
"""

import fcntl
import logging
import os
import socket
import tempfile

from accelerate.utils import broadcast_object_list

from .args import SetupError
from .checkpoints import TRAINING_STATE, checkpoint_step, list_checkpoints, read_training_state, remove_killed_saves
from .export import MODEL_INDEX

LOCK_FILE = ".training.lock"

logger = logging.getLogger(__name__)


def check_output_dir_is_not_the_teacher(output_dir: str, teacher: str) -> None:
    """Refuse an ``output_dir`` that is the teacher's folder, however either is spelt: the distilled
    pipeline would replace the teacher's ``unet/``, scheduler and model card, and a later run or
    resume from it would distil the student instead."""
    if os.path.isdir(output_dir) and os.path.isdir(teacher) and os.path.samefile(output_dir, teacher):
        raise SetupError(f"--output_dir {output_dir} is the teacher's folder (--pretrained_teacher_model {teacher}), "
                         "whose UNet and scheduler the distilled pipeline would replace: give another folder")


def prepare_output_dir(output_dir: str) -> None:
    """Create ``output_dir`` and check that this process can write into it (every process writes
    its RNG state into each checkpoint)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise SetupError(f"--output_dir {output_dir} exists and is not a folder")
    try:
        os.makedirs(output_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()
    except OSError as error:
        raise SetupError(f"--output_dir {output_dir} cannot be written: {error.strerror or error}") from error


def check_checkpoints_are_complete(output_dir: str) -> None:
    """Refuse a ``checkpoint-<step>`` folder without ``training_state.json`` (a copy cut short,
    another script's checkpoint): ``latest`` could not resume from it and the rotation would delete it."""
    foreign = [os.path.basename(path) for path in list_checkpoints(output_dir)
               if not os.path.isfile(os.path.join(path, TRAINING_STATE))]
    if foreign:
        raise SetupError(f"{output_dir} holds {', '.join(foreign)}, which {'is' if len(foreign) == 1 else 'are'} not a "
                         f"complete checkpoint of this script (no {TRAINING_STATE}): move it out of the folder")


def check_no_newer_checkpoints(output_dir: str, resume_path, start_step: int) -> None:
    """Refuse to start where ``output_dir`` holds checkpoints newer than this run's first step:
    ``latest`` would later resume from them, and the rotation would delete this run's
    checkpoints before them, both going by step number."""
    newer = [os.path.basename(path) for path in list_checkpoints(output_dir) if checkpoint_step(path) > start_step]
    if not newer:
        return
    if resume_path is None:
        raise SetupError(f"{output_dir} holds checkpoints of an earlier run ({', '.join(newer)}): continue it with "
                         "--resume_from_checkpoint=latest, or move them out of the folder to start a new run there")
    if os.path.realpath(os.path.dirname(os.path.normpath(resume_path))) != os.path.realpath(output_dir):
        # Written since a run resumed from another folder's checkpoint into this one: a relaunch of
        # that same command (a pre-empted job requeued) goes on from them, and moving them out would lose them.
        raise SetupError(f"{output_dir} holds checkpoints newer than {resume_path} ({', '.join(newer)}), written since "
                         f"a run resumed from it there: relaunch with --resume_from_checkpoint=latest to go on from "
                         f"{newer[-1]}, or move them out of the folder to start again from {resume_path}")
    raise SetupError(f"{output_dir} holds checkpoints newer than {resume_path}, which this run resumes from "
                     f"({', '.join(newer)}): move them out of the folder first, or --resume_from_checkpoint=latest "
                     "would later pick them up again")


def check_no_earlier_pipeline(output_dir: str) -> None:
    """Refuse to start a new run where ``output_dir`` holds an earlier run's distilled pipeline and
    no checkpoint to go on from (a run shorter than ``--checkpointing_steps``, or its checkpoints
    deleted): its export would replace that pipeline, and a kill mid-export would leave neither."""
    if os.path.isfile(os.path.join(output_dir, MODEL_INDEX)):
        raise SetupError(f"{output_dir} holds the distilled pipeline of an earlier run ({MODEL_INDEX}) and no checkpoint "
                         "to go on from: give another --output_dir, or move the pipeline out to start a new run there")


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint):
    """The checkpoint folder to resume from, or ``None`` to start fresh.

    ``"latest"`` is the newest complete checkpoint in ``output_dir`` (none: start fresh);
    any other value must be an existing checkpoint folder: a bare name (``checkpoint-500``) is
    the folder of that name in ``output_dir``, as in diffusers' training scripts, anything else a
    path. With several processes, call it on the main one and broadcast the answer, so that all
    resume from the same checkpoint.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    if os.path.basename(resume_from_checkpoint) == resume_from_checkpoint:
        resume_from_checkpoint = os.path.join(output_dir, resume_from_checkpoint)
    if not os.path.isdir(resume_from_checkpoint):
        raise SetupError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such folder")
    if not os.path.isfile(os.path.join(resume_from_checkpoint, TRAINING_STATE)):
        raise SetupError(f"--resume_from_checkpoint {resume_from_checkpoint} is not a complete checkpoint of this script")
    return resume_from_checkpoint


def lock_output_dir(output_dir: str):
    """An exclusive lock on ``output_dir`` for this run's lifetime (keep the returned file open):
    two runs in one folder would rotate each other's checkpoints away. The second might be a
    relaunch while the first still trains: ``accelerate launch`` stopped by a signal leaves its
    training process running. The operating system drops the lock when the holder dies, however.
    A POSIX record lock (``lockf``): the loader workers forked from the holder do not hold it too,
    and network filesystems (NFS) pass it between machines."""
    lock_path = os.path.join(output_dir, LOCK_FILE)
    handle = open(lock_path, "a+", encoding="utf-8")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise SetupError(f"another run is training into {output_dir} ({holder}): stop it first (stopping "
                         "accelerate launch alone leaves its training process running); if it is gone, as a crashed "
                         f"machine's lock can outlive it on a network filesystem, delete {lock_path}") from None
    except OSError as error:  # some network and FUSE filesystems take no locks
        logger.warning(f"cannot lock {output_dir} ({error.strerror}): nothing stops a second run from using it too")
        return handle
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def claim_output_dir(accelerator, output_dir: str, resume_from_checkpoint):
    """Lock ``output_dir`` for this run, check its checkpoints and pick the one to resume from
    (``resolve_resume_checkpoint``), on the main process; returns ``(resume path, its training
    state, lock)`` on all processes (path and state ``None`` for a fresh start, the lock ``None``
    but on the main one), or raises the main process's error on all."""
    answer, lock = [None], None
    if accelerator.is_main_process:
        try:
            lock = lock_output_dir(output_dir)
            # Now, not at this run's first save: a run that saves none (one resumed at its last step to
            # export) would leave them in the finished folder.
            remove_killed_saves(output_dir)
            check_checkpoints_are_complete(output_dir)
            path = resolve_resume_checkpoint(output_dir, resume_from_checkpoint)
            state = read_training_state(path) if path else None
            check_no_newer_checkpoints(output_dir, path, state["global_step"] if state else 0)
            if path is None:
                check_no_earlier_pipeline(output_dir)
            answer = [(path, state, None)]
        except SetupError as error:
            answer = [(None, None, str(error))]
    broadcast_object_list(answer)
    path, state, error = answer[0]
    if error is not None:
        raise SetupError(error)
    return path, state, lock
