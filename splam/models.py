"""Loading the teacher's parts and building the student and target UNets (SPEC section 1)."""

import copy
import itertools
import logging
import os
import re

import torch
from diffusers import AutoencoderKL, DDPMScheduler, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedModel

from .args import SetupError, one_line
from .objective import TIMESTEP_SCALING

logger = logging.getLogger(__name__)

# A weight file of a variant: model.fp16.safetensors, diffusion_pytorch_model.fp16.bin.
VARIANT_FILE = re.compile(r"^.+\.(\w+)\.(?:safetensors|bin)$")


class TeacherError(SetupError):
    """The teacher cannot be used for SPLAM distillation."""


def teacher_load_error(args, part: str, error: OSError, hint: str = "") -> TeacherError:
    """One line for a part of the teacher that cannot be loaded (the libraries' messages span several)."""
    return TeacherError(f"cannot load the teacher's {part} from {args.pretrained_teacher_model!r}: {hint}{one_line(error)}")


def weight_variants(folder: str) -> list:
    """The variants of the weight files in a local folder: ``fp16`` for ``model.fp16.safetensors``."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted({match.group(1) for match in map(VARIANT_FILE.match, names) if match})


def load_teacher_part(args, model_class, subfolder: str, revision=None, dtype=torch.float32):
    """``subfolder`` of the teacher: weights of ``--variant``, in ``dtype`` whatever dtype they were
    stored in, from ``--teacher_revision`` unless ``revision`` is given. diffusers models load in
    float32 by default; transformers 5 keeps the stored dtype unless told, so a text encoder saved
    in float16 would meet float32 nets at the export."""
    options = dict(subfolder=subfolder, revision=revision or args.teacher_revision, cache_dir=args.cache_dir)
    if model_class is not CLIPTokenizer:
        options.update(variant=args.variant)
    if issubclass(model_class, PreTrainedModel):
        options.update(dtype=dtype)
    elif model_class is not CLIPTokenizer:
        options.update(torch_dtype=dtype)
    try:
        return model_class.from_pretrained(args.pretrained_teacher_model, **options)
    except OSError as error:
        variants = [variant for variant in weight_variants(os.path.join(args.pretrained_teacher_model, subfolder))
                    if variant != args.variant]
        hint = f"it holds weights of variant {', '.join(variants)} (pass --variant): " if variants else ""
        raise teacher_load_error(args, subfolder, error, hint) from error


def teacher_unet_config(args) -> dict:
    """The teacher UNet's config, without its weights."""
    return UNet2DConditionModel.load_config(args.pretrained_teacher_model, subfolder="unet",
                                            revision=args.teacher_revision, cache_dir=args.cache_dir)


def load_teacher_scheduler(args) -> DDPMScheduler:
    """The teacher's noise schedule, read before any weights so that a teacher outside the
    method (SPEC: only epsilon prediction; a UNet conditioned on text alone) or a schedule the
    sampler cannot follow is refused first."""
    try:
        scheduler = DDPMScheduler.from_pretrained(args.pretrained_teacher_model, subfolder="scheduler",
                                                  revision=args.teacher_revision, cache_dir=args.cache_dir)
        unet_config = teacher_unet_config(args)
    except OSError as error:
        # The first files read: for a name that is no folder, the libraries say only that a file is missing.
        hint = ("" if os.path.isdir(args.pretrained_teacher_model) else
                "it is no local folder, and the Hub (or, offline, its cache) has no such model: ")
        raise teacher_load_error(args, "scheduler and unet configs", error, hint) from error
    if unet_config.get("addition_embed_type") is not None:
        raise TeacherError(
            f"the teacher {args.pretrained_teacher_model}'s UNet takes added embeddings (addition_embed_type "
            f"{unet_config['addition_embed_type']!r}, as SDXL's does); SPLAM here distils UNets conditioned on text alone"
        )
    if args.num_ddim_timesteps > scheduler.config.num_train_timesteps:
        raise SetupError(
            f"--num_ddim_timesteps {args.num_ddim_timesteps} exceeds the teacher's "
            f"{scheduler.config.num_train_timesteps} training timesteps"
        )
    num_train_timesteps = scheduler.config.num_train_timesteps
    step_ratio = num_train_timesteps // args.num_ddim_timesteps
    never_trained = num_train_timesteps - step_ratio * args.num_ddim_timesteps
    if never_trained > step_ratio:
        # More than a sub-path's worth: a grid of 30 on 1000 (top 989) is LCM's usual setting and stays quiet.
        logger.warning(
            f"--num_ddim_timesteps {args.num_ddim_timesteps} does not divide the teacher's {num_train_timesteps} "
            f"timesteps: its grid ends at {step_ratio * args.num_ddim_timesteps - 1}, so the noisiest {never_trained} "
            f"are never trained (LCMScheduler samples on the same grid); a divisor of {num_train_timesteps} covers them all"
        )
    if scheduler.config.prediction_type != "epsilon":
        raise TeacherError(
            f"the teacher {args.pretrained_teacher_model} predicts {scheduler.config.prediction_type!r}; "
            "SPLAM distils epsilon-prediction teachers only"
        )
    if scheduler.alphas_cumprod[-1] == 0:
        raise TeacherError(
            f"the teacher {args.pretrained_teacher_model}'s schedule ends at zero signal (rescale_betas_zero_snr), "
            "where an epsilon prediction gives no x0"
        )
    try:
        lcm_scheduler(scheduler.config, args.num_ddim_timesteps)
    except NotImplementedError as error:  # a beta schedule DDPM knows and LCM does not
        raise TeacherError(f"the distilled model's LCMScheduler cannot follow the teacher's schedule: {error}") from error
    return scheduler


def check_vae_config(args) -> None:
    """Read the VAE's config (``--pretrained_vae_model_name_or_path``'s, or else the teacher's), so that
    a wrong folder or id stops the run before the text encoder's weights load rather than after, and
    so do a VAE whose latents have another number of channels than the teacher's UNet takes (an SD3
    or FLUX VAE for SD 1.5), which failed at the first step, and a ``--resolution`` too small for the
    UNet (``resolution_too_small``), which failed at the first validation or at the export."""
    try:
        if args.pretrained_vae_model_name_or_path is None:
            vae_config = AutoencoderKL.load_config(args.pretrained_teacher_model, subfolder="vae",
                                                   revision=args.teacher_revision, cache_dir=args.cache_dir)
        else:
            vae_config = AutoencoderKL.load_config(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
    except OSError as error:
        raise (vae_load_error(args, error) if args.pretrained_vae_model_name_or_path else
               teacher_load_error(args, "vae config", error)) from error
    unet_config = teacher_unet_config(args)
    # Both classes' defaults, for configs written without the key.
    latent_channels, in_channels = vae_config.get("latent_channels", 4), unet_config.get("in_channels", 4)
    if latent_channels != in_channels:
        raise SetupError(f"the VAE {args.pretrained_vae_model_name_or_path!r} makes latents of {latent_channels} "
                         f"channels, the teacher's UNet takes {in_channels}: give a VAE of the teacher's family")
    reason = resolution_too_small(args.resolution, vae_config, unet_config)
    if reason is not None:
        raise SetupError(reason)


# The classes' defaults, for configs written without the key.
VAE_BLOCK_OUT_CHANNELS, UNET_BLOCK_OUT_CHANNELS = (64,), (320, 640, 1280, 1280)


def latent_side(resolution: int, vae_config) -> int:
    """The side of the VAE's latents of images of ``resolution`` pixels: it halves the side once per
    block after the first."""
    return resolution // 2 ** (len(vae_config.get("block_out_channels", VAE_BLOCK_OUT_CHANNELS)) - 1)


def deepest_side(resolution: int, vae_config: dict, unet_config: dict) -> int:
    """The side of the UNet's deepest feature maps for images of ``resolution`` pixels: each of the
    UNet's downsamplers (a stride-2 convolution with padding 1, which rounds an odd side up) halves
    the latents' side."""
    side = latent_side(resolution, vae_config)
    for _ in range(len(unet_config.get("block_out_channels", UNET_BLOCK_OUT_CHANNELS)) - 1):
        side = (side + 1) // 2
    return side


def resolution_too_small(resolution: int, vae_config: dict, unet_config: dict):
    """Why ``resolution`` is too small for the UNet, or ``None``: its deepest blocks normalise the
    channels of the block before (``block_out_channels[-2]``) at the deepest side, and GroupNorm needs
    more than one value per group and image. Validation and the export sample one image per prompt,
    so a UNet whose groups are one channel wide (a toy's: SD 1.5 has 40 per group there) cannot run
    on 1x1 feature maps."""
    channels = unet_config.get("block_out_channels", UNET_BLOCK_OUT_CHANNELS)
    narrowest, groups = channels[max(0, len(channels) - 2)], unet_config.get("norm_num_groups", 32)
    if narrowest // groups * deepest_side(resolution, vae_config, unet_config) ** 2 > 1:
        return None
    least = next(size for size in itertools.count(resolution + 8, 8) if deepest_side(size, vae_config, unet_config) >= 2)
    return (f"--resolution {resolution} is too small for the teacher's UNet: its deepest feature maps would be 1x1, "
            f"where GroupNorm gets one value per group and image ({narrowest} channels in {groups} groups); "
            f"use --resolution {least} or more")


def vae_load_error(args, error: OSError) -> SetupError:
    return SetupError(f"cannot load the VAE {args.pretrained_vae_model_name_or_path!r} (a VAE's own folder or Hub "
                      f"id, e.g. a pipeline's vae/ folder): {one_line(error)}")


# The keys of a scheduler config that fix the noise schedule alphas_cumprod.
NOISE_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                       "rescale_betas_zero_snr")


def lcm_scheduler(teacher_scheduler_config, num_ddim_timesteps: int) -> LCMScheduler:
    """The sampler of the distilled model: LCM's multistep sampler on the teacher's noise schedule,
    whose original grid is the training's DDIM grid.

    Only the noise schedule comes from the teacher's config. How the sampler forms x0 is what
    training does: epsilon prediction, LCM's boundary scalings, no clipping or thresholding (a
    teacher config written without ``clip_sample`` reads as DDPM's default, ``True``, which would
    clip latents to [-1, 1]).
    """
    schedule = {key: teacher_scheduler_config[key] for key in NOISE_SCHEDULE_KEYS if key in teacher_scheduler_config}
    return LCMScheduler.from_config(
        schedule, original_inference_steps=num_ddim_timesteps, prediction_type="epsilon",
        clip_sample=False, thresholding=False, timestep_scaling=TIMESTEP_SCALING,
    )


def load_text_encoder_and_vae(args, dtype=torch.float32):
    """``(tokenizer, text_encoder, vae)``, frozen, on the CPU in ``dtype``. Loaded in it rather than
    cast after: diffusers 0.42 warns at every cast of a model with ``to(dtype)``."""
    tokenizer = load_teacher_part(args, CLIPTokenizer, "tokenizer")
    text_encoder = load_teacher_part(args, CLIPTextModel, "text_encoder", dtype=dtype)
    if args.pretrained_vae_model_name_or_path is None:
        vae = load_teacher_part(args, AutoencoderKL, "vae", dtype=dtype)
    else:
        try:
            vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir,
                                                torch_dtype=dtype)
        except OSError as error:
            raise vae_load_error(args, error) from error
    return tokenizer, freeze(text_encoder), freeze(vae)


def load_teacher_unet(args) -> UNet2DConditionModel:
    """The frozen teacher UNet, on the CPU in float32.

    A UNet with a time-conditioning input of its own (an LCM's guidance embedding) is called
    without it, as SPLAM's teacher is a classifier-free-guided model: the input then adds
    nothing, which is not how such a model samples, so the log says so."""
    teacher_unet = load_teacher_part(args, UNet2DConditionModel, "unet")
    if teacher_unet.config.time_cond_proj_dim is not None:
        logger.warning(f"the teacher's UNet takes a time-conditioning input (time_cond_proj_dim="
                       f"{teacher_unet.config.time_cond_proj_dim}, as an LCM's guidance embedding is); the teacher "
                       "is called without it, as a classifier-free-guided model, and the student starts from its weights")
    return freeze(teacher_unet)


def store_autocast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Store the weights of ``model``'s convolutions and linear layers in ``dtype``, the half dtype
    autocast runs those layers in, and leave everything else (the norms) in float32.

    A frozen float32 net called under autocast has each of these weights cast to ``dtype`` on
    every call (468 casts per SD 1.5 UNet call); autocast runs the norms in float32 whatever their
    weights' dtype. Stored this way the net computes bit for bit what it did, without the casts
    and with half the memory for those weights. Unlike ``--cast_teacher_unet``, which stores the
    norms in the half dtype too, this leaves the math as it was."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.to(dtype)
    return model


def freeze(model):
    model.requires_grad_(False)
    return model.eval()


def build_student(args, teacher_unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """The online student: the teacher's architecture with a time-conditioning input of width
    ``--unet_time_cond_proj_dim`` (for E(gamma)) when the teacher has none, initialised from
    the teacher's weights (``--revision``). The new projection ``time_embedding.cond_proj``
    starts fresh: PyTorch's default init (``--time_cond_proj_init random``, the authors' choice),
    or zeros (``zero``), which adds nothing to the timestep embedding, so the student starts as
    the teacher at every gamma.

    The initialisation is seeded apart from the training RNG (which differs per process), so
    every process builds the same student and the EMA target starts identical everywhere."""
    time_cond_proj_dim = teacher_unet.config.time_cond_proj_dim or args.unet_time_cond_proj_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if args.seed is None else args.seed)
        student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=time_cond_proj_dim)
    if args.revision is None:
        weights = teacher_unet.state_dict()
    else:
        weights = load_teacher_part(args, UNet2DConditionModel, "unet", revision=args.revision).state_dict()
    missing, unexpected = student.load_state_dict(weights, strict=False)
    if unexpected or any(not name.startswith("time_embedding.cond_proj") for name in missing):
        raise TeacherError(f"the teacher's UNet does not fit the student: missing {missing}, unexpected {unexpected}")
    if args.time_cond_proj_init == "zero":
        if not missing:
            raise TeacherError("--time_cond_proj_init zero: the teacher's UNet has a time-conditioning projection "
                               f"already (time_cond_proj_dim={time_cond_proj_dim}), which the student keeps")
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    student.train()
    return student


def build_target(student: UNet2DConditionModel) -> UNet2DConditionModel:
    """The EMA target: a frozen float32 copy of the student."""
    target = copy.deepcopy(student)
    target.requires_grad_(False)
    target.train()
    return target
