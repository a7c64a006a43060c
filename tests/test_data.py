"""The webdataset input over real tar files: decoding, the shard boundary, dirty data,
and the segmented stream that makes resume exact."""

import argparse
import io
import os
import random
import signal
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from transformers import CLIPTokenizer

from splam.args import SetupError
from splam.data import (
    DataError,
    MAX_UNDECODABLE_IN_A_ROW,
    DataStats,
    ImageTextSamples,
    ImageTransform,
    LatentSamples,
    ShardReader,
    ShardStream,
    captioned_images,
    decoded_images,
    expand_shard_urls,
    make_train_dataloader,
    shuffled,
    tar_samples,
    tokenize,
    train_batches,
    train_shard_urls,
)

from conftest import RESOLUTION, npy, run_scripts


def encoded(image: Image.Image, format="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def jpeg_bytes(color, size=(80, 64)):
    return encoded(Image.new("RGB", size, color), "JPEG")


def write_tar(path, samples):
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def read_all(urls, resolution=32, stats=None, **transform_flags):
    stats = DataStats() if stats is None else stats
    transform = ImageTransform(resolution, **transform_flags)
    return list(decoded_images(captioned_images(tar_samples(urls, stats), stats), transform, random.Random(0), stats))


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    return CLIPTokenizer.from_pretrained(tiny_teacher, subfolder="tokenizer")


def test_expand_shard_urls_braces_lists_and_pipes():
    assert expand_shard_urls("data/{000..002}.tar") == ["data/000.tar", "data/001.tar", "data/002.tar"]
    assert expand_shard_urls("a/{0..1}.tar::b/x.tar") == ["a/0.tar", "a/1.tar", "b/x.tar"]
    pipes = expand_shard_urls("pipe:curl -L -s https://host/data/{00000..01099}.tar?download=true")
    assert len(pipes) == 1100
    assert pipes[7] == "pipe:curl -L -s https://host/data/00007.tar?download=true"


def test_a_local_pattern_that_matches_nothing_or_names_a_folder_is_refused(tmp_path, tiny_shards):
    """A folder was read as a shard that cannot be opened, and the run stopped only once its reader
    gave up, saying that there was no captioned image; a glob gets a hint, as nothing expands it."""
    def urls(images=None, latents=None):
        return train_shard_urls(argparse.Namespace(
            train_shards_path_or_url=images, train_latents_path_or_url=latents, pretrained_teacher_model="teacher",
            pretrained_vae_model_name_or_path=None, teacher_revision=None, resolution=64))

    with pytest.raises(SetupError, match="--train_shards_path_or_url matches no file"):
        urls(images=f"{tmp_path}/missing-{{000..003}}.tar")
    with pytest.raises(SetupError, match="--train_latents_path_or_url matches no file"):
        urls(latents=f"{tmp_path}/missing-{{000..003}}.tar")
    with pytest.raises(SetupError, match=r"matches no file \(first: .*/\*\.tar, 1 in all\): globs are not expanded"):
        urls(images=f"{tmp_path}/*.tar")
    shard_dir = os.path.dirname(tiny_shards)
    for spec in (shard_dir, f"{tiny_shards}::{shard_dir}/"):
        with pytest.raises(SetupError, match=f"--train_shards_path_or_url names a folder, {shard_dir}/?: give the shards in "
                                             f"it, as a brace range such as {shard_dir}/+{{00000..00099}}.tar"):
            urls(images=spec)
    assert urls(images=tiny_shards) == expand_shard_urls(tiny_shards)
    assert len(urls(latents="pipe:curl -s https://host/{0..3}.tar")) == 4


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
    stats = DataStats()
    samples = read_all([first, second], stats=stats)
    assert [caption for _, caption in samples] == ["red", "green", "blue", "white"]
    blue = samples[2][0]
    assert blue[2].mean() > 0.9 and blue[0].mean() < -0.9
    assert stats["no_caption"] == 1 and stats["no_image"] == 1 and stats.skipped() == 2


def test_a_sample_without_a_caption_file_takes_its_json_caption(tmp_path):
    """img2dataset writes the caption to .json as well as .txt, and some text-to-image sets only to
    .json (as "prompt"): a caption file wins, then the .json's caption, text or prompt; a .json
    without one of them as a string, or that does not parse, leaves the sample without a caption."""
    shard = write_tar(tmp_path / "json.tar", [
        {"__key__": "both", "jpg": jpeg_bytes("red"), "txt": "from the txt", "json": '{"caption": "from the json"}'},
        {"__key__": "caption", "jpg": jpeg_bytes("red"), "json": '{"url": "http://x", "caption": " a red square "}'},
        {"__key__": "prompt", "jpg": jpeg_bytes("red"), "json": '{"prompt": "a prompt", "width": 512}'.encode("utf-16")},
        {"__key__": "text", "jpg": jpeg_bytes("red"), "json": '{"caption": null, "text": "a text field"}'},
        {"__key__": "none", "jpg": jpeg_bytes("red"), "json": '{"status": "success", "caption": 3}'},
        {"__key__": "list", "jpg": jpeg_bytes("red"), "json": '["a caption in a list"]'},
        {"__key__": "broken", "jpg": jpeg_bytes("red"), "json": '{"caption": "cut sho'},
        {"__key__": "empty", "jpg": jpeg_bytes("red"), "json": '{"caption": "  "}'},
    ])
    stats = DataStats()
    samples = read_all([shard], stats=stats)
    assert [caption for _, caption in samples] == ["from the txt", "a red square", "a prompt", "a text field"]
    assert stats["no_caption"] == 3 and stats["empty_caption"] == 1 and stats.skipped() == 4


def test_pipe_command_shards(tmp_path):
    path = write_tar(tmp_path / "p.tar", [{"__key__": f"k{i}", "jpg": jpeg_bytes("gray"), "txt": f"c{i}"} for i in range(3)])
    samples = read_all(expand_shard_urls(f"pipe:cat {path}"))
    assert [caption for _, caption in samples] == ["c0", "c1", "c2"]


def test_transform_resizes_shorter_side_and_crops_the_centre():
    # Left third red, middle third green, right third blue, 96 x 32 pixels.
    array = np.zeros((32, 96, 3), dtype=np.uint8)
    array[:, :32, 0] = array[:, 32:64, 1] = array[:, 64:, 2] = 255
    pixels = ImageTransform(16, center_crop=True)(Image.fromarray(array), random.Random(0), DataStats())
    assert pixels.shape == (3, 16, 16)
    np.testing.assert_allclose(pixels[:, 8, 8].numpy(), [-1.0, 1.0, -1.0], atol=0.02)


def test_transform_flips_about_half_the_time():
    gradient = Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))).convert("RGB")
    transform, rng = ImageTransform(8, center_crop=True, random_flip=True), random.Random(0)
    flipped = [transform(gradient, rng, DataStats()) for _ in range(40)]
    increasing = sum(bool(p[0, 0, 0] < p[0, 0, -1]) for p in flipped)
    assert 5 < increasing < 35


def image_in_mode(mode):
    """A 40 x 40 image in ``mode`` whose content should read as mid grey (or white where transparent)."""
    if mode == "I;16":
        return Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16))
    if mode == "CMYK":
        return Image.new("CMYK", (40, 40), (0, 0, 0, 127))
    if mode == "P":
        return Image.new("RGB", (40, 40), (128, 128, 128)).convert("P")
    if mode == "RGBA":
        return Image.new("RGBA", (40, 40), (128, 128, 128, 0))
    if mode == "LA":
        return Image.new("LA", (40, 40), (128, 0))
    return Image.new(mode, (40, 40), 128)


@pytest.mark.parametrize("mode, expected", [
    ("L", 128), ("I;16", 128), ("CMYK", 128), ("P", 128), ("RGBA", 255), ("LA", 255),
])
def test_image_modes_are_repaired_to_rgb(tmp_path, mode, expected):
    # PNG cannot hold CMYK; JPEG can.
    extension, image_format = ("jpg", "JPEG") if mode == "CMYK" else ("png", "PNG")
    shard = write_tar(tmp_path / "modes.tar", [
        {"__key__": "x", extension: encoded(image_in_mode(mode), image_format), "txt": "an image"},
    ])
    stats = DataStats()
    [(pixels, _)] = read_all([shard], resolution=32, stats=stats)
    assert pixels.shape == (3, 32, 32)
    np.testing.assert_allclose(((pixels + 1) * 127.5).mean(dim=(1, 2)).numpy(), [expected] * 3, atol=3)
    assert stats["image_mode_converted"] == 1


def test_dirty_samples_are_skipped_or_repaired_and_counted(tmp_path, monkeypatch):
    good = jpeg_bytes("red", (64, 64))
    samples = [
        {"__key__": "ok", "jpg": good, "txt": "fine"},
        {"__key__": "broken_bytes", "jpg": b"\xff\xd8 not really a jpeg", "txt": "broken"},
        {"__key__": "truncated_jpeg", "jpg": good[: len(good) // 2], "txt": "half an image"},
        {"__key__": "empty_caption", "jpg": good, "txt": "   \n"},
        {"__key__": "latin1", "jpg": good, "txt": "caf\xe9 au lait".encode("latin-1")},
        {"__key__": "small", "jpg": jpeg_bytes("blue", (8, 6)), "txt": "tiny"},
        {"__key__": "huge", "png": encoded(Image.new("RGB", (2000, 2000), "white")), "txt": "too big"},
        {"__key__": "large_jpeg", "jpg": jpeg_bytes("green", (1600, 1200)), "txt": "large but fine"},
        {"__key__": "byte_order_mark", "jpg": good, "txt": "\ufeffa caption saved by Notepad".encode("utf-8")},
        {"__key__": "utf16", "jpg": good, "txt": "\ufeffun caf\xe9 de PowerShell\r\n".encode("utf-16-le")},
        {"__key__": "utf16_big_endian", "jpg": good, "txt": "\ufeffun th\xe9".encode("utf-16-be")},
    ]
    shard = write_tar(tmp_path / "dirty.tar", samples)
    # PIL's decompression-bomb limit, lowered so that a 4-megapixel image stands for a giant one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_500_000)
    stats = DataStats()
    decoded = read_all([shard], resolution=32, stats=stats)
    assert [caption for _, caption in decoded] == ["fine", "caf\ufffd au lait", "tiny", "large but fine",
                                                  "a caption saved by Notepad", "un caf\xe9 de PowerShell", "un th\xe9"]
    assert stats == DataStats(undecodable_image=2, empty_caption=1, caption_not_utf8=1, image_upscaled=1, image_too_large=1)
    assert stats.skipped() == 4 and stats.repaired() == 2


class OneCountedBatch(torch.utils.data.IterableDataset):
    seed = 0

    def __iter__(self):
        yield torch.zeros(1), DataStats(undecodable_image=2, image_upscaled=1)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_the_loader_passes_the_counts_through_unchanged(num_workers):
    """torch's loader converts each batch (``default_convert``) and on CUDA pins it; neither may
    copy-and-update the stats, which for a Counter would add every count twice."""
    from torch.utils.data._utils.pin_memory import pin_memory

    stats = DataStats(undecodable_image=2, image_upscaled=1)
    assert pin_memory(stats) == stats
    (_, loaded), = make_train_dataloader(OneCountedBatch(), num_workers=num_workers, pin_memory=False)
    assert loaded == stats


@pytest.mark.parametrize("cut_at", ["in a file's data", "at a header", "in a header"])
def test_a_truncated_tar_keeps_its_complete_samples_and_counts_the_shard(tmp_path, cut_at):
    """A shard cut short is counted wherever the cut falls. tarfile's stream mode ends an archive
    quietly where the stream stops at a header or within one (a copy cut at a block boundary),
    which read as a complete shard before."""
    samples = [{"__key__": f"k{i}", "jpg": jpeg_bytes("gray", (64, 64)), "txt": f"c{i}"} for i in range(6)]
    whole = write_tar(tmp_path / "whole.tar", samples)
    with tarfile.open(whole) as tar:
        fourth_image = tar.getmembers()[6]  # k3.jpg
    cut_offset = {"in a file's data": fourth_image.offset_data + 10, "at a header": fourth_image.offset,
                  "in a header": fourth_image.offset + 100}[cut_at]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(whole, "rb").read()[:cut_offset])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file at all" * 100)
    stats = DataStats()
    decoded = read_all([str(cut), str(garbage), str(tmp_path / "missing.tar"), whole], stats=stats)
    # The cut shard gives its complete samples, the unreadable and the missing shard are counted,
    # the whole one follows intact.
    assert [caption for _, caption in decoded] == ["c0", "c1", "c2"] + [f"c{i}" for i in range(6)]
    assert stats["bad_shard"] == 3 and stats.bad_shards() == 3 and stats.skipped() == 0
    assert stats.report().startswith("0 samples skipped, 0 repaired, 3 shard readings stopped short")


def write_files(path, files):
    """A tar of ``(name, bytes)`` files in the given order, as a tar of a folder would be."""
    with tarfile.open(path, "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_a_shard_whose_samples_files_are_apart_is_left_where_that_shows(tmp_path, caplog):
    """A tar of an unsorted folder: webdataset would cut each sample into fragments and train on the
    few pairs that lie side by side. The shard is read up to the first file whose sample came
    before, then counted and named with the reason; the next shard is read whole."""
    images = [(f"k{i}.jpg", jpeg_bytes("gray")) for i in range(4)]
    captions = [(f"k{i}.txt", f"c{i}".encode()) for i in range(4)]
    apart = write_files(tmp_path / "apart.tar", [images[0], captions[0], *images[1:], *captions[1:]])
    sorted_ = write_files(tmp_path / "sorted.tar", [file for pair in zip(images, captions) for file in pair])
    stats = DataStats()
    samples = read_all([apart, sorted_], stats=stats)
    # k0 is whole; k1..k3 are images alone until k1.txt shows the layout.
    assert [caption for _, caption in samples] == ["c0", "c0", "c1", "c2", "c3"]
    assert stats["no_caption"] == 3 and stats["bad_layout"] == 1 and stats.bad_shards() == 1
    assert "apart.tar" in caplog.text and "the files of sample k1 are not adjacent" in caplog.text


def test_a_sample_written_twice_and_files_written_twice_are_read(tmp_path):
    """A key that comes back with the files it had is a sample written twice, not a layout fault;
    a file twice within one sample keeps the first copy, counted."""
    shard = write_files(tmp_path / "twice.tar", [
        ("a.jpg", jpeg_bytes("red")), ("a.txt", b"first"), ("b.jpg", jpeg_bytes("red")), ("b.txt", b"b"),
        ("a.jpg", jpeg_bytes("red")), ("a.txt", b"again"), ("a.txt", b"third"),
    ])
    stats = DataStats()
    assert [caption for _, caption in read_all([shard], stats=stats)] == ["first", "b", "again"]
    assert stats["duplicate_file"] == 1 and stats.bad_shards() == 0


def test_a_file_twice_is_not_counted_again_when_its_shard_is_read_again_to_a_position(tmp_path):
    """A resumed reader reads its shard again up to its position: what it met there was counted
    before the checkpoint."""
    shard = write_files(tmp_path / "twice.tar", [
        ("a.jpg", b"1"), ("a.txt", b"a"), ("a.txt", b"again"), ("b.jpg", b"2"), ("b.txt", b"b"), ("b.txt", b"again"),
    ])
    position = {"pool": "own", "pass": 0, "shard": 0, "sample": 1}
    reader = ShardReader([shard], [shard], seed=0, reader=0, samples=None, position=position)
    assert next(iter(reader))["__key__"] == "b"
    assert reader.stats["duplicate_file"] == 1  # b's, not a's again


def test_names_with_dots_in_the_key_are_left_without_reading_the_shard_into_one_sample(tmp_path, caplog):
    """``coco.train.000001.jpg`` has webdataset's key ``coco``: every file of the shard would join one
    sample, held in memory whole. Past 64 files the shard is left, with the reason."""
    files = [(f"coco.train.{i:06d}.{extension}", data) for i in range(40)
             for extension, data in (("jpg", jpeg_bytes("gray")), ("txt", b"a caption"))]
    stats = DataStats()
    assert read_all([write_files(tmp_path / "dotted.tar", files)], stats=stats) == []
    assert stats["bad_layout"] == 1 and stats.skipped() == 0
    assert "sample coco has over 64 files" in caplog.text


def test_a_stream_of_shards_whose_files_are_apart_stops_with_a_message(tmp_path, tokenizer):
    """Every shard lays its samples' files apart, with a pair side by side at the start of each: the
    stream does not go on training on those pairs, it stops."""
    shards = []
    for index in range(3):
        images = [(f"k{i}.jpg", jpeg_bytes("gray")) for i in range(4)]
        captions = [(f"k{i}.txt", b"caption") for i in range(4)]
        shards.append(write_files(tmp_path / f"{index}.tar", [images[0], captions[0], *images[1:], *captions[1:]]))
    with pytest.raises(DataError, match="3 shards in a row whose files webdataset cannot group into samples"):
        for _ in shard_stream(shards, tokenizer, batch_size=1, batches_per_segment=100):
            pass


def test_shards_whose_files_are_apart_among_good_ones_do_not_stop_the_stream(tmp_path, tokenizer, monkeypatch):
    """Only such shards in a row stop it: the bad ones met over a run, however few among good ones,
    stopped it once they were as many as 64 (here 2)."""
    monkeypatch.setattr(ShardReader, "MAX_DISTINCT", 2)
    monkeypatch.setattr(ShardReader, "shard_order", lambda reader: list(reader.pool))  # bad, good, bad, good
    shards = []
    for index in range(4):
        images = [(f"k{i}.jpg", jpeg_bytes("gray")) for i in range(3)]
        captions = [(f"k{i}.txt", b"caption") for i in range(3)]
        order = [images[0], captions[0], *images[1:], *captions[1:]] if index % 2 == 0 else [
            file for pair in zip(images, captions) for file in pair]
        shards.append(write_files(tmp_path / f"{index}.tar", order))
    batches = list(shard_stream(shards, tokenizer, batch_size=1, batches_per_segment=3 * (1 + 3 + 1 + 3)))
    assert sum(stats["bad_layout"] for _, _, stats, _ in batches) == 2 * 3  # 3 passes


def test_long_captions_are_truncated_and_counted(tokenizer):
    stats = DataStats()
    ids = tokenize(tokenizer, ["short", "a very long caption " * 20], stats)
    assert ids.shape == (2, 77)
    assert stats["caption_truncated"] == 1


def shard_stream(urls, tokenizer, **overrides):
    options = dict(batch_size=3, batches_per_segment=4, shuffle_buffer=8, seed=7)
    options.update(overrides)
    return ShardStream(urls, ImageTextSamples(ImageTransform(RESOLUTION, random_flip=True), tokenizer), **options)


def test_a_stream_with_nothing_usable_stops_with_a_message(tmp_path, tokenizer):
    shards = [write_tar(tmp_path / f"{i}.tar", [{"__key__": f"k{j}", "txt": "no image"} for j in range(3)]) for i in range(2)]
    with pytest.raises(DataError, match=r"no captioned image \(\.jpg, \.jpeg, \.png, \.webp with \.txt, \.text, \.caption or a "
                                        r"\.json's caption, text, prompt\) in \d+ shards in a row, reading from 2 shards"):
        next(iter(shard_stream(shards, tokenizer)))


def test_a_reader_whose_shards_are_all_bad_reads_from_all_shards(tmp_path, tokenizer, caplog):
    """Process 1 of 2 owns only the corrupt shard: it falls back to all shards and counts the
    corrupt one, rather than stopping a run that has good data."""
    good = write_tar(tmp_path / "good.tar", [{"__key__": f"k{j}", "jpg": jpeg_bytes("red"), "txt": "red"} for j in range(6)])
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(b"not a tar" * 300)
    stream = shard_stream([good, str(corrupt)], tokenizer, process_index=1, num_processes=2, batches_per_segment=1)
    batches = train_batches(make_train_dataloader(stream, num_workers=0, pin_memory=False))
    pixels, _, stats, (_, position) = next(batches)
    assert pixels.shape[0] == 3 and stats["bad_shard"] >= 1
    assert "reads from all of them" in caplog.text
    assert position["pool"] == "all"
    # The next segment tries its own share again (its next pass), then falls back again.
    _, _, stats, (_, next_position) = next(batches)
    assert stats["bad_shard"] >= 1 and next_position["pool"] == "all" and next_position["own_pass"] > position["own_pass"]
    assert caplog.text.count("reads from all of them") == 2


def test_a_shard_that_fails_mid_way_is_opened_again_and_read_on(tmp_path):
    """A shard held open for long may lose its connection: it is opened again and read on from
    where it failed, each sample read once; one that fails again without a new sample is left
    (a truncated tar), and a shard that cannot be read is named in the log once per reader."""
    samples = [{"__key__": f"k{index}", "moments.npy": npy(np.array([index], np.float32)),
                "prompt_embeds.npy": npy(np.zeros(1, np.float32))} for index in range(30)]
    whole = write_tar(tmp_path / "whole.tar", samples)
    failed = tmp_path / "failed_once"
    dropped_once = f"pipe:sh -c 'if test -e {failed}; then cat {whole}; else touch {failed}; head -c 5000 {whole}; fi'"
    missing = str(tmp_path / "missing.tar")
    stream = ShardStream([dropped_once, missing], LatentSamples((1,), (1,)), batch_size=2, batches_per_segment=5,
                         shuffle_buffer=1, seed=0)
    batches = [batch for _, batch in zip(range(30), train_batches(make_train_dataloader(stream, 0, pin_memory=False)))]
    read = [int(moments) for moments, _, _, _ in batches for moments in moments.flatten()]
    assert sorted(read[:30]) == list(range(30)) and sorted(read[30:]) == list(range(30))
    bad_shards = sum(stats["bad_shard"] for _, _, stats, _ in batches)
    assert bad_shards == 1 + 2  # the dropped connection, then the missing shard in each pass
    assert stream.reader.errors.reported == {dropped_once, missing}


def test_a_cut_shard_and_one_with_an_error_inside_are_each_read_once_per_pass(tmp_path):
    """Only a shard whose stream fails mid-way is opened again: one cut short fails again where it
    did, giving nothing new, and is counted once; one holding a sample's two files twice is read
    to its end, the sample kept with the first of each (counted), and not opened again."""
    def sample(index, **extra):
        return {"__key__": f"k{index}", "moments.npy": npy(np.array([index], np.float32)),
                "prompt_embeds.npy": npy(np.zeros(1, np.float32)), **extra}

    whole = open(write_tar(tmp_path / "whole.tar", [sample(index) for index in range(10)]), "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:len(whole) // 2])
    duplicated = tmp_path / "duplicated.tar"
    with tarfile.open(duplicated, "w") as tar:
        for index in range(10, 14):
            for name, data in (("moments.npy", npy(np.array([index], np.float32))),
                               ("prompt_embeds.npy", npy(np.zeros(1, np.float32)))) * (1 + (index == 11)):
                info = tarfile.TarInfo(f"k{index}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pass_length = sum(len(list(tar_samples([str(shard)], DataStats()))) for shard in (cut, duplicated))
    openings = tmp_path / "openings"
    served = f"pipe:sh -c 'echo >> {openings}; cat {duplicated}'"
    stream = ShardStream([str(cut), served], LatentSamples((1,), (1,)), batch_size=1, batches_per_segment=3,
                         shuffle_buffer=1, seed=0)
    batches = [batch for _, batch in zip(range(2 * pass_length), train_batches(make_train_dataloader(stream, 0, False)))]
    read = [int(moments) for moments, _, _, _ in batches]
    assert sorted(read[:pass_length]) == sorted(read[pass_length:]) and len(set(read[:pass_length])) == pass_length
    # Per pass: the cut shard's failure once, the two files written twice once each.
    assert sum(stats["bad_shard"] for _, _, stats, _ in batches) == 2 * 1
    assert sum(stats["duplicate_file"] for _, _, stats, _ in batches) == 2 * 2
    assert len(openings.read_text().splitlines()) == 2  # once per pass


def test_the_shuffle_reads_only_what_the_segment_uses():
    """A buffer left full at every segment's end would read shards about twice over."""
    read = []

    def source():
        for index in range(10_000):
            read.append(index)
            yield index

    stream = shuffled(source(), 1000, random.Random(0), count=300)
    first = [next(stream) for _ in range(300)]
    assert sorted(first) == list(range(300)) and first != sorted(first) and len(read) == 300
    assert next(stream) == 300 and len(read) == 301  # more on demand, for samples that fail to decode


def test_a_stream_of_undecodable_images_stops_with_a_message(tmp_path, tokenizer):
    shard = write_tar(tmp_path / "bad.tar", [{"__key__": f"k{j}", "jpg": b"junk", "txt": "x"} for j in range(MAX_UNDECODABLE_IN_A_ROW)])
    with pytest.raises(DataError, match=r"1000 images in a row could not be used, none before, reading from 1 shard "):
        next(iter(shard_stream([shard], tokenizer)))


def test_each_segment_is_the_same_whether_the_stream_starts_there_or_not(tiny_shards, tokenizer):
    """The data half of exact resume: segments 1 and 2 read after segment 0 equal those read by a
    fresh loader that starts at segment 1 from where the readers stood after segment 0, with two
    workers (each segment reads 6 of a shard's 12 samples, so a reader stops mid-shard)."""
    urls = expand_shard_urls(tiny_shards)
    loader = make_train_dataloader(shard_stream(urls, tokenizer), num_workers=2, pin_memory=False)
    continuous = [batch for _, batch in zip(range(12), train_batches(loader))]
    positions = {reader: position for *_, (reader, position) in continuous[:4]}
    assert sorted(positions) == [0, 1] and {position["sample"] for position in positions.values()} == {6}
    fresh_loader = make_train_dataloader(shard_stream(urls, tokenizer, first_segment=1, positions=positions),
                                         num_workers=2, pin_memory=False)
    resumed = [batch for _, batch in zip(range(8), train_batches(fresh_loader))]
    for (pixels, ids, _, _), (resumed_pixels, resumed_ids, _, _) in zip(continuous[4:], resumed, strict=True):
        assert torch.equal(pixels, resumed_pixels) and torch.equal(ids, resumed_ids)
    assert not torch.equal(continuous[0][0], continuous[4][0])
    for pixels, ids, stats, _ in continuous:
        assert pixels.shape == (3, 3, RESOLUTION, RESOLUTION) and ids.shape == (3, 77)
        assert isinstance(stats, DataStats)


def test_a_reader_reads_every_sample_of_its_shards_once_per_pass_whatever_the_segments(tmp_path):
    """Shards far longer than a segment's share are read on where the last segment stopped, not from
    their start again: over the segments of one pass a reader trains on each sample of its shards
    once, and the next pass reads them all again, in another order."""
    numbered = LatentSamples((1,), (1,))
    shards = []
    for shard in range(3):
        samples = [{"__key__": f"s{shard}k{index}", "moments.npy": npy(np.array([100 * shard + index], np.float32)),
                    "prompt_embeds.npy": npy(np.zeros(1, np.float32))} for index in range(20)]
        shards.append(write_tar(tmp_path / f"{shard}.tar", samples))
    stream = ShardStream(shards, numbered, batch_size=2, batches_per_segment=3, shuffle_buffer=4, seed=0)
    loader = make_train_dataloader(stream, num_workers=0, pin_memory=False)
    read = [int(moments) for _, (moments, _, _, _) in zip(range(60), train_batches(loader)) for moments in moments.flatten()]
    every_sample = sorted(100 * shard + index for shard in range(3) for index in range(20))
    assert sorted(read[:60]) == every_sample and sorted(read[60:]) == every_sample
    assert read[:60] != read[60:]


def test_processes_read_different_samples(tiny_shards, tokenizer):
    urls = expand_shard_urls(tiny_shards)
    first = next(iter(shard_stream(urls, tokenizer, process_index=0)))
    second = next(iter(shard_stream(urls, tokenizer, process_index=1)))
    assert not torch.equal(first[0], second[0])


def test_unreadable_shards_among_good_ones_do_not_stop_the_stream(tmp_path, tokenizer):
    """Three of four shards missing, the good one holding one sample: each sample a segment needs
    takes a pass that opens the three missing ones too, which must not end a stream whose good
    shard keeps giving samples, whatever order the passes take."""
    good = write_tar(tmp_path / "good.tar", [{"__key__": "k", "jpg": jpeg_bytes("red"), "txt": "red"}])
    urls = [good] + [str(tmp_path / f"missing_{i}.tar") for i in range(3)]
    for seed in range(10):
        batches = list(shard_stream(urls, tokenizer, batch_size=2, batches_per_segment=2, shuffle_buffer=1, seed=seed))
        assert len(batches) == 2
        assert sum(stats["bad_shard"] for _, _, stats, _ in batches) >= 9  # 3 per pass, 4 passes but the last's end


def test_shards_that_become_unreadable_stop_the_stream_rather_than_leave_it_spinning(tmp_path, tokenizer):
    """After usable samples, a run of unreadable shards far longer than a pass (20 openings per
    shard of the pool) means the shards went away (a server gone, say)."""
    good = write_tar(tmp_path / "good.tar", [{"__key__": f"k{j}", "jpg": jpeg_bytes("red"), "txt": "red"} for j in range(4)])
    served = tmp_path / "served"
    served_once = f"pipe:sh -c 'test -e {served} && exit 1; touch {served}; cat {good}'"
    stream = shard_stream([served_once, served_once], tokenizer, batch_size=2, batches_per_segment=10, shuffle_buffer=1)

    class StillSpinning(BaseException):  # not an Exception: the shard reader's error handler must not swallow it
        pass

    def spinning(*_):
        raise StillSpinning("the stream is still opening shards after 60 s")

    previous = signal.signal(signal.SIGALRM, spinning)
    signal.alarm(60)
    try:
        with pytest.raises(DataError, match=r"in 40 shards in a row, reading from 2 shards"):
            list(stream)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_an_unreadable_shard_is_named_in_the_log(tmp_path, tiny_shards, caplog):
    missing = str(tmp_path / "missing.tar")
    read_all([missing])
    assert f"No such file or directory: '{missing}'" in caplog.text
    gated = "pipe:curl -s -f https://huggingface.co/datasets/someone/gated/resolve/main/0.tar -H 'Authorization:Bearer hf_NotARealToken0123456789abcdefghijkl'"
    read_all([f"pipe:false {gated}"])
    assert "someone/gated" in caplog.text and "hf_NotARealToken" not in caplog.text
    caplog.clear()
    urls = train_shard_urls(argparse.Namespace(train_shards_path_or_url=f"{tiny_shards}::{missing}",
                                               train_latents_path_or_url=None))
    assert len(urls) == 4 and f"1 of 4 shards do not exist (first: {missing}): each pass tries them again" in caplog.text


def test_a_thin_image_is_cropped_before_it_is_resized(tmp_path, monkeypatch):
    """A 1 x 1,000,000 pixel PNG is a few KB; scaled whole to a shorter side of 64 it would be
    64 million x 64 pixels (16 GB). Only the crop may be resized."""
    resize = Image.Image.resize

    def bounded_resize(self, size, *args, **kwargs):
        assert size[0] * size[1] <= 4 * 64 * 64, f"resized to {size}"
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", bounded_resize)
    thin = write_tar(tmp_path / "thin.tar", [
        {"__key__": "line", "png": encoded(Image.new("RGB", (1_000_000, 1), "white")), "txt": "a divider line"},
    ])
    stats = DataStats()
    [(pixels, _)] = read_all([thin], resolution=64, stats=stats)
    assert pixels.shape == (3, 64, 64) and pixels.min() > 0.99
    assert stats["image_upscaled"] == 1


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view):
    stored left red and right blue, it shows top red and bottom blue."""
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:, :32, 0] = array[:, 32:, 2] = 255
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    shard = write_tar(tmp_path / "phone.tar", [{"__key__": "photo", "jpg": buffer.getvalue(), "txt": "a phone photo"}])
    [(pixels, _)] = read_all([shard], resolution=16, center_crop=True)
    rgb = (pixels + 1) * 127.5
    assert rgb[0, 0].mean() > 240 and rgb[2, 0].mean() < 15  # top row red
    assert rgb[2, -1].mean() > 240 and rgb[0, -1].mean() < 15  # bottom row blue


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_transparent_colour_is_composited_over_white(tmp_path, mode):
    """A PNG tRNS chunk makes a colour of an RGB or greyscale image transparent, as alpha does."""
    black = (0, 0, 0) if mode == "RGB" else 0
    buffer = io.BytesIO()
    Image.new(mode, (40, 40), black).save(buffer, format="PNG", transparency=black)
    shard = write_tar(tmp_path / "trns.tar", [{"__key__": "logo", "png": buffer.getvalue(), "txt": "a transparent logo"}])
    [(pixels, _)] = read_all([shard], resolution=32)
    assert pixels.min() > 0.99


def test_one_shard_of_undecodable_images_is_read_to_its_end_when_asked(tmp_path):
    """scripts/precompute_latents.py reads one shard at a time: a shard whose images all fail to
    decode gives nothing, and does not stop the script."""
    shard = write_tar(tmp_path / "junk.tar", [{"__key__": f"k{j}", "jpg": b"<html>403</html>", "txt": "x"}
                                              for j in range(MAX_UNDECODABLE_IN_A_ROW)]
                      + [{"__key__": "last", "jpg": jpeg_bytes("red"), "txt": "the one good image"}])
    stats = DataStats()
    decoded = list(decoded_images(captioned_images(tar_samples([shard], stats), stats), ImageTransform(32),
                                  random.Random(0), stats))
    assert [caption for _, caption in decoded] == ["the one good image"]
    assert stats["undecodable_image"] == MAX_UNDECODABLE_IN_A_ROW


def test_an_unparsable_exif_block_leaves_the_image_as_stored(tmp_path, monkeypatch):
    """Corrupt EXIF makes PIL raise struct.error and the like while turning an image upright: the
    pixels are fine, so the image is used as stored, in training and by scripts/make_shards.py."""
    import struct

    from make_shards import folder_images
    from PIL import ImageOps

    def broken_exif(image, **kwargs):
        raise struct.error("required argument is not an integer")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken_exif)
    shard = write_tar(tmp_path / "exif.tar", [{"__key__": "k", "jpg": jpeg_bytes("red"), "txt": "red"}])
    stats = DataStats()
    assert len(read_all([shard], stats=stats)) == 1 and stats.skipped() == 0
    (tmp_path / "folder").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "folder" / "photo.jpg")
    [(image, captions)] = list(folder_images(str(tmp_path / "folder")))
    assert image.size == (40, 30) and captions == ["photo"]


def test_one_shard_of_undecodable_images_among_good_ones_does_not_stop_the_stream(tmp_path, tokenizer):
    """A shard whose images all fail to decode (a crawl that saved error pages) gives more than
    MAX_UNDECODABLE_IN_A_ROW failures in a row whenever it is opened: that is one bad shard, not
    unusable data."""
    good = [write_tar(tmp_path / f"good{i}.tar", [{"__key__": f"k{j}", "jpg": jpeg_bytes("red"), "txt": "red"}
                                                  for j in range(12)]) for i in range(3)]
    junk = write_tar(tmp_path / "junk.tar", [{"__key__": f"k{j}", "jpg": b"<html>403</html>", "txt": "x"}
                                             for j in range(MAX_UNDECODABLE_IN_A_ROW + 1)])
    for seed in range(4):
        batches = list(shard_stream(good + [junk], tokenizer, batch_size=2, batches_per_segment=50,
                                    shuffle_buffer=1000, seed=seed))
        assert len(batches) == 50
    # A reader whose own share is the junk shard reads from all shards instead.
    for process_index in range(4):
        batches = list(shard_stream(good + [junk], tokenizer, batch_size=2, batches_per_segment=2,
                                    process_index=process_index, num_processes=4))
        assert len(batches) == 2


def test_make_shards_turns_a_folder_of_mixed_images_into_usable_samples(tmp_path):
    from make_shards import folder_images, write_shards

    folder = tmp_path / "my images"
    folder.mkdir()
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    photo.save(folder / "photo.png")
    photo.save(folder / "photo_webp.webp")
    photo.convert("L").save(folder / "grey.png")
    photo.convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(np.full((70, 70), 40000, dtype=np.uint16)).save(folder / "sixteen.png")
    Image.new("RGB", (1, 1), "red").save(folder / "dot.png")
    sideways = Image.new("RGB", (100, 60), "blue")
    exif = sideways.getexif()
    exif[0x0112] = 6
    sideways.save(folder / "sideways.jpg", exif=exif.tobytes())
    photo.save(folder / "blank.jpg")
    (folder / "blank.txt").write_text("  \n")
    photo.save(folder / "latin.jpg")
    (folder / "latin.txt").write_bytes("un café".encode("latin-1"))
    photo.save(folder / "powershell.jpg")
    (folder / "powershell.txt").write_bytes("\ufeffa caption from PowerShell\r\n".encode("utf-16-le"))
    (folder / "broken.jpg").write_bytes(b"not an image")
    photo.save(folder / "IMG_1.JPG", format="JPEG")
    (folder / "IMG_1.TXT").write_text("a camera's caption")

    sources = list(folder_images(str(folder)))
    # An empty caption file gave "" (training skips such samples); a Latin-1 one stopped the script;
    # a caption file named in capitals was not found.
    assert [captions[0] for _, captions in sources] == [
        "a camera's caption", "blank", "dot", "grey", "un caf\ufffd", "photo", "photo webp", "a caption from PowerShell",
        "rgba", "sideways", "sixteen"]
    assert {image.mode for image, _ in sources} == {"RGB"} and sources[9][0].size == (60, 100)

    shard = write_shards(str(tmp_path / "shards"), 1, 60, RESOLUTION, str(folder))[0]
    stats = DataStats()
    assert len(read_all([shard], RESOLUTION, stats)) == 60 and stats.skipped() == 0, stats
    dots = [np.asarray(sample["jpg"]) for sample in wds.WebDataset(shard, shardshuffle=False).decode("pil")
            if sample["json"]["source"] == 2]
    # A 1-pixel image's crop was empty, so its samples came out black.
    assert dots and all(np.abs(dot.astype(int) - [255, 0, 0]).max() < 8 for dot in dots)


def test_make_shards_refuses_a_missing_image_dir_and_a_file_as_output_dir(tmp_path):
    a_file = tmp_path / "shards"
    a_file.write_text("")
    for result in run_scripts(["scripts/make_shards.py", "--output_dir", str(tmp_path / "out"), "--image_dir",
                               str(tmp_path / "missing")],
                              ["scripts/make_shards.py", "--output_dir", str(a_file)]):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]


def test_readers_with_unequal_shares_of_the_shards_are_warned_of():
    from splam.data import unequal_shares_warning

    assert unequal_shares_warning(8, 4) is None and unequal_shares_warning(1, 1) is None
    assert "3 shards for 4 readers (processes x workers): each reads from all shards" in unequal_shares_warning(3, 4)
    assert ("10 shards for 4 readers (processes x workers): some readers get 2 and others 3, and all give samples "
            "equally fast, so the samples of the smaller shares come round up to 1.50 times as often; a multiple of 4 "
            "shards") in unequal_shares_warning(10, 4)
