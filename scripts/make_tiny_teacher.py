#!/usr/bin/env python
"""Build a Stable Diffusion teacher with random weights, fully offline.

``python scripts/make_tiny_teacher.py OUT_DIR`` writes a ``StableDiffusionPipeline``
folder (UNet, VAE, CLIP text encoder, tokenizer, DDPM ``scaled_linear`` scheduler) in
seconds: the teacher for the quickstart and the tests. ``--preset sd15`` gives the full
SD 1.5 architecture (same shapes and FLOPs as the real model) for benchmarks.

The tokenizer is a character-level CLIP BPE (no merges) generated here, so nothing is
downloaded; its vocabulary is every byte-level character, alone and word-final.
"""

import argparse
import json
import os
import shutil
import tempfile

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

PRESETS = {
    "tiny": dict(
        unet=dict(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(
            sample_size=64,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
        ),
        text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    ),
    "sd15": dict(
        unet=dict(sample_size=64, cross_attention_dim=768),
        vae=dict(
            sample_size=512,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
        ),
        text_encoder=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    ),
}


def byte_level_characters() -> list:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) stands for the bytes 0-255:
    printable Latin-1 bytes stand for themselves, the others for code points from 256 upwards."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    characters, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            characters.append(chr(byte))
        else:
            characters.append(chr(256 + shifted))
            shifted += 1
    return characters


def character_tokenizer(work_dir: str) -> CLIPTokenizer:
    """A CLIP tokenizer whose tokens are single byte-level characters."""
    characters = byte_level_characters()
    vocabulary = characters + [character + "</w>" for character in characters] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_file = os.path.join(work_dir, "vocab.json")
    merges_file = os.path.join(work_dir, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as handle:
        json.dump({token: index for index, token in enumerate(vocabulary)}, handle)
    with open(merges_file, "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")
    return CLIPTokenizer(vocab_file, merges_file, model_max_length=77)


def random_text_encoder(tokenizer: CLIPTokenizer, vocab_size: int, **config) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder that reads ``tokenizer``'s ids (77 of them)."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config,
    ))


def sd_noise_schedule() -> DDPMScheduler:
    """Stable Diffusion 1.5's training schedule: 1,000 scaled-linear betas, epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, steps_offset=1)


def save_pipeline(output_dir: str, vae, text_encoder, tokenizer, unet, scheduler) -> None:
    """The parts as a ``StableDiffusionPipeline`` folder, without a safety checker."""
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(output_dir)


def make_teacher(output_dir: str, preset: str = "tiny", seed: int = 0) -> None:
    config = PRESETS[preset]
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as work_dir:
        tokenizer = character_tokenizer(work_dir)
        text_encoder = random_text_encoder(tokenizer, max(len(tokenizer), 49408 if preset == "sd15" else 0),
                                           **config["text_encoder"])
        save_pipeline(output_dir, AutoencoderKL(in_channels=3, out_channels=3, **config["vae"]), text_encoder, tokenizer,
                      UNet2DConditionModel(in_channels=4, out_channels=4, **config["unet"]), sd_noise_schedule())
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as card:
        card.write(f"---\nlicense: mit\nlibrary_name: diffusers\ntags:\n- stable-diffusion\n---\n\n"
                   f"A Stable Diffusion pipeline ({preset} architecture) with random weights, for tests and benchmarks.\n")


def cached_teacher(preset: str, output_dir: str = None) -> str:
    """``output_dir`` (by default a folder of the preset's in the temp dir), where a teacher is
    built first unless one is there. The build goes to a ``.partial`` folder renamed when
    complete, so that a build cut short is never reused."""
    output_dir = output_dir or os.path.join(tempfile.gettempdir(), f"splam-benchmark-{preset}")
    if os.path.isdir(output_dir) and not os.path.exists(os.path.join(output_dir, "model_index.json")):
        raise SystemExit(f"error: {output_dir} exists but holds no pipeline (model_index.json); "
                         "give a teacher folder or one that does not exist yet")
    if not os.path.isdir(output_dir):
        partial = output_dir.rstrip(os.sep) + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        make_teacher(partial, preset)
        os.replace(partial, output_dir)
    return output_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="Folder to write the pipeline to.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="Architecture size.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    args = parser.parse_args()
    # Random weights written over a real model (a mistyped path) would destroy it.
    if os.path.exists(args.output_dir) and not (os.path.isdir(args.output_dir) and not os.listdir(args.output_dir)):
        parser.error(f"{args.output_dir} exists and is not an empty folder: give a new one")
    make_teacher(args.output_dir, args.preset, args.seed)
    print(f"Wrote a {args.preset} Stable Diffusion teacher with random weights to {args.output_dir}")


if __name__ == "__main__":
    main()
