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
import signal
import sys
from datetime import timedelta

import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import get_available_trackers
from accelerate.utils import DynamoBackend, InitProcessGroupKwargs, ProjectConfiguration, gather_object, set_seed
from diffusers.utils.import_utils import is_xformers_available
from tqdm.auto import tqdm

from splam import update_ema
from splam.args import SetupError, known_tokens, one_line, parse_args, public_config, redact_secrets, redact_tokens
from splam.checkpoints import (
    WRITE_ERRORS,
    CheckpointError,
    check_resumable,
    ema_checksums,
    finish_rotation,
    list_checkpoints,
    load_checkpoint,
    optimizer_hyperparameters,
    register_unet_hooks,
    rotate_checkpoints,
    save_checkpoint,
)
from splam.data import (DataError, DataStats, ShardStream, data_stream_changes, is_per_process, make_train_dataloader,
                        readers_of_process, resumed_reading_positions, train_batches, train_shard_urls,
                        training_samples, unequal_shares_warning)
from splam.export import export_pipeline
from splam.hub import HubError, HubPublisher
from splam.models import check_vae_config, lcm_scheduler, load_teacher_scheduler, load_text_encoder_and_vae
from splam.output_dir import check_output_dir_is_not_the_teacher, claim_output_dir, prepare_output_dir
from splam.sharding import (check_fsdp_options, configure_deepspeed, raise_on_every_process, wait_on_every_process,
                            whole_student)
from splam.training import (
    build_distillation_models,
    encode_batch,
    make_lr_scheduler,
    make_optimizer,
    mixed_precision_autocast,
    optimizer_name,
    read_step_values,
    splam_loss,
    take_optimizer_step,
    total_optimizer_steps,
)
from splam.validation import log_validation, note_trackers_without_images

logger = get_logger(__name__)
# Where diffusers' polynomial schedule ends (get_scheduler's lr_end).
POLYNOMIAL_LR_END = 1e-7


# The signals stop_on_signal has received. Its KeyboardInterrupt is lost where it lands in a callback
# whose exceptions Python ignores (logging's at-fork hook, run when the loader forks its workers),
# so the loop looks here too.
stop_signals = []


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a NaN or inf loss or gradient."""


def check_optional_dependencies(args) -> None:
    """Stop before any weight is loaded when a requested optional package is missing. xformers
    alone is only a warning, and its flag is turned off: without it PyTorch's scaled-dot-product
    attention computes the same attention (as fast on current GPUs), so the authors' command trains
    wherever xformers does not install."""
    if args.enable_xformers_memory_efficient_attention and not is_xformers_available():
        logger.warning("--enable_xformers_memory_efficient_attention: xformers is not installed, so PyTorch's "
                       "scaled-dot-product attention is used (the same attention; pip install xformers for xformers')")
        args.enable_xformers_memory_efficient_attention = False
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise SetupError("--use_8bit_adam needs bitsandbytes (pip install bitsandbytes)") from error
    # accelerate drops a named tracker that is not installed with a debug message only ("all" means
    # whichever are installed).
    available = {tracker.value for tracker in get_available_trackers()}
    for tracker in args.report_to.split(","):
        if tracker not in ("all", "none", *available):
            raise SetupError(f"--report_to={tracker} needs {tracker} (pip install {tracker})")


def check_accelerate_config(accelerator) -> None:
    """Refuse what an accelerate config can ask for that this script does not do."""
    if accelerator.mixed_precision not in ("no", "fp16", "bf16"):
        raise SetupError(f"mixed precision {accelerator.mixed_precision!r} is not supported: use no, fp16 or bf16")
    if accelerator.state.dynamo_plugin.backend != DynamoBackend.NO:
        raise SetupError("set dynamo_backend: 'no' in the accelerate config (or launch with --dynamo_backend no) and pass "
                         "--torch_compile, which compiles the nets in place, so that checkpoints keep their names")


def seed_training_rngs(seed) -> None:
    """The training RNGs (noise, sub-paths, gamma, the VAE's latent draws), different on every process:
    ``--seed`` plus the process index, or without ``--seed`` at random. PyTorch seeds each process's
    CPU generator at random but every CUDA generator with one fixed number (67280421310721), so
    without a seed all GPUs would draw the same noise, timesteps and gamma for their batches (and
    every run the same): the CUDA generators take the CPU generator's random seed."""
    if seed is not None:
        set_seed(seed, device_specific=True)
    else:
        torch.manual_seed(torch.initial_seed())


def make_accelerator(args) -> Accelerator:
    process_group = []
    if args.nccl_timeout:
        # Collectives wait --nccl_timeout seconds for the other processes (e.g. for the main process
        # writing a checkpoint alone). accelerate passes on only the fields that differ from the
        # handler's defaults, so 600 s (its default, for NCCL) would leave gloo at PyTorch's 1800.
        handler = InitProcessGroupKwargs(timeout=timedelta(seconds=args.nccl_timeout))
        handler.to_kwargs = lambda: {"timeout": handler.timeout}
        process_group.append(handler)
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=[tracker for tracker in args.report_to.split(",") if tracker != "none"] or None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        kwargs_handlers=process_group,
    )


def print_shared_messages_once(accelerator) -> None:
    """The splam package's messages are the same on every process (the set-up's notes), except what one
    process's data loader meets (``splam.data.is_per_process``): only the main process prints the
    others, as accelerate's logger does this script's own."""
    if accelerator.is_main_process:
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: record.name.split(".")[0] != "splam" or record.levelno >= logging.ERROR
                          or is_per_process(record))


def tracker_init_kwargs(args) -> dict:
    """wandb writes its run files into the trackers' folder, beside tensorboard's, rather than into the
    working directory (its default), unless ``WANDB_DIR`` says where."""
    if os.environ.get("WANDB_DIR"):
        return {}
    return {"wandb": {"dir": os.path.join(args.output_dir, args.logging_dir)}}


def start_trackers(accelerator, args) -> None:
    """Start the trackers on the main process, before any weight is loaded: a tracker that cannot
    start (wandb without a login or API key, a logging folder that cannot be written) stops the
    run with one line on every process."""
    failure = None
    if accelerator.is_main_process:
        try:
            accelerator.init_trackers(args.tracker_project_name, config=public_config(args),
                                      init_kwargs=tracker_init_kwargs(args))
        except Exception as error:  # each tracker library raises its own errors
            failure = f"--report_to={args.report_to}: the trackers cannot start ({one_line(error)})"
    raise_on_every_process(failure, SetupError)


def make_publisher(accelerator, args):
    """The main process's ``HubPublisher`` with ``--push_to_hub`` or ``--push_checkpoints`` (``None``
    elsewhere), its repository created now: one that cannot be created stops every process with one line."""
    if not (args.push_to_hub or args.push_checkpoints):
        return None
    publisher, failure = None, None
    if accelerator.is_main_process:
        repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
        try:
            publisher = HubPublisher(repo_id, token=args.hub_token, private=args.hub_private_repo)
        except Exception as error:  # HTTP, network and auth errors of huggingface_hub alike
            failure = f"cannot create the Hub repository {repo_id!r}: {one_line(error)}"
    raise_on_every_process(failure, SetupError)
    return publisher


def checkpoints_kept_for_uploads(accelerator, publisher, args) -> frozenset:
    """The checkpoints that the rotation leaves for their uploads (``HubPublisher.checkpoints_to_keep``),
    once uploads are at most ``--checkpoints_total_limit`` checkpoints behind, so that those stay
    as few as the limit; every process waits for that."""
    if not (args.push_checkpoints and args.checkpoints_total_limit):
        return frozenset()
    wait_on_every_process(accelerator, lambda: publisher.caught_up(args.checkpoints_total_limit))
    return publisher.checkpoints_to_keep() if accelerator.is_main_process else frozenset()


def validate(accelerator, args, models, unet, teacher_scheduler, step: int) -> None:
    """Sample the validation prompts with the EMA target and the online student (every process
    takes part: under FSDP2 the whole student is gathered)."""
    student = whole_student(accelerator, unet)
    failure = None
    if accelerator.is_main_process:
        try:
            log_validation(
                accelerator, {"target": models.target_unet, "online": student.to(accelerator.device)},
                models.vae, models.text_encoder, models.tokenizer,
                lcm_scheduler(teacher_scheduler.config, args.num_ddim_timesteps),
                args, step,
            )
        except OSError as error:  # a full disk, no permission
            failure = (f"could not write the validation images of step {step} into "
                       f"{os.path.join(args.output_dir, 'validation')} ({one_line(error)}): make room, then "
                       f"{relaunch_advice(args)}")
    raise_on_every_process(failure, CheckpointError)


def main(args):
    # ---- Set up ------------------------------------------------------------------------
    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    print_shared_messages_once(accelerator)
    for library in (transformers, diffusers):
        (library.utils.logging.set_verbosity_warning if accelerator.is_local_main_process
         else library.utils.logging.set_verbosity_error)()
    seed_training_rngs(args.seed)
    # Recorded as run (in the trackers' config and the model card), whether set by the flag or by the accelerate config.
    args.mixed_precision = accelerator.mixed_precision
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        logger.warning("accelerate runs fp16 on a CPU without autocast or grad scaling: this run computes in float32")
        args.mixed_precision = "no"

    # Everything that can be wrong with the command line is found before any weight is loaded.
    check_output_dir_is_not_the_teacher(args.output_dir, args.pretrained_teacher_model)
    prepare_output_dir(args.output_dir)
    check_accelerate_config(accelerator)
    check_fsdp_options(accelerator, args)
    configure_deepspeed(accelerator, args)
    check_optional_dependencies(args)
    shard_urls = train_shard_urls(args)
    # output_lock stays held while main runs: a second run into output_dir is refused.
    resume_path, resume_state, output_lock = claim_output_dir(accelerator, args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        logger.info(f"No checkpoint in {args.output_dir} to resume from: starting a new run.")
    if args.hub_token is not None:
        logger.warning("--hub_token is on the command line, which accelerate launch prints in full if this process "
                       "fails: prefer HF_TOKEN or `hf auth login`")
    global_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    # --scale_lr multiplies the rate by the global batch; the flags are recorded as given.
    learning_rate = args.learning_rate * global_batch_size if args.scale_lr else args.learning_rate
    if args.lr_scheduler == "polynomial" and learning_rate <= POLYNOMIAL_LR_END:
        raise SetupError(f"--lr_scheduler polynomial decays the learning rate to {POLYNOMIAL_LR_END}: "
                         f"it must start above that, got {learning_rate}")
    teacher_scheduler = load_teacher_scheduler(args)
    check_vae_config(args)
    if resume_path is not None:
        check_resumable(accelerator, args, resume_path, resume_state, optimizer_name(args))
    publisher = make_publisher(accelerator, args)

    args.max_train_steps = total_optimizer_steps(args, global_batch_size, resume_state)
    if resume_state is not None and resume_state["global_step"] > args.max_train_steps:
        raise SetupError(f"{resume_path} is at step {resume_state['global_step']}, past --max_train_steps="
                         f"{args.max_train_steps}: raise --max_train_steps, or resume from an earlier checkpoint")
    if publisher is not None and args.push_checkpoints:
        publisher.push_missing_checkpoints(list_checkpoints(args.output_dir))
    start_trackers(accelerator, args)
    note_trackers_without_images(accelerator)

    models = build_distillation_models(args, accelerator, teacher_scheduler)
    optimizer = make_optimizer(args, models.unet.parameters(), learning_rate)

    # What fixes the data stream: any change makes the batches after a resume differ from those
    # of an uninterrupted run.
    data_stream = {"batches_per_segment": args.checkpointing_steps * args.gradient_accumulation_steps,
                   "train_batch_size": args.train_batch_size,
                   "gradient_accumulation_steps": args.gradient_accumulation_steps,
                   "num_processes": accelerator.num_processes, "dataloader_num_workers": args.dataloader_num_workers,
                   "shuffle_buffer_size": args.shuffle_buffer_size, "seed": args.seed,
                   "shards": redact_tokens(args.train_latents_path_or_url or args.train_shards_path_or_url,
                                           known_tokens([args.hub_token]))}
    global_step, first_segment, samples_seen, data_stats, positions = 0, 0, 0, DataStats(), {}
    if resume_state is not None:
        global_step, first_segment = resume_state["global_step"], resume_state["data_segment"]
        samples_seen = resume_state["samples_seen"]
        if accelerator.is_main_process:  # the checkpoint holds all processes' counts
            data_stats.update(resume_state["data_stats"])
        changed = data_stream_changes(resume_state["data_stream"], data_stream)
        if changed:
            logger.warning(f"{', '.join(changed)} changed since the checkpoint: the data stream goes on differently "
                           "from an uninterrupted run's, so this resume is not exact")
        positions = resumed_reading_positions(resume_state, changed, resume_path)

    # The stream is cut into segments of one checkpoint interval, so a resume starts a segment. A
    # checkpoint must end a segment, or a resume from it would skip the rest of that segment's
    # batches: after a resume off this run's grid (--checkpointing_steps changed), the first segment
    # is cut short to end at the next checkpoint.
    batches_per_segment = data_stream["batches_per_segment"]
    first_segment_batches = (-global_step % args.checkpointing_steps) * args.gradient_accumulation_steps or batches_per_segment
    train_dataloader = make_train_dataloader(
        ShardStream(
            shard_urls,
            training_samples(args, models.tokenizer, models.text_encoder, models.vae),
            batch_size=args.train_batch_size,
            batches_per_segment=batches_per_segment,
            shuffle_buffer=args.shuffle_buffer_size,
            seed=0 if args.seed is None else args.seed,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            first_segment=first_segment,
            first_segment_batches=first_segment_batches,
            positions=positions,
        ),
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    # Where this process's readers read on: a checkpoint gathers them all.
    own_readers = readers_of_process(accelerator.process_index, args.dataloader_num_workers)
    reading_positions = {reader: position for reader, position in positions.items() if reader in own_readers}

    share_warning = unequal_shares_warning(len(shard_urls), accelerator.num_processes * len(own_readers))
    if share_warning:
        logger.warning(share_warning)

    # Stepped once per update taken (take_optimizer_step), not prepared: accelerate would step it
    # once per process, which ties its position to the process count and breaks a resume on another.
    lr_scheduler = make_lr_scheduler(args, optimizer)
    hyperparameters = optimizer_hyperparameters(optimizer)
    models.unet, optimizer = accelerator.prepare(models.unet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    unet, target_unet = models.unet, models.target_unet
    autocast = mixed_precision_autocast(accelerator)
    register_unet_hooks(accelerator, target_unet)

    if resume_state is not None:
        logger.info(f"Resuming from {resume_path}")
        changes = load_checkpoint(accelerator, resume_path, optimizer, lr_scheduler, hyperparameters)
        if changes:
            logger.warning(f"Optimizer settings changed since the checkpoint, this run's apply: {'; '.join(changes)}")
        if resume_state["max_train_steps"] != args.max_train_steps:
            logger.warning(f"The run now lasts {args.max_train_steps} optimizer steps, not {resume_state['max_train_steps']}: "
                           "the rest of the lr schedule is reshaped")

    if resume_state is not None and global_step % args.validation_steps == 0:
        # The checkpoint comes before its step's validation, so a run stopped while it sampled would
        # never sample that step: sampled again here, from the same weights, the same images.
        validate(accelerator, args, models, unet, teacher_scheduler, global_step)

    logger.info("***** Running SPLAM distillation *****")
    logger.info(f"  Batch size per process = {args.train_batch_size}, processes = {accelerator.num_processes}, "
                f"accumulation steps = {args.gradient_accumulation_steps}, global batch = {global_batch_size}")
    logger.info(f"  Optimizer steps = {args.max_train_steps}, starting at step {global_step}, learning rate = {learning_rate}")

    # ---- The loop ----------------------------------------------------------------------
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    batches_seen, nonfinite_in_a_row, update_loss = 0, 0, 0.0
    batches = train_batches(train_dataloader)
    while global_step < args.max_train_steps:
        if stop_signals:
            raise KeyboardInterrupt(stop_signals[0])
        inputs, conditioning, batch_stats, (reader, position) = next(batches)
        batches_seen += 1
        data_stats.update(batch_stats)
        reading_positions[reader] = position
        with accelerator.accumulate(unet):
            # 1. Latents z and prompt embeddings c. 2-7. The SPLAM loss (splam.training.splam_loss).
            latents, prompt_embeds = encode_batch(inputs, conditioning, models, args)
            loss = splam_loss(latents, prompt_embeds, models, args, autocast)
            accelerator.backward(loss)
            # The update's loss is the mean over its micro-batches: a NaN in any of them counts.
            update_loss = update_loss + loss.detach() / args.gradient_accumulation_steps
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                # The loss averaged over processes, the reduced gradient norm and the data counters
                # summed over processes, in one host sync: NaN or inf anywhere makes loss and norm so
                # everywhere, so every process takes the same decisions below (under FSDP2 they
                # include collectives).
                loss_value, grad_norm_value, (skipped, repaired, bad_shards) = read_step_values(
                    accelerator, update_loss, grad_norm, (data_stats.skipped(), data_stats.repaired(), data_stats.bad_shards())
                )
                update_loss = 0.0
                update_taken = take_optimizer_step(accelerator, optimizer, lr_scheduler, loss_value, grad_norm_value)

        if not accelerator.sync_gradients:
            continue
        # 8. The target follows the student, on every update that was taken.
        if update_taken:
            update_ema(target_unet.parameters(), accelerator.unwrap_model(unet).parameters(), args.ema_decay)
        # While the grad scaler settles, inf gradients are normal: only a non-finite loss counts then.
        step_is_finite = math.isfinite(loss_value) and (accelerator.scaler is not None or update_taken)
        global_step += 1
        samples_seen += global_batch_size
        progress_bar.update(1)
        nonfinite_in_a_row = 0 if step_is_finite else nonfinite_in_a_row + 1
        if nonfinite_in_a_row:
            logger.warning(f"Step {global_step}: non-finite loss or gradient, update skipped ({nonfinite_in_a_row} in a row)")
        logs = {"loss": loss_value, "lr": optimizer.param_groups[0]["lr"], "data/skipped": skipped, "data/repaired": repaired,
                "data/bad_shards": bad_shards}
        if grad_norm_value is not None:
            logs["grad_norm"] = grad_norm_value
        if accelerator.device.type == "cuda":
            logs["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30  # allocator statistics: no sync
        progress_bar.set_postfix(loss=logs["loss"], lr=logs["lr"])
        accelerator.log(logs, step=global_step)
        # After the step is logged: the trackers show every step the message counts.
        if nonfinite_in_a_row >= args.max_nonfinite_steps:
            raise NonFiniteError(
                f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (--max_nonfinite_steps); "
                "lower --learning_rate or check the teacher and the data"
            )

        if global_step % args.checkpointing_steps == 0:
            all_data_stats = data_stats.summed_over_processes()
            training_state = {
                "global_step": global_step,
                "data_segment": first_segment + 1 + math.ceil((batches_seen - first_segment_batches) / batches_per_segment),
                "data_stream": data_stream,
                "reading_positions": {str(reader): position for positions_of_a_process in gather_object([reading_positions])
                                      for reader, position in positions_of_a_process.items()},
                "samples_seen": samples_seen,
                "data_stats": dict(all_data_stats),
                "optimizer": optimizer_name(args),
                "max_train_steps": args.max_train_steps,
            }
            path = save_checkpoint(accelerator, args.output_dir, global_step, training_state, args.checkpoints_total_limit,
                                   checkpoints_kept_for_uploads(accelerator, publisher, args))
            logger.info(f"Saved {path}")
            if publisher is not None and args.push_checkpoints:
                publisher.push_checkpoint(path, global_step)
            if accelerator.num_processes > 1:
                checksums = accelerator.gather(ema_checksums(target_unet)[None])
                if not torch.equal(checksums, checksums[:1].expand_as(checksums)):
                    raise CheckpointError(f"the EMA target differs between processes at step {global_step}")
                logger.info(f"EMA target identical on all {accelerator.num_processes} processes")
            if all_data_stats.total():
                logger.info(f"Data so far: {all_data_stats.report()}")
        if global_step % args.validation_steps == 0:
            validate(accelerator, args, models, unet, teacher_scheduler, global_step)
    progress_bar.close()
    all_data_stats = data_stats.summed_over_processes()
    if all_data_stats.total():
        logger.info(f"Data in all: {all_data_stats.report()}")

    # ---- The distilled pipeline --------------------------------------------------------
    accelerator.wait_for_everyone()
    student = whole_student(accelerator, unet)
    if accelerator.is_main_process:
        # The frozen nets were cast for training; the published pipeline gets them afresh, in float32.
        tokenizer, text_encoder, vae = load_text_encoder_and_vae(args)
        try:
            export_pipeline(
                args, tokenizer, text_encoder, vae, target_unet, student,
                teacher_scheduler.config, global_step, samples_seen,
                repo_id=publisher.repo_id if args.push_to_hub else None,
            )
        except WRITE_ERRORS as error:
            raise CheckpointError(
                f"could not write the distilled pipeline into {args.output_dir} ({one_line(error)}): "
                f"make room, then {relaunch_advice(args)}, which writes it again"
            ) from error
        logger.info(f"Saved the distilled pipeline to {args.output_dir}")
    accelerator.end_training()  # the trackers' runs end as finished, whatever the uploads do
    if publisher is not None:
        publisher.wait_for_checkpoints()
    if accelerator.is_main_process:
        # Those kept for their uploads, and those over a limit lowered for a relaunch that saves none.
        finish_rotation()
        rotate_checkpoints(args.output_dir, args.checkpoints_total_limit)
    if publisher is not None and args.push_to_hub:
        logger.info(f"Uploaded the pipeline: {publisher.push_pipeline(args.output_dir)}")


def stop_on_signal(signum, frame):
    """SIGTERM (a pre-emption's warning) and SIGINT (Ctrl-C) stop the run with one error line, where
    Python's defaults die silently or print a traceback. KeyboardInterrupt, on which loader
    workers, which inherit this handler, leave quietly."""
    name = signal.Signals(signum).name
    stop_signals.append(name)
    raise KeyboardInterrupt(name)


def relaunch_advice(args) -> str:
    """How a relaunch goes on from where the run was. A run resumed from a checkpoint outside
    ``output_dir`` that has written none there yet goes on from that one again: ``latest`` would
    start afresh."""
    checkpoints = list_checkpoints(args.output_dir)
    if checkpoints:
        return f"relaunch with --resume_from_checkpoint=latest to go on from {checkpoints[-1]}"
    if args.resume_from_checkpoint not in (None, "latest"):
        return (f"relaunch with --resume_from_checkpoint={args.resume_from_checkpoint} to go on from it "
                f"(--output_dir {args.output_dir} holds no checkpoint yet)")
    return "relaunch with --resume_from_checkpoint=latest to go on from the start (no checkpoint yet)"


def stopped_message(signal_name: str, args) -> str:
    return f"stopped by {signal_name}: {relaunch_advice(args)}"


def error_line(error: Exception, args):
    """The one line a run that stops on ``error`` ends with, or ``None`` for a fault whose traceback
    is wanted. Once a stop signal has arrived, whatever breaks as it unwinds the run (a loader worker
    that the same signal ended, which the DataLoader reports as a RuntimeError) is the stop's doing."""
    if isinstance(error, KeyboardInterrupt) or stop_signals:
        return stopped_message(stop_signals[0] if stop_signals else "SIGINT", args)
    if isinstance(error, (SetupError, CheckpointError, NonFiniteError, HubError)):
        return str(error)
    if isinstance(error, DataError):
        # Raised in a loader worker, it arrives with the worker's traceback; its last line is the message.
        return str(error).strip().splitlines()[-1].removeprefix("splam.data.DataError: ")
    return None


if __name__ == "__main__":
    arguments = parse_args()
    sys.argv = redact_secrets(sys.argv)
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, stop_on_signal)
    try:
        main(arguments)
    except (Exception, KeyboardInterrupt) as error:
        line = error_line(error, arguments)
        if line is None:
            raise
        sys.exit(f"error: {line}")
