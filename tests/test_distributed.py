"""Distributed training: two processes (accelerate's MULTI_CPU over gloo, launched by torchrun), FSDP2 on
them, and DeepSpeed ZeRO-2 on one process."""

import io
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import webdataset as wds
from accelerate.utils import DistributedType
from PIL import Image
from torch.distributed.checkpoint.api import CheckpointException
from transformers import CLIPTokenizer

from splam.args import SetupError
from splam.checkpoints import CheckpointError, check_checkpoint_layout, check_resumable, load_checkpoint
from splam.data import ImageTextSamples, ImageTransform, ShardStream, data_stream_changes, make_train_dataloader, train_batches

from conftest import LEARNING_RATE, REPO_ROOT, RESOLUTION, WARMUP_STEPS, launch, logged_scalars, run_script, training_command


def keyed_shards(directory, num_shards=8, samples_per_shard=6):
    """Shards whose every sample has a unique caption, its key."""
    image = Image.new("RGB", (RESOLUTION, RESOLUTION), "gray")
    for shard in range(num_shards):
        with wds.TarWriter(os.path.join(directory, f"{shard:03d}.tar")) as writer:
            for index in range(samples_per_shard):
                key = f"s{shard}i{index}"
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                writer.write({"__key__": key, "png": buffer.getvalue(), "txt": key})
    return os.path.join(directory, "{000..%03d}.tar" % (num_shards - 1))


def test_processes_and_workers_read_disjoint_samples(tmp_path, tiny_teacher):
    """2 processes x 2 workers over 8 shards: no sample is read by two readers in the first steps."""
    urls = wds.shardlists.expand_urls(keyed_shards(str(tmp_path)))
    tokenizer = CLIPTokenizer.from_pretrained(tiny_teacher, subfolder="tokenizer")
    captions_by_process = []
    for process_index in range(2):
        stream = ShardStream(urls, ImageTextSamples(ImageTransform(RESOLUTION), tokenizer), batch_size=2,
                             batches_per_segment=4, shuffle_buffer=4, seed=3, process_index=process_index, num_processes=2)
        loader = make_train_dataloader(stream, num_workers=2, pin_memory=False)
        captions = []
        for _, (_, input_ids, _, _) in zip(range(6), train_batches(loader)):
            captions += [caption.replace(" ", "") for caption in tokenizer.batch_decode(input_ids, skip_special_tokens=True)]
        captions_by_process.append(captions)
    first, second = (set(captions) for captions in captions_by_process)
    assert len(first) > 4 and len(second) > 4
    assert not first & second
    shard_of = lambda caption: int(caption[1:caption.index("i")])  # noqa: E731
    assert {shard_of(c) % 4 for c in first} <= {0, 1} and {shard_of(c) % 4 for c in second} <= {2, 3}


def test_the_extra_batches_of_a_segment_go_to_every_worker_in_turn(tmp_path, tiny_teacher):
    """One batch per segment and two workers: in alternate segments each worker yields it, so the
    shards of both workers' shares are read."""
    urls = wds.shardlists.expand_urls(keyed_shards(str(tmp_path), num_shards=4))
    tokenizer = CLIPTokenizer.from_pretrained(tiny_teacher, subfolder="tokenizer")
    stream = ShardStream(urls, ImageTextSamples(ImageTransform(RESOLUTION), tokenizer), batch_size=2,
                         batches_per_segment=1, shuffle_buffer=4, seed=3)
    loader = make_train_dataloader(stream, num_workers=2, pin_memory=False)
    shards_read = set()
    for _, (_, input_ids, _, _) in zip(range(4), train_batches(loader)):
        shards_read |= {int(caption.replace(" ", "")[1:].split("i")[0])
                        for caption in tokenizer.batch_decode(input_ids, skip_special_tokens=True)}
    assert shards_read & {0, 2} and shards_read & {1, 3}


def torchrun(teacher, shards, output_dir, *flags, env=None, check=True):
    command = training_command(teacher, shards, output_dir, *flags)
    script_index = command.index("train_splam_distill_sd_wds.py")
    env = dict(os.environ, **(env or {}), ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command[script_index:], env=env)
    assert result.returncode == 0 or not check, result.stderr[-5000:]
    return result


SLOW_MAIN_PROCESS = """
import os, sys, time
import torch
sys.path.insert(0, {repo_root!r})
from splam.args import parse_args
from train_splam_distill_sd_wds import make_accelerator

# Both processes past their imports, whose time varies by seconds on a loaded machine, before the
# process group starts: its set-up waits no longer than the timeout either.
open(os.path.join({ready_dir!r}, os.environ["RANK"]), "w").close()
while len(os.listdir({ready_dir!r})) < 2:
    time.sleep(0.05)
accelerator = make_accelerator(parse_args(sys.argv[1:]))
gloo = torch.distributed.group.WORLD._get_backend(torch.device("cpu"))
print("timeout", gloo.options._timeout, flush=True)
{wait}
print("all arrived", flush=True)
"""
ONE_LONG_WAIT = """
if accelerator.is_main_process:
    time.sleep(10)  # as it does writing a checkpoint alone
accelerator.wait_for_everyone()
"""
WAIT_IN_SHORT_CALLS = """
from splam.sharding import wait_on_every_process
calls = []
def upload_done():  # 6 s in all, as an upload the main process waits for might take
    time.sleep(1)
    calls.append(None)
    return len(calls) == 6
wait_on_every_process(accelerator, upload_done)
"""


def launch_slow_main_process(tmp_path, timeout_seconds: int, wait: str):
    """``SLOW_MAIN_PROCESS`` on 2 processes, with ``--nccl_timeout`` and the main process's ``wait``."""
    run_dir = tmp_path / f"{timeout_seconds}-{abs(hash(wait))}"
    (run_dir / "ready").mkdir(parents=True)
    program = run_dir / "slow_main_process.py"
    program.write_text(SLOW_MAIN_PROCESS.format(repo_root=REPO_ROOT, ready_dir=str(run_dir / "ready"), wait=wait))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(program), "--pretrained_teacher_model=unused",
                      "--train_shards_path_or_url=unused", "--max_train_steps=1", f"--nccl_timeout={timeout_seconds}", env=env)


def test_nccl_timeout_is_how_long_a_collective_waits_for_the_other_processes(tmp_path):
    """The training script's accelerator on 2 processes: the others wait at a collective for a main
    process 10 s late; with --nccl_timeout=3 they give up, with 600 (accelerate's own default for
    NCCL, which its InitProcessGroupKwargs would leave out, and gloo's then 1800) they wait."""
    impatient = launch_slow_main_process(tmp_path, 3, ONE_LONG_WAIT)
    assert impatient.returncode != 0 and "Timed out waiting 3000ms" in impatient.stderr, impatient.stderr[-3000:]
    patient = launch_slow_main_process(tmp_path, 600, ONE_LONG_WAIT)
    assert patient.returncode == 0 and patient.stdout.count("all arrived") == 2, patient.stderr[-3000:]
    assert patient.stdout.count("0:10:00") == 2  # the two processes' prints may interleave


def test_a_wait_on_the_main_process_longer_than_the_timeout_passes_in_short_calls(tmp_path):
    """The main process waits 6 s for an upload (``checkpoints_kept_for_uploads``) while the
    collectives give up after 3: in calls of 1 s, the others never wait longer than that."""
    result = launch_slow_main_process(tmp_path, 3, WAIT_IN_SHORT_CALLS)
    assert result.returncode == 0 and result.stdout.count("all arrived") == 2, result.stderr[-3000:]


def test_two_processes_train_checkpoint_and_resume(tiny_teacher, tiny_shards, tmp_path):
    """Process 1's share of the shards is two corrupt files: it reads the others too, and what it
    skips is logged (by it alone) and checkpointed with process 0's counts. A set-up note, the same on
    every process (``--cast_teacher_unet`` without autocast), is printed once."""
    corrupt = [tmp_path / f"corrupt-{index}.tar" for index in range(2)]
    for path in corrupt:
        path.write_bytes(b"not a tar" * 300)
    good = wds.shardlists.expand_urls(tiny_shards)
    shards = "::".join([good[0], str(corrupt[0]), good[1], str(corrupt[1])])
    output_dir = str(tmp_path / "ddp")
    flags = ["--gradient_accumulation_steps=2", "--checkpointing_steps=2", "--checkpoints_total_limit=2",
             "--resume_from_checkpoint=latest", "--dataloader_num_workers=1", "--cast_teacher_unet"]
    first = torchrun(tiny_teacher, shards, output_dir, "--max_train_steps=4", *flags)
    assert "processes = 2, accumulation steps = 2, global batch = 8" in first.stderr
    assert first.stderr.count("EMA target identical on all 2 processes") == 2
    assert "reads from all of them" in first.stderr
    assert first.stderr.count("--cast_teacher_unet: the step computes in float32 here") == 1
    checkpoint = os.path.join(output_dir, "checkpoint-4")
    assert {"random_states_0.pkl", "random_states_1.pkl", "unet", "unet_target"} <= set(os.listdir(checkpoint))
    bad_shards = json.load(open(os.path.join(checkpoint, "training_state.json")))["data_stats"]["bad_shard"]
    assert bad_shards >= 4  # in each of the 2 segments both shards of its own share, before it falls back
    assert logged_scalars(output_dir, "data/bad_shards")[0][4] == bad_shards
    assert logged_scalars(output_dir, "data/skipped")[0][4] == 0
    assert f"Data in all: 0 samples skipped, 0 repaired, {bad_shards} shard readings stopped short" in first.stderr

    second = torchrun(tiny_teacher, shards, output_dir, "--max_train_steps=6", *flags)
    assert "Resuming from" in second.stderr and "checkpoint-4" in second.stderr
    assert second.stderr.count("EMA target identical on all 2 processes") == 1
    assert sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-6"]
    assert sorted(logged_scalars(output_dir, "loss")[-1]) == [5, 6]
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(output_dir)
    image = pipeline("a cat", num_inference_steps=2, guidance_scale=1, output_type="pt").images
    assert torch.isfinite(image).all()
    # Only the main process writes: one tensorboard run per launch, one exported pipeline.
    assert len(logged_scalars(output_dir, "loss")) == 2

    # On one process the lr schedule goes on where it was: it counts updates, not processes.
    third = launch(tiny_teacher, shards, output_dir, "--max_train_steps=7", *flags)
    assert "num_processes changed since the checkpoint" in third.stderr
    assert logged_scalars(output_dir, "lr")[-1] == {7: pytest.approx(LEARNING_RATE * 7 / WARMUP_STEPS)}


def fsdp_config_env():
    """The environment ``accelerate launch --config_file configs/fsdp.yaml`` gives its processes,
    plus the switch that lets accelerate take its FSDP path on CPUs (tests/fsdp_on_cpu)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    launch_args = launch_command_parser().parse_args(
        ["--config_file", os.path.join(REPO_ROOT, "configs", "fsdp.yaml"), "--num_processes", "2",
         "--mixed_precision", "no", "train_splam_distill_sd_wds.py"]
    )
    launch_args, _, _ = _validate_launch_command(launch_args)
    env = {name: value for name, value in prepare_multi_gpu_env(launch_args).items()
           if name.startswith(("FSDP_", "ACCELERATE_"))}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO_ROOT, "tests", "fsdp_on_cpu"), os.environ.get("PYTHONPATH", "")])
    return env


def test_fsdp2_trains_like_ddp_and_resumes(tiny_teacher, tiny_shards, tmp_path):
    """configs/fsdp.yaml on 2 CPU processes, through accelerate's FSDP2 code path: the student is
    sharded (accelerate's FSDP checkpoint files), a resume goes on from it, and the losses and the
    final EMA target match a DDP run of the same seed: the sharded EMA update, clipping and
    optimizer do the same math."""
    from diffusers import UNet2DConditionModel

    env = fsdp_config_env()
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    flags = ["--checkpointing_steps=2", "--resume_from_checkpoint=latest", "--validation_steps=2", "--max_grad_norm=0.01"]
    fsdp_dir, ddp_dir = str(tmp_path / "fsdp"), str(tmp_path / "ddp")
    first = torchrun(tiny_teacher, tiny_shards, fsdp_dir, "--max_train_steps=2", *flags, env=env)
    assert "Saving FSDP model" in first.stderr and "EMA target identical on all 2 processes" in first.stderr
    assert {"pytorch_model_fsdp_0", "optimizer_0", "unet", "unet_target"} <= set(os.listdir(os.path.join(fsdp_dir, "checkpoint-2")))
    assert len(os.listdir(os.path.join(fsdp_dir, "validation", "step-2"))) > 0
    second = torchrun(tiny_teacher, tiny_shards, fsdp_dir, "--max_train_steps=4", *flags, env=env)
    assert "Resuming from" in second.stderr and "checkpoint-2" in second.stderr and "Loading FSDP model" in second.stderr

    torchrun(tiny_teacher, tiny_shards, ddp_dir, "--max_train_steps=4", *flags)
    fsdp_losses = {step: loss for run in logged_scalars(fsdp_dir, "loss") for step, loss in run.items()}
    (ddp_losses,) = logged_scalars(ddp_dir, "loss")
    assert sorted(fsdp_losses) == sorted(ddp_losses) == [1, 2, 3, 4]
    assert all(abs(fsdp_losses[step] - ddp_losses[step]) <= 1e-4 * abs(ddp_losses[step]) for step in ddp_losses)
    # The logged gradient norm is the whole student's, before clipping, on the sharded run too.
    fsdp_norms = {step: norm for run in logged_scalars(fsdp_dir, "grad_norm") for step, norm in run.items()}
    (ddp_norms,) = logged_scalars(ddp_dir, "grad_norm")
    assert sorted(fsdp_norms) == sorted(ddp_norms) == [1, 2, 3, 4] and min(ddp_norms.values()) > 0.01
    assert all(abs(fsdp_norms[step] - ddp_norms[step]) <= 1e-3 * ddp_norms[step] for step in ddp_norms)
    for folder in ("unet", "unet_online"):
        fsdp_unet = UNet2DConditionModel.from_pretrained(fsdp_dir, subfolder=folder).state_dict()
        ddp_unet = UNet2DConditionModel.from_pretrained(ddp_dir, subfolder=folder).state_dict()
        assert fsdp_unet.keys() == ddp_unet.keys()
        assert all(torch.allclose(fsdp_unet[name], ddp_unet[name], rtol=1e-4, atol=1e-6) for name in ddp_unet), folder



def test_fsdp_refuses_8bit_adam_before_loading_weights(tiny_teacher, tiny_shards, tmp_path):
    result = torchrun(tiny_teacher, tiny_shards, str(tmp_path / "out"), "--max_train_steps=2", "--use_8bit_adam",
                      env=fsdp_config_env(), check=False)
    assert result.returncode != 0
    assert "error: --use_8bit_adam does not work under FSDP" in result.stderr
    assert "Loading weights" not in result.stderr


def test_a_hub_repository_that_cannot_be_created_stops_every_process_with_one_line(tiny_teacher, tiny_shards, tmp_path):
    """Only the main process creates it: the other one waited for it at the next collective and died
    there with gloo's traceback (under NCCL, after the collective timeout)."""
    result = torchrun(tiny_teacher, tiny_shards, str(tmp_path / "out"), "--max_train_steps=2", "--push_to_hub",
                      env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}, check=False)
    assert result.returncode != 0 and "[rank1]: Traceback" not in result.stderr, result.stderr[-5000:]
    assert "error: cannot create the Hub repository 'out'" in result.stderr
    assert "Loading weights" not in result.stderr


def test_validation_images_that_cannot_be_written_stop_every_process_with_one_line(tiny_teacher, tiny_shards, tmp_path):
    """Only the main process validates: the other one went on to the next step's collective and died
    there with gloo's traceback (under NCCL after the collective timeout). A checkpoint the main
    process fails to write stops them alike (splam.sharding.raise_on_every_process)."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "validation").write_text("")
    result = torchrun(tiny_teacher, tiny_shards, str(output_dir), "--max_train_steps=2", "--validation_steps=1",
                      "--validation_prompts", "a cat", check=False)
    assert result.returncode != 0 and "[rank1]: Traceback" not in result.stderr, result.stderr[-5000:]
    stops = [line for line in result.stderr.splitlines() if line.startswith("error: could not write the validation images")]
    assert len(stops) == 2, result.stderr[-5000:]


def deepspeed_launch(teacher, shards, output_dir, mixed_precision, *flags):
    """configs/deepspeed_zero2.yaml on one CPU process: DeepSpeed's CPU accelerator has no fp16,
    and accelerate counts one process per launch on a CPU under DeepSpeed."""
    command = training_command(teacher, shards, output_dir, *flags)
    launcher = ["-m", "accelerate.commands.launch", "--config_file", os.path.join(REPO_ROOT, "configs", "deepspeed_zero2.yaml"),
                "--num_processes", "1", "--mixed_precision", mixed_precision]
    result = run_script(*launcher, *command[command.index("train_splam_distill_sd_wds.py"):])
    assert result.returncode == 0, result.stderr[-5000:]
    return result


@pytest.mark.parametrize("section, flags", [("optimizer", "--learning_rate"), ("scheduler", "--lr_scheduler")])
def test_a_deepspeed_config_with_its_own_optimizer_or_schedule_is_refused(section, flags):
    """Its engine would step them as well as those the flags set (the config as accelerate holds it
    from a --deepspeed_config_file)."""
    from accelerate.utils import DistributedType

    from splam.args import SetupError
    from splam.sharding import configure_deepspeed

    config = {"zero_optimization": {"stage": 2}, section: {"type": "WarmupLR", "params": {}}}
    plugin = types.SimpleNamespace(deepspeed_config=config)
    accelerator = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1,
                                        state=types.SimpleNamespace(deepspeed_plugin=plugin))
    args = types.SimpleNamespace(train_batch_size=2, gradient_accumulation_steps=1, max_grad_norm=1.0)
    with pytest.raises(SetupError, match=f"remove the '{section}' section from the DeepSpeed config: set it with {flags}"):
        configure_deepspeed(accelerator, args)
    del config[section]
    configure_deepspeed(accelerator, args)
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_clipping"] == 1.0


def test_deepspeed_zero_stage_3_is_refused_and_stage_2_is_not():
    """Stage 3 partitions the student's parameters, which the EMA update reads whole; the config as
    accelerate's own plugin builds it from an accelerate config's ``zero_stage``."""
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from splam.args import SetupError
    from splam.sharding import configure_deepspeed

    def accelerator(plugin):
        return types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1,
                                     state=types.SimpleNamespace(deepspeed_plugin=plugin))

    args = types.SimpleNamespace(train_batch_size=2, gradient_accumulation_steps=1, max_grad_norm=1.0)
    with pytest.raises(SetupError, match="DeepSpeed ZeRO stage 3 is not supported .* use stage 2"):
        configure_deepspeed(accelerator(DeepSpeedPlugin(zero_stage=3)), args)
    stage_2 = DeepSpeedPlugin(zero_stage=2)
    configure_deepspeed(accelerator(stage_2), args)
    assert stage_2.deepspeed_config["train_micro_batch_size_per_gpu"] == 2


def test_the_deepspeed_configs_accumulation_and_clipping_give_way_to_the_flags_with_a_warning(caplog):
    """A config's gradient_accumulation_steps: 4 was replaced by the flag's default 1 without a word. A
    flag passed (here --max_grad_norm=0.5 over the shipped config's 1.0) needs none."""
    from accelerate.utils import DistributedType

    from splam.sharding import configure_deepspeed

    config = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4, "gradient_clipping": 1.0}
    accelerator = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                                        state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(deepspeed_config=config)))
    configure_deepspeed(accelerator, types.SimpleNamespace(train_batch_size=2, gradient_accumulation_steps=1, max_grad_norm=0.5))
    assert ("the DeepSpeed config's gradient_accumulation_steps: 4 is replaced by --gradient_accumulation_steps, left at "
            "its default 1: pass --gradient_accumulation_steps=4") in caplog.text
    assert "gradient_clipping" not in caplog.text
    assert config["gradient_accumulation_steps"] == 1 and config["train_batch_size"] == 4 and config["gradient_clipping"] == 0.5


def test_deepspeed_trains_like_a_plain_run_and_resumes_in_bf16(tiny_teacher, tiny_shards, tmp_path):
    """Under DeepSpeed ZeRO-2 the flags' batch size and clipping norm reach the engine (the
    config says 1.0; 0.01 clips every step here), so fp32 losses, gradient norms and both UNets
    match a plain run; in bf16 the engine's half-precision student trains with the fp32 EMA
    target under autocast, validates, checkpoints and resumes."""
    from diffusers import UNet2DConditionModel

    flags = ["--max_train_steps=4", "--max_grad_norm=0.01"]
    deepspeed_dir, plain_dir = str(tmp_path / "deepspeed"), str(tmp_path / "plain")
    deepspeed_launch(tiny_teacher, tiny_shards, deepspeed_dir, "no", *flags)
    result = run_script(*training_command(tiny_teacher, tiny_shards, plain_dir, *flags))
    assert result.returncode == 0, result.stderr[-3000:]
    for tag in ("loss", "grad_norm"):
        (deepspeed_values,), (plain_values,) = logged_scalars(deepspeed_dir, tag), logged_scalars(plain_dir, tag)
        assert sorted(deepspeed_values) == sorted(plain_values) == [1, 2, 3, 4]
        assert all(abs(deepspeed_values[step] - plain_values[step]) <= 1e-4 * abs(plain_values[step]) for step in plain_values)
    assert min(logged_scalars(plain_dir, "grad_norm")[0].values()) > 0.01
    for folder in ("unet", "unet_online"):
        deepspeed_unet = UNet2DConditionModel.from_pretrained(deepspeed_dir, subfolder=folder).state_dict()
        plain_unet = UNet2DConditionModel.from_pretrained(plain_dir, subfolder=folder).state_dict()
        for name, plain in plain_unet.items():
            assert (deepspeed_unet[name] - plain).abs().max() <= 1e-3 * plain.abs().max() + 1e-6, (folder, name)

    bf16_dir = str(tmp_path / "bf16")
    common = ["--checkpointing_steps=2", "--validation_steps=2", "--resume_from_checkpoint=latest"]
    deepspeed_launch(tiny_teacher, tiny_shards, bf16_dir, "bf16", "--max_train_steps=2", *common)
    second = deepspeed_launch(tiny_teacher, tiny_shards, bf16_dir, "bf16", "--max_train_steps=4", *common)
    assert "Resuming from" in second.stderr and "checkpoint-2" in second.stderr
    first_losses, second_losses = logged_scalars(bf16_dir, "loss")
    assert sorted(first_losses) == [1, 2] and sorted(second_losses) == [3, 4]
    assert all(torch.isfinite(torch.tensor(list({**first_losses, **second_losses}.values()))))
    assert len(os.listdir(os.path.join(bf16_dir, "validation", "step-4"))) > 0
    target = UNet2DConditionModel.from_pretrained(bf16_dir, subfolder="unet")
    assert {parameter.dtype for parameter in target.parameters()} == {torch.float32}


# A checkpoint written under one kind of distribution (FSDP, DeepSpeed, DDP or one process) and
# resumed under another is refused as such, before any weight loads, not called damaged; a damaged
# FSDP checkpoint is refused with one line like any other. No training: folders shaped like accelerate's,
# with the files its save_state writes for the student and the optimizer, by distribution (FSDP:
# sharded, full and local state dicts).
LAYOUTS = {
    DistributedType.FSDP: [["pytorch_model_fsdp_0/__0_0.distcp", "optimizer_0/__0_0.distcp"],
                           ["pytorch_model_fsdp.bin", "optimizer.bin"],
                           ["pytorch_model_fsdp_rank0.bin", "optimizer_0_rank0.bin"]],
    DistributedType.DEEPSPEED: [["pytorch_model/mp_rank_00_model_states.pt", "latest"]],
    DistributedType.MULTI_CPU: [["optimizer.bin"]],
}
WRITTEN = [(distributed_type, files) for distributed_type, layouts in LAYOUTS.items() for files in layouts]


def checkpoint(tmp_path, distributed_type, files=None):
    path = tmp_path / f"checkpoint-{distributed_type.value}"
    unets = [f"{net}/{name}" for net in ("unet", "unet_target")
             for name in ("config.json", "diffusion_pytorch_model.safetensors")]
    for name in (files or LAYOUTS[distributed_type][0]) + unets + ["training_state.json"]:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("{}")
    return str(path)


def accelerator_for(distributed_type, load_state=None):
    return types.SimpleNamespace(distributed_type=distributed_type, load_state=load_state, scaler=None, process_index=0)


@pytest.mark.parametrize("written, files", WRITTEN)
@pytest.mark.parametrize("running", list(LAYOUTS) + [DistributedType.NO, DistributedType.MULTI_GPU])
def test_a_checkpoint_of_another_distribution_is_refused_as_such(tmp_path, written, files, running):
    path = checkpoint(tmp_path, written, files)
    plain = {DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU}
    if written == running or {written, running} <= plain:
        check_checkpoint_layout(accelerator_for(running), path)  # DDP and one process read each other's
        return
    with pytest.raises(SetupError, match="was written under .*resume it with the accelerate config it was trained with") as error:
        check_checkpoint_layout(accelerator_for(running), path)
    assert "damaged" not in str(error.value)


@pytest.mark.parametrize("running", [DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MULTI_GPU])
def test_a_checkpoint_damaged_past_telling_its_distribution_is_left_to_the_damage_check(tmp_path, running):
    """Its student and optimizer files deleted: "damaged" (load_checkpoint's line), not "another distribution"."""
    check_checkpoint_layout(accelerator_for(running), checkpoint(tmp_path, DistributedType.NO, files=["random_states_0.pkl"]))
    sharded_fsdp_without_its_student = checkpoint(tmp_path, DistributedType.FSDP, files=["optimizer_0/__0_0.distcp"])
    check_checkpoint_layout(accelerator_for(DistributedType.FSDP), sharded_fsdp_without_its_student)


def test_a_checkpoint_of_another_optimizer_is_refused_before_the_weights_load(tiny_teacher, tmp_path):
    from splam.args import parse_args

    args = parse_args([f"--pretrained_teacher_model={tiny_teacher}", "--train_shards_path_or_url=unused.tar",
                       "--max_train_steps=1"])
    path = checkpoint(tmp_path, DistributedType.NO, files=["optimizer.bin"])
    check_resumable(accelerator_for(DistributedType.NO), args, path, {"optimizer": "AdamW"}, "AdamW")
    with pytest.raises(SetupError, match="was trained with AdamW8bit; resume it with the same --use_8bit_adam setting"):
        check_resumable(accelerator_for(DistributedType.NO), args, path, {"optimizer": "AdamW8bit"}, "AdamW")


def test_a_damaged_fsdp_checkpoint_is_refused_with_one_line(tmp_path):
    """torch.distributed.checkpoint reports missing shards as CheckpointException, a BaseException."""
    def load_state(path):
        raise CheckpointException("read_metadata", {0: (FileNotFoundError("no such file: __0_0.distcp"), None)})

    path = checkpoint(tmp_path, DistributedType.FSDP)
    torch.save({}, os.path.join(path, "random_states_0.pkl"))  # readable: the shards are what is damaged
    with pytest.raises(CheckpointError, match=f"cannot resume from {path}, which is damaged \\(no such file: __0_0.distcp\\)"):
        load_checkpoint(accelerator_for(DistributedType.FSDP, load_state), path, None, None, [])


# Without --seed every process still draws its own noise, sub-paths and gamma on the GPU: PyTorch
# seeds each process's CPU generator at random but every CUDA generator with one fixed number.
FIXED_CUDA_SEED = 67280421310721  # PyTorch's default_rng_seed_val, every fresh CUDA generator's seed

PROGRAM = """
import sys
import torch
sys.path.insert(0, {repo_root!r})
seeds = []
torch.cuda.manual_seed_all = seeds.append  # what the CUDA generators would be seeded with (none on this machine)
from train_splam_distill_sd_wds import seed_training_rngs
seed_training_rngs(None)
print(seeds[-1] if seeds else {fixed})
"""


def cuda_seed_of_a_fresh_process():
    program = PROGRAM.format(repo_root=REPO_ROOT, fixed=FIXED_CUDA_SEED)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split()[-1])


def test_without_a_seed_each_process_seeds_its_cuda_generators_apart():
    first, second = cuda_seed_of_a_fresh_process(), cuda_seed_of_a_fresh_process()
    assert FIXED_CUDA_SEED not in (first, second)
    assert first != second


# A resume names what changed in the data stream, and only that: no loader worker and one worker
# read the same stream, so switching between them keeps the resume exact and is not reported.
SAVED = {"batches_per_segment": 2, "train_batch_size": 2, "gradient_accumulation_steps": 1, "num_processes": 2,
         "dataloader_num_workers": 0, "shuffle_buffer_size": 1000, "seed": 1, "shards": "{000..002}.tar"}


def test_zero_and_one_loader_workers_read_the_same_stream(tiny_teacher, tiny_shards):
    urls = wds.shardlists.expand_urls(tiny_shards)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_teacher, subfolder="tokenizer")
    streams = []
    for num_workers in (0, 1):
        stream = ShardStream(urls, ImageTextSamples(ImageTransform(RESOLUTION), tokenizer), batch_size=2,
                             batches_per_segment=2, shuffle_buffer=8, seed=3, process_index=1, num_processes=2,
                             first_segment=1)
        loader = make_train_dataloader(stream, num_workers=num_workers, pin_memory=False)
        streams.append([batch[:2] for _, batch in zip(range(3), train_batches(loader))])
    for (pixels_0, ids_0), (pixels_1, ids_1) in zip(*streams):
        assert torch.equal(pixels_0, pixels_1) and torch.equal(ids_0, ids_1)
    assert data_stream_changes(SAVED, {**SAVED, "dataloader_num_workers": 1}) == []


def test_a_changed_setting_is_named():
    assert data_stream_changes(SAVED, {**SAVED, "dataloader_num_workers": 2}) == ["dataloader_num_workers"]
    assert data_stream_changes(SAVED, {**SAVED, "num_processes": 1, "seed": None}) == ["num_processes", "seed"]
