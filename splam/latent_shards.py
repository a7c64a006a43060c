"""What made a latent shard: ``scripts/precompute_latents.py`` writes beside each output shard
``<shard>.json``, its input shard and every setting that shapes its arrays. A rerun of the script
reads them so as not to mix latents of other settings, and training reads them so as to refuse
latents of another resolution at the start, and to warn of latents that another VAE and text encoder
made (their shapes alone agree)."""

import json
import logging
import os

from .args import SetupError

logger = logging.getLogger(__name__)

# The flags of scripts/precompute_latents.py that shape the stored arrays.
SETTINGS = ("pretrained_teacher_model", "pretrained_vae_model_name_or_path", "teacher_revision", "resolution",
            "center_crop", "random_flip", "mixed_precision", "storage_dtype", "seed")
# Those that name the VAE and text encoder that made the arrays; training warns where they differ.
MODEL_SETTINGS = ("pretrained_teacher_model", "pretrained_vae_model_name_or_path", "teacher_revision")


def record_path(shard_path: str) -> str:
    return shard_path + ".json"


def read_record(shard_path: str):
    """The record beside a local latent shard, or ``None`` where there is none (or it is no JSON)."""
    try:
        with open(record_path(shard_path), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def same_setting(recorded, value) -> bool:
    """Equal, or two spellings of one local file or folder (relative and absolute, a trailing slash)."""
    if recorded == value:
        return True
    return (isinstance(recorded, str) and isinstance(value, str) and os.path.exists(recorded) and os.path.exists(value)
            and os.path.samefile(recorded, value))


def changed_settings(record: dict, settings: dict) -> list:
    """The names of ``settings`` whose values differ from ``record``'s."""
    return [name for name, value in settings.items() if not same_setting(record.get(name), value)]


def check_latent_records(args, local_shards) -> None:
    """Compare the records of ``local_shards`` (local paths of latent shards; those without a record
    are not checked) with this run. Latents of another ``--resolution`` are refused (``SetupError``):
    a reader would stop the run at the first of them, maybe hours in. Another teacher, VAE or revision
    is a warning: a teacher's name on the Hub and its downloaded folder are two spellings of one
    model that only its files could tell apart."""
    records = {path: record for path in local_shards for record in [read_record(path)] if record is not None}
    resized = [path for path, record in records.items() if record.get("resolution", args.resolution) != args.resolution]
    if resized:
        found = sorted({str(records[path]["resolution"]) for path in resized})
        raise SetupError(f"{len(resized)} of the {len(records)} latent shards with a record checked hold latents of "
                         f"another --resolution ({', '.join(found)}; first: {resized[0]}) than this run's "
                         f"{args.resolution}: pass the --resolution they were made at, or precompute them at "
                         f"{args.resolution}")
    settings = {name: getattr(args, name) for name in MODEL_SETTINGS}
    others = {path: changes for path, record in records.items() for changes in [changed_settings(record, settings)]
              if changes}
    if others:
        path, changes = next(iter(others.items()))
        logger.warning(f"{len(others)} of the {len(records)} latent shards with a record checked were made with another "
                       + ", ".join(f"{name} ({records[path].get(name)}, this run {settings[name]})" for name in changes)
                       + f" (first: {path}): their latents and prompt embeddings come from other models than the "
                       "teacher this run distils, unless these name the same one")
