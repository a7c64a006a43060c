"""Command-line flags of ``train_splam_distill_sd_wds.py``, with their checks.

Flag names follow diffusers' LCM distillation example and the authors' script, so
that the seed README's command runs unchanged.
"""

import argparse
import importlib.util
import math
import os
import re

from accelerate.utils import LoggerType
from diffusers.optimization import SchedulerType

DEFAULT_VALIDATION_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a painting of a majestic kingdom with towering castles, lush gardens, ice and snow world",
    "a close-up photo of a cat sitting on a wooden table",
    "a cup of coffee on a saucer, top view",
]


class SetupError(Exception):
    """A run that cannot start as configured; reported as one line, before weights are loaded."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (the libraries' span several), or its type's name if it has none."""
    return " ".join(str(error).split()) or type(error).__name__


# The step counts validation and the exported sample grid use (on the --num_ddim_timesteps grid).
VALIDATION_STEPS = (1, 2, 4)
# diffusers' schedules but the one that needs a rules string this script has no flag for.
LR_SCHEDULES = [schedule.value for schedule in SchedulerType if schedule != SchedulerType.PIECEWISE_CONSTANT]
TRACKERS = (*(tracker.value for tracker in LoggerType), "none")
# The characters wandb refuses in a project name.
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"

# Keys that must never reach a tracker, a log line or a written file.
SECRET_ARGS = ("hub_token",)
# Tokens that can also sit inside other flags' values, e.g. the shard command of a gated Hub
# dataset, ``pipe:curl ... -H 'Authorization: Bearer hf_...'``: Hugging Face access tokens (hf_
# and 34 letters and digits, taken as a token from 30 on, in case the length changes; a shorter
# run, or one inside a longer word, is a name such as a folder's), and the whole value of any
# Authorization header (Bearer, Basic, token, ...), up to the quote or line end that closes it
# (an unquoted one takes the rest of the command with it).
HUB_TOKEN_PATTERN = re.compile(r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,}(?![A-Za-z0-9])")
AUTHORIZATION_VALUE_PATTERN = re.compile(r"(?<=Authorization:)[^'\"\n]*", re.I)
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def finite_float(text: str) -> float:
    """The type of the float flags: the range checks let NaN through (every comparison with it is
    false), and an infinite rate, scale or norm is no setting."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated flags: every spelling of a secret flag must be known to redact_secrets.
    parser = argparse.ArgumentParser(
        description="Distil a Stable Diffusion teacher with SPLAM (ECCV 2024).", allow_abbrev=False
    )

    models = parser.add_argument_group("models")
    models.add_argument("--pretrained_teacher_model", type=str, required=True,
                        help="Teacher: a StableDiffusionPipeline folder or Hub id with an epsilon-prediction UNet.")
    models.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                        help="A VAE to use instead of the teacher's (its folder or Hub id).")
    models.add_argument("--teacher_revision", type=str, default=None, help="Revision of the teacher on the Hub.")
    models.add_argument("--revision", type=str, default=None, help="Revision of the student's initialisation (the teacher's UNet).")
    models.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models are cached.")
    models.add_argument("--variant", type=str, default=None,
                        help="Variant of the teacher's weight files, e.g. fp16 for model.fp16.safetensors (trained in float32).")
    models.add_argument("--unet_time_cond_proj_dim", type=int, default=256,
                        help="Width of the gamma embedding E(gamma) when the teacher's UNet has no time_cond_proj_dim.")
    models.add_argument("--time_cond_proj_init", type=str, default="random", choices=["random", "zero"],
                        help="Start of the new gamma projection: random (PyTorch's default, as the authors) or zero "
                             "(the student starts as the teacher at every gamma).")

    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--train_shards_path_or_url", type=str,
                        help="Image-text webdataset shards: paths, URLs, 'pipe:' commands, {000..009} ranges, "
                             "'::'-separated lists.")
    source.add_argument("--train_latents_path_or_url", type=str,
                        help="Instead, shards of VAE latents and prompt embeddings from scripts/precompute_latents.py "
                             "(same forms): no VAE encode or text encoder per step; crops and flips are those of the "
                             "precomputation.")
    data.add_argument("--resolution", type=int, default=512, help="Training image size in pixels (a multiple of 8).")
    data.add_argument("--center_crop", action="store_true", help="Crop the centre instead of a random square.")
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally with probability 0.5.")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Samples in one epoch of the stream; with --num_train_epochs, the run's length where "
                           "--max_train_steps is unset.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loader worker processes.")
    data.add_argument("--shuffle_buffer_size", type=int, default=1000,
                      help="Samples held in the shuffle buffer per worker (1: no shuffling).")
    data.add_argument("--proportion_empty_prompts", type=finite_float, default=0.0,
                      help="Fraction of captions replaced by the empty prompt.")

    method = parser.add_argument_group("SPLAM")
    method.add_argument("--w_scale", type=finite_float, default=8.0, help="Teacher's guidance scale w (LCM's formulation).")
    method.add_argument("--num_ddim_timesteps", type=int, default=50, help="Number of sub-paths (DDIM steps of the teacher).")
    method.add_argument("--loss_type", type=str, default="l2", choices=["l2", "huber"], help="Distance between endpoints.")
    method.add_argument("--huber_c", type=finite_float, default=0.001, help="The c of the pseudo-Huber loss.")
    method.add_argument("--gamma_sampling", type=str, default="uniform", choices=["uniform", "one"],
                        help="uniform: gamma ~ U[0, 1) (SPLAM); one: gamma = 1 (LCM's consistency distillation).")
    method.add_argument("--ema_decay", type=finite_float, default=0.95, help="EMA decay of the target network.")

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", type=str, default="splam-model", help="Where checkpoints and the final pipeline go.")
    training.add_argument("--seed", type=int, default=None, help="Seed for reproducible training.")
    training.add_argument("--train_batch_size", type=int, default=16, help="Batch size per process.")
    training.add_argument("--num_train_epochs", type=int, default=100, help="Epochs of max_train_samples, if max_train_steps is unset.")
    training.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps in total; overrides num_train_epochs.")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
    training.add_argument("--gradient_checkpointing", action="store_true", help="Recompute the student's activations in backward.")
    training.add_argument("--learning_rate", type=finite_float, default=1e-4, help="Learning rate after warm-up.")
    training.add_argument("--scale_lr", action="store_true", help="Multiply the lr by the global batch size.")
    training.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULES,
                          help="diffusers' schedule of the lr over the optimizer steps, after --lr_warmup_steps.")
    training.add_argument("--lr_warmup_steps", type=int, default=500,
                          help="Warm-up optimizer steps (the constant schedule has none: use constant_with_warmup).")
    training.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    training.add_argument("--lr_power", type=finite_float, default=1.0, help="Power of the polynomial schedule's decay.")
    training.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW.")
    training.add_argument("--adam_beta1", type=finite_float, default=0.9)
    training.add_argument("--adam_beta2", type=finite_float, default=0.999)
    training.add_argument("--adam_weight_decay", type=finite_float, default=1e-2)
    training.add_argument("--adam_epsilon", type=finite_float, default=1e-08)
    training.add_argument("--max_grad_norm", type=finite_float, default=1.0, help="Gradient-norm clipping.")
    training.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                          help="Overrides accelerate's config.")
    training.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs.")
    training.add_argument("--cudnn_benchmark", action="store_true",
                          help="Let cuDNN time its algorithms for each convolution shape once and keep the fastest "
                               "(torch.backends.cudnn.benchmark): seconds at the start and more workspace memory; "
                               "the same math, as the step's shapes do not change.")
    training.add_argument("--cast_teacher_unet", action="store_true",
                          help="Keep the whole teacher UNet, norms included, in the half-precision dtype (without it, "
                               "under fp16 or bf16, only its convolutions and linear layers are: fp32's math under autocast).")
    training.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                          help="Use xformers' attention (PyTorch's SDPA is the default).")
    training.add_argument("--channels_last", action="store_true",
                          help="Channels-last memory format for the UNets and the VAE (faster convolutions on recent GPUs).")
    training.add_argument("--torch_compile", nargs="?", const="all", default=None, choices=["all", "frozen"],
                          help="torch.compile in place the teacher, target and student UNets and, when training from "
                               "images, the text encoder and the VAE's encoder (the flag alone, or 'all'), or with "
                               "'frozen' only the nets that run without gradients, leaving out the costliest part of "
                               "the compilation, the student's forward and backward. Minutes before the first step.")
    training.add_argument("--max_nonfinite_steps", type=int, default=10,
                          help="Stop after this many optimizer steps in a row with a NaN or inf loss or gradient.")
    training.add_argument("--vae_encode_batch_size", type=int, default=32, help="Images per VAE encode call.")
    training.add_argument("--nccl_timeout", type=int, default=None,
                          help="Seconds a collective (NCCL, or gloo on CPUs) waits for the other processes before it "
                               "fails; raise it where the main process alone writes checkpoints to a slow disk. "
                               "Default: PyTorch's (10 minutes for NCCL).")

    checkpoints = parser.add_argument_group("checkpoints")
    checkpoints.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint every N optimizer steps.")
    checkpoints.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    checkpoints.add_argument("--resume_from_checkpoint", type=str, default=None,
                             help='A checkpoint folder (a bare name such as checkpoint-500 is one in output_dir), '
                                  'or "latest" for the newest one in output_dir.')

    logging = parser.add_argument_group("logging and validation")
    logging.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to output_dir.")
    logging.add_argument("--report_to", type=str, default="tensorboard",
                         help='"tensorboard", "wandb", "comet_ml" or another accelerate tracker, a comma-separated '
                              'list of them, "all", or "none".')
    logging.add_argument("--tracker_project_name", type=str, default="splam-distill", help="Project name in the trackers.")
    logging.add_argument("--validation_steps", type=int, default=200, help="Sample the validation prompts every N steps.")
    logging.add_argument("--validation_prompts", type=str, nargs="+", default=DEFAULT_VALIDATION_PROMPTS)

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the final pipeline to the Hub.")
    hub.add_argument("--hub_token", type=str, default=None, help="Hub token (else HF_TOKEN or the cached login).")
    hub.add_argument("--hub_model_id", type=str, default=None, help="Hub repository (default: the output folder's name).")
    hub.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository as private.")
    hub.add_argument("--push_checkpoints", action="store_true",
                     help="Also upload each checkpoint's UNets to checkpoints/step-<N> in the background.")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse inconsistent or out-of-range flags with one line, before anything is loaded."""
    for name in ("pretrained_teacher_model", "output_dir", "train_shards_path_or_url", "train_latents_path_or_url"):
        if getattr(args, name) is not None and not getattr(args, name).strip():
            parser.error(f"--{name} is empty")
    if args.resolution % 8 != 0 or args.resolution < 8:
        parser.error(f"--resolution must be a multiple of 8, at least 8, got {args.resolution}")
    if not 0.0 <= args.ema_decay < 1.0:
        parser.error(f"--ema_decay must lie in [0, 1), got {args.ema_decay}")
    if args.learning_rate < 0:
        parser.error(f"--learning_rate must not be negative, got {args.learning_rate}")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        parser.error(f"--proportion_empty_prompts must lie in [0, 1], got {args.proportion_empty_prompts}")
    if args.num_ddim_timesteps < max(VALIDATION_STEPS):
        parser.error(f"--num_ddim_timesteps must be at least {max(VALIDATION_STEPS)}, the most steps validation samples "
                     f"with on its grid, got {args.num_ddim_timesteps}")
    if args.unet_time_cond_proj_dim < 4:
        parser.error(f"--unet_time_cond_proj_dim must be at least 4, the narrowest sinusoidal embedding of gamma, "
                     f"got {args.unet_time_cond_proj_dim}")
    # numpy takes seeds in [0, 2**32), and each process seeds with --seed plus its index.
    if args.seed is not None and not 0 <= args.seed < 2**32 - 2**16:
        parser.error(f"--seed must lie in [0, {2**32 - 2**16}), got {args.seed}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            parser.error(f"--{name} must lie in [0, 1), got {getattr(args, name)}")
    for name in ("adam_weight_decay", "lr_warmup_steps", "lr_power", "w_scale"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ("adam_epsilon", "max_grad_norm", "huber_c"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    trackers = [name.strip() for name in args.report_to.split(",")]
    unknown = [name for name in trackers if name not in TRACKERS]
    if unknown or ("none" in trackers and len(trackers) > 1):
        parser.error(f"--report_to takes one or more of {', '.join(TRACKERS[:-1])}, or none alone; got {args.report_to!r}")
    args.report_to = ",".join(trackers)
    # wandb refuses such a name only when its run starts, after the weights have loaded.
    name = args.tracker_project_name
    if ("wandb" in trackers or ("all" in trackers and importlib.util.find_spec("wandb"))) and (
            len(name) > 128 or any(char in name for char in WANDB_PROJECT_FORBIDDEN)):
        parser.error(f"--tracker_project_name {name!r} is no wandb project name: at most 128 "
                     f"characters, none of {WANDB_PROJECT_FORBIDDEN}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}")
    for name in ("max_train_steps", "max_train_samples", "num_train_epochs", "nccl_timeout"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("center_crop", "random_flip"):
        if args.train_latents_path_or_url and getattr(args, name):
            parser.error(f"--{name} has no effect on --train_latents_path_or_url: crops and flips are made once, by "
                         f"scripts/precompute_latents.py --{name}")
    if args.channels_last and args.use_8bit_adam:
        parser.error("--channels_last does not go with --use_8bit_adam: bitsandbytes makes the student's weights "
                     "contiguous again at every step, undoing channels-last; use --channels_last with AdamW")
    if args.dataloader_num_workers < 0:
        parser.error(f"--dataloader_num_workers must not be negative, got {args.dataloader_num_workers}")
    if args.max_train_steps is None and args.max_train_samples is None:
        parser.error("give --max_train_steps or --max_train_samples: a streamed dataset has no length of its own")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps",
                 "max_nonfinite_steps", "vae_encode_batch_size", "lr_num_cycles", "shuffle_buffer_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def known_tokens(extra=()) -> list:
    """The Hub tokens this process could use: ``extra`` (``--hub_token``), the environment's, the cached login's."""
    tokens = [*extra, *(os.environ.get(name) for name in TOKEN_ENV_VARS)]
    try:
        from huggingface_hub import get_token

        tokens.append(get_token())
    except Exception:  # no login cached, or an unreadable token file
        pass
    return [token for token in tokens if token and len(token) >= 8]


def redact_tokens(text: str, tokens=()) -> str:
    """``text`` with ``tokens``, Hugging Face access tokens and Authorization header values replaced by ``***``."""
    for token in tokens:
        text = text.replace(token, "***")
    text = HUB_TOKEN_PATTERN.sub("***", text)
    return AUTHORIZATION_VALUE_PATTERN.sub(" ***", text)


def redact_secrets(argv: list) -> list:
    """``argv`` with the values of secret flags replaced, and tokens inside other values too, for
    whatever records the command line (wandb stores it with every run)."""
    redacted, hide_next = [], False
    for argument in argv:
        flag = argument.split("=", 1)[0]
        if hide_next:
            argument, hide_next = "***", False
        elif flag.lstrip("-") in SECRET_ARGS:
            if "=" in argument:
                argument = f"{flag}=***"
            else:
                hide_next = True
        redacted.append(argument)
    tokens = known_tokens()
    return [redact_tokens(argument, tokens) for argument in redacted]


def public_config(args: argparse.Namespace) -> dict:
    """The flags as a tracker config (and the model card's table): secrets removed, tokens inside
    other values (a gated dataset's shard command) masked, lists joined so every tracker takes them."""
    tokens = known_tokens([getattr(args, name, None) for name in SECRET_ARGS])
    config = {}
    for key, value in vars(args).items():
        if key in SECRET_ARGS:
            continue
        value = "; ".join(value) if isinstance(value, list) else value
        config[key] = redact_tokens(value, tokens) if isinstance(value, str) else value
    return config
