"""Two processes (accelerate's MULTI_CPU over gloo, launched by torchrun)."""

import io
import os

import torch
import webdataset as wds
from PIL import Image
from transformers import CLIPTokenizer

from splam.data import ImageTransform, ShardStream, make_train_dataloader, train_batches

from conftest import RESOLUTION, logged_scalars, run_script, training_command


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
        stream = ShardStream(urls, ImageTransform(RESOLUTION), tokenizer, batch_size=2, batches_per_segment=4,
                             shuffle_buffer=4, seed=3, process_index=process_index, num_processes=2)
        loader = make_train_dataloader(stream, num_workers=2, pin_memory=False)
        captions = []
        for _, (_, input_ids, _) in zip(range(6), train_batches(loader, 0)):
            captions += [caption.replace(" ", "") for caption in tokenizer.batch_decode(input_ids, skip_special_tokens=True)]
        captions_by_process.append(captions)
    first, second = (set(captions) for captions in captions_by_process)
    assert len(first) > 4 and len(second) > 4
    assert not first & second
    shard_of = lambda caption: int(caption[1:caption.index("i")])  # noqa: E731
    assert {shard_of(c) % 4 for c in first} <= {0, 1} and {shard_of(c) % 4 for c in second} <= {2, 3}


def torchrun(teacher, shards, output_dir, *flags):
    command = training_command(teacher, shards, output_dir, *flags)
    script_index = command.index("train_splam_distill_sd_wds.py")
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", *command[script_index:], env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    return result


def test_two_processes_train_checkpoint_and_resume(tiny_teacher, tiny_shards, tmp_path):
    output_dir = str(tmp_path / "ddp")
    flags = ["--gradient_accumulation_steps=2", "--checkpointing_steps=2", "--checkpoints_total_limit=2",
             "--resume_from_checkpoint=latest", "--dataloader_num_workers=1"]
    first = torchrun(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=4", *flags)
    assert "processes = 2, accumulation steps = 2, global batch = 8" in first.stderr
    assert first.stderr.count("EMA target identical on all 2 processes") == 2
    checkpoint = os.path.join(output_dir, "checkpoint-4")
    assert {"random_states_0.pkl", "random_states_1.pkl", "unet", "unet_target"} <= set(os.listdir(checkpoint))

    second = torchrun(tiny_teacher, tiny_shards, output_dir, "--max_train_steps=6", *flags)
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
