"""Publishing through the real huggingface_hub client, against a Hub-compatible server on loopback."""

import argparse
import html
import os
import re
import shutil

import pytest
import yaml
from huggingface_hub import ModelCard, constants

from splam.args import parse_args, public_config
from splam.checkpoints import rotate_checkpoints
from splam.hub import HubError, HubPublisher
from splam.model_card import model_card

from conftest import launch, run_script
from hub_server import USER, FakeHub

FLAG_TOKEN = "hf_FlagTokenForTheFakeHub"
ENV_TOKEN = "hf_EnvironmentTokenForTheFakeHub"


@pytest.fixture
def hub(monkeypatch):
    with FakeHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        yield server


@pytest.fixture(scope="module")
def pushed_run(tiny_teacher, tiny_shards, tmp_path_factory):
    """A short run with --push_to_hub and --push_checkpoints against the test server, whose uploads
    are slower than the run's steps (a checkpoint's upload is still under way at the next one's save)."""
    output_dir = str(tmp_path_factory.mktemp("push") / "splam-tiny")
    with FakeHub() as server:
        server.preupload_seconds = 3
        env = dict(os.environ, HF_ENDPOINT=server.endpoint, HF_TOKEN=ENV_TOKEN, HF_HUB_DISABLE_TELEMETRY="1")
        result = launch(
            tiny_teacher, tiny_shards, output_dir,
            "--max_train_steps=4", "--checkpointing_steps=2", "--checkpoints_total_limit=1", "--push_to_hub", "--push_checkpoints",
            "--hub_private_repo", f"--hub_token={FLAG_TOKEN}", "--validation_prompts", "a cat", "a rocket",
            env=env,
        )
        yield server, output_dir, result


def test_the_pipeline_and_the_checkpoints_arrive_and_nothing_else(pushed_run):
    """Every checkpoint arrives, also one that --checkpoints_total_limit would have deleted while it
    was uploaded: it is kept until its upload is done, and deleted at the end."""
    server, output_dir, result = pushed_run
    repo_id = f"{USER}/splam-tiny"
    assert list(server.repos) == [repo_id] and server.repos[repo_id]["private"]
    files = server.repos[repo_id]["files"]
    for name in ("model_index.json", "README.md", "samples.png", "scheduler/scheduler_config.json",
                 "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/tokenizer_config.json"):
        assert name in files, name
    for step in (2, 4):
        assert f"checkpoints/step-{step}/unet/diffusion_pytorch_model.safetensors" in files
        assert f"checkpoints/step-{step}/unet_target/diffusion_pytorch_model.safetensors" in files
    assert not [name for name in files if name.startswith(("unet_online", "logs", "validation", "checkpoint-"))]
    assert not [name for name in files if name.endswith((".bin", ".pkl", "training_state.json"))]
    assert sorted(server.repos[repo_id]["commits"]) == ["Checkpoint at step 2", "Checkpoint at step 4", "SPLAM-distilled pipeline"]
    uploads = [auth for method, path, auth in server.requests if method == "POST"]
    assert uploads and set(uploads) == {f"Bearer {FLAG_TOKEN}"}
    for content in files.values():
        assert FLAG_TOKEN.encode() not in content and ENV_TOKEN.encode() not in content
    assert "Uploaded the pipeline" in result.stderr
    assert sorted(name for name in os.listdir(output_dir) if "checkpoint" in name) == ["checkpoint-4"]
    assert server.validated_metadata and server.validated_metadata[-1]["library_name"] == "diffusers"


def test_the_pushed_model_loads_and_samples_elsewhere(pushed_run, tmp_path):
    server, _, _ = pushed_run
    code = (
        "import sys, torch\n"
        "from diffusers import DiffusionPipeline, LCMScheduler\n"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "assert isinstance(pipe.scheduler, LCMScheduler), type(pipe.scheduler)\n"
        "image = pipe('a rocket', num_inference_steps=2, guidance_scale=1.0, output_type='pt').images\n"
        "assert torch.isfinite(image).all() and image.std() > 0\n"
        "print('sampled', tuple(image.shape))\n"
    )
    env = dict(os.environ, HF_ENDPOINT=server.endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN=ENV_TOKEN)
    result = run_script("-c", code, f"{USER}/splam-tiny", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sampled (1, 3, 64, 64)" in result.stdout


def test_the_model_card(pushed_run):
    _, output_dir, _ = pushed_run
    text = open(os.path.join(output_dir, "README.md"), encoding="utf-8").read()
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "text-to-image"
    assert {"splam", "lcm", "distillation"} <= set(metadata["tags"])
    # The teacher is a local folder, which the Hub refuses as a base_model (its test server too).
    assert metadata["license"] == "mit" and "base_model" not in metadata
    assert f'DiffusionPipeline.from_pretrained("{USER}/splam-tiny")' in text
    assert ModelCard.load(os.path.join(output_dir, "README.md")).data.license == "mit"
    assert "4 optimizer steps (8 samples seen)" in text
    assert "![Samples at 1, 2 and 4 steps](samples.png)" in text and os.path.exists(os.path.join(output_dir, "samples.png"))
    assert "guidance_scale=1.0" in text and "LCMScheduler" in text and "arXiv 2404.13903" in text
    assert "| `w_scale` | `8.0` |" in text and "hub_token" not in text and FLAG_TOKEN not in text
    from PIL import Image

    grid = Image.open(os.path.join(output_dir, "samples.png"))
    assert grid.size == (2 * 64, 3 * 64)


def test_a_teacher_from_the_hub_is_the_cards_base_model():
    args = parse_args(["--pretrained_teacher_model=runwayml/stable-diffusion-v1-5", "--train_shards_path_or_url=x.tar",
                       "--max_train_steps=1", "--output_dir=runs/splam-sd15"])
    text = model_card(args, 1, 12, "samples.png")
    assert yaml.safe_load(text.split("---")[1])["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert "(https://huggingface.co/runwayml/stable-diffusion-v1-5)" in text
    assert 'from_pretrained("splam-sd15")' in text


def test_every_setting_stays_in_its_cell_of_the_cards_table_as_written():
    """Markdown ends a table cell at a ``|``, inside code too (a shard command that pipes its download
    through a decompressor split its row into extra cells), a row at a line break, and a code span at
    its first backtick unless opened with more; the table is read back with a Markdown renderer."""
    from markdown_it import MarkdownIt

    values = {"train_shards_path_or_url": "pipe:curl -s -L https://example.org/{00000..00009}.tar.zst | zstd -d",
              "tracker_project_name": "`quoted` and a `` double",
              "hub_model_id": "`edge`", "logging_dir": "two\nlines"}
    prompts = ["a cat | a dog", "a `dog`"]
    args = parse_args(["--pretrained_teacher_model=t", "--max_train_steps=1", "--validation_prompts", *prompts,
                       *[f"--{flag}={value}" for flag, value in values.items()]])
    card = model_card(args, 1, 2, "samples.png")
    table = card[card.index("| flag | value |"):].split("\n\n")[0]
    cells = re.findall(r"<tr>\s*<td><code>(.*?)</code></td>\s*<td><code>(.*?)</code></td>\s*</tr>",
                       MarkdownIt("commonmark").enable("table").render(table), re.S)
    settings = public_config(args)
    assert {flag: html.unescape(value) for flag, value in cells} == {
        flag: str(value).replace("\n", " ") for flag, value in settings.items()}, table
    assert [settings[flag] for flag in values] == list(values.values())
    assert "`dog`" in settings["validation_prompts"]


def test_a_failed_final_upload_says_where_the_pipeline_is(hub, tmp_path):
    publisher = HubPublisher("refused", token=FLAG_TOKEN)
    (tmp_path / "model_index.json").write_text("{}")
    hub.fail_commits = 1
    with pytest.raises(HubError, match=f"uploading the pipeline to {USER}/refused failed .*; it is complete in {tmp_path}"):
        publisher.push_pipeline(str(tmp_path))


def test_token_from_the_environment(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    publisher = HubPublisher("from-env")
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / "secret.txt").write_text("not for upload")
    publisher.push_pipeline(str(folder))
    assert publisher.repo_id == f"{USER}/from-env"
    assert set(hub.repos[publisher.repo_id]["files"]) == {"model_index.json"}
    assert {auth for method, _, auth in hub.requests if method == "POST"} == {f"Bearer {ENV_TOKEN}"}


def fake_checkpoint(output_dir, step: int) -> str:
    path = output_dir / f"checkpoint-{step}"
    (path / "unet").mkdir(parents=True)
    (path / "unet" / "config.json").write_text(f'{{"step": {step}}}')
    (path / "optimizer.bin").write_bytes(b"state")
    (path / "training_state.json").write_text("{}")
    return str(path)


def test_a_failed_checkpoint_upload_is_retried_at_the_next_checkpoint(hub, tmp_path, caplog):
    """Also under --checkpoints_total_limit=1: the failed checkpoint is kept for its retry. The
    calls come in the training loop's order: the rotation after a save, then the push."""
    publisher = HubPublisher("retries", token=FLAG_TOKEN)
    hub.fail_commits = 1
    publisher.push_checkpoint(fake_checkpoint(tmp_path, 2), 2)
    publisher.uploads[2].future.exception()  # let the failing upload finish
    fake_checkpoint(tmp_path, 4)
    rotate_checkpoints(str(tmp_path), 1, publisher.checkpoints_to_keep())
    publisher.push_checkpoint(str(tmp_path / "checkpoint-4"), 4)
    publisher.wait_for_checkpoints()
    rotate_checkpoints(str(tmp_path), 1, publisher.checkpoints_to_keep())
    files = hub.repos[publisher.repo_id]["files"]
    assert set(files) == {"checkpoints/step-2/unet/config.json", "checkpoints/step-4/unet/config.json"}
    assert "Upload of checkpoint step 2 failed" in caplog.text and "retrying" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4"]


def test_checkpoints_a_stopped_run_saved_but_had_not_uploaded_are_uploaded_by_the_next(hub, tmp_path):
    """Uploads run in the training process: one killed after saving checkpoint-4 and -6, before their
    uploads, left them on the disk only, and the resumed run's rotation deleted them unsent."""
    first_run = HubPublisher("resumed", token=FLAG_TOKEN)
    first_run.push_checkpoint(fake_checkpoint(tmp_path, 2), 2)
    first_run.wait_for_checkpoints()
    local = [str(tmp_path / "checkpoint-2"), fake_checkpoint(tmp_path, 4), fake_checkpoint(tmp_path, 6)]
    resumed_run = HubPublisher("resumed", token=FLAG_TOKEN)
    resumed_run.push_missing_checkpoints(local)
    assert sorted(resumed_run.uploads) == [4, 6]
    assert resumed_run.checkpoints_to_keep() <= set(local[1:])  # kept from the rotation until sent
    resumed_run.wait_for_checkpoints()
    assert {name.split("/")[1] for name in hub.repos[resumed_run.repo_id]["files"]} == {"step-2", "step-4", "step-6"}
    assert hub.repos[resumed_run.repo_id]["commits"] == [f"Checkpoint at step {step}" for step in (2, 4, 6)]


def test_checkpoints_uploading_are_kept_past_the_limit_and_uploads_fall_behind_by_at_most_the_limit(hub, tmp_path):
    publisher = HubPublisher("slow", token=FLAG_TOKEN)
    hub.preupload_seconds = 1
    for step in (2, 4, 6):  # as the training loop does at each checkpoint, with --checkpoints_total_limit=1
        while not publisher.caught_up(1, wait_seconds=0.1):
            pass
        keep = publisher.checkpoints_to_keep()
        assert sum(not upload.future.done() for upload in publisher.uploads.values()) <= 1
        fake_checkpoint(tmp_path, step)
        rotate_checkpoints(str(tmp_path), 1, keep)
        publisher.push_checkpoint(str(tmp_path / f"checkpoint-{step}"), step)
    # At checkpoint-6 the upload of 2 was waited for, and 4's was under way: 4 stays past the limit.
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-6"]
    publisher.wait_for_checkpoints()
    rotate_checkpoints(str(tmp_path), 1, publisher.checkpoints_to_keep())
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6"]
    assert {name.split("/")[1] for name in hub.repos[publisher.repo_id]["files"]} == {"step-2", "step-4", "step-6"}


def test_an_unreachable_hub_stops_the_run_before_training(tiny_teacher, tiny_shards, tmp_path):
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2")
    result = run_script("train_splam_distill_sd_wds.py", f"--pretrained_teacher_model={tiny_teacher}",
                        f"--train_shards_path_or_url={tiny_shards}", f"--output_dir={tmp_path}/out",
                        "--max_train_steps=2", "--push_to_hub", env=env, timeout=300)
    assert result.returncode != 0
    assert "error: cannot create the Hub repository 'out'" in result.stderr.strip().splitlines()[-1]


def test_the_licence_of_a_hub_teacher_comes_from_the_cache_its_weights_came_from(tmp_path, monkeypatch):
    """--cache_dir and --teacher_revision apply to the teacher's card as to its weights."""
    from splam.model_card import teacher_license

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--someone--tiny-sd"
    for revision, commit, license_name in (("main", "a" * 40, "mit"), ("v2", "b" * 40, "apache-2.0")):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "README.md").write_text(f"---\nlicense: {license_name}\n---\n# tiny\n")
    teacher = argparse.Namespace(pretrained_teacher_model="someone/tiny-sd", teacher_revision=None, cache_dir=str(tmp_path))
    assert teacher_license(teacher) == "mit"
    assert teacher_license(argparse.Namespace(**{**vars(teacher), "teacher_revision": "v2"})) == "apache-2.0"


def test_a_token_inside_the_shard_command_reaches_neither_the_card_nor_the_trackers(monkeypatch):
    """Gated webdatasets on the Hub stream with ``pipe:curl ... -H 'Authorization:Bearer hf_...'``: the
    token in the shard flag must not be published in the model card, the tracker config or argv."""
    from splam.args import public_config, redact_secrets

    # The environment's token is masked as the token it is, whatever it looks like; a Hub token typed
    # into the command by its form; any Authorization header's value, whatever its scheme.
    environment_token = "a-token-of-no-known-form-0123"
    monkeypatch.setenv("HF_TOKEN", environment_token)
    typed = "hf_AnotherTokenTypedIntoTheCommand0123"
    basic = "dXNlcjpwYXNzd29yZA=="
    shards = ("pipe:curl -s -L https://huggingface.co/datasets/someone/gated/resolve/main/{00000..00009}.tar "
              f"-H \"X-Token: {environment_token}\" -H \"X-Other: {typed}\" -H 'Authorization: Basic {basic}'")
    argv = ["--pretrained_teacher_model=t", f"--train_shards_path_or_url={shards}", "--max_train_steps=1",
            "--output_dir=o", "--cache_dir=/data/hf_laion2Baesthetics6plus"]
    args = parse_args(argv)
    texts = [str(public_config(args)), model_card(args, 1, 2, "samples.png"), " ".join(redact_secrets(argv))]
    for text in texts:
        assert environment_token not in text and typed not in text and basic not in text
        assert "/data/hf_laion2Baesthetics6plus" in text  # a name that only starts like a token is kept
    assert "resolve/main/{00000..00009}.tar" in texts[1]  # the rest of the flag is still recorded
    # scripts/precompute_latents.py records each output shard's input beside it
    from precompute_latents import SETTINGS, shard_record

    record = shard_record(argparse.Namespace(**dict.fromkeys(SETTINGS)), shards)
    assert basic not in record["input"] and "resolve/main" in record["input"]


def test_a_resumed_run_uploads_the_checkpoint_it_resumes_from_when_the_hub_lacks_it(pushed_run, tiny_teacher, tiny_shards,
                                                                                      tmp_path):
    """The run's checkpoint-4 as a killed run would leave it, saved but not uploaded (a Hub that has
    nothing yet): the relaunch, which only exports, sends it before the pipeline."""
    output_dir = str(tmp_path / "splam-tiny")
    shutil.copytree(pushed_run[1], output_dir)
    with FakeHub() as server:
        env = dict(os.environ, HF_ENDPOINT=server.endpoint, HF_TOKEN=ENV_TOKEN, HF_HUB_DISABLE_TELEMETRY="1")
        result = launch(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=4", "--checkpointing_steps=2",
                        "--checkpoints_total_limit=1", "--push_checkpoints", "--resume_from_checkpoint=latest",
                        "--report_to=none", env=env)
        assert "checkpoint-4 is not on the Hub" in result.stderr, result.stderr[-3000:]
        assert server.repos[f"{USER}/splam-tiny"]["commits"] == ["Checkpoint at step 4"]
