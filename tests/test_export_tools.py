"""Folding gamma into a plain SD UNet, extracting a LoRA, and the sampling CLI, on a trained tiny student."""

import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from splam.lora import extract_lora

from conftest import launch, run_script, run_scripts

PROMPT = "a rocket on a launch pad"


@pytest.fixture(scope="module")
def trained_student(tiny_teacher, tiny_shards, tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("student") / "splam")
    launch(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=4", "--checkpointing_steps=4",
           "--learning_rate=1e-3", "--lr_warmup_steps=0")
    return output_dir


@pytest.fixture(scope="module")
def folded_student(trained_student, tmp_path_factory):
    folded = str(tmp_path_factory.mktemp("folded") / "plain")
    result = run_script("scripts/fold_gamma.py", "--model", trained_student, "--out", folded)
    assert result.returncode == 0, result.stderr[-3000:]
    return folded


def two_step_latents(pipeline, prompt=PROMPT):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(prompt, num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


def test_the_folded_unet_is_plain_sd_and_samples_like_the_student(trained_student, folded_student):
    folded = DiffusionPipeline.from_pretrained(folded_student)
    assert type(folded).__name__ == "StableDiffusionPipeline" and isinstance(folded.scheduler, LCMScheduler)
    assert folded.unet.config.time_cond_proj_dim is None
    teacher_keys = set(UNet2DConditionModel.from_pretrained(trained_student, subfolder="unet").state_dict())
    assert set(folded.unet.state_dict()) == {key for key in teacher_keys if "cond_proj" not in key}
    reference = two_step_latents(DiffusionPipeline.from_pretrained(trained_student))
    latents = two_step_latents(folded)
    torch.testing.assert_close(latents, reference, rtol=1e-4, atol=1e-4)


def test_an_export_killed_midway_leaves_no_folder_that_loads_as_a_pipeline(tiny_teacher, tiny_shards, tmp_path,
                                                                            monkeypatch):
    """A folder is a pipeline by its model_index.json, which diffusers wrote after the components but
    before the online UNet, the sample grid and the model card; and a re-export (a finished run
    resumed for more steps) overwrote the components under the earlier export's index. A run killed
    mid-export left a folder that loaded half of one export, or a mix of two."""
    from splam.args import parse_args
    from splam.export import export_pipeline
    from splam.models import (build_student, build_target, load_teacher_scheduler, load_teacher_unet,
                              load_text_encoder_and_vae)

    output_dir = tmp_path / "run"
    args = parse_args([f"--pretrained_teacher_model={tiny_teacher}", f"--train_shards_path_or_url={tiny_shards}",
                       f"--output_dir={output_dir}", "--max_train_steps=1", "--resolution=64",
                       "--validation_prompts", PROMPT])
    tokenizer, text_encoder, vae = load_text_encoder_and_vae(args)
    student = build_student(args, load_teacher_unet(args))

    def export():
        export_pipeline(args, tokenizer, text_encoder, vae, build_target(student), student,
                        load_teacher_scheduler(args).config, global_step=1, samples_seen=2)

    export()
    written = {path.name: path.stat().st_mtime_ns for path in output_dir.iterdir()}
    assert written["model_index.json"] == max(written.values()), written

    class Killed(BaseException):
        pass

    def killed_while_writing(*_, **__):
        raise Killed

    monkeypatch.setattr(UNet2DConditionModel, "save_pretrained", killed_while_writing)
    with pytest.raises(Killed):
        export()
    assert not (output_dir / "model_index.json").exists()


def test_the_lora_converges_to_the_student_as_the_rank_grows(tiny_teacher, folded_student, tmp_path):
    ranks = (1, 4, 16, 4096)
    results = run_scripts(*[["scripts/extract_lora.py", "--teacher", tiny_teacher, "--student", folded_student,
                             "--rank", str(rank), "--out", str(tmp_path / f"lora-{rank}"), "--report_error"] for rank in ranks])
    errors = {}
    for rank, result in zip(ranks, results):
        assert result.returncode == 0, result.stderr[-3000:]
        errors[rank] = float(re.search(r"against the student: (\S+)", result.stdout).group(1))
    reference = two_step_latents(StableDiffusionPipeline.from_pretrained(folded_student), "a photograph of an astronaut riding a horse")
    teacher = StableDiffusionPipeline.from_pretrained(tiny_teacher)
    teacher.scheduler = LCMScheduler.from_config(teacher.scheduler.config)
    without_lora = ((two_step_latents(teacher, "a photograph of an astronaut riding a horse") - reference).abs().mean()
                    / reference.abs().mean()).item()
    assert without_lora > errors[1] > errors[4] > errors[16] > errors[4096]
    # Full rank: only the normalisation layers' changes, which a LoRA cannot carry, are missing.
    assert errors[4096] < 1e-3, errors


def test_the_sampling_cli_writes_a_grid(trained_student, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a cat\n\na cup of coffee\n")
    grid, small = str(tmp_path / "grid.png"), str(tmp_path / "small.png")
    result, small_result = run_scripts(
        ["scripts/sample.py", "--model", trained_student, "--prompt", PROMPT, "--prompt_file", str(prompt_file),
         "--num_images", "2", "--steps", "1", "--seed", "3", "--out", grid],
        ["scripts/sample.py", "--model", trained_student, "--prompt", PROMPT, "--height", "32", "--width", "48", "--out", small],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(grid).size == (2 * 64, 3 * 64)
    assert "6 images (3 prompts x 2), 1 steps" in result.stdout and "s per image on cpu" in result.stdout
    assert small_result.returncode == 0 and Image.open(small).size == (48, 32)


def test_a_lora_without_bias_deltas_fuses_into_the_teacher(tiny_teacher, folded_student, tmp_path):
    """With bias deltas every layer gets a PEFT lora_bias, and fuse_lora fails midway on the attention
    projections (no bias), leaving the layers before them merged. --no_bias gives a LoRA that fuses."""
    lora_dir = str(tmp_path / "lora")
    result = run_script("scripts/extract_lora.py", "--teacher", tiny_teacher, "--student", folded_student,
                        "--rank", "4096", "--no_bias", "--out", lora_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    assert not [key for key in load_file(f"{lora_dir}/pytorch_lora_weights.safetensors") if key.endswith(".bias")]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher)
    pipe.scheduler = LCMScheduler.from_pretrained(folded_student, subfolder="scheduler")
    teacher = two_step_latents(pipe)
    pipe.load_lora_weights(lora_dir)
    unfused = two_step_latents(pipe)
    # Fused and then unloaded (diffusers' way to keep a LoRA in the weights), it samples as loaded.
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    torch.testing.assert_close(two_step_latents(pipe), unfused, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unfused, teacher, rtol=1e-3, atol=1e-3)


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_the_sampling_cli_refuses_a_checkpoint_or_a_missing_model_in_one_line(trained_student, tmp_path):
    unfinished = tmp_path / "unfinished run"
    shutil.copytree(f"{trained_student}/checkpoint-4", unfinished / "checkpoint-4")
    cases = [
        (f"{trained_student}/checkpoint-4", ["--prompt", PROMPT], "is a training checkpoint, not a pipeline"),
        (str(unfinished), ["--prompt", PROMPT],
         "holds no pipeline yet, only the checkpoints of a run that has not ended (newest: checkpoint-4): a run writes "
         "its pipeline at its end; to export one now, resume it with --resume_from_checkpoint=latest --max_train_steps=4"),
        (str(tmp_path / "missing"), ["--prompt", PROMPT], "cannot load a pipeline from"),
        (trained_student, ["--prompt_file", str(tmp_path / "missing.txt")], "cannot read --prompt_file"),
    ]
    results = run_scripts(*[["scripts/sample.py", "--model", model, *prompts, "--out", str(tmp_path / "grid.png")]
                            for model, prompts, _ in cases])
    for result, (_, _, expected) in zip(results, cases):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert last_line(result).startswith("error: ") and expected in last_line(result), last_line(result)


def test_a_checkpoint_is_exported_into_another_folder_than_its_runs(tmp_path):
    """The scripts said to resume the checkpoint's run from it with --max_train_steps at its step: in
    the run's own output_dir that is refused below its newest checkpoint, and from the newest one,
    where the run ended past it (its last step no checkpoint's), it replaced the run's pipeline, whose
    weights no checkpoint holds."""
    from splam.cli import training_output_error

    checkpoint = tmp_path / "run" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.json").write_text("{}")
    assert (f"--resume_from_checkpoint={checkpoint} --max_train_steps=4 --output_dir=<a new folder>"
            in training_output_error(str(checkpoint)))


def test_the_sampling_cli_checks_its_output_and_device_before_sampling(trained_student, tmp_path):
    # A name PIL cannot save, or a size the pipeline refuses, used to fail after the sampling; a
    # device the machine lacks (no machine has a hundredth GPU) or a misspelt one, with a traceback.
    out = tmp_path / "new folder" / "grid.png"
    refused = [["--out", str(tmp_path / "grid")], ["--height", "30"], ["--device", "cuda:99"], ["--device", "gpu"]]
    *results, written = run_scripts(*[["scripts/sample.py", "--model", trained_student, "--prompt", PROMPT, *flags]
                                      for flags in [*refused, ["--out", str(out)]]])
    for result, flags in zip(results, refused):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert last_line(result).startswith("sample.py: error: " + flags[0]), last_line(result)
    assert written.returncode == 0 and Image.open(out).size == (64, 64), written.stderr[-3000:]


def test_fold_gamma_never_overwrites_a_model_and_refuses_a_folded_model_or_checkpoint(tiny_teacher, trained_student,
                                                                                       folded_student, tmp_path):
    out = str(tmp_path / "plain")
    cases = [
        # Folding into the source folder (or the teacher's) used to overwrite the model there.
        (trained_student, trained_student + "/", 2, "holds something else than an earlier fold_gamma.py output"),
        (trained_student, tiny_teacher, 2, "holds something else than an earlier fold_gamma.py output"),
        (folded_student, out, 1, "has no UNet with a gamma projection (time_cond_proj_dim) to fold"),
        (f"{trained_student}/checkpoint-4", out, 1, "is a training checkpoint, not a pipeline"),
    ]
    results = run_scripts(*[["scripts/fold_gamma.py", "--model", model, "--out", target] for model, target, _, _ in cases])
    for result, (_, _, returncode, expected) in zip(results, cases):
        assert result.returncode == returncode and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert expected in last_line(result), last_line(result)
    assert DiffusionPipeline.from_pretrained(trained_student).unet.config.time_cond_proj_dim is not None
    assert isinstance(DiffusionPipeline.from_pretrained(tiny_teacher).scheduler, DDPMScheduler)
    # A rerun onto its own output goes on.
    result = run_script("scripts/fold_gamma.py", "--model", trained_student, "--out", folded_student)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_fold_killed_while_it_writes_leaves_no_half_fold_and_a_rerun_goes_on(trained_student, tmp_path, monkeypatch):
    """diffusers writes model_index.json after the components: a kill before it left --out with
    components alone, which the rerun refused as something else than a fold."""
    import fold_gamma

    out = str(tmp_path / "plain")
    monkeypatch.setattr(sys, "argv", ["fold_gamma.py", "--model", trained_student, "--out", out])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("SIGKILL")

    with monkeypatch.context() as patch:
        patch.setattr(StableDiffusionPipeline, "save_config", killed)
        with pytest.raises(KeyboardInterrupt):
            fold_gamma.main()
    assert not os.path.exists(out)
    fold_gamma.main()
    assert sorted(os.listdir(tmp_path)) == ["plain"]
    assert DiffusionPipeline.from_pretrained(out).unet.config.time_cond_proj_dim is None


def test_extract_lora_refuses_an_unfolded_or_foreign_student_and_a_file_as_out(tiny_teacher, trained_student,
                                                                               folded_student, tmp_path):
    config = UNet2DConditionModel.load_config(folded_student, subfolder="unet")
    UNet2DConditionModel.from_config(config, block_out_channels=(32, 32)).save_pretrained(tmp_path / "other" / "unet")
    out_file = tmp_path / "lora.safetensors"
    out_file.write_bytes(b"")
    cases = [
        (tiny_teacher, trained_student, tmp_path / "lora", 1, "the student has a gamma projection the teacher lacks"),
        (tmp_path / "other", folded_student, tmp_path / "lora", 1, "the student's architecture differs from the teacher's"),
        # diffusers only logs that a file is no folder: the script said it wrote the LoRA.
        (tiny_teacher, folded_student, out_file, 2, "is a file: give the folder to write the LoRA into"),
    ]
    results = run_scripts(*[["scripts/extract_lora.py", "--teacher", str(teacher), "--student", student, "--rank", "4",
                             "--out", str(out)] for teacher, student, out, _, _ in cases])
    for result, (_, _, _, returncode, expected) in zip(results, cases):
        assert result.returncode == returncode and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert expected in last_line(result), last_line(result)


def test_every_layer_of_a_lora_has_one_rank(tiny_teacher, folded_student):
    """Layers narrower than the rank (conv_out's 4 channels) had a lower one: older diffusers (0.35.2,
    which requirements.txt allows) then scaled every layer by the first layer's rank over its own, and
    the rank-64 LoRA of the README's table sampled 70 times further from the student."""
    teacher = UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet")
    student = UNet2DConditionModel.from_pretrained(folded_student, subfolder="unet")
    lora = extract_lora(teacher, student, 64)
    assert {value.shape[0] for key, value in lora.items() if key.endswith("lora_A.weight")} == {64}
    assert {value.shape[1] for key, value in lora.items() if key.endswith("lora_B.weight")} == {64}
    conv_out = lora["conv_out.lora_B.weight"].flatten(1) @ lora["conv_out.lora_A.weight"].flatten(1)
    torch.testing.assert_close(conv_out, (student.conv_out.weight - teacher.conv_out.weight).flatten(1), rtol=1e-4, atol=1e-6)


def test_a_prompt_file_with_a_byte_order_mark_samples_its_prompts_as_written(trained_student, tmp_path):
    """The mark a Windows editor puts at the start of a UTF-8 file became part of the first prompt."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(PROMPT + "\n", encoding="utf-8-sig")
    sources = {"from-file.png": ["--prompt_file", str(prompt_file)], "as-flag.png": ["--prompt", PROMPT]}
    for result in run_scripts(*[["scripts/sample.py", "--model", trained_student, *source, "--out", str(tmp_path / name)]
                                for name, source in sources.items()]):
        assert result.returncode == 0, result.stderr[-3000:]
    grids = [torch.from_numpy(np.asarray(Image.open(tmp_path / name))) for name in sources]
    assert torch.equal(*grids)
