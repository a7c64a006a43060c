"""The student as one whole module, whether or not FSDP2 shards it, and the DeepSpeed settings
that follow the flags.

Under DDP and DeepSpeed ZeRO-2 every process holds the student's full parameters. Under
FSDP2 (``fsdp_version: 2``) each holds a shard: its parameters are DTensors, and whatever
reads the whole student (a checkpoint's ``unet/``, validation, the export) needs the
shards gathered first, by every process together. Only the student is sharded: the
teacher, the VAE, the text encoder and the EMA target stay whole on every process.

What one process alone does (the main one writes validation images, a checkpoint's UNets)
can fail there alone: ``raise_on_every_process`` stops the others with its message; it can
also take long there: ``wait_on_every_process`` keeps the others' collectives short meanwhile.
"""

import logging

import torch
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from diffusers import UNet2DConditionModel
from torch.distributed.fsdp import CPUOffloadPolicy
from torch.distributed.tensor import DTensor

from .args import SetupError, build_parser

logger = logging.getLogger(__name__)


def check_fsdp_options(accelerator, args) -> None:
    """Refuse what does not work with a sharded student: FSDP1 (its flat parameters have no
    per-tensor view of the whole student; FSDP2's DTensors have), bitsandbytes' 8-bit AdamW
    (it cannot step DTensors), channels-last weights (``fully_shard`` takes contiguous
    parameters only) and parameter offloading (untested: the EMA's gathers would run on CPU
    shards)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise SetupError("FSDP needs fsdp_version: 2 in the accelerate config (see configs/fsdp.yaml)")
    if args.use_8bit_adam:
        raise SetupError("--use_8bit_adam does not work under FSDP (bitsandbytes cannot step sharded parameters); "
                         "FSDP shards the AdamW states instead")
    if args.channels_last:
        raise SetupError("--channels_last does not work under FSDP2, which shards contiguous parameters only")
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise SetupError("fsdp_offload_params is not supported: set it to false (see configs/fsdp.yaml)")


def configure_deepspeed(accelerator, args) -> None:
    """Under DeepSpeed, hand its engine the flags' values of what it reads from its config: the
    batch sizes (accelerate derives them from a prepared dataloader, and the shard stream is not
    one), the accumulation steps and the clipping norm (the engine clips inside its step), saying
    so where the config sets them otherwise and the flag was left at its default (a value meant
    for the engine, lost); refuse a config that brings an optimizer or lr schedule of its own, and
    ZeRO stage 3, which partitions the student's parameters: the EMA update, validation and the
    UNets' saving read them whole."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("zero_optimization", {}).get("stage") == 3:
        raise SetupError("DeepSpeed ZeRO stage 3 is not supported (it partitions the student's parameters, which the EMA "
                         "target reads whole): use stage 2 (configs/deepspeed_zero2.yaml) or FSDP2 (configs/fsdp.yaml)")
    for section, flags in (("optimizer", "--learning_rate, --adam_*, --use_8bit_adam"), ("scheduler", "--lr_scheduler")):
        if section in config:
            # Its engine would step its own alongside this script's, which the flags set.
            raise SetupError(f"remove the {section!r} section from the DeepSpeed config: set it with {flags}")
    defaults = build_parser()
    for key, name in (("gradient_accumulation_steps", "gradient_accumulation_steps"), ("gradient_clipping", "max_grad_norm")):
        value = getattr(args, name)
        if config.get(key, "auto") not in ("auto", value) and value == defaults.get_default(name):
            logger.warning(f"the DeepSpeed config's {key}: {config[key]} is replaced by --{name}, left at its default "
                           f"{value}: pass --{name}={config[key]} for the config's")
    config.update(
        train_micro_batch_size_per_gpu=args.train_batch_size,
        train_batch_size=args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        gradient_clipping=args.max_grad_norm,
    )


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The full value of a possibly sharded tensor (a collective for a DTensor)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def whole_student(accelerator, unet):
    """The student as a plain ``UNet2DConditionModel``: the unwrapped module itself where it is
    whole; under FSDP2 a float32 copy on the CPU, gathered by all processes and returned on the
    main one (``None`` elsewhere). Every process must call it."""
    student = accelerator.unwrap_model(unet)
    if not any(isinstance(parameter, DTensor) for parameter in student.parameters()):
        return student
    state_dict = accelerator.get_state_dict(unet)
    if not accelerator.is_main_process:
        return None
    with torch.device("meta"):
        copy = UNet2DConditionModel.from_config(student.config)
    copy.load_state_dict(state_dict, assign=True)
    return copy.float()


def wait_on_every_process(accelerator, done_on_main) -> None:
    """Wait on every process until ``done_on_main()``, called on the main process alone, returns
    True; each call should wait there a minute at most. The other processes wait for each answer
    at a collective, so however long the main process waits in all (an upload), no collective
    waits longer than one call: a single wait would fail them after the collectives' timeout."""
    while True:
        done = [done_on_main() if accelerator.is_main_process else None]
        broadcast_object_list(done)
        if done[0]:
            return


def raise_on_every_process(failure, error_class) -> None:
    """Raise ``error_class(failure)`` on every process where any process reports a failure (its
    message; ``None`` where all went well there), the first process's failure if several do. A
    collective, to call on every process: where one process stopped alone, the others would wait
    for it at the next collective and die with the backend's traceback (under NCCL after its
    timeout, 10 minutes by default)."""
    failures = [message for message in gather_object([failure]) if message is not None]
    if failures:
        raise error_class(failures[0])
