#!/usr/bin/env python
"""Write webdataset shards of captioned images, fully offline.

``python scripts/make_shards.py --output_dir DIR --num_shards N --samples_per_shard M --resolution R``
writes ``DIR/00000.tar ...``, each sample a ``jpg``, a ``txt`` caption and a ``json``
record. The images are the real photographs bundled with scikit-image (or those in
``--image_dir``, captioned by a ``.txt`` file of the same name, else by the file
name), cropped at random and resized to ``R`` so that samples differ.
"""

import argparse
import io
import json
import os
import random
import sys

import numpy as np
import skimage.data
import webdataset as wds
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from splam.cli import IMAGE_EXTENSIONS  # noqa: E402
from splam.data import DataStats, decode_caption, to_rgb, upright  # noqa: E402

# scikit-image's bundled colour photographs, with captions written for them.
BUNDLED_IMAGES = {
    "astronaut": ["a photograph of an astronaut in a white spacesuit", "an astronaut posing with a flag"],
    "coffee": ["a cup of coffee on a saucer", "a top view of a coffee cup on a table"],
    "chelsea": ["a close-up photo of a tabby cat", "a cat looking to the side"],
    "rocket": ["a rocket on a launch pad", "a space rocket under a blue sky"],
    "hubble_deep_field": ["a deep field image of distant galaxies", "stars and galaxies in deep space"],
    "immunohistochemistry": ["a microscope image of stained tissue", "a colourful histology slide"],
    "retina": ["a photograph of a human retina", "the fundus of an eye with blood vessels"],
    "colorwheel": ["a colour wheel with every hue", "a rainbow colour circle"],
}


def bundled_images():
    """``(PIL image, captions)`` for each bundled photograph."""
    for name, captions in BUNDLED_IMAGES.items():
        yield Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB"), captions


def folder_images(image_dir: str):
    """``(PIL image, [caption])`` for each image in ``image_dir``."""
    file_names = sorted(os.listdir(image_dir))
    # A caption file is found whatever its case, as images are (cameras write IMG_1.JPG and IMG_1.TXT);
    # one named exactly as the image comes first.
    caption_names = {name.lower(): name for name in file_names if name.lower().endswith(".txt")}
    caption_names.update({name: name for name in file_names if name.endswith(".txt")})
    for file_name in file_names:
        stem, extension = os.path.splitext(file_name)
        if extension.lower() not in IMAGE_EXTENSIONS:
            continue
        caption_name = caption_names.get(stem + ".txt") or caption_names.get(stem.lower() + ".txt")
        caption = ""
        if caption_name is not None:
            # Read as training reads captions: a byte-order mark dropped, UTF-16 decoded, other bytes
            # that are not UTF-8 replaced.
            with open(os.path.join(image_dir, caption_name), "rb") as handle:
                caption = decode_caption(handle.read(), DataStats())
        # Training skips samples with empty captions: an empty .txt falls back to the name too.
        caption = caption or stem.replace("_", " ").replace("-", " ")
        try:
            with Image.open(os.path.join(image_dir, file_name)) as image:
                # Upright as a viewer shows it, and transparency over white, as training reads images
                # (an EXIF block that cannot be parsed leaves the image as stored there too).
                upright(image)
                yield to_rgb(image, DataStats()), [caption]
        except (OSError, SyntaxError) as error:  # PIL's errors for unreadable images
            print(f"skipped {file_name}: {error}", file=sys.stderr)


def random_view(image: Image.Image, resolution: int, rng: random.Random) -> Image.Image:
    """A random square crop covering 50-100% of the shorter side, resized to ``resolution``."""
    side = max(1, int(min(image.size) * rng.uniform(0.5, 1.0)))  # an empty crop of a 1-pixel side is black
    left = rng.randint(0, image.width - side)
    top = rng.randint(0, image.height - side)
    return image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.Resampling.BICUBIC)


def write_shards(output_dir, num_shards, samples_per_shard, resolution, image_dir=None, seed=0) -> list:
    """Write the shards and return their paths."""
    os.makedirs(output_dir, exist_ok=True)
    sources = list(folder_images(image_dir) if image_dir else bundled_images())
    if not sources:
        raise SystemExit(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
    rng = random.Random(seed)
    paths = []
    for shard in range(num_shards):
        path = os.path.join(output_dir, f"{shard:05d}.tar")
        with wds.TarWriter(path) as writer:
            for index in range(samples_per_shard):
                source_index = rng.randrange(len(sources))
                image, captions = sources[source_index]
                caption = rng.choice(captions)
                buffer = io.BytesIO()
                random_view(image, resolution, rng).save(buffer, format="JPEG", quality=90)
                writer.write({
                    "__key__": f"{shard:05d}{index:05d}",
                    "jpg": buffer.getvalue(),
                    "txt": caption,
                    "json": json.dumps({"caption": caption, "source": source_index, "width": resolution, "height": resolution}),
                })
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="Folder for the .tar shards.")
    parser.add_argument("--num_shards", type=int, default=2)
    parser.add_argument("--samples_per_shard", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=64, help="Side of the square images, in pixels.")
    parser.add_argument("--image_dir", default=None, help="Your own images instead of scikit-image's.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.num_shards, args.samples_per_shard, args.resolution) < 1:
        parser.error("--num_shards, --samples_per_shard and --resolution must be at least 1")
    if args.image_dir is not None and not os.path.isdir(args.image_dir):
        parser.error(f"--image_dir {args.image_dir} is not a folder")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output_dir {args.output_dir} exists and is not a folder")
    paths = write_shards(args.output_dir, args.num_shards, args.samples_per_shard, args.resolution, args.image_dir, args.seed)
    last = len(paths) - 1
    print(f"Wrote {len(paths)} shards of {args.samples_per_shard} samples: {args.output_dir}/{{00000..{last:05d}}}.tar")


if __name__ == "__main__":
    main()
