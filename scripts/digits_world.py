"""The digits world: a small, real, offline text-to-image setting in which SPLAM and LCM can be
compared the way the paper compares them on SD 1.5 (``scripts/run_digits_benchmark.py``).

Data: scikit-learn's 1,797 real 8x8 scans of handwritten digits, upscaled to 32x32 RGB, with
captions such as "a handwritten digit seven", split into train and held-out by image. Teacher:
a small SD-architecture pipeline trained here on that data, first the VAE, then the UNet with
captions dropped 10% of the time, so that classifier-free guidance means something. Judge: a
scikit-learn MLP trained on the real digits' training split.
"""

import io
import os
import random

import numpy as np
import torch
import webdataset as wds
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from make_tiny_teacher import character_tokenizer, random_text_encoder, save_pipeline, sd_noise_schedule

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PHRASINGS = ["a handwritten digit {}", "the number {}, handwritten", "a scan of a handwritten {}", "digit {}"]
RESOLUTION = 32


def caption(label: int, phrasing: int) -> str:
    return PHRASINGS[phrasing].format(NAMES[label])


def digits_split(seed: int = 0):
    """``(train_images, heldout_images, train_labels, heldout_labels)`` (``train_test_split``'s order);
    images 8x8 in [0, 16]."""
    digits = load_digits()
    return train_test_split(digits.images, digits.target, test_size=0.2, random_state=seed, stratify=digits.target)


def to_rgb32(image8: np.ndarray) -> Image.Image:
    """An 8x8 scan (0-16, ink high) as a 32x32 RGB image, white ink on black."""
    grey = Image.fromarray((image8 * (255.0 / 16.0)).astype(np.uint8), mode="L")
    return grey.resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC).convert("RGB")


def to_scan8(images) -> np.ndarray:
    """Generated images (PIL) back to 8x8 scans in [0, 16], flattened, for the judge."""
    scans = [np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=np.float64) * (16.0 / 255.0)
             for image in images]
    return np.stack(scans).reshape(len(scans), 64)


def write_train_shards(out_dir: str, images, labels, num_shards: int = 4, seed: int = 0) -> str:
    """Webdataset shards of the training split, each image with a random phrasing; returns the shard spec."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    for shard in range(num_shards):
        with wds.TarWriter(os.path.join(out_dir, f"{shard:03d}.tar")) as writer:
            for index in range(shard, len(images), num_shards):
                buffer = io.BytesIO()
                to_rgb32(images[index]).save(buffer, format="PNG")
                writer.write({"__key__": f"digit{index:05d}", "png": buffer.getvalue(),
                              "txt": caption(int(labels[index]), rng.randrange(len(PHRASINGS)))})
    return os.path.join(out_dir, "{000..%03d}.tar" % (num_shards - 1))


def train_judge(train_images, train_labels, seed: int = 0) -> MLPClassifier:
    judge = MLPClassifier(hidden_layer_sizes=(32,), max_iter=2000, random_state=seed)
    judge.fit(train_images.reshape(len(train_images), 64), train_labels)
    return judge


def judge_features(judge: MLPClassifier, scans: np.ndarray) -> np.ndarray:
    """The judge's hidden-layer activations: the embedding for Frechet distances."""
    return np.maximum(scans @ judge.coefs_[0] + judge.intercepts_[0], 0.0)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, eps: float = 1e-6) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` between two feature sets; ``eps I`` is
    added to both covariances, since ReLU features that never fire make them singular."""
    from scipy import linalg

    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    offset = eps * np.eye(features_a.shape[1])
    cov_a, cov_b = np.cov(features_a, rowvar=False) + offset, np.cov(features_b, rowvar=False) + offset
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * root))


def build_teacher_parts(seed: int):
    """Untrained VAE (32 px -> 4x8x8), CLIP text encoder, tokenizer, UNet and scheduler."""
    import tempfile

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as work_dir:
        tokenizer = character_tokenizer(work_dir)
    text_encoder = random_text_encoder(tokenizer, len(tokenizer), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, layers_per_block=1,
        block_out_channels=(16, 32, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8,
        norm_num_groups=32,
    )
    return vae, text_encoder, tokenizer, unet, sd_noise_schedule()


def train_teacher(out_dir: str, images, labels, vae_steps: int, unet_steps: int, seed: int = 0, log=print) -> str:
    """Train the VAE, then the UNet (10% empty captions), and save a StableDiffusionPipeline."""
    vae, text_encoder, tokenizer, unet, scheduler = build_teacher_parts(seed)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.stack([torch.from_numpy(np.asarray(to_rgb32(image), dtype=np.float32)).permute(2, 0, 1)
                          for image in images]) / 127.5 - 1.0
    labels = torch.as_tensor(labels)

    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for step in range(vae_steps):
        batch = pixels[torch.randint(0, len(pixels), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == vae_steps - 1:
            log(f"VAE step {step}: loss {loss.item():.4f}")
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        latents = latents * vae.config.scaling_factor
        captions = [[caption(int(label), phrasing) for phrasing in range(len(PHRASINGS))] for label in labels]
        embeddings = {text: text_encoder(tokenizer([text], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0][0]
                      for text in {c for options in captions for c in options} | {""}}

    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, unet_steps)
    alphas_cumprod = scheduler.alphas_cumprod
    for step in range(unet_steps):
        index = torch.randint(0, len(latents), (64,), generator=generator)
        texts = [captions[i][random.Random(step * 131 + i).randrange(len(PHRASINGS))] for i in index.tolist()]
        dropped = torch.rand(len(texts), generator=generator) < 0.1
        context = torch.stack([embeddings["" if drop else text] for text, drop in zip(texts, dropped)])
        noise = torch.randn(latents[index].shape, generator=generator)
        timesteps = torch.randint(0, 1000, (len(index),), generator=generator)
        acp = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = acp.sqrt() * latents[index] + (1 - acp).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(noisy, timesteps, encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == unet_steps - 1:
            log(f"UNet step {step}: loss {loss.item():.4f}")
    save_pipeline(out_dir, vae, text_encoder, tokenizer, unet.eval(), scheduler)
    return out_dir
