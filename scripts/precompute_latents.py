#!/usr/bin/env python
"""Precompute the VAE latents and prompt embeddings of image-text shards, for training with
``--train_latents_path_or_url`` (no VAE encode and no text encoder in the training step).

    python scripts/precompute_latents.py --pretrained_teacher_model=runwayml/stable-diffusion-v1-5 \\
        --train_shards_path_or_url="data/{00000..00099}.tar" --output_dir=latents --resolution=512
    accelerate launch train_splam_distill_sd_wds.py --train_latents_path_or_url="latents/{00000..00099}.tar" ...

Input shard ``i`` becomes ``output_dir/{i:05d}.tar``. Every usable sample (the training's own
checks, repairs and counters) becomes ``moments.npy`` (the VAE posterior's mean and
log-variance, ``[2C, R/8, R/8]``; training draws a fresh ``z`` from it at every step),
``prompt_embeds.npy`` (``[77, D]``) and its caption ``txt``. Crops (random unless
``--center_crop``) and flips (``--random_flip``) are drawn once, here: in training they are
fixed per sample. Train with the same teacher (or ``--pretrained_vae_model_name_or_path``) and
``--resolution``; other shapes are refused.

Split the work over GPUs or machines with ``--num_jobs J --job_index k`` (job ``k`` takes the
shards ``i`` with ``i mod J = k``, and GPU ``k mod`` the number of GPUs it sees), or launch the
script with ``torchrun`` or ``accelerate launch``: its processes are then the jobs, each on its
local GPU (a job that exits with an error then stops the others, as the launcher does; a rerun
finishes their shards). Each shard is written under a temporary name and renamed
when complete; a shard that cannot be read to the end, or holds no usable sample, is left out (the
run then exits with an error naming it), and a rerun skips the shards already there and retries the others.

Beside each output shard, ``{i:05d}.tar.json`` records its input shard and every setting that
shapes its arrays, so a rerun that would mix latents of other settings, or give another input
shard an existing output's name, is refused before it loads anything; the same settings with
more shards appended to the list encode only the new ones.
"""

import argparse
import glob
import io
import json
import os
import random
import socket
import sys
import time

import numpy as np
import torch
import webdataset as wds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from splam.args import SetupError, redact_tokens  # noqa: E402
from splam.cli import batched  # noqa: E402
from splam.data import (  # noqa: E402
    BAD_LAYOUT,
    BAD_SHARD,
    MOMENTS_KEY,
    PROMPT_EMBEDS_KEY,
    DataStats,
    ImageTextSamples,
    ImageTransform,
    captioned_images,
    decoded_images,
    checked_shard_urls,
    tar_samples,
    tokenize,
)
from splam.latent_shards import SETTINGS, changed_settings, read_record, record_path, same_setting  # noqa: E402
from splam.models import load_text_encoder_and_vae  # noqa: E402
from splam.output_dir import prepare_output_dir  # noqa: E402
from splam.training import encode_prompts, posterior_moments  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained_teacher_model", required=True, help="The teacher that training will distil.")
    parser.add_argument("--pretrained_vae_model_name_or_path", default=None, help="Another VAE, as in training.")
    parser.add_argument("--teacher_revision", default=None)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--variant", default=None, help="Variant of the teacher's weight files, as in training.")
    parser.add_argument("--train_shards_path_or_url", required=True, help="Image-text shards, as in training.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--center_crop", action="store_true")
    parser.add_argument("--random_flip", action="store_true", help="Flip half of the samples, once.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per VAE and text-encoder call.")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                        help="Precision the VAE and text encoder run in here.")
    parser.add_argument("--storage_dtype", choices=["float16", "float32"], default="float16",
                        help="Precision of the stored arrays (float16 halves the disk; float32 is exact).")
    parser.add_argument("--num_jobs", type=int, default=1)
    parser.add_argument("--job_index", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="Seeds the crops and flips of each shard.")
    args = parser.parse_args(argv)
    if args.resolution % 8 or not 0 <= args.job_index < args.num_jobs or args.batch_size < 1:
        parser.error("--resolution must be a multiple of 8, 0 <= --job_index < --num_jobs and --batch_size >= 1")
    args.gpu = args.job_index  # jobs started side by side on one machine take its GPUs in turn
    if os.environ.get("WORLD_SIZE", "1") != "1":  # each launched process would take every shard, on the first GPU
        if args.num_jobs != 1:
            parser.error("under torchrun or accelerate launch the jobs are its processes: leave out --num_jobs and "
                         "--job_index")
        try:
            args.num_jobs, args.job_index, args.gpu = (int(os.environ[name])
                                                       for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
        except (KeyError, ValueError):
            parser.error("WORLD_SIZE is set (as by torchrun) without integer WORLD_SIZE, RANK and LOCAL_RANK")
    return args


def npy_bytes(array: torch.Tensor, dtype: str) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.float().cpu().numpy().astype(dtype), allow_pickle=False)
    return buffer.getvalue()


@torch.no_grad()
def write_latent_shard(path, samples, tokenizer, text_encoder, vae, args, stats: DataStats) -> int:
    """Encode ``(pixels, caption)`` samples in batches into the tar file ``path``; returns the count."""
    prefix, count = os.path.basename(path).split(".")[0], 0
    with wds.TarWriter(path, encoder=False) as writer:
        for batch in batched(samples, args.batch_size):
            captions = [caption for _, caption in batch]
            moments = posterior_moments(torch.stack([pixels for pixels, _ in batch]), vae, args.batch_size)
            prompt_embeds = encode_prompts(tokenize(tokenizer, captions, stats), text_encoder)
            for sample_moments, sample_embeds, caption in zip(moments, prompt_embeds, captions):
                writer.write({
                    "__key__": f"{prefix}_{count:06d}",
                    MOMENTS_KEY: npy_bytes(sample_moments, args.storage_dtype),
                    PROMPT_EMBEDS_KEY: npy_bytes(sample_embeds, args.storage_dtype),
                    "txt": caption.encode("utf-8"),
                })
                count += 1
    return count


def shard_record(args, url: str) -> dict:
    """What made an output shard: its input shard (a token in a gated dataset's curl command
    masked) and the settings."""
    return {"input": redact_tokens(url), **{name: getattr(args, name) for name in SETTINGS}}


def output_path(args, index: int) -> str:
    return os.path.join(args.output_dir, f"{index:05d}.tar")


def check_earlier_outputs(args, urls) -> None:
    """Refuse to go on where an output shard was made from another input shard or with other
    settings: it would be skipped as done, and the latents mixed."""
    for index, url in enumerate(urls):
        path = output_path(args, index)
        if same_setting(path, url):
            sys.exit(f"error: {path} is the input shard {url} itself, which would be skipped as encoded: give "
                     "another --output_dir")
        if not os.path.exists(path) or not os.path.exists(record_path(path)):
            continue
        recorded = read_record(path)
        if recorded is None:
            sys.exit(f"error: cannot read {record_path(path)}: delete it and {path} to encode that shard again")
        changed = changed_settings(recorded, shard_record(args, url))
        if changed:
            sys.exit(f"error: {path} was made with another {', '.join(changed)} "
                     f"({', '.join(str(recorded.get(key)) for key in changed)}): use another --output_dir")


def partial_path(path: str) -> str:
    """Where this process writes ``path`` until it is complete: a name of its own, so that two
    jobs given the same shard (a job started twice) do not write into one file. Those left by
    dead processes of this machine are removed."""
    host = socket.gethostname()
    for stale in glob.glob(f"{glob.escape(path)}.{glob.escape(host)}-*.partial"):
        try:
            os.kill(int(stale.rsplit("-", 1)[1].split(".")[0]), 0)
        except ProcessLookupError:
            os.remove(stale)
        except PermissionError:  # alive, another user's
            pass
    return f"{path}.{host}-{os.getpid()}.partial"


def main(args):
    try:
        urls = checked_shard_urls(args.train_shards_path_or_url, "--train_shards_path_or_url")
        prepare_output_dir(args.output_dir)
        check_earlier_outputs(args, urls)
        dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
        tokenizer, text_encoder, vae = load_text_encoder_and_vae(args, dtype)
    except SetupError as error:
        sys.exit(f"error: {error}")
    device = torch.device(f"cuda:{args.gpu % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    text_encoder.to(device)
    vae.to(device)
    transform = ImageTransform(args.resolution, args.center_crop, args.random_flip)
    stats, written, started = DataStats(), 0, time.perf_counter()
    failed, misgrouped, unusable = [], [], []
    mine = range(args.job_index, len(urls), args.num_jobs)
    for done, index in enumerate(mine, start=1):
        path = output_path(args, index)
        if os.path.exists(path):
            continue
        rng, shard_stats = random.Random(f"{args.seed}-{index}"), DataStats()
        # One shard is finite: however many of its images fail to decode, the others are encoded.
        samples = decoded_images(captioned_images(tar_samples([urls[index]], shard_stats), shard_stats), transform,
                                 rng, shard_stats)
        partial = partial_path(path)
        count = write_latent_shard(partial, samples, tokenizer, text_encoder, vae, args, shard_stats)
        stats.update(shard_stats)
        if shard_stats.bad_shards() or not count:
            # Unread or cut short (network, disk), files webdataset cannot group, or nothing in it usable
            # (shards of another layout): not marked done, so that a rerun tries it again.
            os.remove(partial)
            (failed if shard_stats[BAD_SHARD] else misgrouped if shard_stats[BAD_LAYOUT] else unusable).append(urls[index])
            continue
        # The record first: a shard on disk always has one.
        with open(record_path(partial), "w", encoding="utf-8") as handle:
            json.dump(shard_record(args, urls[index]), handle, indent=2)
        os.replace(record_path(partial), record_path(path))
        os.replace(partial, path)
        written += count
        elapsed = time.perf_counter() - started
        print(f"shard {done}/{len(mine)} ({path}): {written} samples in {elapsed:.0f} s, {written / elapsed:.1f}/s",
              flush=True)
    print(f"Data: {stats.report()}")
    errors = []
    if failed:
        errors.append(f"{len(failed)} shards could not be read to the end (first: {redact_tokens(failed[0])}); "
                      "run again to retry them")
    if misgrouped:
        errors.append(f"{len(misgrouped)} shards hold files that webdataset cannot group into samples (first: "
                      f"{redact_tokens(misgrouped[0])}; the log says why); they were not written")
    if unusable:
        errors.append(f"{len(unusable)} shards held no usable sample, a {ImageTextSamples.usable} (first: "
                      f"{redact_tokens(unusable[0])}); they were not written")
    if errors:
        sys.exit("error: " + "; ".join(errors))
    training = (f"--train_latents_path_or_url=\"{args.output_dir}/{{00000..{len(urls) - 1:05d}}}.tar\" "
                f"--resolution={args.resolution} and the same teacher")
    written = set(os.listdir(args.output_dir))  # one listing: a web-scale set has 100k shards
    due = [index for index in range(len(urls)) if os.path.basename(output_path(args, index)) not in written]
    if due:  # the other jobs' shards
        print(f"This job's shards are done; shards still due from the other jobs: {len(due)} of {len(urls)} "
              f"(first: {output_path(args, due[0])}). Once they are written, train with {training}")
    else:
        print(f"Train with {training}")


if __name__ == "__main__":
    main(parse_args())
