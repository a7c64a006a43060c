"""The COCO evaluation harness end to end on the tiny world, offline: a tiny TorchScript feature
extractor stands in for Inception-v3 and a tiny local CLIP for ViT-L/14."""

import glob
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from conftest import RESOLUTION, launch, run_script, run_scripts

CAPTIONS = {1: ["a cup of coffee", "coffee on a table"], 2: ["a rocket on a pad", "a rocket"], 3: ["a cat"],
            4: ["a galaxy", "stars in deep space", "the night sky"], 5: ["an astronaut"], 6: ["a colour wheel"]}


class TinyFeatures(torch.nn.Module):
    """uint8 images -> 16 pooled features of a fixed random conv net."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(images.float() / 255.0)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def world(tiny_teacher, tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    student = str(root / "student")
    launch(tiny_teacher, tiny_shards, student, "--max_train_steps=2", "--checkpointing_steps=2")
    annotations = [{"image_id": image_id, "id": 10 * image_id + k, "caption": text}
                   for image_id, texts in CAPTIONS.items() for k, text in enumerate(texts)]
    captions = root / "captions.json"
    captions.write_text(json.dumps({"annotations": annotations, "images": [{"id": i} for i in CAPTIONS]}))
    references = root / "reference"
    references.mkdir()
    rng = np.random.default_rng(0)
    for index in range(12):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(references / f"{index}.png")
    extractor = str(root / "features.pt")
    torch.jit.script(TinyFeatures()).save(extractor)
    clip = str(root / "clip")
    from make_tiny_teacher import character_tokenizer

    tokenizer = character_tokenizer(str(root))
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                           image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(clip)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(clip)
    return dict(student=student, captions=str(captions), references=str(references), extractor=extractor, clip=clip,
                root=root, teacher=tiny_teacher)


def evaluate(world, out, *flags):
    result = run_script("scripts/evaluate_coco.py", "--model", world["student"], "--captions", world["captions"],
                        "--num_images", "4", "--resolution", str(RESOLUTION), "--batch_size", "3",
                        "--clip_model", world["clip"], "--fid_feature_extractor", world["extractor"], "--out", out, *flags)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_a_distilled_model_gets_a_row_per_step_count_and_resumes(world):
    out = str(world["root"] / "results.json")
    first = evaluate(world, out, "--reference_images", world["references"], "--steps", "1", "2", "4")
    assert first.stdout.count(" 4 new images") == 3
    report = json.load(open(out))
    assert [(row["sampler"], row["steps"], row["guidance_scale"]) for row in report["results"]] == [("lcm", 1, 1.0), ("lcm", 2, 1.0), ("lcm", 4, 1.0)]
    for row in report["results"]:
        assert row["images"] == 4 and np.isfinite(row["fid"]) and row["fid"] >= 0 and np.isfinite(row["clip_score"])
    assert report["seeds"]["images"] == [0, 3] and "torch" in report["versions"]
    table = open(out.replace(".json", ".md")).read()
    assert len(re.findall(r"^\| lcm \| [124] \| 1 \|", table, re.M)) == 3

    images_dir = out.replace(".json", "-images")
    record = json.load(open(os.path.join(images_dir, "lcm-2", "000003.json")))
    assert record["seed"] == 3 and record["prompt"] in {text for texts in CAPTIONS.values() for text in texts}
    # Interrupted: one image lost. The rerun makes only that one, from the saved reference statistics.
    os.remove(os.path.join(images_dir, "lcm-2", "000001.json"))
    before = os.path.getmtime(os.path.join(images_dir, "lcm-2", "000000.png"))
    second = evaluate(world, out, "--reference_stats", os.path.join(images_dir, "reference_stats.pt"), "--steps", "1", "2", "4")
    assert "lcm-1: 0 new images" in second.stdout and "lcm-2: 1 new images" in second.stdout
    assert os.path.getmtime(os.path.join(images_dir, "lcm-2", "000000.png")) == before
    rerun = json.load(open(out))
    assert [row["fid"] for row in rerun["results"]] == pytest.approx([row["fid"] for row in report["results"]], rel=1e-4)

    # Another model in the same folder is refused; another seed (prompts and seeds) makes every image again.
    other_model = run_script("scripts/evaluate_coco.py", "--model", world["teacher"], "--captions", world["captions"],
                             "--num_images", "4", "--resolution", str(RESOLUTION), "--steps", "1", "--clip_model",
                             world["clip"], "--fid_feature_extractor", world["extractor"], "--reference_images",
                             world["references"], "--out", out)
    assert other_model.returncode != 0
    assert f"error: {images_dir}/lcm-1 holds images made with another model ({world['student']})" in other_model.stderr
    reseeded = evaluate(world, out, "--reference_stats", os.path.join(images_dir, "reference_stats.pt"), "--steps", "1",
                        "--seed", "7")
    assert "lcm-1: 4 new images" in reseeded.stdout
    assert json.load(open(os.path.join(images_dir, "lcm-1", "000000.json")))["seed"] == 7


def test_metrics_that_cannot_be_built_stop_the_run_before_it_samples(world):
    out = str(world["root"] / "no-clip.json")
    result = run_script("scripts/evaluate_coco.py", "--model", world["student"], "--captions", world["captions"],
                        "--num_images", "4", "--resolution", str(RESOLUTION), "--clip_model", str(world["root"] / "missing"),
                        "--fid_feature_extractor", world["extractor"], "--reference_images", world["references"],
                        "--out", out, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode != 0 and "error: cannot build the metrics" in result.stderr.strip().splitlines()[-1]
    assert not glob.glob(str(world["root"] / "no-clip-images" / "*" / "*.png"))


@pytest.mark.parametrize("flags, expected", [
    (["--resolution", "500"], "--resolution must be a multiple of 8, at least 8 (the VAE's factor), got 500"),
    (["--steps", "1", "0"], "--steps and --teacher_steps must be at least 1, got [1, 0]"),
])
def test_sampling_settings_no_pipeline_takes_are_refused_before_anything_loads(flags, expected, tmp_path):
    """Each stopped the sampling at its first batch with a traceback, after the model and the metrics
    had loaded (and, with --steps 1 0, after the whole 1-step row)."""
    result = run_script("scripts/evaluate_coco.py", "--model", str(tmp_path / "model"), "--captions",
                        str(tmp_path / "captions.json"), "--reference_stats", str(tmp_path / "stats.pt"),
                        "--out", str(tmp_path / "out.json"), *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert expected in result.stderr.strip().splitlines()[-1]


def test_a_missing_reference_or_model_stops_the_run_before_it_samples(world):
    """The reference images were first read after the sampling, hours in, and a step count the
    scheduler refuses stopped the run at its row."""
    missing = str(world["root"] / "missing")
    # As a run killed while it saved its reference statistics left them: read after hours of sampling.
    cut_short = world["root"] / "cut-short-reference_stats.pt"
    cut_short.write_bytes(b"PK\x03\x04" + bytes(60))
    cases = [
        (world["student"], ["--reference_images", missing], 2, "is not a folder of at least 2 images"),
        (world["student"], ["--reference_stats", missing], 2, "no such file"),
        # It was loaded (with a traceback) after the captions and the rows' checks; argparse keeps the last
        # --fid_feature_extractor, so this one replaces the command's valid one.
        (world["student"], ["--reference_images", world["references"], "--fid_feature_extractor", missing], 2,
         f"--fid_feature_extractor {missing}: no such file"),
        (world["student"], ["--reference_stats", str(cut_short)], 1, f"error: cannot read --reference_stats {cut_short}"),
        (missing, ["--reference_images", world["references"]], 1, "error: cannot load a pipeline from"),
        # More steps than the model's LCMScheduler takes stopped the run after the 1-step row.
        (world["student"], ["--reference_images", world["references"], "--steps", "1", "1000"], 1,
         "error: the row lcm-1000 cannot be sampled: "),
    ]
    out = str(world["root"] / "missing-input.json")
    results = run_scripts(*[["scripts/evaluate_coco.py", "--model", model, "--captions", world["captions"], "--num_images", "4",
                             "--resolution", str(RESOLUTION), "--clip_model", world["clip"], "--fid_feature_extractor",
                             world["extractor"], "--out", out, *flags] for model, flags, _, _ in cases])
    for result, (_, _, returncode, expected) in zip(results, cases):
        assert result.returncode == returncode and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert expected in result.stderr.strip().splitlines()[-1], result.stderr[-3000:]
        assert not glob.glob(str(world["root"] / "missing-input-images" / "*" / "*.png"))


def test_the_teacher_rows_use_ddim_and_guidance(world):
    out = str(world["root"] / "teacher.json")
    result = run_script("scripts/evaluate_coco.py", "--model", world["teacher"], "--captions", world["captions"],
                        "--num_images", "2", "--resolution", str(RESOLUTION), "--teacher_steps", "3", "5",
                        "--guidance_scale", "7.5", "--clip_model", world["clip"], "--fid_feature_extractor", world["extractor"],
                        "--reference_images", world["references"], "--out", out)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.load(open(out))["results"]
    assert [(row["sampler"], row["steps"], row["guidance_scale"]) for row in rows] == [("ddim", 3, 7.5), ("ddim", 5, 7.5)]


def test_fid_is_zero_against_itself_and_grows_with_a_shift(world):
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 200, (40, 3, 32, 32), dtype=np.uint8))
    fid = FrechetInceptionDistance(feature=torch.jit.load(world["extractor"]), reset_real_features=False)
    fid.update(images, real=True)
    fid.update(images, real=False)
    same = float(fid.compute())
    fid.reset()
    fid.update((images.int() + 50).clamp(0, 255).to(torch.uint8), real=False)
    shifted = float(fid.compute())
    assert abs(same) < 1e-3 and shifted > 100 * max(abs(same), 1e-6)


def test_caption_choice_is_seeded_and_one_per_image(world):
    from evaluate_coco import load_prompts

    first = load_prompts(world["captions"], 6, seed=0)
    assert first == load_prompts(world["captions"], 6, seed=0)
    assert all(any(prompt in CAPTIONS[i] for i in CAPTIONS) for prompt in first) and len(first) == 6
    assert [next(i for i in CAPTIONS if prompt in CAPTIONS[i]) for prompt in first] == sorted(CAPTIONS)
    assert any(load_prompts(world["captions"], 6, seed=seed) != first for seed in range(1, 6))
    with pytest.raises(SystemExit):
        load_prompts(world["captions"], 7, seed=0)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be"])
def test_a_prompt_file_with_a_byte_order_mark_gives_its_prompts_as_written(encoding, tmp_path):
    """The mark a Windows editor puts at the start of a UTF-8 file became part of the first prompt, and a
    UTF-16 file (Windows PowerShell 5's) was refused; training reads such captions (sample.py reads
    its --prompt_file the same way)."""
    from evaluate_coco import load_prompts

    path = tmp_path / "prompts.txt"
    text = "a red bus\r\nun café on a sofa\n"
    path.write_bytes(("\ufeff" + text if encoding == "utf-16-be" else text).encode(encoding))
    assert sorted(load_prompts(str(path), 2, seed=0)) == ["a red bus", "un café on a sofa"]


def test_an_image_whose_record_a_kill_cut_short_is_made_again(tmp_path):
    """The record is written after its image: a run killed while it wrote one left an empty file, on
    which every later run to resume stopped with a JSONDecodeError traceback."""
    from evaluate_coco import already_made

    (tmp_path / "000000.png").write_bytes(b"")
    (tmp_path / "000000.json").write_text("")
    assert not already_made(str(tmp_path), 0, "a red bus", 0)
    (tmp_path / "000000.json").write_text(json.dumps({"prompt": "a red bus", "seed": 0, "seconds": 0.1}))
    assert already_made(str(tmp_path), 0, "a red bus", 0) and not already_made(str(tmp_path), 0, "a red bus", 1)


@pytest.mark.parametrize("name, content, expected", [
    ("instances_val2014.json", b'{"annotations": [{"image_id": 1, "bbox": [0, 0, 5, 5]}]}', "is no COCO captions file"),
    ("captions.json", b'{"annotations": [{"image_id": 1, "caption": "a dog"}', "is no COCO captions file"),
    ("prompts.txt", "a red bus\nun caf\xe9\n".encode("latin-1"), "cannot read --captions"),
    ("prompts.txt", b"a red bus\n", "error: --num_images 2 is more than the 1 captioned images"),
], ids=["instances file", "cut-short json", "latin-1 text", "too few prompts"])
def test_captions_that_cannot_be_used_stop_the_run_with_one_line(name, content, expected, tmp_path):
    """COCO's other annotation files (instances_*, person_keypoints_*), a cut-short JSON and a
    file in another encoding gave tracebacks."""
    from evaluate_coco import load_prompts

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SystemExit) as stopped:
        load_prompts(str(path), 2, seed=0)
    message = str(stopped.value)
    assert message.startswith("error: ") and expected in message and "\n" not in message


def test_two_processes_split_the_images(world):
    out = str(world["root"] / "split.json")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "scripts/evaluate_coco.py",
                        "--model", world["student"], "--captions", world["captions"], "--num_images", "5",
                        "--resolution", str(RESOLUTION), "--steps", "1", "--clip_model", world["clip"],
                        "--fid_feature_extractor", world["extractor"], "--reference_images", world["references"],
                        "--out", out, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[process 0] lcm-1: 3 new images" in result.stdout and "[process 1] lcm-1: 2 new images" in result.stdout
    assert json.load(open(out))["results"][0]["images"] == 5
