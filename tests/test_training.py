"""End to end: ``accelerate launch train_splam_distill_sd_wds.py`` on the tiny world."""

import glob
import os
import re
import shlex

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, UNet2DConditionModel

from splam.args import parse_args, public_config, redact_secrets

from conftest import LEARNING_RATE, REPO_ROOT, RESOLUTION, WARMUP_STEPS, launch, logged_scalars, run_script

@pytest.mark.parametrize("grad_norm", [torch.tensor(2.5), 2.5, None], ids=["tensor", "deepspeed float", "none"])
def test_loss_and_grad_norm_are_read_back_from_any_norm_accelerate_returns(grad_norm):
    from accelerate import Accelerator

    from splam.training import read_step_values

    loss = torch.tensor(0.75, requires_grad=True) * 1.0
    loss_value, grad_norm_value, counts = read_step_values(Accelerator(cpu=True), loss, grad_norm, (3, 0))
    assert loss_value == 0.75 and grad_norm_value == (None if grad_norm is None else 2.5) and counts == [3, 0]


@pytest.mark.parametrize("grad_scaler", [False, True], ids=["fp32", "fp16 grad scaler and fused AdamW"])
def test_an_update_with_non_finite_gradients_is_skipped_and_said_so(grad_scaler):
    """With a grad scaler and a fused AdamW the skip happens inside the kernel, where accelerate's
    ``optimizer_step_was_skipped`` cannot see it: the lr schedule (and the EMA) must still not move."""
    from accelerate import Accelerator

    from splam.training import read_step_values, take_optimizer_step

    accelerator = Accelerator(cpu=True)
    if grad_scaler:
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # what accelerate makes for fp16 on CUDA
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    def step(first_input: float) -> bool:
        loss = model(torch.tensor([[first_input, 1.0, 1.0]])).sum()
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
        loss_value, grad_norm_value, _ = read_step_values(accelerator, loss, grad_norm)
        return take_optimizer_step(accelerator, optimizer, lr_scheduler, loss_value, grad_norm_value)

    before = model.weight.detach().clone()
    assert step(float("inf")) is False
    assert torch.equal(model.weight, before) and lr_scheduler.scheduler.last_epoch == 0
    assert step(1.0) is True
    assert not torch.equal(model.weight, before) and lr_scheduler.scheduler.last_epoch == 1
    if grad_scaler:
        assert accelerator.scaler.get_scale() == 512.0


def linear_model_checkpoint(accelerator, path, micro_batches_done=0):
    """An accelerate checkpoint of a linear model at ``path``, with the folders the training script's
    save hooks add: ``(model, optimizer, lr_scheduler, hyperparameters)``, prepared."""
    from splam.checkpoints import optimizer_hyperparameters

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    hyperparameters = optimizer_hyperparameters(optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    accelerator.step = micro_batches_done
    accelerator.save_state(str(path))
    for net in ("unet", "unet_target"):  # what the checks before loading look for
        (path / net).mkdir()
        (path / net / "config.json").write_text("{}")
        (path / net / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return model, optimizer, lr_scheduler, hyperparameters


def test_a_resume_starts_a_whole_update_whatever_the_saved_accumulation(tmp_path):
    """accelerate saves its micro-batch count; a checkpoint of a run with 2 accumulation steps
    holds a multiple of 2 that, restored into a run with 3, would end the first update after
    one micro-batch instead of three."""
    from accelerate import Accelerator
    from accelerate.state import GradientState

    from splam.checkpoints import load_checkpoint

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    # Two updates of two micro-batches.
    model, optimizer, lr_scheduler, hyperparameters = linear_model_checkpoint(accelerator, tmp_path / "checkpoint", 4)
    try:
        load_checkpoint(accelerator, str(tmp_path / "checkpoint"), optimizer, lr_scheduler, hyperparameters)
        micro_batches = 0
        while True:
            micro_batches += 1
            with accelerator.accumulate(model):
                accelerator.backward(model(torch.ones(1, 2)).sum())
            if accelerator.sync_gradients:
                break
        assert micro_batches == 3
    finally:
        GradientState._reset_state()  # the other tests' accelerators accumulate nothing


def test_a_checkpoint_of_a_run_without_grad_scaler_resumes_under_fp16(tmp_path):
    """A bf16 or fp32 run's checkpoint has no scaler.pt; resumed under fp16 (on a GPU, where
    accelerate makes a grad scaler), load_state asked for it, and the checkpoint was called damaged."""
    from accelerate import Accelerator

    from splam.checkpoints import load_checkpoint

    accelerator = Accelerator(cpu=True)
    _, optimizer, lr_scheduler, hyperparameters = linear_model_checkpoint(accelerator, tmp_path / "checkpoint")
    scaler = accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # what accelerate makes for fp16 on CUDA
    changes = load_checkpoint(accelerator, str(tmp_path / "checkpoint"), optimizer, lr_scheduler, hyperparameters)
    assert accelerator.scaler is scaler and scaler.get_scale() == 1024.0
    assert changes == ["fp16's grad scaler, from its initial scale 1024 (the checkpoint's run had none: bf16 or fp32)"]


def test_a_checkpoint_whose_rng_state_is_cut_short_or_missing_is_refused_as_damaged(tmp_path):
    """accelerate's load_state notes an RNG state it cannot read at the info level and goes on: the
    resume silently drew other noise than the run that never stopped. A process the checkpoint's run
    did not have (a resume on more processes) has no RNG state to restore."""
    from accelerate import Accelerator

    from splam.checkpoints import CheckpointError, load_checkpoint, rng_state_damage

    accelerator = Accelerator(cpu=True)
    checkpoint = tmp_path / "checkpoint"
    _, optimizer, lr_scheduler, hyperparameters = linear_model_checkpoint(accelerator, checkpoint)
    assert rng_state_damage(str(checkpoint), 1) is None
    rng_state = checkpoint / "random_states_0.pkl"
    os.truncate(rng_state, rng_state.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"which is damaged \(random_states_0.pkl: "):
        load_checkpoint(accelerator, str(checkpoint), optimizer, lr_scheduler, hyperparameters)
    rng_state.unlink()
    assert rng_state_damage(str(checkpoint), 0) == "no random_states_0.pkl"


@pytest.mark.parametrize("resume_state, expected", [
    (None, 7),  # 2 epochs of 10 samples in batches of 3: ceil(20 / 3)
    ({"global_step": 4, "samples_seen": 12}, 7),  # the same batches after a resume
    ({"global_step": 2, "samples_seen": 16}, 4),  # 2 steps of 8 before the resume: 4 samples to go
    ({"global_step": 5, "samples_seen": 40}, 5),  # nothing to go: the run ends where it is
])
def test_a_run_measured_in_samples_ends_after_them_across_batch_sizes(resume_state, expected):
    from argparse import Namespace

    from splam.training import total_optimizer_steps

    args = Namespace(max_train_steps=None, num_train_epochs=2, max_train_samples=10)
    assert total_optimizer_steps(args, 3, resume_state) == expected
    assert total_optimizer_steps(Namespace(max_train_steps=9), 3, resume_state) == 9


@pytest.mark.parametrize("warmup_steps", [1, 3, 5])
def test_a_polynomial_schedule_reaches_the_end_of_a_run_that_warms_up_all_along(warmup_steps, caplog):
    """diffusers' polynomial schedule divided by zero after the last update of a run whose warm-up
    is as long (3 steps of 3: the run died before its last checkpoint and export), and on a resume
    at that step; a shorter warm-up's schedule is diffusers' own. A warm-up as long as the run is
    warned of (a short run with the default 500 warm-up steps never reached its rate without a word)."""
    from argparse import Namespace

    from diffusers.optimization import get_scheduler

    from splam.checkpoints import apply_hyperparameters, optimizer_hyperparameters
    from splam.training import make_lr_scheduler

    def update_rates(lr_scheduler):
        optimizer = lr_scheduler.optimizer
        rates = []
        for _ in range(3):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            lr_scheduler.step()
        return rates

    def optimizer():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)

    args = Namespace(lr_scheduler="polynomial", lr_warmup_steps=warmup_steps, max_train_steps=3, lr_num_cycles=1,
                     lr_power=1.0)
    with caplog.at_level("WARNING"):
        lr_scheduler = make_lr_scheduler(args, optimizer())
    warned = f"--lr_warmup_steps {warmup_steps} is not shorter than the run's 3 optimizer steps: --lr_scheduler polynomial"
    assert (warned in caplog.text) == (warmup_steps >= 3)
    rates = update_rates(lr_scheduler)
    if warmup_steps < args.max_train_steps:
        assert rates == update_rates(get_scheduler("polynomial", optimizer=optimizer(), num_warmup_steps=warmup_steps,
                                                   num_training_steps=args.max_train_steps))
    else:
        assert rates == pytest.approx([1e-4 * step / warmup_steps for step in range(3)])
    apply_hyperparameters(lr_scheduler.optimizer, lr_scheduler, optimizer_hyperparameters(lr_scheduler.optimizer))


def test_8bit_adamw_takes_bitsandbytes_updates_without_its_device_waits(monkeypatch):
    """The same weights and states as bitsandbytes' own AdamW8bit over three steps, for tensors
    with 8-bit states (4096 elements and more), with 32-bit ones and without a gradient, while
    bitsandbytes' own step waits for the device once per updated tensor and ours never does
    (bitsandbytes' CPU path; the waits are its ``sync_gpu``). Paged states keep the waits."""
    import bitsandbytes as bnb
    import bitsandbytes.optim.optimizer

    from splam.adamw8bit import AdamW8bit

    waits = []
    monkeypatch.setattr(bitsandbytes.optim.optimizer, "sync_gpu", waits.append)
    generator = torch.Generator().manual_seed(0)
    initial = [torch.randn(64, 96, generator=generator), torch.randn(96, generator=generator), torch.randn(8, generator=generator)]
    gradients = [[torch.randn_like(param) for param in initial[:2]] for _ in range(3)]

    def train(optimizer_class, **options):
        params = [param.clone().requires_grad_() for param in initial]
        optimizer = optimizer_class(params, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8, **options)
        waits.clear()
        for step_gradients in gradients:
            for param, gradient in zip(params, step_gradients):
                param.grad = gradient.clone()
            optimizer.step()
        return params, optimizer, len(waits)

    reference, reference_optimizer, reference_waits = train(bnb.optim.AdamW8bit)
    ours, our_optimizer, our_waits = train(AdamW8bit)
    assert reference_waits == 3 * 2 and our_waits == 0
    assert our_optimizer.state[ours[0]]["state1"].dtype == torch.uint8
    assert our_optimizer.state[ours[1]]["state1"].dtype == torch.float32
    assert torch.equal(ours[2], initial[2]) and not our_optimizer.state[ours[2]]
    for theirs, mine, start in zip(reference[:2], ours[:2], initial):
        assert not torch.equal(mine, start) and torch.equal(theirs, mine)
        for key, value in reference_optimizer.state[theirs].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(our_optimizer.state[mine][key])), key
    assert train(AdamW8bit, is_paged=True)[2] >= 3 * 2


def unet_weights(path):
    return UNet2DConditionModel.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def resumed_run(tiny_teacher, tiny_shards, tmp_path_factory):
    """4 steps with a checkpoint every 2 (limit 1), then a resume from `latest` to 6 steps with
    twice the learning rate and batches of 3 instead of 2."""
    output_dir = str(tmp_path_factory.mktemp("run") / "splam")
    common = ["--checkpointing_steps=2", "--checkpoints_total_limit=1", "--resume_from_checkpoint=latest"]
    first = launch(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=4", *common)
    after_first = sorted(os.listdir(output_dir))
    second = launch(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=6", *common,
                    f"--learning_rate={2 * LEARNING_RATE}", "--train_batch_size=3")
    return output_dir, first, second, after_first


def test_checkpoints_are_written_and_rotated(resumed_run):
    output_dir, first, _, after_first = resumed_run
    assert "No checkpoint" in first.stderr and "starting a new run" in first.stderr
    assert [name for name in after_first if name.startswith("checkpoint")] == ["checkpoint-4"]
    assert [name for name in os.listdir(output_dir) if "checkpoint" in name] == ["checkpoint-6"]
    checkpoint = os.path.join(output_dir, "checkpoint-6")
    for name in ("unet", "unet_target", "optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"):
        assert os.path.exists(os.path.join(checkpoint, name)), name


def test_resume_continues_the_step_and_the_lr_schedule_at_the_new_rate(resumed_run):
    output_dir, _, second, _ = resumed_run
    assert re.search(r"Resuming from .*checkpoint-4", second.stderr)
    assert f"this run's apply: learning rate {LEARNING_RATE} -> {2 * LEARNING_RATE}" in second.stderr
    assert "train_batch_size changed since the checkpoint" in second.stderr
    assert "The run now lasts 6 optimizer steps, not 4: the rest of the lr schedule is reshaped" in second.stderr
    first_losses, second_losses = logged_scalars(output_dir, "loss")
    assert sorted(first_losses) == [1, 2, 3, 4]
    assert sorted(second_losses) == [5, 6]
    assert all(np.isfinite(list(second_losses.values())))
    # constant_with_warmup: lr = base * step / warmup; a reset schedule would log base / warmup at
    # step 5, and one that kept the checkpoint's base LEARNING_RATE * 5 / warmup.
    _, second_lrs = logged_scalars(output_dir, "lr")
    assert second_lrs[5] == pytest.approx(2 * LEARNING_RATE * 5 / WARMUP_STEPS)


def test_output_is_an_lcm_pipeline_whose_unet_is_the_ema_target(resumed_run):
    output_dir, _, _, _ = resumed_run
    pipeline = DiffusionPipeline.from_pretrained(output_dir)
    assert type(pipeline).__name__ == "LatentConsistencyModelPipeline"
    assert isinstance(pipeline.scheduler, LCMScheduler)
    assert pipeline.scheduler.config.original_inference_steps == 50
    assert pipeline.unet.config.time_cond_proj_dim == 256
    target = unet_weights(os.path.join(output_dir, "checkpoint-6", "unet_target"))
    online = unet_weights(os.path.join(output_dir, "checkpoint-6", "unet"))
    exported = pipeline.unet.state_dict()
    assert all(torch.equal(exported[name], target[name]) for name in target)
    assert not all(torch.equal(exported[name], online[name]) for name in online)
    exported_online = unet_weights(os.path.join(output_dir, "unet_online"))
    assert all(torch.equal(exported_online[name], online[name]) for name in online)

    image = pipeline(
        prompt="a cup of coffee", num_inference_steps=2, guidance_scale=1, original_inference_steps=50, output_type="np"
    ).images[0]
    assert image.shape == (RESOLUTION, RESOLUTION, 3) and np.isfinite(image).all()
    card = open(os.path.join(output_dir, "README.md"), encoding="utf-8").read()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "- splam" in card
    assert "6 optimizer steps (14 samples seen)" in card and "| `w_scale` | `8.0` |" in card


def test_fp16_8bit_adam_wandb_validation_and_no_secret_leaks(tiny_teacher, tiny_shards, tmp_path):
    output_dir = str(tmp_path / "fp16")
    env = {key: value for key, value in os.environ.items() if key != "WANDB_DIR"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_TOKEN="hf_EnvironmentTokenThatMustNotLeak")
    # The shard command carries credentials, as a gated dataset's curl command does (cat ignores them).
    basic = "dXNlcjpwYXNzd29yZA=="
    shards = (f"pipe:cat {tiny_shards} # -H 'Authorization: Basic {basic}' "
              "-H 'X-Token: hf_EnvironmentTokenThatMustNotLeak'")
    result = launch(
        tiny_teacher, shards, output_dir,
        "--mixed_precision=fp16", "--use_8bit_adam", "--report_to=tensorboard,wandb", "--max_train_steps=2",
        "--checkpointing_steps=2", "--validation_steps=2", "--validation_prompts", "a cat", "a rocket",
        "--hub_token=hf_SecretTokenThatMustNotLeak",
        env=env,
    )
    images = sorted(os.listdir(os.path.join(output_dir, "validation", "step-2")))
    assert images == sorted(f"{net}-{steps}step-{i}.png" for net in ("online", "target") for steps in (1, 2, 4) for i in (0, 1))
    # accelerate computes fp16 in float32 on a CPU: said, and recorded so.
    assert "this run computes in float32" in result.stderr
    assert "| `mixed_precision` | `no` |" in open(os.path.join(output_dir, "README.md")).read()
    # Without WANDB_DIR, wandb's run goes beside tensorboard's logs, not into the working directory.
    wandb_runs = glob.glob(os.path.join(output_dir, "logs", "wandb", "offline-run-*"))
    assert len(wandb_runs) == 1
    run_record = open(glob.glob(os.path.join(wandb_runs[0], "run-*.wandb"))[0], "rb").read()
    assert b"w_scale" in run_record and b"validation/target/2-step" in run_record
    assert glob.glob(os.path.join(wandb_runs[0], "files", "media", "images", "validation", "target", "*.png"))
    optimizer_state = torch.load(os.path.join(output_dir, "checkpoint-2", "optimizer.bin"), weights_only=False)["state"]
    # bitsandbytes keeps 8-bit states (uint8 plus block-wise absmax) for tensors of 4096 elements and more.
    first_moments = [state["__bnb_optimizer_quant_state__"]["state1"] for state in optimizer_state.values()]
    assert any(moment.dtype == torch.uint8 for moment in first_moments)
    assert logged_scalars(output_dir, "loss")[0].keys() == {1, 2}
    # Secrets: neither token is in anything the run wrote or printed.
    written = [open(path, "rb").read() for path in glob.glob(os.path.join(str(tmp_path), "**", "*"), recursive=True)
               if os.path.isfile(path)]
    for secret in (b"hf_SecretTokenThatMustNotLeak", b"hf_EnvironmentTokenThatMustNotLeak", basic.encode()):
        assert not any(secret in content for content in written)
        assert secret.decode() not in result.stdout + result.stderr


def test_missing_xformers_falls_back_to_pytorch_attention_with_a_warning(tiny_teacher, tiny_shards, tmp_path):
    """The authors' command has the flag; xformers is not installed here. The run goes on (to the
    missing teacher, which stops it cheaply) after saying which attention it uses."""
    result = run_script(
        "train_splam_distill_sd_wds.py", f"--pretrained_teacher_model={tmp_path}/no-such-teacher",
        f"--train_shards_path_or_url={tiny_shards}", f"--output_dir={tmp_path}/out", "--max_train_steps=1",
        "--enable_xformers_memory_efficient_attention",
    )
    assert "xformers is not installed, so PyTorch's scaled-dot-product attention is used" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot load the teacher")


def test_non_epsilon_teacher_is_refused(tiny_teacher, tiny_shards, tmp_path):
    import shutil

    teacher = str(tmp_path / "v-teacher")
    shutil.copytree(tiny_teacher, teacher)
    config_path = os.path.join(teacher, "scheduler", "scheduler_config.json")
    config = open(config_path).read().replace('"epsilon"', '"v_prediction"')
    open(config_path, "w").write(config)
    result = run_script(
        "train_splam_distill_sd_wds.py", f"--pretrained_teacher_model={teacher}",
        f"--train_shards_path_or_url={tiny_shards}", f"--output_dir={tmp_path}/out", "--max_train_steps=1",
    )
    assert result.returncode != 0
    assert "v_prediction" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr


@pytest.mark.parametrize("schedule, unet, expected", [
    ({"beta_schedule": "sigmoid"}, {}, "LCMScheduler cannot follow the teacher's schedule"),
    ({"rescale_betas_zero_snr": True}, {}, "ends at zero signal"),
    ({"num_train_timesteps": 40}, {}, "--num_ddim_timesteps 50 exceeds the teacher's 40 training timesteps"),
    ({}, {"addition_embed_type": "text_time"}, "takes added embeddings (addition_embed_type 'text_time', as SDXL's does)"),
])
def test_teachers_outside_the_method_are_refused_before_weights(schedule, unet, expected, tiny_teacher, tmp_path):
    """Only the configs exist: the refusal comes before any weight would be read."""
    import json

    from diffusers import DDPMScheduler

    from splam.args import SetupError
    from splam.models import load_teacher_scheduler

    DDPMScheduler(**schedule).save_pretrained(tmp_path / "scheduler")
    unet_config = json.load(open(os.path.join(tiny_teacher, "unet", "config.json")))
    os.makedirs(tmp_path / "unet")
    json.dump({**unet_config, **unet}, open(tmp_path / "unet" / "config.json", "w"))
    args = parse_args([f"--pretrained_teacher_model={tmp_path}", "--output_dir=unused",
                       f"--train_shards_path_or_url={tmp_path}/unused.tar", "--max_train_steps=1"])
    with pytest.raises(SetupError, match=re.escape(expected)):
        load_teacher_scheduler(args)


def test_a_vae_whose_latents_the_teacher_cannot_take_is_refused_before_weights(tiny_teacher, tmp_path):
    """An SD3 or FLUX VAE (16 latent channels) given to an SD 1.5 teacher failed at the first step, after
    every weight had loaded, with a traceback. Only its config exists here."""
    import json

    from splam.args import SetupError
    from splam.models import check_vae_config

    vae_config = json.load(open(os.path.join(tiny_teacher, "vae", "config.json")))
    os.makedirs(tmp_path / "vae")
    json.dump({**vae_config, "latent_channels": 16}, open(tmp_path / "vae" / "config.json", "w"))
    args = parse_args([f"--pretrained_teacher_model={tiny_teacher}", f"--pretrained_vae_model_name_or_path={tmp_path}/vae",
                       f"--train_shards_path_or_url={tmp_path}/unused.tar", "--max_train_steps=1"])
    with pytest.raises(SetupError, match="makes latents of 16 channels, the teacher's UNet takes 4"):
        check_vae_config(args)
    args.pretrained_vae_model_name_or_path = os.path.join(tiny_teacher, "vae")
    check_vae_config(args)


def test_a_teacher_stored_in_float16_is_loaded_in_float32_with_or_without_a_variant(tiny_teacher, tmp_path):
    """transformers 5 keeps a text encoder in the dtype it was saved in; the export would then
    mix a float16 text encoder with float32 nets and fail after the whole training."""
    from diffusers import StableDiffusionPipeline

    from splam.args import SetupError
    from splam.models import load_teacher_unet, load_text_encoder_and_vae

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_teacher, torch_dtype=torch.float16)
    pipeline.save_pretrained(tmp_path / "plain")
    pipeline.save_pretrained(tmp_path / "fp16-only", variant="fp16")

    def teacher_args(folder, *flags):
        return parse_args([f"--pretrained_teacher_model={tmp_path / folder}", "--output_dir=unused",
                           "--train_shards_path_or_url=unused.tar", "--max_train_steps=1", *flags])

    for args in (teacher_args("plain"), teacher_args("fp16-only", "--variant=fp16")):
        _, text_encoder, vae = load_text_encoder_and_vae(args)
        for net in (text_encoder, vae, load_teacher_unet(args)):
            assert {parameter.dtype for parameter in net.parameters()} == {torch.float32}
    with pytest.raises(SetupError, match=re.escape("text_encoder from") + ".*" + re.escape("it holds weights of variant fp16 (pass --variant)")):
        load_text_encoder_and_vae(teacher_args("fp16-only"))


def test_the_readme_training_command_parses_unchanged():
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    command = re.search(r"accelerate launch train_splam_distill_sd_wds\.py \\\n(.*?)```", readme, re.S).group(1)
    argv = shlex.split(command.replace("\\\n", " ").replace("$MODEL_NAME", "m").replace("$OUTPUT_DIR", "o"))
    args = parse_args(argv)
    assert args.use_8bit_adam and args.push_to_hub and args.gradient_checkpointing
    assert args.resume_from_checkpoint == "latest" and args.report_to == "wandb" and args.loss_type == "huber"
    assert args.train_shards_path_or_url.startswith("pipe:curl")
    assert args.unet_time_cond_proj_dim == 256 and args.w_scale == 8.0 and args.num_ddim_timesteps == 50


def test_public_config_drops_the_hub_token():
    args = parse_args(["--pretrained_teacher_model=t", "--train_shards_path_or_url=s", "--max_train_steps=1", "--hub_token=secret"])
    config = public_config(args)
    assert "hub_token" not in config and "secret" not in str(config)
    assert isinstance(config["validation_prompts"], str)


def test_redact_secrets_hides_both_spellings_of_the_token():
    argv = ["train.py", "--hub_token", "abc", "--seed=1", "--hub_token=xyz", "--output_dir", "o"]
    assert redact_secrets(argv) == ["train.py", "--hub_token", "***", "--seed=1", "--hub_token=***", "--output_dir", "o"]


def test_the_readme_inference_snippet_samples_the_output(resumed_run):
    output_dir, _, _, _ = resumed_run
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    snippet = re.search(r"## Inference.*?```python\n(.*?)```", readme, re.S).group(1)
    snippet = snippet.replace('"path/to/saved/model"', repr(output_dir)).replace('"cuda"', '"cpu"')
    namespace = {}
    exec(snippet, namespace)
    image = np.asarray(namespace["images"][0])
    assert image.shape == (RESOLUTION, RESOLUTION, 3) and image.std() > 0
    # The seed's pipe.to(torch_device=..., torch_dtype=...) would have left it in float32.
    assert namespace["pipe"].unet.dtype == namespace["pipe"].text_encoder.dtype == torch.float16
    # The seed README's old argument name still runs (today's pipeline ignores it).
    assert namespace["pipe"](prompt="a cat", num_inference_steps=1, guidance_scale=1, lcm_origin_steps=50).images


@pytest.mark.parametrize("init", ["random", "zero"])
def test_time_cond_proj_init(tiny_teacher, init):
    """zero: the student predicts what the teacher predicts at every gamma; random: it does not."""
    from splam.models import build_student
    from splam.objective import gamma_embedding

    args = parse_args(["--pretrained_teacher_model", tiny_teacher, "--train_shards_path_or_url", "unused.tar", "--max_train_steps=1",
                       f"--time_cond_proj_init={init}"])
    teacher = UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet")
    student = build_student(args, teacher)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, teacher.config.in_channels, 8, 8, generator=generator)
    context = torch.randn(2, 77, teacher.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([999, 19])
    gamma = torch.tensor([0.0, 0.7])
    with torch.no_grad():
        expected = teacher(sample, timesteps, context).sample
        got = student(sample, timesteps, context,
                      timestep_cond=gamma_embedding(gamma, student.config.time_cond_proj_dim)).sample
    assert torch.allclose(got, expected, atol=1e-6) == (init == "zero")


def test_zero_init_is_refused_for_a_teacher_that_has_the_projection(tiny_teacher):
    from splam.models import TeacherError, build_student

    args = parse_args(["--pretrained_teacher_model", tiny_teacher, "--train_shards_path_or_url", "unused.tar",
                       "--max_train_steps=1", "--time_cond_proj_init=zero"])
    config = UNet2DConditionModel.load_config(tiny_teacher, subfolder="unet")
    teacher = UNet2DConditionModel.from_config(config, time_cond_proj_dim=16)
    with pytest.raises(TeacherError, match="has a time-conditioning projection already"):
        build_student(args, teacher)


@pytest.mark.parametrize("time_cond_proj_dim", [None, 16])
def test_a_teacher_with_its_own_time_conditioning_is_named_in_the_log(tiny_teacher, tmp_path, caplog,
                                                                       time_cond_proj_dim):
    import shutil

    from splam.models import load_teacher_unet

    teacher = str(tmp_path / "teacher")
    shutil.copytree(tiny_teacher, teacher)
    config = UNet2DConditionModel.load_config(tiny_teacher, subfolder="unet")
    UNet2DConditionModel.from_config(config, time_cond_proj_dim=time_cond_proj_dim).save_pretrained(
        os.path.join(teacher, "unet"))
    args = parse_args(["--pretrained_teacher_model", teacher, "--train_shards_path_or_url", "unused.tar",
                       "--max_train_steps=1"])
    with caplog.at_level("WARNING", logger="splam.models"):
        load_teacher_unet(args)
    assert ("the teacher is called without it" in caplog.text) == (time_cond_proj_dim is not None)


@pytest.mark.parametrize("num_ddim_timesteps, never_trained", [(50, 0), (30, 0), (300, 100), (600, 400)])
def test_a_grid_that_leaves_the_noisiest_timesteps_untrained_is_named(tiny_teacher, caplog, num_ddim_timesteps,
                                                                      never_trained):
    from splam.models import load_teacher_scheduler

    args = parse_args(["--pretrained_teacher_model", tiny_teacher, "--train_shards_path_or_url", "unused.tar",
                       "--max_train_steps=1", f"--num_ddim_timesteps={num_ddim_timesteps}"])
    with caplog.at_level("WARNING", logger="splam.models"):
        load_teacher_scheduler(args)
    # 30 leaves 10 of 1000 (a sub-path is 33 long): too few to mention.
    assert (f"the noisiest {never_trained} are never trained" in caplog.text) == (never_trained > 0)


def test_trackers_that_get_no_validation_images_are_named(tmp_path, caplog):
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    from splam.validation import note_trackers_without_images

    class ScalarsOnly(GeneralTracker):
        name = "scalars-only"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()

        @property
        def tracker(self):
            return None

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            pass

    for trackers, named in ((["tensorboard"], False), (["tensorboard", ScalarsOnly()], True)):
        accelerator = Accelerator(cpu=True, log_with=trackers, project_dir=str(tmp_path))
        accelerator.init_trackers("splam")
        caplog.clear()
        with caplog.at_level("WARNING", logger="splam.validation"):
            note_trackers_without_images(accelerator)
        assert ("scalars-only gets the scalars alone" in caplog.text) == named
        accelerator.end_training()


def test_wandb_writes_into_the_logging_dir_unless_wandb_dir_says_where(monkeypatch):
    from train_splam_distill_sd_wds import tracker_init_kwargs

    args = parse_args(["--pretrained_teacher_model=teacher", "--train_shards_path_or_url=shards.tar",
                       "--output_dir=run", "--logging_dir=trackers", "--max_train_steps=1"])
    monkeypatch.delenv("WANDB_DIR", raising=False)
    assert tracker_init_kwargs(args) == {"wandb": {"dir": os.path.join("run", "trackers")}}
    monkeypatch.setenv("WANDB_DIR", "/elsewhere")
    assert tracker_init_kwargs(args) == {}


def test_the_logged_loss_of_an_accumulated_update_is_the_mean_of_its_micro_batches(tiny_teacher, tiny_shards, tmp_path):
    """With the learning rate at 0 the nets stay as they start, so the two steps of a run without
    accumulation see what the two micro-batches of one accumulated update see (the same batches and
    random draws, in the same order): the update logs their mean."""
    accumulated, single = str(tmp_path / "accumulated"), str(tmp_path / "single")
    launch(tiny_teacher, tiny_shards, accumulated, "--learning_rate=0", "--gradient_accumulation_steps=2",
           "--max_train_steps=1")
    launch(tiny_teacher, tiny_shards, single, "--learning_rate=0", "--max_train_steps=2")
    micro_batch_losses = logged_scalars(single, "loss")[0]
    assert micro_batch_losses[1] != pytest.approx(micro_batch_losses[2], rel=1e-3)
    assert logged_scalars(accumulated, "loss")[0][1] == pytest.approx(
        (micro_batch_losses[1] + micro_batch_losses[2]) / 2, rel=1e-5)
