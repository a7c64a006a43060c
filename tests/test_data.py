"""The webdataset input over real tar files."""

import io
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from splam.data import ImageTransform, expand_shard_urls, image_text_pipeline, make_train_dataloader

from conftest import RESOLUTION


def jpeg_bytes(color, size=(80, 64)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_tar(path, samples):
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def read_all(urls, resolution=32, **transform_flags):
    pipeline = image_text_pipeline(
        urls, ImageTransform(resolution, **transform_flags), resampled=False, shuffle_buffer=0, seed=0
    )
    return list(pipeline)


def test_expand_shard_urls_braces_lists_and_pipes():
    assert expand_shard_urls("data/{000..002}.tar") == ["data/000.tar", "data/001.tar", "data/002.tar"]
    assert expand_shard_urls("a/{0..1}.tar::b/x.tar") == ["a/0.tar", "a/1.tar", "b/x.tar"]
    pipes = expand_shard_urls("pipe:curl -L -s https://host/data/{00000..01099}.tar?download=true")
    assert len(pipes) == 1100
    assert pipes[7] == "pipe:curl -L -s https://host/data/00007.tar?download=true"


def test_generated_shards_decode_to_normalised_pairs(tiny_shards):
    samples = read_all(expand_shard_urls(tiny_shards), resolution=RESOLUTION)
    assert len(samples) == 36
    for pixels, caption in samples:
        assert pixels.shape == (3, RESOLUTION, RESOLUTION) and pixels.dtype == torch.float32
        assert -1.0 <= pixels.min() and pixels.max() <= 1.0
        assert isinstance(caption, str) and caption
    assert len({caption for _, caption in samples}) > 3


def test_shard_boundary_with_repeated_key_and_incomplete_samples(tmp_path):
    """The same key at the end of one shard and the start of the next is two samples (the
    end-of-shard marker separates them); samples without image or caption are skipped."""
    first = write_tar(tmp_path / "a.tar", [
        {"__key__": "s0", "jpg": jpeg_bytes("red"), "txt": "red"},
        {"__key__": "no_caption", "jpg": jpeg_bytes("black")},
        {"__key__": "s1", "jpg": jpeg_bytes("green"), "txt": "green"},
    ])
    second = write_tar(tmp_path / "b.tar", [
        {"__key__": "s1", "png": jpeg_bytes("blue"), "text": "blue"},
        {"__key__": "no_image", "txt": "nothing to see"},
        {"__key__": "s2", "jpeg": jpeg_bytes("white"), "caption": "  white  ", "json": "{}"},
    ])
    samples = read_all([first, second])
    assert [caption for _, caption in samples] == ["red", "green", "blue", "white"]
    blue = samples[2][0]
    assert blue[2].mean() > 0.9 and blue[0].mean() < -0.9


def test_pipe_command_shards(tmp_path):
    path = write_tar(tmp_path / "p.tar", [{"__key__": f"k{i}", "jpg": jpeg_bytes("gray"), "txt": f"c{i}"} for i in range(3)])
    samples = read_all(expand_shard_urls(f"pipe:cat {path}"))
    assert [caption for _, caption in samples] == ["c0", "c1", "c2"]


def test_transform_resizes_shorter_side_and_crops_the_centre():
    # Left third red, middle third green, right third blue, 96 x 32 pixels.
    array = np.zeros((32, 96, 3), dtype=np.uint8)
    array[:, :32, 0] = array[:, 32:64, 1] = array[:, 64:, 2] = 255
    pixels = ImageTransform(16, center_crop=True)(Image.fromarray(array))
    assert pixels.shape == (3, 16, 16)
    np.testing.assert_allclose(pixels[:, 8, 8].numpy(), [-1.0, 1.0, -1.0], atol=0.02)


def test_transform_converts_modes_and_flips():
    gray = ImageTransform(8, center_crop=True)(Image.new("L", (20, 10), 255))
    assert gray.shape == (3, 8, 8) and torch.allclose(gray, torch.ones_like(gray))
    gradient = Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1)))
    flipped = [ImageTransform(8, center_crop=True, random_flip=True)(gradient) for _ in range(40)]
    increasing = sum(bool(p[0, 0, 0] < p[0, 0, -1]) for p in flipped)
    assert 0 < increasing < 40


def test_train_dataloader_yields_fixed_size_batches(tiny_shards):
    loader = make_train_dataloader(
        expand_shard_urls(tiny_shards),
        ImageTransform(RESOLUTION),
        batch_size=4,
        num_batches=5,
        num_workers=2,
        shuffle_buffer=8,
        seed=0,
        pin_memory=False,
    )
    batches = list(loader)
    assert len(batches) >= 5
    for pixels, captions in batches:
        assert pixels.shape == (4, 3, RESOLUTION, RESOLUTION) and len(captions) == 4
