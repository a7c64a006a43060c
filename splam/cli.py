"""What the scripts share: a model or a prompt file named on the command line that cannot be read
stops them with one ``error:`` line, not the libraries' tracebacks; the dtype they sample in; the
image files they read; batches of what they process."""

import os

import torch

from .args import one_line
from .checkpoints import CHECKPOINT_PATTERN, TRAINING_STATE, checkpoint_step, list_checkpoints
from .data import text_encoding


def training_output_error(path: str):
    """The reason a local folder that training wrote holds no pipeline (a checkpoint, or the
    ``output_dir`` of a run that has not ended), with the way to get one; ``None`` otherwise."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "model_index.json")):
        return None
    if os.path.isfile(os.path.join(path, TRAINING_STATE)):
        # Into another folder: the run's own output_dir refuses a resume below its newest checkpoint, and
        # would have its pipeline, maybe of a later step than any checkpoint, replaced by this one's.
        named = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
        step = named.group(1) if named else "<its step>"
        return (f"{path} is a training checkpoint, not a pipeline: to export one from it, resume its run from it into "
                f"another folder, --resume_from_checkpoint={path} --max_train_steps={step} "
                "--output_dir=<a new folder> (nothing more is trained)")
    checkpoints = list_checkpoints(path)
    if checkpoints:
        return (f"{path} holds no pipeline yet, only the checkpoints of a run that has not ended (newest: "
                f"{os.path.basename(checkpoints[-1])}): a run writes its pipeline at its end; to export one now, resume "
                f"it with --resume_from_checkpoint=latest --max_train_steps={checkpoint_step(checkpoints[-1])}")
    return None


# The image files read from a folder (scripts/make_shards.py, evaluate_coco.py's reference images).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# The sampling scripts' --dtype.
SAMPLING_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sampling_dtype(name, device) -> torch.dtype:
    """The dtype ``--dtype name`` samples in on ``device``; without one, float16 on CUDA (where half
    precision is fast and exact enough to sample) and float32 elsewhere."""
    if name is not None:
        return SAMPLING_DTYPES[name]
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_or_exit(model_class, path: str, what: str, **options):
    """``model_class.from_pretrained(path, **options)``, or ``SystemExit`` with one line naming ``what``."""
    reason = training_output_error(path)
    if reason is not None:
        raise SystemExit(f"error: {reason}")
    try:
        return model_class.from_pretrained(path, **options)
    except (OSError, ValueError) as error:  # no such folder or Hub id, a file missing, not a diffusers folder
        raise SystemExit(f"error: cannot load {what} from {path!r}: {one_line(error)}") from error


def read_prompt_file(path: str, flag: str) -> list:
    """The non-empty lines of a text file of prompts, stripped, decoded as training decodes captions
    (``splam.data.text_encoding``), or ``SystemExit`` with one line naming ``flag``."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        text = raw.decode(text_encoding(raw))
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"error: cannot read {flag} {path}: {one_line(error)}") from error
    return [line.strip() for line in text.splitlines() if line.strip()]


def batched(items, size: int):
    """Lists of ``size`` consecutive items (the last one shorter) of an iterable."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
