"""The throughput benchmark runs, and every speed option leaves the step's math unchanged."""

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch._dynamo.testing import CompileCounter
from torch.utils._python_dispatch import TorchDispatchMode

from splam.args import parse_args
from splam.models import lcm_scheduler, load_teacher_scheduler, load_teacher_unet
from splam.training import build_distillation_models, encode_batch, encode_prompts, posterior_moments, splam_loss
from splam.validation import few_step_pipeline, sample_validation_images

from conftest import REPO_ROOT, RESOLUTION, assert_process_ended, run_script, run_scripts


def teacher_args(tiny_teacher, *flags, source="--train_shards_path_or_url=unused"):
    return parse_args([f"--pretrained_teacher_model={tiny_teacher}", source, "--max_train_steps=1", *flags])


def conv_and_linear_weights(unet) -> int:
    """How many weights and biases of convolutions and linear layers ``unet`` has."""
    return sum(1 for module in unet.modules() if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))
               for _ in module.parameters(recurse=False))


def test_the_benchmark_prints_its_figures(tiny_teacher, tmp_path):
    out = str(tmp_path / "figures.json")
    result = run_script("scripts/benchmark.py", "--preset", "tiny", "--teacher_dir", tiny_teacher, "--batch_size", "2",
                        "--resolution", str(RESOLUTION), "--steps", "3", "--warmup", "1", "--peak_tflops", "1", "--profile_steps", "1",
                        "--mixed_precision", "bf16", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    for text in ("s/step: median", "samples/s:", "peak memory:", "TFLOP per step", "of the floor", "Self CPU time total",
                 "operators per step, views aside:", "time per step by kind of work, host (self time)"):
        assert text in result.stdout, text
    figures = json.load(open(out))
    assert figures["s_per_step"]["min"] <= figures["s_per_step"]["median"] <= figures["s_per_step"]["max"]
    assert figures["tflop_per_step"] > 0 and figures["samples_per_s"] == pytest.approx(2 / figures["s_per_step"]["median"])
    # The FLOPs by kind add up to the step's, nearly all in convolutions and matrix products.
    by_kind = figures["tflop_per_step_by_kind"]
    assert sum(by_kind.values()) == pytest.approx(figures["tflop_per_step"])
    assert by_kind["convolution"] > 0 and by_kind["matrix product"] > 0
    # The profiled step's host time by kind: of the order of a step's time (the profiler's overhead, and a
    # busy machine, stretch the profiled step), the convolutions a good part of it.
    seconds_by_kind = figures["profile"]["seconds_by_kind"]
    assert 0.2 * figures["s_per_step"]["min"] < sum(seconds_by_kind.values()) < 5 * figures["s_per_step"]["max"]
    assert seconds_by_kind["convolution"] > 0.05 * sum(seconds_by_kind.values())
    assert {"attention", "optimizer and EMA", "normalisation"} <= set(seconds_by_kind)
    # Same architecture, one call each (the teacher's twice as wide): under autocast the fp32
    # target's convolution and linear weights are cast on every call, the teacher's are stored for it.
    operators = figures["operators_per_step"]
    assert list(operators) == ["teacher forward", "target forward", "student forward", "backward", "the rest"]
    stored_weights = conv_and_linear_weights(load_teacher_unet(teacher_args(tiny_teacher)))
    assert 0 < operators["teacher forward"] <= operators["target forward"] - stored_weights
    assert operators["backward"] > operators["student forward"]


def test_no_timed_steps_is_refused_before_the_benchmark_runs(tiny_teacher):
    """--steps 0 ran the setup and the warm-up, then stopped with a traceback: no median of no times."""
    result = run_script("scripts/benchmark.py", "--teacher_dir", tiny_teacher, "--steps", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "--steps must be at least 1" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("mode", ["readme", "fast", "fast-eager"])
def test_the_end_to_end_benchmark_times_the_training_script(tiny_teacher, tmp_path, mode):
    """``--data shards`` writes shards (and, in the fast modes, their latents) and times the
    training script's own steps from its log, after the warm-up ones."""
    out = str(tmp_path / "figures.json")
    started = time.time()
    result = run_script("scripts/benchmark.py", "--preset", "tiny", "--teacher_dir", tiny_teacher, "--batch_size", "2",
                        "--resolution", str(RESOLUTION), "--steps", "3", "--warmup", "2", "--mode", mode,
                        "--data", "shards", "--out", out, "--", "--dataloader_num_workers=1")
    benchmark_seconds = time.time() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Optimizer steps = 6" in result.stderr and "Saved the distilled pipeline" in result.stderr
    assert ("Train with --train_latents_path_or_url" in result.stdout) == mode.startswith("fast")
    figures = json.load(open(out))
    assert figures["data"] == "shards" and figures["timed_steps"] == len(figures["step_seconds"]) == 3
    assert figures["optimizer"] == ("AdamW8bit" if mode == "readme" else "AdamW")
    # seconds from the training script's call to its first logged step, within the benchmark's
    # own run (how long depends on the compilation and its cache: minutes when cold)
    assert 0 < figures["seconds_to_first_step_done"] < benchmark_seconds and "first step done after" in result.stdout
    assert 0 < figures["s_per_step"]["min"] <= figures["s_per_step"]["median"] <= figures["s_per_step"]["max"]
    # every step's loss from the log, for comparing runs of the same math
    assert [step["step"] for step in figures["steps"]] == list(range(1, 7))
    assert all(math.isfinite(step["loss"]) for step in figures["steps"])


def test_the_fast_mode_of_the_authors_math_changes_only_options_that_keep_it():
    """``readme-adamw-fast``, the mode for the 2x goal, trains what ``readme-adamw`` (the README's
    command with the authors' optimizer) trains: only options that leave the math unchanged differ."""
    from benchmark import training_args

    def parsed(mode):
        options = types.SimpleNamespace(mode=mode, resolution=512, batch_size=12, mixed_precision="fp16")
        return vars(training_args("teacher", options, "shards.tar", "--max_train_steps=1"))

    exact, fast, eager = parsed("readme-adamw"), parsed("readme-adamw-fast"), parsed("readme-adamw-fast-eager")
    assert {name for name in exact if exact[name] != fast[name]} == {"gradient_checkpointing", "channels_last", "torch_compile"}
    assert not fast["gradient_checkpointing"] and fast["channels_last"] and fast["torch_compile"] == "all"
    assert {name for name in fast if fast[name] != eager[name]} == {"torch_compile"} and eager["torch_compile"] is None


def test_the_compiled_step_is_counted_the_flops_of_the_eager_one(tiny_teacher, monkeypatch):
    """Under ``--torch_compile`` the benchmark counts the FLOPs of its first step run eagerly: the
    compiled step's FLOPs are the eager step's, so the fraction of the floor is printed for it too.
    The first compiled step, which compiles, is not timed either."""
    from benchmark import measure_step

    class SlowCompiler(CompileCounter):
        """Traces, takes its time as a compiler does, then runs eagerly (seconds where inductor takes
        minutes on a CPU); notes when each compilation ended."""

        def __init__(self):
            super().__init__()
            self.ended = []

        def __call__(self, graph, example_inputs):
            time.sleep(1)
            self.ended.append(time.perf_counter())
            return super().__call__(graph, example_inputs)

    compilations = SlowCompiler()
    plain_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **options: plain_compile(module, backend=compilations))
    options = types.SimpleNamespace(mode="fast", resolution=RESOLUTION, batch_size=2, mixed_precision="no",
                                    warmup=0, steps=2, profile_steps=0)
    compiled = measure_step(options, [], tiny_teacher)
    timed_steps_began = time.perf_counter() - sum(compiled["times"])  # the timed steps end the measurement
    options.mode = "fast-eager"
    eager = measure_step(options, [], tiny_teacher)
    assert compiled["flops_by_operator"] == eager["flops_by_operator"] and sum(eager["flops_by_operator"].values()) > 0
    # The compilation is not timed, even with --warmup 0 (a comparison of times alone fails on a busy machine).
    assert compilations.ended and max(compilations.ended) < timed_steps_began
    # Counted under the counter's dispatch mode, a first call would have left the nets uncompiled for good.
    assert compilations.frame_count > 0
    assert compiled["operators"] is None and eager["operators"]["student forward"] > 0


def test_a_profiled_steps_kernels_are_told_apart_by_kind_and_the_devices_idle_time_counted():
    """Kernel names as an H100 runs them (cuDNN, cuBLAS, FlashAttention, inductor, ATen), and a
    trace in the format ``torch.profiler`` exports: three kernels, two overlapping, then a gap."""
    from benchmark import device_time, work_kind

    kinds = {
        "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_kernel__5x_cudnn": "convolution",
        "sm90_xmma_wgrad_implicit_gemm_indexed_f16f16_f16f32_f32_nhwckrsc_nhwc_kernel__5x_cudnn": "convolution",
        "void nchwToNhwcKernel<__half, __half, float, true, false, (cudnnKernelDataType_t)0>": "convolution",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0": "attention",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false>, true>": "attention",
        "nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NNT": "matrix product",
        "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_kernel": "matrix product",
        "triton_poi_fused__to_copy_convolution_0": "fused by the compiler",
        "triton_red_fused_native_group_norm_silu_1": "fused by the compiler",
        "void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor<float, 4>>": "optimizer and EMA",
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half, float>": "normalisation",
        "Memcpy HtoD (Pinned -> Device)": "copy",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>>": "other",
        "aten::mkldnn_convolution": "convolution",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
        "aten::addmm": "matrix product",
        "aten::normal_": "other",
    }
    assert {name: work_kind(name) for name in kinds} == kinds

    trace = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::convolution", "ts": 0.0, "dur": 50.0},
        {"ph": "X", "cat": "kernel", "name": "conv_fprop", "ts": 1_000_000.0, "dur": 30.0},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1_000_020.0, "dur": 20.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 1_000_070.0, "dur": 10.0},
        {"ph": "X", "cat": "kernel", "name": "conv_fprop", "ts": 1_000_090.0, "dur": 10.0},
    ]
    seconds, busy, span = device_time(trace)
    assert seconds == {"conv_fprop": pytest.approx(40e-6), "gemm": pytest.approx(20e-6), "Memcpy HtoD": pytest.approx(10e-6)}
    assert busy == pytest.approx(60e-6) and span == pytest.approx(100e-6)
    assert device_time(trace[:1]) == ({}, 0.0, 0.0)  # no kernel traced: the host's times are taken instead


def test_step_times_come_from_the_logged_wall_times_after_the_warm_up(tmp_path):
    from benchmark import logged_run
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "logs" / "splam-distill"))
    for step, wall_time in enumerate([100.0, 110.0, 111.0, 113.0, 116.0, 120.0], start=1):
        writer.add_scalar("loss", 0.5 / step, step, walltime=wall_time)
        writer.add_scalar("memory/peak_gib", 1.0 + step, step, walltime=wall_time)
        if step != 2:  # a step whose update was skipped logs no gradient norm
            writer.add_scalar("grad_norm", 10.0 * step, step, walltime=wall_time)
    writer.close()
    times, peak_memory, first_step, steps = logged_run(str(tmp_path / "logs"), warmup=2)
    assert times == pytest.approx([2.0, 3.0, 4.0]) and peak_memory == 7.0 and first_step == 100.0
    assert [step["step"] for step in steps] == [1, 2, 3, 4, 5, 6]
    assert [step["loss"] for step in steps[:2]] == pytest.approx([0.5, 0.25])
    assert [step["grad_norm"] for step in steps[:3]] == [10.0, None, 30.0]


def fixed_step_loss(tiny_teacher, *flags, from_latents=False):
    """The fp32 loss of one step on a fixed batch with fixed random draws; ``from_latents`` feeds
    the batch as precomputed posterior moments and prompt embeddings."""
    source = "--train_latents_path_or_url=unused" if from_latents else "--train_shards_path_or_url=unused"
    args = teacher_args(tiny_teacher, f"--resolution={RESOLUTION}", "--seed=0", *flags, source=source)
    models = build_distillation_models(args, Accelerator(cpu=True, mixed_precision="no"), load_teacher_scheduler(args))
    generator = torch.Generator().manual_seed(1)
    inputs = torch.rand((3, 3, RESOLUTION, RESOLUTION), generator=generator) * 2 - 1
    conditioning = torch.randint(0, len(models.tokenizer), (3, 77), generator=generator)
    if from_latents:
        with torch.no_grad():
            inputs = posterior_moments(inputs, models.vae, batch_size=2)
            conditioning = encode_prompts(conditioning, models.text_encoder)
    torch.manual_seed(2)
    latents, prompt_embeds = encode_batch(inputs, conditioning, models, args)
    return splam_loss(latents, prompt_embeds, models, args, contextlib.nullcontext).item()


@pytest.mark.parametrize("option", ["--channels_last", "--torch_compile", "--torch_compile=frozen", "--gradient_checkpointing"])
def test_speed_options_leave_the_loss_unchanged(tiny_teacher, option):
    reference = fixed_step_loss(tiny_teacher)
    assert fixed_step_loss(tiny_teacher, option) == pytest.approx(reference, rel=1e-5)


def test_cudnn_benchmark_lets_cudnn_choose_its_convolutions_by_timing_them(tiny_teacher, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    for flags, chosen_by_timing in (((), False), (("--cudnn_benchmark",), True)):
        args = teacher_args(tiny_teacher, *flags)
        build_distillation_models(args, Accelerator(cpu=True, mixed_precision="no"), load_teacher_scheduler(args))
        assert torch.backends.cudnn.benchmark is chosen_by_timing


UNETS = {"teacher_unet", "unet", "target_unet"}


@pytest.mark.parametrize("flag, source, compiled", [
    ("--torch_compile", "--train_shards_path_or_url=unused", {"text_encoder", "encoder", *UNETS}),
    ("--torch_compile=all", "--train_shards_path_or_url=unused", {"text_encoder", "encoder", *UNETS}),
    ("--torch_compile=frozen", "--train_shards_path_or_url=unused", {"text_encoder", "encoder", "teacher_unet", "target_unet"}),
    ("--torch_compile", "--train_latents_path_or_url=unused", UNETS),
    ("--torch_compile=frozen", "--train_latents_path_or_url=unused", {"teacher_unet", "target_unet"}),
])
def test_torch_compile_compiles_the_nets_it_names_in_place(tiny_teacher, flag, source, compiled, caplog):
    """``--torch_compile`` compiles the three UNets and, where the steps encode images and
    prompts, the text encoder and the VAE's encoder; ``=frozen`` only the nets that run without
    gradients, so the student's forward and backward are not compiled. On a CPU the student is
    never compiled: torch's CPU compiler gives its backward wrong gradients. In place: the
    checkpoints' parameter names stay those of the plain nets."""
    args = teacher_args(tiny_teacher, flag, source=source)
    models = build_distillation_models(args, Accelerator(cpu=True, mixed_precision="no"), load_teacher_scheduler(args))
    if "unet" in compiled:
        compiled = compiled - {"unet"}
        assert "the student stays uncompiled on a CPU" in caplog.text
    nets = {"encoder": models.vae.encoder, "decoder": models.vae.decoder, "text_encoder": models.text_encoder,
            **{name: getattr(models, name) for name in UNETS}}
    # nn.Module.compile() compiles in place by setting this; the module stays the same object.
    assert {name for name, net in nets.items() if net._compiled_call_impl is not None} == compiled
    assert all(not key.startswith("_orig_mod") for net in nets.values() for key in net.state_dict())


def test_validation_and_the_export_sample_with_compiled_unets_without_compiling(tiny_teacher):
    """Under ``--torch_compile`` the UNets are compiled in place, and the validation images and the
    export's grid (one image at a time, from the float32 target) are new inputs to them: sampled
    compiled, each run would compile the target again for a few calls (minutes on a GPU)."""
    args = teacher_args(tiny_teacher)
    models = build_distillation_models(args, Accelerator(cpu=True, mixed_precision="no"), load_teacher_scheduler(args))
    compilations = CompileCounter()
    models.target_unet.compile(backend=compilations)
    pipeline = few_step_pipeline(models.vae, models.text_encoder, models.tokenizer, models.target_unet,
                                 lcm_scheduler(load_teacher_scheduler(args).config, args.num_ddim_timesteps))
    images = sample_validation_images(pipeline, ["a red square"], RESOLUTION, seed=0)
    assert [image.size for row in images.values() for image in row] == [(RESOLUTION, RESOLUTION)] * 3
    assert compilations.frame_count == 0
    pipeline(prompt="a red square", num_inference_steps=1, height=RESOLUTION, width=RESOLUTION)
    assert compilations.frame_count == 1  # outside the sampling, the UNet is compiled as --torch_compile asks


def test_the_compiled_unets_serve_batches_of_images_and_of_precomputed_latents_alike(tiny_teacher):
    """With ``--channels_last`` the VAE's moments are channels-last and those read from latent shards
    are not; the UNets compiled on one source must not compile again for the other."""
    args = teacher_args(tiny_teacher, "--channels_last", f"--resolution={RESOLUTION}")
    models = build_distillation_models(args, Accelerator(cpu=True, mixed_precision="no"), load_teacher_scheduler(args))
    compilations = CompileCounter()
    for unet in (models.teacher_unet, models.target_unet):
        unet.compile(backend=compilations)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand((2, 3, RESOLUTION, RESOLUTION), generator=generator) * 2 - 1
    input_ids = torch.randint(0, len(models.tokenizer), (2, 77), generator=generator)
    with torch.no_grad():
        splam_loss(*encode_batch(pixels, input_ids, models, args), models, args, contextlib.nullcontext)
        compiled_for_images = compilations.frame_count
        # As a latent shard's loader gives them: float16, in the default layout.
        moments = posterior_moments(pixels, models.vae, batch_size=2).half().contiguous()
        prompt_embeds = encode_prompts(input_ids, models.text_encoder).half()
        args.train_latents_path_or_url = "unused"
        splam_loss(*encode_batch(moments, prompt_embeds, models, args), models, args, contextlib.nullcontext)
    assert compiled_for_images > 0 and compilations.frame_count == compiled_for_images


def test_cast_teacher_unet_says_when_there_is_no_half_dtype_to_cast_to(tiny_teacher, caplog):
    args = teacher_args(tiny_teacher, "--cast_teacher_unet")
    with caplog.at_level(logging.WARNING, logger="splam.training"):
        models = build_distillation_models(args, Accelerator(cpu=True, mixed_precision="no"), load_teacher_scheduler(args))
    assert models.teacher_unet.dtype == torch.float32
    assert "--cast_teacher_unet: the step computes in float32 here" in caplog.text


def test_the_teacher_stored_for_autocast_computes_the_same_without_weight_casts(tiny_teacher):
    """Under mixed precision the teacher's convolutions and linear layers are stored in the half
    dtype and its norms in float32: under autocast its output is bit for bit that of the float32
    teacher, and its weights are no longer cast on every call."""
    args = teacher_args(tiny_teacher)
    AcceleratorState._reset_state()  # one process holds one accelerator state; the other tests' are float32
    try:
        stored = build_distillation_models(args, Accelerator(cpu=True, mixed_precision="bf16"), load_teacher_scheduler(args)).teacher_unet
    finally:
        AcceleratorState._reset_state()
    dtypes = {(type(module).__name__, param.dtype) for module in stored.modules() for param in module.parameters(recurse=False)}
    assert dtypes == {("Conv2d", torch.bfloat16), ("Linear", torch.bfloat16),
                      ("GroupNorm", torch.float32), ("LayerNorm", torch.float32)}

    reference = load_teacher_unet(args)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in reference.parameters():  # norms away from 1 and 0, which every dtype holds exactly
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
        stored.load_state_dict(reference.state_dict())
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([19, 999])
    embeds = torch.randn(2, 77, reference.config.cross_attention_dim, generator=generator)

    def call(unet):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), CountCasts() as casts:
            return unet(x, t, encoder_hidden_states=embeds).sample, casts.count

    (expected, reference_casts), (output, stored_casts) = call(reference), call(stored)
    assert torch.equal(output, expected)
    assert reference_casts - stored_casts >= conv_and_linear_weights(stored) > 0


def test_the_frozen_encoders_are_loaded_in_the_half_dtype_without_diffusers_cast_warning(tiny_teacher):
    """Under mixed precision the VAE and the text encoder are held in the half dtype. diffusers
    0.42 warns at every ``to(dtype)`` of a model, so they are loaded in it instead, a VAE of its own included."""
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    diffusers_logger = logging.getLogger("diffusers")  # which does not propagate to pytest's handlers
    diffusers_logger.addHandler(handler)
    try:
        for flags in ((), (f"--pretrained_vae_model_name_or_path={os.path.join(tiny_teacher, 'vae')}",)):
            args = teacher_args(tiny_teacher, *flags)
            AcceleratorState._reset_state()
            try:
                models = build_distillation_models(args, Accelerator(cpu=True, mixed_precision="bf16"),
                                                   load_teacher_scheduler(args))
            finally:
                AcceleratorState._reset_state()
            for net in (models.vae, models.text_encoder):
                assert {parameter.dtype for parameter in net.parameters()} == {torch.bfloat16}
    finally:
        diffusers_logger.removeHandler(handler)
    assert not [warning for warning in warnings if "should be kept in float32" in warning]


class CountCasts(TorchDispatchMode):
    """Counts the dtype casts dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


def test_precomputed_latents_leave_the_loss_unchanged(tiny_teacher):
    """Training from stored posterior moments and prompt embeddings is the same step as training
    from images and captions: same z draw, same emptied prompts."""
    for flags in ([], ["--proportion_empty_prompts=0.5"]):
        reference = fixed_step_loss(tiny_teacher, *flags)
        assert fixed_step_loss(tiny_teacher, *flags, from_latents=True) == pytest.approx(reference, rel=1e-5)


def test_one_batched_teacher_call_equals_two(tiny_teacher):
    args = teacher_args(tiny_teacher)
    models = build_distillation_models(args, Accelerator(cpu=True, mixed_precision="no"), load_teacher_scheduler(args))
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([19, 519, 999])
    cond = torch.randn(3, 77, models.uncond_prompt_embeds.shape[-1])
    uncond = models.uncond_prompt_embeds.expand_as(cond)
    with torch.no_grad():
        batched = models.teacher_unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([cond, uncond])).sample
        separate = torch.cat([models.teacher_unet(x, t, encoder_hidden_states=cond).sample,
                              models.teacher_unet(x, t, encoder_hidden_states=uncond).sample])
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-6)


def test_the_figures_script_runs_its_rows_and_prints_the_table(tiny_teacher, tmp_path):
    out_dir = tmp_path / "figures"
    result = run_script("scripts/throughput_figures.py", "--out_dir", str(out_dir), "--preset", "tiny",
                        "--teacher_dir", tiny_teacher, "--resolution", str(RESOLUTION), "--batch_size", "2", "--small_batch_size", "1",
                        "--rows", "readme-24gb,readme-step", "--steps", "2", "--warmup", "0", "--", "--dataloader_num_workers=1")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.load(open(out_dir / "figures.json"))
    assert [(row["row"], row["batch_size"]) for row in figures] == [("readme-24gb", 1), ("readme-step", 2)]
    assert [len(row["step_seconds"]) for row in figures] == [2, 2]
    table = (out_dir / "table.md").read_text()
    assert table in result.stdout and table.count("`scripts/benchmark.py --preset tiny") == 2

    failing = run_script("scripts/throughput_figures.py", "--out_dir", str(out_dir), "--preset", "tiny",
                         "--teacher_dir", tiny_teacher, "--rows", "readme-step", "--", "--no_such_flag")
    assert failing.returncode != 0 and "rows that did not finish: readme-step (2)" in failing.stderr
    # --total_timeout counts from the start: with 1 s in all, no row is started
    out_of_time = run_script("scripts/throughput_figures.py", "--out_dir", str(out_dir), "--preset", "tiny",
                             "--teacher_dir", tiny_teacher, "--rows", "readme-step", "--total_timeout", "1")
    assert out_of_time.returncode != 0 and "readme-step (no time left)" in out_of_time.stderr
    assert "== readme-step:" not in (out_dir / "benchmark.log").read_text().split("--no_such_flag")[-1]


# A row that starts a worker process, prints the worker's pid and waits.
ROW_WITH_A_WORKER = ("import subprocess, sys, time; "
                     "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                     "print(worker.pid, flush=True); time.sleep(120)")


def test_a_row_that_times_out_is_ended_with_the_processes_it_started(tmp_path):
    """A row's loader workers and compiler processes must not outlive its timeout and slow the next row."""
    from throughput_figures import run_row

    with open(tmp_path / "row.log", "w") as log:
        assert run_row([sys.executable, "-c", ROW_WITH_A_WORKER], log, timeout=5) == "timeout"
    assert_process_ended(int((tmp_path / "row.log").read_text()))


def test_a_terminated_figures_script_ends_the_running_row(tmp_path):
    """The row runs in its own process group, which a SIGTERM to the script (timeout, a job
    scheduler) does not reach by itself."""
    log_path = tmp_path / "row.log"
    script = (f"import sys; sys.path.insert(0, {os.path.join(REPO_ROOT, 'scripts')!r}); "
              "from throughput_figures import exit_on_termination, run_row; exit_on_termination(); "
              f"run_row([sys.executable, '-c', {ROW_WITH_A_WORKER!r}], open({str(log_path)!r}, 'w'), timeout=120)")
    figures = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not log_path.exists() or not log_path.read_text().strip():
        assert time.time() < deadline and figures.poll() is None, "the row never started its worker"
        time.sleep(0.2)
    figures.terminate()
    assert figures.wait(timeout=30) == 128 + signal.SIGTERM
    assert_process_ended(int(log_path.read_text()))


def test_a_row_that_wrote_its_figures_counts_though_it_ran_past_its_timeout(tiny_teacher, tmp_path, monkeypatch):
    """A row with compiled nets and 8 loader workers can take seconds to exit after writing its
    figures: a timeout then must not lose them."""
    import throughput_figures

    monkeypatch.setattr(throughput_figures, "exit_on_termination", lambda: None)  # this process's signals stay pytest's

    with open(os.path.join(REPO_ROOT, "docs", "benchmark", "throughput-h100-compiled.json")) as handle:
        measured = {key: value for key, value in json.load(handle)[0].items() if key not in ("row", "command")}
    (tmp_path / "measured.json").write_text(json.dumps(measured))
    row = tmp_path / "row.py"
    row.write_text("import shutil, sys, time\n"
                   f"shutil.copy({str(tmp_path / 'measured.json')!r}, sys.argv[sys.argv.index('--out') + 1])\n"
                   "time.sleep(120)\n")
    monkeypatch.setattr(throughput_figures, "BENCHMARK", str(row))
    monkeypatch.setattr(sys, "argv", ["throughput_figures.py", "--out_dir", str(tmp_path / "figures"), "--preset", "tiny",
                                      "--teacher_dir", tiny_teacher, "--rows", "readme-adamw-fast-shards", "--timeout", "3"])
    started = time.monotonic()
    throughput_figures.main()  # no row failed: it would exit
    assert time.monotonic() - started < 60
    (figures,) = json.load(open(tmp_path / "figures" / "figures.json"))
    assert figures["row"] == "readme-adamw-fast-shards" and figures["s_per_step"] == measured["s_per_step"]
    assert "ended (timeout) after writing its figures" in (tmp_path / "figures" / "benchmark.log").read_text()
    assert "| 2.05x |" in (tmp_path / "figures" / "table.md").read_text()


def test_only_rows_timed_like_the_authors_script_are_compared_with_it():
    """The authors' 0.525 s/step is end to end, sd15 at batch 12, 512 px and fp16, with torch's AdamW,
    on an H100 80GB HBM3: a row with 8-bit Adam, bf16, the step alone or another card gets no speed-up."""
    from throughput_figures import table_row

    figures = {"device": "NVIDIA H100 80GB HBM3", "data": "shards", "preset": "sd15", "batch_size": 12,
               "resolution": 512, "mixed_precision": "fp16", "optimizer": "AdamW", "s_per_step": {"median": 0.25, "min": 0.24, "max": 0.3},
               "samples_per_s": 48.0, "peak_memory_gib": 20.0, "command": "scripts/benchmark.py",
               "versions": {"torch": "2.11.0", "cuda": "13.0", "diffusers": "0.42.1", "transformers": "5.17.0",
                            "accelerate": "1.15.0"}}
    assert "| 2.10x |" in table_row(figures)
    for change in ({"optimizer": "AdamW8bit"}, {"data": "synthetic"}, {"device": "NVIDIA H200"}, {"batch_size": 4},
                   {"mixed_precision": "bf16"}):
        assert "| n/a |" in table_row({**figures, **change}), change


def test_a_teacher_build_left_partial_is_rebuilt_and_a_finished_one_reused(tmp_path):
    from make_tiny_teacher import cached_teacher

    teacher, partial = tmp_path / "teacher", tmp_path / "teacher.partial"
    partial.mkdir()
    (partial / "model_index.json").write_text("{}")  # what a killed build leaves behind
    assert cached_teacher("tiny", str(teacher)) == str(teacher)
    assert (teacher / "unet" / "config.json").exists() and not partial.exists()
    built = (teacher / "model_index.json").stat().st_mtime_ns
    cached_teacher("tiny", str(teacher))
    assert (teacher / "model_index.json").stat().st_mtime_ns == built
    (tmp_path / "not-a-teacher").mkdir()
    with pytest.raises(SystemExit, match="holds no pipeline"):
        cached_teacher("tiny", str(tmp_path / "not-a-teacher"))


def test_the_tiny_teacher_is_never_written_over_an_existing_model(tiny_teacher, tmp_path):
    """A mistyped output folder used to get random weights written over the model in it."""
    weights = os.path.join(tiny_teacher, "unet", "diffusion_pytorch_model.safetensors")
    before = os.stat(weights).st_mtime_ns
    (tmp_path / "empty").mkdir()
    refused, made = run_scripts(["scripts/make_tiny_teacher.py", tiny_teacher],
                                ["scripts/make_tiny_teacher.py", str(tmp_path / "empty")])
    assert refused.returncode == 2 and "exists and is not an empty folder" in refused.stderr, refused.stderr[-3000:]
    assert os.stat(weights).st_mtime_ns == before
    assert made.returncode == 0, made.stderr[-3000:]
