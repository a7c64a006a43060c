"""Precomputed latents: scripts/precompute_latents.py on real shards, then training from them."""

import argparse
import glob
import io
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from diffusers import AutoencoderKL, DiffusionPipeline
from PIL import Image

from splam.args import SetupError
from splam.data import LatentSamples, ShardStream

from conftest import REPO_ROOT, RESOLUTION, launch, logged_scalars, npy, run_script, run_scripts, training_command

LATENTS = "--train_latents_path_or_url"


def precompute_command(teacher, shards, output_dir, *flags):
    return ["scripts/precompute_latents.py", f"--pretrained_teacher_model={teacher}", f"--train_shards_path_or_url={shards}",
            f"--output_dir={output_dir}", *flags]


def precompute(teacher, shards, output_dir, *flags):
    return run_script(*precompute_command(teacher, shards, output_dir, *flags))


@pytest.fixture(scope="module")
def latent_shards(tiny_teacher, tiny_shards, tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("latents"))
    result = precompute(tiny_teacher, tiny_shards, output_dir, f"--resolution={RESOLUTION}", "--random_flip", "--batch_size=5")
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir, result


def test_every_sample_becomes_moments_and_prompt_embeds(latent_shards, tiny_teacher):
    output_dir, result = latent_shards
    shards = sorted(glob.glob(os.path.join(output_dir, "*.tar")))
    assert [os.path.basename(path) for path in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert f'{LATENTS}="{output_dir}/{{00000..00002}}.tar"' in result.stdout
    vae = AutoencoderKL.from_pretrained(tiny_teacher, subfolder="vae")
    latent_size = RESOLUTION // 2 ** (len(vae.config.block_out_channels) - 1)
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode())
    assert len(samples) == 36  # 3 shards x 12 captioned images
    for sample in samples:
        assert sample["moments.npy"].shape == (2 * vae.config.latent_channels, latent_size, latent_size)
        assert sample["moments.npy"].dtype == np.float16 and np.isfinite(sample["moments.npy"]).all()
        assert sample["prompt_embeds.npy"].shape[0] == 77 and sample["txt"]
    assert not glob.glob(os.path.join(output_dir, "*.partial"))


def test_a_rerun_goes_on_only_with_the_same_settings_and_shards(latent_shards, tiny_teacher, tiny_shards, tmp_path):
    output_dir, _ = latent_shards
    shards = sorted(glob.glob(os.path.join(output_dir, "*.tar")))
    mtimes = [os.path.getmtime(path) for path in shards]
    rerun = precompute(tiny_teacher, tiny_shards, output_dir, f"--resolution={RESOLUTION}", "--random_flip", "--batch_size=3")
    assert rerun.returncode == 0 and mtimes == [os.path.getmtime(path) for path in shards]
    others = tiny_shards.replace("{00000..00002}", "{00001..00002}")
    for shard_spec, flags, expected in [
        (others, ["--random_flip"], "00000.tar was made with another input"),
        (tiny_shards, [], "00000.tar was made with another random_flip (True)"),
        (tiny_shards, ["--random_flip", "--resolution=32"], "00000.tar was made with another resolution (64)"),
    ]:
        refused = precompute(tiny_teacher, shard_spec, output_dir, f"--resolution={RESOLUTION}", *flags)
        assert refused.returncode != 0 and expected in refused.stderr.strip().splitlines()[-1], refused.stderr[-2000:]
    assert mtimes == [os.path.getmtime(path) for path in shards]
    # More shards appended to the list: the earlier ones are kept, the new one is encoded.
    growing = str(tmp_path / "growing")
    resolution = f"--resolution={RESOLUTION}"
    assert precompute(tiny_teacher, tiny_shards.replace("{00000..00002}", "{00000..00001}"), growing, resolution).returncode == 0
    first_two = [os.path.getmtime(os.path.join(growing, f"0000{index}.tar")) for index in range(2)]
    assert precompute(tiny_teacher, tiny_shards, growing, resolution).returncode == 0
    assert first_two == [os.path.getmtime(os.path.join(growing, f"0000{index}.tar")) for index in range(2)]
    assert os.path.exists(os.path.join(growing, "00002.tar"))


def test_a_rerun_with_other_spellings_of_the_same_paths_goes_on(latent_shards, tiny_teacher, tiny_shards):
    """A trailing slash (as shell completion adds) or a relative path to the same shards was refused as
    another teacher or input, with the advice to encode everything again elsewhere."""
    output_dir, _ = latent_shards
    shards = sorted(glob.glob(os.path.join(output_dir, "*.tar")))
    mtimes = [os.path.getmtime(path) for path in shards]
    rerun = precompute(tiny_teacher + "/", os.path.relpath(tiny_shards, REPO_ROOT), output_dir, f"--resolution={RESOLUTION}",
                       "--random_flip")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert mtimes == [os.path.getmtime(path) for path in shards]


def test_training_from_latents_resumes_exactly_and_exports(latent_shards, tiny_teacher, tmp_path):
    output_dir = latent_shards[0]
    spec = f"{output_dir}/{{00000..00002}}.tar"
    flags = ["--checkpointing_steps=2", "--resume_from_checkpoint=latest", "--proportion_empty_prompts=0.3",
             "--mixed_precision=no"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    launch(tiny_teacher, spec, straight, "--max_train_steps=4", *flags, source=LATENTS)
    launch(tiny_teacher, spec, resumed, "--max_train_steps=2", *flags, source=LATENTS)
    second = launch(tiny_teacher, spec, resumed, "--max_train_steps=4", *flags, source=LATENTS)
    assert "Resuming from" in second.stderr and "were made with another" not in second.stderr
    (straight_losses,) = logged_scalars(straight, "loss")
    resumed_losses = logged_scalars(resumed, "loss")[-1]
    assert sorted(resumed_losses) == [3, 4]
    assert all(resumed_losses[step] == straight_losses[step] for step in (3, 4))
    pipeline = DiffusionPipeline.from_pretrained(resumed)
    image = pipeline("a cup of coffee", num_inference_steps=2, guidance_scale=1, output_type="pt").images
    assert torch.isfinite(image).all()


def test_latents_made_by_another_teacher_are_named_in_the_log(latent_shards, tiny_teacher, tmp_path, caplog):
    """Latents of another VAE and text encoder have the shapes this teacher's give: only the shards'
    records tell. Another spelling of the same teacher's folder is no other teacher."""
    from splam.data import train_shard_urls

    def urls(teacher, resolution=RESOLUTION):
        caplog.clear()
        return train_shard_urls(argparse.Namespace(
            train_latents_path_or_url=f"{latent_shards[0]}/{{00000..00002}}.tar", train_shards_path_or_url=None,
            pretrained_teacher_model=teacher, pretrained_vae_model_name_or_path=None, teacher_revision=None,
            resolution=resolution))

    assert len(urls(tiny_teacher + "/")) == 3 and "made with another" not in caplog.text
    urls(str(tmp_path))
    assert (f"3 of the 3 latent shards with a record checked were made with another pretrained_teacher_model ({tiny_teacher}, "
            f"this run {tmp_path})") in caplog.text
    # Another resolution is certain, and a reader would stop the run at the first such shard: refused.
    with pytest.raises(SetupError, match=rf"3 of the 3 latent shards with a record checked hold latents of another "
                                         rf"--resolution \({RESOLUTION}; first: .*00000.tar\) than this run's {2 * RESOLUTION}"):
        urls(tiny_teacher, resolution=2 * RESOLUTION)


def test_latents_of_another_resolution_without_records_are_refused_when_read(latent_shards, tiny_teacher, tmp_path):
    """Shards without records (copied, or on a server) show their size only when a reader opens one."""
    for index in range(3):
        shutil.copy(f"{latent_shards[0]}/{index:05d}.tar", tmp_path)
    command = training_command(tiny_teacher, f"{tmp_path}/{{00000..00002}}.tar", str(tmp_path / "out"),
                               "--max_train_steps=2", f"--resolution={2 * RESOLUTION}", source=LATENTS)
    result = run_script(*command[command.index("train_splam_distill_sd_wds.py"):])
    assert result.returncode == 1
    assert "error: the latent shards hold moments.npy of shape" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", ["--center_crop", "--random_flip"])
def test_crop_and_flip_flags_are_refused_with_latents(flag, capsys):
    from splam.args import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--pretrained_teacher_model=t", f"{LATENTS}=x.tar", "--max_train_steps=1", flag])
    assert f"{flag} has no effect on {LATENTS}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_teacher_model=t", f"{LATENTS}=x.tar", "--train_shards_path_or_url=y.tar",
                    "--max_train_steps=1"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_latent_samples_without_arrays_or_with_junk_are_skipped_and_counted(tmp_path):
    moments, embeds = np.ones((2, 2, 2), np.float16), np.ones((3, 4), np.float16)
    samples = [
        {"__key__": "good0", "moments.npy": npy(moments), "prompt_embeds.npy": npy(embeds)},
        {"__key__": "noembeds", "moments.npy": npy(moments)},
        {"__key__": "junk", "moments.npy": npy(moments), "prompt_embeds.npy": b"not an array"},
        {"__key__": "good1", "moments.npy": npy(2 * moments), "prompt_embeds.npy": npy(embeds.astype(np.float32))},
    ]
    path = str(tmp_path / "latents.tar")
    with wds.TarWriter(path) as writer:
        for sample in samples:
            writer.write(sample)
    stream = ShardStream([path], LatentSamples((2, 2, 2), (3, 4)), batch_size=2, batches_per_segment=1,
                         shuffle_buffer=1, seed=0)
    ((batch_moments, batch_embeds, stats, _),) = list(stream)
    assert batch_moments.dtype == batch_embeds.dtype == torch.float32
    assert sorted(batch_moments.sum(dim=(1, 2, 3)).tolist()) == [8.0, 16.0]
    assert stats["no_latents"] == 1 and stats["undecodable_latents"] == 1


def test_precompute_leaves_out_a_shard_it_cannot_read(tiny_teacher, tiny_shards, tmp_path):
    """A shard that cannot be read is not written (so a rerun retries it), and the run says so."""
    output_dir = str(tmp_path / "latents")
    spec = tiny_shards.replace("{00000..00002}", "{00001..00003}")  # 00003 does not exist
    result = run_script("scripts/precompute_latents.py", f"--pretrained_teacher_model={tiny_teacher}",
                        f"--train_shards_path_or_url={spec}", f"--output_dir={output_dir}", f"--resolution={RESOLUTION}")
    assert result.returncode == 1
    assert "error: 1 shards could not be read to the end (first: " in result.stderr and "00003.tar" in result.stderr
    assert sorted(os.listdir(output_dir)) == ["00000.tar", "00000.tar.json", "00001.tar", "00001.tar.json"]


def test_precompute_splits_its_shards_between_jobs_or_a_launchers_processes(tiny_teacher, tiny_shards, tmp_path):
    """Job 0 of 2 writes shards 0 and 2 and says that shard 1 is still due (it said to train on all
    three); under torchrun the processes are the jobs (each took every shard, on the first GPU)."""
    output_dir = tmp_path / "latents"
    first_job = precompute(tiny_teacher, tiny_shards, output_dir, f"--resolution={RESOLUTION}", "--num_jobs=2", "--job_index=0")
    assert first_job.returncode == 0, first_job.stderr[-3000:]
    assert sorted(os.listdir(output_dir)) == ["00000.tar", "00000.tar.json", "00002.tar", "00002.tar.json"]
    assert f"shards still due from the other jobs: 1 of 3 (first: {output_dir}/00001.tar)" in first_job.stdout
    assert "Train with" not in first_job.stdout
    launched = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *precompute_command(tiny_teacher, tiny_shards, output_dir, f"--resolution={RESOLUTION}"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    # Process 1 alone takes shard 1, its only one; process 0 finds its shards 0 and 2 done.
    assert f"shard 1/1 ({output_dir}/00001.tar)" in launched.stdout and launched.stdout.count("shard ") == 1
    assert len(glob.glob(f"{output_dir}/*.tar")) == 3


def test_precompute_under_a_launcher_refuses_jobs_of_its_own(monkeypatch, capsys):
    from precompute_latents import parse_args

    required = ["--pretrained_teacher_model=t", "--train_shards_path_or_url=s", "--output_dir=o"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    args = parse_args(required)
    assert (args.num_jobs, args.job_index, args.gpu) == (4, 3, 1)
    with pytest.raises(SystemExit):
        parse_args([*required, "--num_jobs=2"])
    assert "leave out --num_jobs and --job_index" in capsys.readouterr().err
    monkeypatch.delenv("RANK")
    with pytest.raises(SystemExit):
        parse_args(required)
    assert "without integer WORLD_SIZE, RANK and LOCAL_RANK" in capsys.readouterr().err


def test_precompute_refuses_a_missing_teacher_a_file_as_output_dir_and_shards_that_are_not_there_in_one_line(
        tiny_teacher, tiny_shards, tmp_path):
    not_a_folder = tmp_path / "latents"
    not_a_folder.write_text("")
    cases = [(tmp_path / "missing", tiny_shards, tmp_path / "out", "error: cannot load the teacher's tokenizer from"),
             (tiny_teacher, tiny_shards, not_a_folder, "error: --output_dir"),
             # A glob, which shard specs do not expand: it was reported as a shard that could not be read.
             (tiny_teacher, f"{tmp_path}/*.tar", tmp_path / "out", "error: --train_shards_path_or_url matches no file")]
    results = run_scripts(*[precompute_command(teacher, shards, output_dir, f"--resolution={RESOLUTION}")
                            for teacher, shards, output_dir, _ in cases])
    for result, (_, _, _, expected) in zip(results, cases):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr[-3000:]


def test_precompute_leaves_out_a_shard_with_no_usable_sample_or_its_samples_files_apart(tiny_teacher, tiny_shards, tmp_path):
    """Shards without captions (here a .json of metadata without one) gave an empty latent shard,
    exit 0 and the advice to train on it; a rerun after fixing them then skipped it as done. One
    whose samples' files lie apart gave the few pairs side by side, as if that were the shard."""
    image = io.BytesIO()
    Image.new("RGB", (RESOLUTION, RESOLUTION), "red").save(image, format="JPEG")
    json_only = str(tmp_path / "json-only.tar")
    with wds.TarWriter(json_only) as writer:
        for index in range(3):
            writer.write({"__key__": f"k{index}", "jpg": image.getvalue(), "json": b'{"url": "http://x/red.jpg"}'})
    apart = str(tmp_path / "apart.tar")
    with tarfile.open(apart, "w") as tar:
        for name in ("k0.jpg", "k0.txt", "k1.jpg", "k2.jpg", "k1.txt", "k2.txt"):
            data = image.getvalue() if name.endswith(".jpg") else b"a red square"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    output_dir = str(tmp_path / "latents")
    result = precompute(tiny_teacher, f"{json_only}::{apart}::{tiny_shards.replace('{00000..00002}', '00000')}",
                        output_dir, f"--resolution={RESOLUTION}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "1 shards held no usable sample" in result.stderr and "json-only.tar" in result.stderr
    assert "1 shards hold files that webdataset cannot group into samples (first: " in result.stderr
    assert "the files of sample k1 are not adjacent" in result.stderr
    assert sorted(os.listdir(output_dir)) == ["00002.tar", "00002.tar.json"]


def test_precompute_refuses_to_write_over_its_input_shards(tiny_teacher, tiny_shards):
    """With --output_dir the shards' own folder, every input shard was taken for a finished output: nothing
    was encoded, and the run advised training on the image shards as latents."""
    shard_dir = os.path.dirname(tiny_shards)
    result = precompute(tiny_teacher, tiny_shards, shard_dir, f"--resolution={RESOLUTION}")
    assert result.returncode == 1 and "is the input shard" in result.stderr.strip().splitlines()[-1], result.stderr[-3000:]
    assert "Train with" not in result.stdout
