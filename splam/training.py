"""The pieces of a SPLAM training step: the nets as training holds them, the optimizer, a
batch's latents and prompt embeddings (SPEC section 3, step 1), its loss (steps 2 to 7) and
the update, taken or skipped. The training script's loop and the throughput benchmark's step
are both made of these pieces, in the same order.
"""

import functools
import logging
import math
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler

from .models import build_student, build_target, load_teacher_unet, load_text_encoder_and_vae, store_autocast_weights
from .objective import (
    consistency_output,
    distillation_loss,
    gamma_embedding,
    guided_teacher_prediction,
    predicted_origin,
    sample_gamma,
    scalings_for_boundary_conditions,
    sub_path_point,
)
from .sharding import whole_tensor
from .solver import DDIMSolver, append_dims

logger = logging.getLogger(__name__)


@dataclass
class DistillationModels:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    teacher_unet: torch.nn.Module
    unet: torch.nn.Module  # the online student (wrapped by accelerate once prepared)
    target_unet: torch.nn.Module
    solver: DDIMSolver
    uncond_input_ids: torch.Tensor  # on the CPU, where the batches' token ids are
    uncond_prompt_embeds: torch.Tensor


def half_dtype(accelerator):
    """The half dtype the step's forward passes compute in under mixed precision, or None for
    float32. accelerate runs fp16 on a CPU without autocast (``native_amp`` is off), so
    everything stays float32 there; under DeepSpeed ``native_amp`` is off too, but its engine
    holds the student in the half dtype, so the step computes in it as well."""
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if accelerator.mixed_precision not in ("fp16", "bf16") or not (accelerator.native_amp or deepspeed):
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[accelerator.mixed_precision]


def mixed_precision_autocast(accelerator):
    """A zero-argument autocast context factory for the forward passes of training and
    validation: accelerate's own, or under DeepSpeed (where accelerate adds none) torch's in the
    half dtype, so that the frozen nets, the fp32 EMA target and the half student meet."""
    dtype = half_dtype(accelerator)
    if dtype is None or accelerator.native_amp:
        return accelerator.autocast
    return functools.partial(torch.autocast, accelerator.device.type, dtype=dtype)


def build_distillation_models(args, accelerator, teacher_scheduler) -> DistillationModels:
    """Load the frozen nets, build the student and its EMA target (fp32, SPEC section 1), move all
    to the device, and apply the memory and speed options."""
    # The frozen VAE and text encoder (and the teacher with --cast_teacher_unet) are stored in the
    # half dtype where the step computes in it, and the teacher's convolutions and linear layers
    # otherwise: no weight casts on every call.
    weight_dtype = half_dtype(accelerator) or torch.float32
    tokenizer, text_encoder, vae = load_text_encoder_and_vae(args, weight_dtype)
    teacher_unet = load_teacher_unet(args)
    unet = build_student(args, teacher_unet)
    target_unet = build_target(unet)
    text_encoder.to(accelerator.device)
    vae.to(accelerator.device)
    if args.cast_teacher_unet:
        if weight_dtype == torch.float32:
            logger.warning("--cast_teacher_unet: the step computes in float32 here (no fp16 or bf16 autocast), "
                           "so the teacher stays in float32")
        teacher_unet.to(accelerator.device, dtype=weight_dtype)
    else:
        store_autocast_weights(teacher_unet, weight_dtype).to(accelerator.device)
    # The student goes to the device before the optimizer is made, so that AdamW takes its fused kernel there.
    for model in (unet, target_unet):
        model.to(accelerator.device)
    if args.channels_last:
        for model in (vae, teacher_unet, unet, target_unet):
            model.to(memory_format=torch.channels_last)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if args.enable_xformers_memory_efficient_attention:
        for model in (teacher_unet, unet, target_unet):
            model.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    solver = DDIMSolver(
        teacher_scheduler.alphas_cumprod,
        timesteps=teacher_scheduler.config.num_train_timesteps,
        ddim_timesteps=args.num_ddim_timesteps,
    ).to(accelerator.device)
    # The empty prompt is encoded once: every step's unconditional teacher call reuses it.
    with torch.no_grad():
        uncond_input_ids = tokenizer(
            [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        uncond_prompt_embeds = encode_prompts(uncond_input_ids, text_encoder).float()
    if args.torch_compile:
        # In place, so that checkpoints keep the plain names. "frozen" leaves out the student, whose
        # forward and backward are most of the compilation's minutes. The encoders are compiled only
        # where the steps call them, and after the empty prompt's encoding, so that their first
        # compilation is for the training batch's shape rather than one more for a single prompt.
        compile_student = args.torch_compile == "all"
        if compile_student and accelerator.device.type == "cpu":
            # Measured with torch 2.13: inductor's CPU code for the SD UNet's backward zeroes the
            # gradients of the mid and up blocks (its forward is exact). CUDA's code is another generator.
            logger.warning("--torch_compile: the student stays uncompiled on a CPU, where torch's compiler was "
                           "measured to give it wrong gradients; the frozen nets are compiled")
            compile_student = False
        to_compile = [teacher_unet, target_unet] + ([unet] if compile_student else [])
        if not args.train_latents_path_or_url:
            to_compile += [text_encoder, vae.encoder]
        for model in to_compile:
            model.compile()
    return DistillationModels(tokenizer, text_encoder, vae, teacher_unet, unet, target_unet, solver,
                              uncond_input_ids, uncond_prompt_embeds)


def make_optimizer(args, params, learning_rate: float):
    """AdamW, or bitsandbytes' 8-bit AdamW with ``--use_8bit_adam`` (``splam.adamw8bit``, which
    queues its per-tensor updates without host waits); torch's fused kernel on CUDA."""
    params = list(params)
    options = dict(lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                   weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.use_8bit_adam:
        from .adamw8bit import AdamW8bit

        return AdamW8bit(params, **options)
    return torch.optim.AdamW(params, fused=params[0].is_cuda, **options)


def make_lr_scheduler(args, optimizer):
    """diffusers' ``--lr_scheduler`` over ``args.max_train_steps`` optimizer steps, the first
    ``--lr_warmup_steps`` of them warming up.

    diffusers' polynomial schedule divides by its steps after the warm-up when it is read at its
    end: after the last update of a run that warms up all along, or on a resume at that step to
    export. Such a run never leaves the warm-up, which the schedule keeps when it is one step
    longer; no update reads it past the run's end. A warm-up that lasts the whole run is warned of:
    the rate then never reaches ``--learning_rate``."""
    num_training_steps = args.max_train_steps
    if args.lr_scheduler != "constant" and args.lr_warmup_steps >= args.max_train_steps:
        logger.warning(f"--lr_warmup_steps {args.lr_warmup_steps} is not shorter than the run's {args.max_train_steps} "
                       f"optimizer steps: --lr_scheduler {args.lr_scheduler} warms up all along and never reaches "
                       "--learning_rate")
    if args.lr_scheduler == "polynomial":
        num_training_steps = max(num_training_steps, args.lr_warmup_steps + 1)
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


def optimizer_name(args) -> str:
    return "AdamW8bit" if args.use_8bit_adam else "AdamW"


def total_optimizer_steps(args, global_batch_size: int, resume_state) -> int:
    """``--max_train_steps``, or else the optimizer steps in which the run sees ``--num_train_epochs``
    x ``--max_train_samples`` samples: a streamed dataset has no epochs of its own, so an epoch is
    a number of samples. After a resume, the steps taken plus those that see the samples still due
    at this run's global batch, so a resume on another batch size or process count still ends
    after the samples asked for."""
    if args.max_train_steps is not None:
        return args.max_train_steps
    samples = args.num_train_epochs * args.max_train_samples
    if resume_state is None:
        return math.ceil(samples / global_batch_size)
    samples_due = max(0, samples - resume_state["samples_seen"])
    return resume_state["global_step"] + math.ceil(samples_due / global_batch_size)


def read_step_values(accelerator, loss: torch.Tensor, grad_norm, counts=()):
    """The loss averaged over processes, the gradient norm (global, after unscaling), and
    ``counts`` (integers of this process's host, such as its skipped samples) summed over processes.

    ``grad_norm`` is what ``accelerator.clip_grad_norm_`` returned: a tensor, a DTensor under
    FSDP2, or under DeepSpeed (which clips inside its engine) a float or ``None``; the returned
    norm is ``None`` then too. All travel to the host in one copy, the training loop's one wait
    for the device per optimizer step: the step must know loss and norm before it decides whether
    to take the update, and one wait instead of two leaves the GPU idle once while the host queues
    the next work. Every process gets the same numbers, so all decide alike. It is a collective:
    every process passes as many counts. They enter as fills of float32 (exact below 2**24,
    tensorboard's own precision), not as a copy to the device, which would wait for it by itself.
    """
    device = loss.device
    summed = accelerator.reduce(torch.stack([
        loss.detach().float(), *(torch.full((), count, dtype=torch.float32, device=device) for count in counts)
    ]), reduction="sum")
    values = [summed[:1] / accelerator.num_processes, summed[1:]]
    if grad_norm is not None:
        values.append(torch.as_tensor(whole_tensor(grad_norm), dtype=torch.float32, device=device).reshape(1))
    numbers = torch.cat(values).tolist()
    summed_counts = [round(number) for number in numbers[1:1 + len(counts)]]
    return numbers[0], numbers[-1] if grad_norm is not None else None, summed_counts


def take_optimizer_step(accelerator, optimizer, lr_scheduler, loss_value: float, grad_norm_value) -> bool:
    """Step the optimizer and the lr schedule unless the loss or the gradient norm (from
    ``read_step_values``) is non-finite, then clear the gradients; returns whether the
    update was taken, which is when the EMA target follows.

    Under fp16 the grad scaler finds the same inf gradients and skips the update itself, lowering
    its scale, so it gets every step. Whether it skipped is not read from accelerate's
    ``optimizer_step_was_skipped``: a fused AdamW skips inside its kernel, and that flag then
    reports the step as taken. A finite gradient norm means finite gradients, so the host
    already knows.
    """
    taken = math.isfinite(loss_value) and (grad_norm_value is None or math.isfinite(grad_norm_value))
    if taken or accelerator.scaler is not None:
        optimizer.step()
    if taken:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return taken


def encode_prompts(input_ids: torch.Tensor, text_encoder) -> torch.Tensor:
    """CLIP text embeddings ``[B, 77, D]`` of token ids."""
    return text_encoder(input_ids.to(text_encoder.device))[0]


def posterior_moments(pixels: torch.Tensor, vae, batch_size: int) -> torch.Tensor:
    """The VAE posterior of images: mean and log-variance stacked on the channel axis,
    ``[B, 2C, h, w]`` (diffusers' ``DiagonalGaussianDistribution`` parameters), encoded in
    chunks of ``batch_size``. ``scripts/precompute_latents.py`` stores these."""
    pixels = pixels.to(vae.device, vae.dtype, non_blocking=True)
    return torch.cat([vae.encode(chunk).latent_dist.parameters for chunk in pixels.split(batch_size)])


def sample_latents(moments: torch.Tensor, vae) -> torch.Tensor:
    """``z = latent_dist.sample() * vae.config.scaling_factor``, drawn in float32.

    Returned contiguous: moments fresh from a channels-last VAE are channels-last, those read from
    latent shards are not, and the UNets' inputs inherit the layout, to which compiled UNets are
    specialised. One layout lets their compilation serve both sources (and the inductor cache
    be shared by runs from images and from latents)."""
    moments = moments.to(vae.device, torch.float32, non_blocking=True)
    return (DiagonalGaussianDistribution(moments).sample() * vae.config.scaling_factor).contiguous()


@torch.no_grad()
def encode_batch(inputs: torch.Tensor, conditioning: torch.Tensor, models: DistillationModels, args):
    """SPEC step 1: the latents ``z`` and prompt embeddings ``c`` of a batch, with a fraction
    ``--proportion_empty_prompts`` of the prompts replaced by the empty one.

    An image batch is ``(pixels, token ids)`` and goes through the VAE and the text encoder; a
    latent batch (``--train_latents_path_or_url``) is ``(posterior moments, prompt embeddings)``,
    precomputed by the same functions, and only draws ``z``."""
    dropped = torch.rand(len(conditioning)) < args.proportion_empty_prompts
    if args.train_latents_path_or_url:
        latents = sample_latents(inputs, models.vae)
        prompt_embeds = conditioning.to(latents.device, torch.float32, non_blocking=True)
        return latents, torch.where(dropped.to(latents.device)[:, None, None], models.uncond_prompt_embeds, prompt_embeds)
    latents = sample_latents(posterior_moments(inputs, models.vae, args.vae_encode_batch_size), models.vae)
    input_ids = torch.where(dropped[:, None], models.uncond_input_ids, conditioning)
    return latents, encode_prompts(input_ids, models.text_encoder).float()


def splam_loss(latents: torch.Tensor, prompt_embeds: torch.Tensor, models: DistillationModels, args, autocast) -> torch.Tensor:
    """The SPLAM loss of one batch of latents ``z`` and prompt embeddings ``c`` (``encode_batch``),
    SPEC section 3 steps 2 to 7 (``autocast`` from ``mixed_precision_autocast``).

    2. a sub-path ``(ts, te)`` per sample and ``x_s = a(ts) z + s(ts) noise``;
    3. the teacher's CFG-guided DDIM step ``x_s -> x_e`` (cond and uncond in one batched call);
    4. the target's endpoint ``y_T`` from ``x_e`` at ``te``, at gamma = 1;
    5. ``gamma`` and the sub-path linear point ``x_g`` with its noise level ``sigma_g``;
    6. the student's endpoint ``y_S`` from ``x_g`` at ``ts``, told ``gamma``;
    7. the distance of ``y_S`` to ``y_T`` (no gradient through the target side).
    """
    solver, time_cond_proj_dim = models.solver, models.target_unet.config.time_cond_proj_dim
    batch_size, ndim = latents.shape[0], latents.ndim

    index = torch.randint(0, args.num_ddim_timesteps, (batch_size,), device=latents.device)
    start_timesteps, end_timesteps = solver.sub_path(index)
    alpha_start, sigma_start = solver.alpha_sigma(start_timesteps, ndim)
    alpha_end, sigma_end = solver.alpha_sigma(end_timesteps, ndim)
    # Drawn by shape, not randn_like: the draws must not depend on the latents' memory layout
    # (the VAE's output strides differ from those of stored latents).
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    x_start = alpha_start * latents + sigma_start * noise

    teacher_unet, teacher_dtype = models.teacher_unet, models.teacher_unet.dtype
    with torch.no_grad(), autocast():
        teacher_eps = teacher_unet(
            torch.cat([x_start, x_start]).to(teacher_dtype),
            torch.cat([start_timesteps, start_timesteps]),
            encoder_hidden_states=torch.cat(
                [prompt_embeds, models.uncond_prompt_embeds.expand_as(prompt_embeds)]
            ).to(teacher_dtype),
        ).sample.float()
        eps_cond, eps_uncond = teacher_eps.chunk(2)
        x0, eps = guided_teacher_prediction(
            eps_cond,
            eps_uncond,
            predicted_origin(eps_cond, x_start, alpha_start, sigma_start),
            predicted_origin(eps_uncond, x_start, alpha_start, sigma_start),
            args.w_scale,
        )
        x_end = solver.ddim_step(x0, eps, index)

        target_eps = models.target_unet(
            x_end,
            end_timesteps,
            timestep_cond=gamma_embedding(torch.ones(batch_size, device=x_end.device), time_cond_proj_dim),
            encoder_hidden_states=prompt_embeds,
        ).sample.float()
        c_skip_end, c_out_end = scalings_for_boundary_conditions(append_dims(end_timesteps, ndim))
        y_target = consistency_output(x_end, predicted_origin(target_eps, x_end, alpha_end, sigma_end), c_skip_end, c_out_end)

    gamma = sample_gamma(batch_size, latents.device, ndim, args.gamma_sampling)
    x_gamma, sigma_gamma = sub_path_point(x_start, x_end, gamma, alpha_start, alpha_end, sigma_end)

    with autocast():
        student_eps = models.unet(
            x_gamma,
            start_timesteps,
            timestep_cond=gamma_embedding(gamma.flatten(), time_cond_proj_dim),
            encoder_hidden_states=prompt_embeds,
        ).sample.float()
    c_skip_start, c_out_start = scalings_for_boundary_conditions(append_dims(start_timesteps, ndim))
    y_student = consistency_output(
        x_gamma, predicted_origin(student_eps, x_gamma, alpha_start, sigma_gamma), c_skip_start, c_out_start
    )
    return distillation_loss(y_student, y_target, args.loss_type, args.huber_c)
