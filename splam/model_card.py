"""The model card (``README.md``) of a distilled pipeline, in the Hub's format."""

import os
import re

from huggingface_hub import ModelCard, hf_hub_download

from .args import public_config

CITATION = """@inproceedings{xu2024splam,
  title={Accelerating Image Generation with Sub-path Linear Approximation Model},
  author={Chen Xu and Tianhui Song and Weixin Feng and Xubin Li and Tiezheng Ge and Bo Zheng and Limin Wang},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2024}
}"""


def teacher_license(args):
    """The ``license`` of the teacher's model card, or ``None`` when it has no card or none can be read."""
    source = args.pretrained_teacher_model
    try:
        if os.path.isdir(source):
            path = os.path.join(source, "README.md")
        else:  # the teacher's revision, from the cache the weights came from
            path = hf_hub_download(source, "README.md", revision=args.teacher_revision, cache_dir=args.cache_dir)
        card = ModelCard.load(path)
    except Exception:  # no README, no network, no such repository: the licence is simply unknown
        return None
    return card.data.license


def table_code(value) -> str:
    """``value`` as inline code in a Markdown table cell. A ``|`` (a shard command's pipe) ends the
    cell even inside code unless escaped, a line break ends the row, and a code span ends at the first
    run of as many backticks as opened it: so the span opens with one backtick more than the longest
    run inside, padded with a space where the value starts or ends with one (CommonMark strips it)."""
    text = re.sub(r"\s*\n\s*", " ", str(value)).replace("|", "\\|")
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def model_card(args, global_step: int, samples_seen: int, grid_file: str, license_name=None, repo_id=None) -> str:
    """YAML metadata, what the model is, how to use it, how it was trained (no secrets), the sample grid.
    ``repo_id`` is the Hub repository, with its namespace; without one the card names the model
    as ``--hub_model_id`` or the output folder would be called."""
    repo_name = repo_id or args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    settings = "\n".join(f"| `{key}` | {table_code(value)} |" for key, value in sorted(public_config(args).items()))
    teacher = args.pretrained_teacher_model
    # The Hub refuses a card whose base_model is not one of its models, as a local folder is not.
    teacher_on_hub = not os.path.isdir(teacher)
    base_model_line = f"base_model: {teacher}\n" if teacher_on_hub else ""
    teacher_link = (f"[`{teacher}`](https://huggingface.co/{teacher})" if teacher_on_hub
                    else f"`{os.path.basename(os.path.normpath(teacher))}`")
    license_line = f"license: {license_name}\n" if license_name else ""
    return f"""---
{base_model_line}{license_line}library_name: diffusers
pipeline_tag: text-to-image
tags:
- splam
- lcm
- distillation
- text-to-image
- stable-diffusion
inference: true
---

# {repo_name}

A 1 to 4 step text-to-image model distilled from
{teacher_link} with the
Sub-path Linear Approximation Model (SPLAM, Xu et al., ECCV 2024, arXiv 2404.13903).
`unet/` is the EMA target network; the scheduler is `LCMScheduler`.

Trained for {global_step} optimizer steps ({samples_seen} samples seen) with teacher guidance
w = {args.w_scale} over {args.num_ddim_timesteps} sub-paths.

![Samples at 1, 2 and 4 steps]({grid_file})

Rows: 1, 2 and 4 steps; columns: the validation prompts, at `guidance_scale=1`.

## Usage

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_name}")  # an LCMScheduler pipeline
pipe.to("cuda", torch.float16)
image = pipe("a painting of a majestic kingdom", num_inference_steps=2, guidance_scale=1.0,
             original_inference_steps={args.num_ddim_timesteps}).images[0]
```

Keep `guidance_scale=1`: the pipeline then feeds the model the embedding of gamma = 1, the
sub-path endpoint it was trained to predict. 1, 2, 3 or 4 steps.

## Training settings

| flag | value |
| --- | --- |
{settings}

## Citation

```bibtex
{CITATION}
```
"""
