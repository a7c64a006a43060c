"""Streaming training batches from webdataset tar shards: ``(pixels, token ids)`` from
image-text shards, or ``(posterior moments, prompt embeddings)`` from the latent shards of
``scripts/precompute_latents.py``.

A shard spec is what ``--train_shards_path_or_url`` takes: local paths, URLs, ``pipe:``
commands, ``{000..009}`` brace ranges and ``::``-separated lists of these. Their raw samples come
from ``splam.tar_shards``, which groups a tar's files as webdataset does, shard by shard (the
authors' custom grouping crashed on the end-of-shard marker webdataset 1.x puts between shards,
SPEC defect 2).

Web data is dirty. Every sample that cannot be used is skipped, every one that can be
mended is repaired, and both are counted by reason (``DataStats``) so the training loop
can report them; a stream in which nothing usable remains raises ``DataError``.

Each reader (a loader worker of a process) reads its own share of the shards in passes, each
shard whole. For exact resume the stream is cut into *segments* of a fixed number of batches
(one checkpoint interval): the checkpoint stores where each reader reads on, and everything
random in a segment (shuffle, crops, flips) comes from an RNG seeded by ``(seed, segment,
process, worker)`` only, so the stream from segment ``k`` on is the same whether or not the
run was restarted there.
"""

import codecs
import collections
import io
import json
import logging
import os
import random
import re
import warnings

import numpy as np
import torch
import webdataset as wds
from accelerate.utils import gather_object
from PIL import Image, ImageOps

from .args import SetupError, redact_tokens
from .latent_shards import check_latent_records
from .models import latent_side
from .tar_shards import LayoutError, shard_samples

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "text", "caption")
# Where a sample without a caption file has its caption: the first string of these fields of its .json
# (img2dataset writes "caption" there beside the .txt; some text-to-image sets write only a "prompt").
JSON_CAPTION_FIELDS = ("caption", "text", "prompt")
# Reasons a sample is dropped, reasons it was mended, and the shards whose reading stopped short
# (``ShardErrors``), as counted in DataStats.
SKIP_REASONS = ("no_image", "no_caption", "empty_caption", "undecodable_image", "image_too_large", "no_latents",
                "undecodable_latents")
REPAIR_REASONS = ("caption_not_utf8", "caption_truncated", "image_mode_converted", "image_upscaled", "duplicate_file")
BAD_SHARD, BAD_LAYOUT = "bad_shard", "bad_layout"
HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
MAX_UNDECODABLE_IN_A_ROW = 1000
MAX_SHARDS_CHECKED = 10_000  # local shards whose existence is checked at the start
RECORDS_CHECKED = 100  # local latent shards whose records are checked: a set is made with one command
# The arrays of a latent shard's sample (scripts/precompute_latents.py writes them).
MOMENTS_KEY, PROMPT_EMBEDS_KEY = "moments.npy", "prompt_embeds.npy"


logger = logging.getLogger(__name__)
# ``extra=`` of a message that one process's loader meets alone: every process prints those, the
# main process alone the package's others, which are the same on each (the training script's filter).
PER_PROCESS = {"per_process": True}


def is_per_process(record: logging.LogRecord) -> bool:
    return getattr(record, "per_process", False)


class DataError(RuntimeError):
    """The shard stream yields nothing usable."""


class DataStats(collections.Counter):
    """Counts of skipped and repaired samples by reason."""

    def skipped(self) -> int:
        return sum(self[reason] for reason in SKIP_REASONS)

    def repaired(self) -> int:
        return sum(self[reason] for reason in REPAIR_REASONS)

    def bad_shards(self) -> int:
        """Readings of a shard that stopped short: not samples, since how many were lost is not known."""
        return self[BAD_SHARD] + self[BAD_LAYOUT]

    def summary(self) -> str:
        return ", ".join(f"{reason} {count}" for reason, count in sorted(self.items()) if count)

    def report(self) -> str:
        readings = self.bad_shards()
        shards_part = f", {readings} shard reading{'' if readings == 1 else 's'} stopped short" if readings else ""
        return f"{self.skipped()} samples skipped, {self.repaired()} repaired{shards_part} ({self.summary() or 'no reasons'})"

    def summed_over_processes(self) -> "DataStats":
        """The counts of all processes added up (each counts what its own loader workers read);
        a collective, to call on every process."""
        total = DataStats()
        for counts in gather_object([dict(self)]):
            total.update(counts)
        return total

    def pin_memory(self):
        # A pinning loader (on CUDA) would otherwise copy a mapping and update() the copy with its
        # own items, which for a Counter adds them: every batch's counts would arrive doubled.
        return self


def expand_shard_urls(spec: str) -> list:
    """Split a shard spec on ``::`` and expand its brace ranges into a list of shard URLs."""
    return wds.shardlists.expand_urls(spec)


def train_shard_urls(args) -> list:
    """The shard URLs of ``--train_shards_path_or_url`` or ``--train_latents_path_or_url``
    (``checked_shard_urls``); latent shards' records are checked against this run's models."""
    if not args.train_latents_path_or_url:
        return checked_shard_urls(args.train_shards_path_or_url, "--train_shards_path_or_url")
    urls = checked_shard_urls(args.train_latents_path_or_url, "--train_latents_path_or_url")
    check_latent_records(args, local_paths(urls)[:RECORDS_CHECKED])
    return urls


def local_paths(urls) -> list:
    return [url for url in urls if not re.match(r"^[a-z][a-z0-9+.-]*:", url)]


def checked_shard_urls(spec: str, flag: str) -> list:
    """The shard URLs of ``spec``, given as ``flag``; a spec whose URLs are all local paths, none of
    which exists, or that names a folder is refused (``SetupError``), and missing ones among others
    are counted in the log."""
    urls = expand_shard_urls(spec)
    local = local_paths(urls)
    if local and len(local) == len(urls) and not any(os.path.exists(path) for path in local):
        # The shell expands a glob only where it matches, and webdataset never does.
        glob_hint = ": globs are not expanded, use a brace range such as {00000..00099}" if re.search(r"[*?[]", spec) else ""
        raise SetupError(f"{flag} matches no file (first: {urls[0]}, {len(urls)} in all){glob_hint}")
    # Bounded: on a network filesystem each check is a round trip, and a web-scale spec has 100k shards.
    checked = local[:MAX_SHARDS_CHECKED]
    folder = next((path for path in checked if os.path.isdir(path)), None)
    if folder is not None:
        raise SetupError(f"{flag} names a folder, {folder}: give the shards in it, as a brace range such as "
                         f"{os.path.join(folder, '{00000..00099}.tar')} or a :: list")
    missing = [path for path in checked if not os.path.exists(path)]
    if missing:
        logger.warning(f"{flag}: {len(missing)} of {'the first ' if len(checked) < len(local) else ''}{len(checked)} "
                       f"shards do not exist (first: {missing[0]}): each pass tries them again and counts them as "
                       "shard readings stopped short")
    return urls


def training_samples(args, tokenizer, text_encoder, vae):
    """What the flags make a training sample: ``LatentSamples`` of the shapes this teacher gives at
    ``--resolution`` with ``--train_latents_path_or_url``, else ``ImageTextSamples``."""
    if not args.train_latents_path_or_url:
        return ImageTextSamples(ImageTransform(args.resolution, args.center_crop, args.random_flip), tokenizer)
    latent_size = latent_side(args.resolution, vae.config)
    return LatentSamples(
        moments_shape=(2 * vae.config.latent_channels, latent_size, latent_size),
        prompt_embeds_shape=(tokenizer.model_max_length, text_encoder.config.hidden_size),
    )


def to_rgb(image: Image.Image, stats: DataStats) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16- and 32-bit greyscale rescaled to 8 bits, transparency
    composited over white, palette, CMYK and the rest converted by PIL."""
    # An RGB or L image can still have a transparent colour (a PNG tRNS chunk).
    transparent = "transparency" in image.info
    if image.mode == "RGB" and not transparent:
        return image
    stats["image_mode_converted"] += 1
    if image.mode in HIGH_DEPTH_MODES:
        array = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            array = array / 257.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("P", "L", "RGB") and transparent):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageTransform:
    """Resize the shorter side to ``resolution`` (bilinear, antialiased), crop a square
    (random, or central with ``center_crop``), flip horizontally with probability 0.5
    when ``random_flip``, and map to a float tensor ``[3, R, R]`` in ``[-1, 1]``."""

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = False):
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image, rng: random.Random, stats: DataStats) -> torch.Tensor:
        image = to_rgb(image, stats)
        if min(image.size) < self.resolution:
            stats["image_upscaled"] += 1
        scale = self.resolution / min(image.size)
        size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
        if self.center_crop:
            left = (size[0] - self.resolution) // 2
            top = (size[1] - self.resolution) // 2
        else:
            left = rng.randint(0, size[0] - self.resolution)
            top = rng.randint(0, size[1] - self.resolution)
        # Only the crop is resized (its box in the original's pixels): resizing the whole image first
        # would make a thin one (1 x 100000 pixels, a few hundred bytes) gigapixels large.
        x_scale, y_scale = image.width / size[0], image.height / size[1]
        box = (left * x_scale, top * y_scale, (left + self.resolution) * x_scale, (top + self.resolution) * y_scale)
        image = image.resize((self.resolution, self.resolution), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return pixels.float().div(127.5).sub(1.0)


def first_present(sample: dict, keys):
    return next((sample[key] for key in keys if sample.get(key) is not None), None)


def text_encoding(raw: bytes) -> str:
    """How a caption or a prompt file is decoded: UTF-16 where a byte-order mark says so (Windows
    PowerShell 5 writes its text files so), else UTF-8. A byte-order mark is no part of the text, and
    no UTF-8 text starts with a UTF-16 one."""
    return "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"


def decode_caption(raw, stats: DataStats) -> str:
    """A caption's text (``text_encoding``), bytes that do not decode replaced (and counted)."""
    encoding = text_encoding(raw)
    try:
        caption = raw.decode(encoding)
    except UnicodeDecodeError:
        stats["caption_not_utf8"] += 1
        caption = raw.decode(encoding, errors="replace")
    return caption.strip()


def json_caption(raw_json: bytes):
    """The first string among ``JSON_CAPTION_FIELDS`` of a sample's .json, stripped; ``None`` where
    there is none or the .json does not parse (no caption, like a sample without one)."""
    try:
        metadata = json.loads(raw_json)
    except ValueError:  # not JSON, or not UTF-8/16/32 text
        return None
    if not isinstance(metadata, dict):
        return None
    return next((metadata[field].strip() for field in JSON_CAPTION_FIELDS if isinstance(metadata.get(field), str)), None)


def sample_caption(sample: dict, stats: DataStats):
    """A raw sample's caption: its caption file's (``CAPTION_KEYS``, ``decode_caption``), or else
    its .json's (``json_caption``); ``None`` without either."""
    raw_caption = first_present(sample, CAPTION_KEYS)
    if raw_caption is not None:
        return decode_caption(raw_caption, stats)
    return None if sample.get("json") is None else json_caption(sample["json"])


def captioned_images(raw_samples, stats: DataStats, on_sample=None):
    """``(image bytes, caption)`` of each raw tar sample that has both; the others are counted.
    ``on_sample`` is called for each one that passes."""
    for sample in raw_samples:
        image_bytes = first_present(sample, IMAGE_KEYS)
        caption = None if image_bytes is None else sample_caption(sample, stats)
        if image_bytes is None or caption is None:
            stats["no_image" if image_bytes is None else "no_caption"] += 1
            continue
        if not caption:
            stats["empty_caption"] += 1
            continue
        if on_sample is not None:
            on_sample()
        yield image_bytes, caption


def upright(image: Image.Image) -> None:
    """Turn ``image`` in place as a viewer shows it: phone photos store their rotation in EXIF. An
    EXIF block that cannot be parsed (PIL warns, or raises ``struct.error`` and the like) leaves it as stored."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - orientation is best effort; the pixels are fine
        pass


def decode_image(image_bytes: bytes, transform: ImageTransform, rng: random.Random, stats: DataStats) -> torch.Tensor:
    """The transformed image, or ``None`` when it cannot be used (counted). Images over PIL's
    decompression-bomb limit (about 89 megapixels) are skipped; large JPEGs are decoded at a
    reduced scale."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image_bytes)) as image:
                image.draft("RGB", (transform.resolution, transform.resolution))
                image.load()
                upright(image)
                return transform(image, rng, stats)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        stats["image_too_large"] += 1
    except (OSError, ValueError, SyntaxError):
        stats["undecodable_image"] += 1
    return None


def decoded_samples(encoded, decode, what: str, on_dead_run=None):
    """``(decode(data), rest)`` for each ``(data, rest)`` whose data decodes (``decode`` returns
    ``None`` for one that does not, counted by it). Once ``MAX_UNDECODABLE_IN_A_ROW`` have failed in
    a row with none decoded before, ``on_dead_run(message)`` is asked at each further failure: it
    raises to stop, returns True to count afresh (the stream reads from other shards now) or False
    to go on counting. Without it failures are only counted, as for one finite shard. ``what``
    names the data in the message."""
    failures_in_a_row, decoded_any = 0, False
    for data, rest in encoded:
        decoded = decode(data)
        if decoded is None:
            failures_in_a_row += 1
            if (on_dead_run is not None and not decoded_any and failures_in_a_row >= MAX_UNDECODABLE_IN_A_ROW
                    and on_dead_run(f"{failures_in_a_row} {what} in a row could not be used, none before")):
                failures_in_a_row = 0
            continue
        failures_in_a_row, decoded_any = 0, True
        yield decoded, rest


def decoded_images(pairs, transform: ImageTransform, rng: random.Random, stats: DataStats, on_dead_run=None):
    """``(pixels, caption)`` for each ``(image bytes, caption)`` whose image decodes."""
    return decoded_samples(pairs, lambda image_bytes: decode_image(image_bytes, transform, rng, stats), "images", on_dead_run)


class ShardErrors:
    """What reading shards meets, counted into ``stats``: readings that stopped short, each shard
    named in the log once (a token in its URL masked), as ``bad_shard`` where the stream could not
    be opened or read to its end and ``bad_layout`` where its files cannot be grouped
    (``LayoutError``), and files a sample holds twice (``duplicate_file``). Only stream failures,
    also counted in ``stream_failures``, may be mended by reading the shard again (a connection
    dropped); ``layout_failures`` counts the others.

    A shard read again up to a position (``count_from``, the first sample not read before) meets
    again what was counted when its samples were read before: ``samples_given`` (how many the
    reading has given, kept by ``tar_samples``) tells what was. A failure where none is new is
    the one that ended the reading before, or one met on the way to the position."""

    def __init__(self, stats: DataStats):
        self.stats, self.reported = stats, set()
        self.stream_failures, self.layout_failures = 0, 0
        self.count_from, self.samples_given = 0, 0

    def __call__(self, error: Exception, url: str) -> None:
        reason = BAD_LAYOUT if isinstance(error, LayoutError) else BAD_SHARD
        self.stream_failures += reason == BAD_SHARD
        self.layout_failures += reason == BAD_LAYOUT
        if self.count_from == 0 or self.samples_given > self.count_from:
            self.stats[reason] += 1
        if url not in self.reported:
            self.reported.add(url)
            # The URL may be a gated dataset's curl command with its token.
            logger.warning(redact_tokens(f"could not read the shard {url} to its end ({reason}): "
                                         f"{type(error).__name__}: {error}"), extra=PER_PROCESS)

    def duplicate_file(self) -> None:
        if self.samples_given >= self.count_from:  # in a sample not read before
            self.stats["duplicate_file"] += 1


def tar_samples(urls, stats: DataStats, errors: ShardErrors = None):
    """Raw samples (``splam.tar_shards``) of the shards in ``urls``, in order. A shard whose reading
    stops short is counted (by ``errors``, or a ``ShardErrors`` of this call's own); reading goes
    on with the next one."""
    errors = errors or ShardErrors(stats)
    for url in urls:
        errors.samples_given = 0
        for sample in shard_samples(url, on_failure=lambda error, url=url: errors(error, url),
                                    on_duplicate=errors.duplicate_file):
            yield sample
            errors.samples_given += 1


def shuffled(samples, buffer_size: int, rng: random.Random, count: int):
    """Shuffle a stream through a buffer of up to ``buffer_size`` items: the first ``count`` items
    (what a segment uses), then, unshuffled, any more asked for (to replace samples that fail to
    decode after the buffer). The buffer grows by two in, one out, and the first item leaves once
    a tenth of it is filled, so a segment starts without a long wait; after the ``count``-th item
    it is emptied rather than refilled, so a segment reads only what it uses (a buffer left full
    at every segment's end would double the reading of shards)."""
    initial = max(1, buffer_size // 10)
    samples = iter(samples)
    buffer, read = [], 0
    for sample in samples:
        buffer.append(sample)
        read += 1
        if len(buffer) < buffer_size and read < count:
            extra = next(samples, None)
            if extra is not None:
                buffer.append(extra)
                read += 1
        if read >= count:
            break
        if len(buffer) >= initial:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer
    yield from samples


def tokenize(tokenizer, captions, stats: DataStats) -> torch.Tensor:
    """Token ids ``[B, 77]``, padded; captions longer than the tokenizer's limit are truncated (and counted)."""
    max_length = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(captions).input_ids]
    stats["caption_truncated"] += sum(length > max_length for length in lengths)
    return tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


class ImageTextSamples:
    """What a training sample is in image-text shards: an image and its caption, batched as
    ``(pixels [B, 3, R, R], input_ids [B, 77])``."""

    usable = (f"captioned image ({', '.join('.' + key for key in IMAGE_KEYS)} with "
              f"{', '.join('.' + key for key in CAPTION_KEYS)} or a .json's {', '.join(JSON_CAPTION_FIELDS)})")
    flag = "--train_shards_path_or_url"

    def __init__(self, transform: ImageTransform, tokenizer):
        self.transform = transform
        self.tokenizer = tokenizer

    def select(self, raw_samples, stats: DataStats, on_sample):
        """Cheap checks, before the shuffle buffer: ``(image bytes, caption)`` pairs."""
        return captioned_images(raw_samples, stats, on_sample)

    def decode(self, selected, rng: random.Random, stats: DataStats, on_dead_run=None):
        return decoded_images(selected, self.transform, rng, stats, on_dead_run)

    def collate(self, batch, stats: DataStats):
        pixels = torch.stack([pixels for pixels, _ in batch])
        return pixels, tokenize(self.tokenizer, [caption for _, caption in batch], stats)


class LatentSamples:
    """What a training sample is in latent shards (``scripts/precompute_latents.py``): the VAE
    posterior's moments (mean and log-variance, ``[2C, R/8, R/8]``) and the prompt embeddings
    (``[77, D]``), stored in float16 or float32, batched in float32 as
    ``(moments [B, 2C, h, w], prompt_embeds [B, 77, D])``.
    Shards made for another resolution or text encoder are refused with ``DataError``."""

    usable, flag = "sample with latents", "--train_latents_path_or_url"

    def __init__(self, moments_shape, prompt_embeds_shape):
        self.shapes = {MOMENTS_KEY: tuple(moments_shape), PROMPT_EMBEDS_KEY: tuple(prompt_embeds_shape)}

    def select(self, raw_samples, stats: DataStats, on_sample):
        for sample in raw_samples:
            if sample.get(MOMENTS_KEY) is None or sample.get(PROMPT_EMBEDS_KEY) is None:
                stats["no_latents"] += 1
                continue
            on_sample()
            yield (sample[MOMENTS_KEY], sample[PROMPT_EMBEDS_KEY]), None

    def decode(self, selected, rng: random.Random, stats: DataStats, on_dead_run=None):
        return decoded_samples(selected, lambda arrays: self.load(arrays, stats), "latent samples", on_dead_run)

    def collate(self, batch, stats: DataStats):
        return tuple(torch.stack(arrays) for arrays in zip(*(arrays for arrays, _ in batch)))

    def load(self, raw_arrays, stats: DataStats):
        """``(moments, prompt_embeds)`` in float32 (a few hundred KB a sample: the copy to the
        device is cheap next to a step, and shards of either storage dtype mix), or ``None``."""
        arrays = []
        for key, raw in zip((MOMENTS_KEY, PROMPT_EMBEDS_KEY), raw_arrays):
            try:
                array = np.load(io.BytesIO(raw), allow_pickle=False)
            except (OSError, ValueError, EOFError):
                stats["undecodable_latents"] += 1
                return None
            if array.shape != self.shapes[key]:
                raise DataError(
                    f"the latent shards hold {key} of shape {array.shape} where this teacher and --resolution give "
                    f"{self.shapes[key]}: make them with the same teacher and --resolution (scripts/precompute_latents.py)"
                )
            arrays.append(torch.from_numpy(array).float())
        return tuple(arrays)


def shards(count: int) -> str:
    return f"{count} shard{'' if count == 1 else 's'}"


class ShardReader:
    """The raw samples one reader (a loader worker of a process) reads over a run, in order: its
    own share of the shards pass after pass, each pass in an order drawn from ``(seed, reader,
    pass)``, each shard from its first sample to its last, so that every sample of the share is
    read once per pass. ``position`` is where the next sample comes from (the ``pool`` of shards,
    the ``pass``, the ``shard`` in that pass's order and the ``sample`` in that shard); a
    checkpoint stores it, and a reader made with it reads on from there.

    It gives up on its pool once the shards show that they hold nothing usable, counting from the
    start of each segment (``start_segment``):

    - before the segment's first usable sample, once every shard of the pool (or 64 of them) has
      been opened without one;
    - after it, once the shards have been opened 20 times each in a row without one: the shards
      went away (a server down), and the stream stops rather than spinning;
    - samples that fail to decode (``decoded_samples``' run), before any has decoded, once every
      shard (or 64) has been opened: one shard of error pages saved as JPEGs is not dead data;
    - once as many shards in a row as the pool holds (or 64) have shown a layout webdataset cannot
      group (``splam.tar_shards``), whatever samples they gave before it showed; a shard read
      whole in between counts afresh.

    A reader that gives up on its own share reads from all shards for the rest of the segment,
    with a warning (a few corrupt shards that make up one reader's share must not stop a run), and
    then goes on with its share's next pass; one that gives up on all shards stops the stream with
    ``DataError``."""

    MAX_DISTINCT = 64
    OPENINGS_PER_SHARD = 20
    MAX_OPENINGS_OF_A_SHARD = 10  # in one reading of it: one and the reopenings after failures mid-way

    def __init__(self, own_urls, all_urls, seed, reader: int, samples, position=None):
        self.own_urls, self.all_urls, self.seed, self.reader, self.samples = own_urls, all_urls, seed, reader, samples
        self.position = dict(position) if position else {"pool": "own", "pass": 0, "shard": 0, "sample": 0}
        self.stats = DataStats()
        self.errors = ShardErrors(self.stats)
        self.start_segment()

    @property
    def pool(self) -> list:
        return self.own_urls if self.position["pool"] == "own" else self.all_urls

    def start_segment(self):
        """Count afresh for giving up, and go back to the own share after a segment spent on all
        shards: what failed there may have been passing (a server restarting)."""
        if self.position["pool"] == "all" and len(self.own_urls) < len(self.all_urls):
            self.position = {"pool": "own", "pass": self.position["own_pass"] + 1, "shard": 0, "sample": 0}
        self.stats.clear()
        self.usable_seen = False
        self.opened = set()  # distinct shards opened this segment, in this pool
        self.restart()

    def restart(self):
        self.tried = set()  # distinct shards opened since the last usable sample
        self.unusable_openings = 0
        self.bad_layouts_in_a_row = 0  # shards whose reading stopped at a layout, none read whole between

    def all_tried(self, shards: set) -> bool:
        return len(shards) >= min(len(self.pool), self.MAX_DISTINCT)

    def shard_order(self) -> list:
        order = list(self.pool)
        random.Random(f"{self.seed}-{self.reader}-{self.position['pool']}-{self.position['pass']}").shuffle(order)
        return order

    def __iter__(self):
        """The raw samples (dicts of bytes by extension), endlessly, from ``position`` on."""
        while True:
            order = self.shard_order()
            if self.position["shard"] >= len(order):
                self.position.update({"pass": self.position["pass"] + 1, "shard": 0, "sample": 0})
            elif (reason := self.dead_pool()) is not None:
                self.give_up(reason)
            else:
                yield from self.read_shard(order[self.position["shard"]])

    def dead_pool(self):
        """Why the pool holds nothing usable, or ``None`` while it may."""
        if (self.unusable_openings >= self.OPENINGS_PER_SHARD * len(self.pool) if self.usable_seen
                else self.all_tried(self.tried)):
            return f"no {self.samples.usable} in {shards(self.unusable_openings)} in a row"
        if self.bad_layouts_in_a_row >= min(len(self.pool), self.MAX_DISTINCT):
            # The few samples each gave before its layout showed are no data set to train on.
            return (f"{shards(self.bad_layouts_in_a_row)} in a row whose files webdataset cannot group into samples "
                    "(the log says why)")
        return None

    def read_shard(self, url: str):
        """The samples of ``url`` from ``position``'s on, and ``position`` then at the next shard,
        unless the reader gave up on its pool meanwhile. A shard is read again up to ``position``'s
        sample only where a resume starts in it or where its stream failed mid-way (opened again,
        up to 10 times in all)."""
        pool, first_sample, layout_failures = self.position["pool"], self.position["sample"], self.errors.layout_failures
        if first_sample == 0:  # not a shard opened again mid-way (a resume), as the uninterrupted run did not
            self.opened.add(url)
            self.tried.add(url)
            self.unusable_openings += 1
        for _ in range(self.MAX_OPENINGS_OF_A_SHARD):
            failures, reading_from = self.errors.stream_failures, self.position["sample"]
            self.errors.count_from = reading_from
            for index, sample in enumerate(tar_samples([url], self.stats, self.errors)):
                if index >= reading_from:
                    self.position["sample"] = index + 1
                    yield sample
                    if self.position["pool"] != pool:  # given up on while the samples decoded
                        break
            # A shard held open for long (over checkpoints and validations) may fail mid-way, a
            # connection dropped: it is opened again to read on, until it fails giving nothing new.
            if (self.position["pool"] != pool or self.errors.stream_failures == failures
                    or self.position["sample"] == reading_from):
                break
        self.errors.count_from = 0
        if self.position["pool"] != pool:
            return
        if self.errors.layout_failures > layout_failures:
            self.bad_layouts_in_a_row += 1
        elif self.position["sample"] > first_sample:
            self.bad_layouts_in_a_row = 0
        self.position.update(shard=self.position["shard"] + 1, sample=0)

    def found_usable(self):
        self.tried.clear()
        self.unusable_openings, self.usable_seen = 0, True

    def dead_decoding(self, reason: str) -> bool:
        """``on_dead_run`` for ``decoded_samples``."""
        if not self.all_tried(self.opened):
            return False
        self.give_up(reason)
        return True

    def give_up(self, reason: str):
        if self.position["pool"] == "own" and len(self.own_urls) < len(self.all_urls):
            logger.warning(f"{reason} from this loader's {len(self.own_urls)} of {len(self.all_urls)} shards: it reads "
                           "from all of them for the rest of this segment, so some samples may be read by more than one loader",
                           extra=PER_PROCESS)
            self.position = {"pool": "all", "pass": 0, "shard": 0, "sample": 0, "own_pass": self.position["pass"]}
            self.opened = set()
            self.restart()
            return
        raise DataError(f"{reason}, reading from {shards(len(self.pool))} (counted so far: "
                        f"{self.stats.summary() or 'nothing'}); check {self.samples.flag}")


class ShardStream(torch.utils.data.IterableDataset):
    """The training stream, one segment per pass: ``batches_per_segment`` batches per process
    (``first_segment_batches`` in ``first_segment``, the pass a run starts with) of
    ``(*samples.collate(batch), DataStats since the previous batch, (reader, position))``,
    ``samples`` being an ``ImageTextSamples`` or a ``LatentSamples`` and ``position`` where that
    batch's reader (``ShardReader``) reads on.

    Every loader worker of every process is a reader of its own, with its own disjoint share of
    the shards when there are at least as many shards as readers, so no two read the same sample.
    A reader reads on over the segments where it left off (the loader's workers persist), and
    starts from ``positions[reader]`` where given: a checkpoint's, for exact resume. What is
    random in a segment (the shuffle, crops, flips) comes from ``(seed, segment, process, worker)``.
    """

    def __init__(self, urls, samples, *, batch_size, batches_per_segment, shuffle_buffer, seed,
                 process_index=0, num_processes=1, first_segment=0, first_segment_batches=None, positions=None):
        self.urls = list(urls)
        self.samples = samples
        self.batch_size = batch_size
        self.batches_per_segment = batches_per_segment
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.first_segment = first_segment
        self.first_segment_batches = first_segment_batches or batches_per_segment
        self.positions = dict(positions or {})
        # Per copy of the dataset: each loader worker holds its own, iterated once per segment.
        self.segments_read = 0
        self.reader = self.raw_samples = None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        segment = self.first_segment + self.segments_read
        self.segments_read += 1
        if self.reader is None:
            readers = self.num_processes * num_workers
            reader_index = readers_of_process(self.process_index, num_workers)[worker]
            own_urls = self.urls[reader_index::readers] if len(self.urls) >= readers else self.urls
            self.reader = ShardReader(own_urls, self.urls, self.seed, reader_index, self.samples,
                                      self.positions.get(reader_index))
            self.raw_samples = iter(self.reader)
        # Where the segment's batches do not divide among the workers, the extra ones go to other
        # workers in each segment (with fewer batches than workers, some yield none in a segment).
        base, extra = divmod(self.first_segment_batches if segment == self.first_segment else self.batches_per_segment,
                             num_workers)
        num_batches = base + ((worker - segment) % num_workers < extra)
        reader, stats = self.reader, self.reader.stats
        reader.start_segment()
        rng = random.Random(f"{self.seed}-{segment}-{self.process_index}-{worker}")
        # Cheap checks happen before the shuffle buffer (they keep unusable samples out of it);
        # decoding after it.
        selected = self.samples.select(self.raw_samples, stats, on_sample=reader.found_usable)
        decoded = self.samples.decode(shuffled(selected, self.shuffle_buffer, rng, num_batches * self.batch_size),
                                      rng, stats, on_dead_run=reader.dead_decoding)
        for _ in range(num_batches):
            batch = [next(decoded) for _ in range(self.batch_size)]
            yield *self.samples.collate(batch, stats), DataStats(stats), (reader.reader, dict(reader.position))
            stats.clear()


def readers_of_process(process_index: int, num_workers: int) -> range:
    """The indices of a process's readers, one per loader worker (one where it has none)."""
    workers = max(1, num_workers)
    return range(process_index * workers, (process_index + 1) * workers)


def unequal_shares_warning(shards: int, readers: int):
    """What to warn of where ``readers`` (processes x loader workers, one per process without workers)
    cannot get equal shares of ``shards`` (``None`` where they do): every reader gives as many
    samples per step, so a reader with fewer shards goes round its own more often, and their samples
    come round more often than others'."""
    if shards < readers:
        return (f"{shards} shards for {readers} readers (processes x workers): each reads from all shards, so some "
                "samples may be read by more than one")
    if shards % readers:
        fewer = shards // readers
        return (f"{shards} shards for {readers} readers (processes x workers): some readers get {fewer} and others "
                f"{fewer + 1}, and all give samples equally fast, so the samples of the smaller shares come round up to "
                f"{(fewer + 1) / fewer:.2f} times as often; a multiple of {readers} shards of about equal size reads all "
                "samples alike")
    return None


# The settings of the data stream (the training script's ``data_stream``) that fix its readers, their
# shares of the shards and the order they read them in: with any changed, a resume's readers start afresh.
READERS_FIXED_BY = {"num_processes", "dataloader_num_workers", "seed", "shards"}


def data_stream_changes(saved: dict, current: dict) -> list:
    """The names of the settings that fix the data stream (the training script's ``data_stream``) whose
    values differ between a checkpoint's and this run's. No loader worker (the process reads) and one
    worker read the same stream: either way the process has one reader (``ShardStream``)."""
    def reader_count(name, value):
        return max(1, value) if name == "dataloader_num_workers" else value

    return [name for name, value in current.items() if reader_count(name, saved[name]) != reader_count(name, value)]


def as_made(batch):
    """The loader's collate function: each batch as the stream made it. The default one
    (``default_convert``) copies a mapping and ``update()``s the copy, which for the batch's
    ``DataStats``, a Counter, adds every count twice."""
    return batch


def resumed_reading_positions(resume_state: dict, changed: list, resume_path: str) -> dict:
    """``{reader: position}`` from a checkpoint's training state, where each reader reads on after
    the resume; empty, with a warning, where they do not apply: a checkpoint from before they were
    stored (format 3), or ``changed`` settings (``data_stream_changes``) among ``READERS_FIXED_BY``."""
    if "reading_positions" not in resume_state:
        logger.warning(f"{resume_path} predates checkpoints that say where each data reader stands: the readers "
                       "start their passes over the shards afresh, so this resume is not exact")
        return {}
    if set(changed) & READERS_FIXED_BY:
        logger.warning("The data readers start their passes over the shards afresh (their number, the seed or the "
                       "shards changed): samples read before the resume may come again before the others")
        return {}
    return {int(reader): position for reader, position in resume_state["reading_positions"].items()}


def make_train_dataloader(dataset: ShardStream, num_workers: int, pin_memory: bool):
    """A loader over one segment of ``dataset`` per pass. Its workers persist over the passes, so
    that each reader reads on where it left off, and the loader's own generator keeps the global
    torch RNG out of the data."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        collate_fn=as_made,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(dataset.seed),
    )


def train_batches(loader):
    """The endless stream of training batches, segment after segment."""
    while True:
        yield from loader
