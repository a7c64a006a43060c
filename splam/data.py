"""Streaming ``(image, caption)`` pairs from webdataset tar shards.

A shard spec is what ``--train_shards_path_or_url`` takes: local paths, URLs,
``pipe:`` commands, ``{000..009}`` brace ranges and ``::``-separated lists of these.
Samples are grouped by webdataset's own tar reader, which understands the
end-of-shard marker of webdataset 1.x (the authors' custom grouping crashed on it,
SPEC defect 2). A sample without an image or a caption is skipped.
"""

import functools
import io
import math
import random

import numpy as np
import torch
import webdataset as wds
from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "text", "caption")


def expand_shard_urls(spec: str) -> list:
    """Split a shard spec on ``::`` and expand its brace ranges into a list of shard URLs."""
    return wds.shardlists.expand_urls(spec)


class ImageTransform:
    """Resize the shorter side to ``resolution`` (bilinear, antialiased), crop a square
    (random, or central with ``center_crop``), flip horizontally with probability 0.5
    when ``random_flip``, and map to a float tensor ``[3, R, R]`` in ``[-1, 1]``.

    Random choices use Python's ``random``, which PyTorch seeds in every loader worker.
    """

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = False):
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        scale = self.resolution / min(image.size)
        size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
        if self.center_crop:
            left = (image.width - self.resolution) // 2
            top = (image.height - self.resolution) // 2
        else:
            left = random.randint(0, image.width - self.resolution)
            top = random.randint(0, image.height - self.resolution)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return pixels.float().div(127.5).sub(1.0)


def first_present(sample: dict, keys):
    return next((sample[key] for key in keys if sample.get(key) is not None), None)


def decode_sample(sample: dict, transform: ImageTransform):
    """``(pixels, caption)`` of a raw tar sample, or ``None`` when the image or the caption is missing."""
    image_bytes = first_present(sample, IMAGE_KEYS)
    caption = first_present(sample, CAPTION_KEYS)
    if image_bytes is None or caption is None:
        return None
    with Image.open(io.BytesIO(image_bytes)) as image:
        pixels = transform(image)
    return pixels, caption.decode("utf-8").strip()


def collate_pairs(samples):
    pixels, captions = zip(*samples)
    return torch.stack(pixels), list(captions)


def image_text_pipeline(urls, transform: ImageTransform, *, resampled: bool, shuffle_buffer: int, seed: int):
    """The sample stream over ``urls``: ``(pixels, caption)`` pairs.

    ``resampled`` draws shards with replacement forever (seeded per process and
    worker); otherwise every shard is read once, split between processes and workers.
    """
    if resampled:
        shards = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        shards = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    shuffle = [wds.detshuffle(shuffle_buffer, initial=shuffle_buffer, seed=seed)] if shuffle_buffer > 1 else []
    return wds.DataPipeline(
        *shards,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        *shuffle,
        wds.map(functools.partial(decode_sample, transform=transform), handler=wds.warn_and_continue),
    )


def make_train_dataloader(
    urls,
    transform: ImageTransform,
    *,
    batch_size: int,
    num_batches: int,
    num_workers: int,
    shuffle_buffer: int,
    seed: int,
    pin_memory: bool,
):
    """A ``WebLoader`` of ``num_batches`` batches ``(pixels [B, 3, R, R], captions)`` per epoch
    over resampled shards; each of the ``num_workers`` workers yields its share."""
    pipeline = image_text_pipeline(urls, transform, resampled=True, shuffle_buffer=shuffle_buffer, seed=seed)
    pipeline.append(wds.batched(batch_size, partial=False, collation_fn=collate_pairs))
    batches_per_worker = math.ceil(num_batches / max(num_workers, 1))
    loader = wds.WebLoader(
        pipeline.with_epoch(batches_per_worker),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
    loader.num_batches = num_batches
    return loader
