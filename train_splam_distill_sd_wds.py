#!/usr/bin/env python
"""Distil a Stable Diffusion teacher into a 1-4 step student with SPLAM.

Sub-path Linear Approximation Model (Xu et al., ECCV 2024), in the notation of
SPEC.md. Each training step:

1. encode a batch of images to latents ``z`` and captions to embeddings ``c``;
2. draw a sub-path ``(ts, te)`` of the teacher's DDIM grid and noise ``z`` to ``x_s``;
3. take one CFG-guided DDIM step of the teacher from ``x_s`` to ``x_e``;
4. let the EMA target predict the endpoint ``y_T`` from ``x_e`` at ``te``;
5. draw ``gamma`` and form the sub-path linear point ``x_g`` with noise level ``sigma_g``;
6. let the student predict the endpoint ``y_S`` from ``x_g`` at ``ts``, told ``gamma``;
7. minimise the distance of ``y_S`` to ``y_T``, then move the target towards the student.

Launch with ``accelerate launch train_splam_distill_sd_wds.py --help`` for the flags.
"""

import logging
import math
import os
import sys

import torch
import transformers
import diffusers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.utils.import_utils import is_xformers_available
from tqdm.auto import tqdm

from splam import (
    DDIMSolver,
    append_dims,
    consistency_output,
    distillation_loss,
    gamma_embedding,
    guided_teacher_prediction,
    predicted_origin,
    sample_gamma,
    scalings_for_boundary_conditions,
    sub_path_point,
    update_ema,
)
from splam.args import SetupError, parse_args, public_config, redact_secrets
from splam.checkpoints import checkpoint_step, register_unet_hooks, resolve_resume_checkpoint, save_checkpoint
from splam.data import ImageTransform, expand_shard_urls, make_train_dataloader
from splam.export import export_pipeline
from splam.hub import push_pipeline
from splam.models import (
    build_student,
    build_target,
    lcm_scheduler,
    load_teacher_scheduler,
    load_teacher_unet,
    load_text_encoder_and_vae,
)
from splam.validation import log_validation

logger = get_logger(__name__)


def check_optional_dependencies(args) -> None:
    """Stop before any weight is loaded when a requested optional package is missing."""
    if args.enable_xformers_memory_efficient_attention and not is_xformers_available():
        raise SetupError(
            "--enable_xformers_memory_efficient_attention needs xformers (pip install xformers); "
            "without the flag PyTorch's scaled-dot-product attention is used"
        )
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise SetupError("--use_8bit_adam needs bitsandbytes (pip install bitsandbytes)") from error
    if "wandb" in args.report_to or args.report_to == "all":
        try:
            import wandb  # noqa: F401
        except ImportError as error:
            raise SetupError("--report_to=wandb needs wandb (pip install wandb)") from error


def encode_prompts(captions, tokenizer, text_encoder) -> torch.Tensor:
    """CLIP text embeddings ``[B, 77, D]`` of the captions (longer ones truncated)."""
    tokens = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(tokens.to(text_encoder.device))[0]


def encode_images(pixels: torch.Tensor, vae, batch_size: int) -> torch.Tensor:
    """``z = vae.encode(pixels).latent_dist.sample() * scaling_factor``, in chunks of ``batch_size``."""
    pixels = pixels.to(vae.device, vae.dtype)
    latents = [vae.encode(chunk).latent_dist.sample() for chunk in pixels.split(batch_size)]
    return torch.cat(latents).float() * vae.config.scaling_factor


def make_optimizer(args, params):
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def main(args):
    # ---- Set up ------------------------------------------------------------------------
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    for library in (transformers, diffusers):
        (library.utils.logging.set_verbosity_warning if accelerator.is_local_main_process
         else library.utils.logging.set_verbosity_error)()
    if args.seed is not None:
        set_seed(args.seed, device_specific=True)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    check_optional_dependencies(args)
    resume_path = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        logger.info(f"No checkpoint in {args.output_dir} to resume from: starting a new run.")
    teacher_scheduler = load_teacher_scheduler(args)

    # Frozen nets in the half-precision dtype where mixed precision runs under autocast; the
    # student keeps float32 master weights and the target stays float32 (SPEC section 1).
    # accelerate runs fp16 on a CPU without autocast (native_amp is off), so everything stays float32 there.
    weight_dtype = torch.float32
    if accelerator.native_amp:
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[accelerator.mixed_precision]
    tokenizer, text_encoder, vae = load_text_encoder_and_vae(args)
    teacher_unet = load_teacher_unet(args)
    unet = build_student(args, teacher_unet)
    target_unet = build_target(unet)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    teacher_unet.to(accelerator.device, dtype=weight_dtype if args.cast_teacher_unet else torch.float32)
    target_unet.to(accelerator.device)

    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
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
    time_cond_proj_dim = unet.config.time_cond_proj_dim

    global_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if args.scale_lr:
        args.learning_rate *= global_batch_size
    optimizer = make_optimizer(args, unet.parameters())

    max_train_samples = args.max_train_samples or args.max_train_steps * global_batch_size
    num_batches = math.ceil(max_train_samples / (args.train_batch_size * accelerator.num_processes))
    train_dataloader = make_train_dataloader(
        expand_shard_urls(args.train_shards_path_or_url),
        ImageTransform(args.resolution, args.center_crop, args.random_flip),
        batch_size=args.train_batch_size,
        num_batches=num_batches,
        num_workers=args.dataloader_num_workers,
        shuffle_buffer=args.shuffle_buffer_size,
        seed=0 if args.seed is None else args.seed,
        pin_memory=accelerator.device.type == "cuda",
    )
    num_update_steps_per_epoch = math.ceil(num_batches / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    # accelerate steps a prepared lr scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    register_unet_hooks(accelerator, target_unet)

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=public_config(args))

    with torch.no_grad():
        uncond_prompt_embeds = encode_prompts([""], tokenizer, text_encoder)

    global_step = 0
    if resume_path is not None:
        logger.info(f"Resuming from {resume_path}")
        accelerator.load_state(resume_path)
        global_step = checkpoint_step(resume_path)
    first_epoch = global_step // num_update_steps_per_epoch

    logger.info("***** Running SPLAM distillation *****")
    logger.info(f"  Batch size per process = {args.train_batch_size}, processes = {accelerator.num_processes}, "
                f"accumulation steps = {args.gradient_accumulation_steps}, global batch = {global_batch_size}")
    logger.info(f"  Optimizer steps = {args.max_train_steps}, samples per epoch = {max_train_samples}")

    # ---- The loop ----------------------------------------------------------------------
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    for epoch in range(first_epoch, num_train_epochs):
        for pixels, captions in train_dataloader:
            with accelerator.accumulate(unet):
                # 1. Latents z and prompt embeddings c (a fraction of prompts emptied).
                with torch.no_grad():
                    latents = encode_images(pixels, vae, args.vae_encode_batch_size)
                    dropped = torch.rand(len(captions)) < args.proportion_empty_prompts
                    captions = ["" if drop else caption for caption, drop in zip(captions, dropped)]
                    prompt_embeds = encode_prompts(captions, tokenizer, text_encoder).float()
                batch_size, ndim = latents.shape[0], latents.ndim

                # 2. A sub-path (ts, te) per sample and the start point x_s.
                index = torch.randint(0, args.num_ddim_timesteps, (batch_size,), device=latents.device)
                start_timesteps, end_timesteps = solver.sub_path(index)
                alpha_start, sigma_start = solver.alpha_sigma(start_timesteps, ndim)
                alpha_end, sigma_end = solver.alpha_sigma(end_timesteps, ndim)
                noise = torch.randn_like(latents)
                x_start = alpha_start * latents + sigma_start * noise

                with torch.no_grad(), accelerator.autocast():
                    # 3. The teacher's CFG-guided DDIM step x_s -> x_e (cond and uncond in one call).
                    teacher_eps = teacher_unet(
                        torch.cat([x_start, x_start]).to(teacher_unet.dtype),
                        torch.cat([start_timesteps, start_timesteps]),
                        encoder_hidden_states=torch.cat(
                            [prompt_embeds, uncond_prompt_embeds.expand_as(prompt_embeds)]
                        ).to(teacher_unet.dtype),
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

                    # 4. The target's endpoint y_T from x_e at te, at gamma = 1.
                    target_eps = target_unet(
                        x_end,
                        end_timesteps,
                        timestep_cond=gamma_embedding(torch.ones(batch_size, device=x_end.device), time_cond_proj_dim),
                        encoder_hidden_states=prompt_embeds,
                    ).sample.float()
                    c_skip_end, c_out_end = scalings_for_boundary_conditions(append_dims(end_timesteps, ndim))
                    y_target = consistency_output(
                        x_end, predicted_origin(target_eps, x_end, alpha_end, sigma_end), c_skip_end, c_out_end
                    )

                # 5. The sub-path linear point x_g and its noise level sigma_g.
                gamma = sample_gamma(batch_size, latents.device, ndim)
                x_gamma, sigma_gamma = sub_path_point(x_start, x_end, gamma, alpha_start, alpha_end, sigma_end)

                # 6. The student's endpoint y_S from x_g at ts, told gamma.
                with accelerator.autocast():
                    student_eps = unet(
                        x_gamma,
                        start_timesteps,
                        timestep_cond=gamma_embedding(gamma.flatten(), time_cond_proj_dim),
                        encoder_hidden_states=prompt_embeds,
                    ).sample.float()
                c_skip_start, c_out_start = scalings_for_boundary_conditions(append_dims(start_timesteps, ndim))
                y_student = consistency_output(
                    x_gamma, predicted_origin(student_eps, x_gamma, alpha_start, sigma_gamma), c_skip_start, c_out_start
                )

                # 7. Loss, optimizer step.
                loss = distillation_loss(y_student, y_target, args.loss_type, args.huber_c)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            # 8. The target follows the student; bookkeeping per optimizer step.
            update_ema(target_unet.parameters(), accelerator.unwrap_model(unet).parameters(), args.ema_decay)
            global_step += 1
            progress_bar.update(1)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress_bar.set_postfix(**logs)
            accelerator.log(logs, step=global_step)

            if global_step % args.checkpointing_steps == 0:
                path = save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
                logger.info(f"Saved {path}")
            if global_step % args.validation_steps == 0 and accelerator.is_main_process:
                log_validation(
                    accelerator,
                    {"target": target_unet, "online": accelerator.unwrap_model(unet)},
                    vae, text_encoder, tokenizer, lcm_scheduler(teacher_scheduler.config, args.num_ddim_timesteps),
                    args, global_step,
                )
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    # ---- The distilled pipeline --------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The frozen nets were cast for training; the published pipeline gets them as released.
        tokenizer, text_encoder, vae = load_text_encoder_and_vae(args)
        export_pipeline(
            args, tokenizer, text_encoder, vae, target_unet, accelerator.unwrap_model(unet),
            teacher_scheduler.config, global_step, global_step * global_batch_size,
        )
        logger.info(f"Saved the distilled pipeline to {args.output_dir}")
        if args.push_to_hub:
            repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
            logger.info(f"Uploaded to {push_pipeline(args.output_dir, repo_id, token=args.hub_token)}")
    accelerator.end_training()


if __name__ == "__main__":
    arguments = parse_args()
    sys.argv = redact_secrets(sys.argv)
    try:
        main(arguments)
    except SetupError as error:
        sys.exit(f"error: {error}")
