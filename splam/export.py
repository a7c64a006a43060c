"""The final output: ``output_dir`` as a diffusers pipeline that samples in 1 to 4 steps.

``unet/`` is the EMA target (SPEC section 4), ``unet_online/`` the online student,
``scheduler/`` an ``LCMScheduler`` on the training's DDIM grid, and the VAE, text
encoder and tokenizer are the teacher's, in float32 as they were published. The
authors' script left two bare UNet folders that no pipeline loads (SPEC defect 6).
"""

import os

from .args import public_config
from .models import lcm_scheduler
from .validation import few_step_pipeline

CITATION = """@inproceedings{xu2024splam,
  title={Accelerating Image Generation with Sub-path Linear Approximation Model},
  author={Chen Xu and Tianhui Song and Weixin Feng and Xubin Li and Tiezheng Ge and Bo Zheng and Limin Wang},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2024}
}"""


def export_pipeline(args, tokenizer, text_encoder, vae, target_unet, online_unet, teacher_scheduler_config, global_step: int, samples_seen: int) -> None:
    """Save the distilled pipeline and its model card into ``args.output_dir``.

    ``text_encoder`` and ``vae`` must be float32 copies (training may hold them in half precision).
    """
    scheduler = lcm_scheduler(teacher_scheduler_config, args.num_ddim_timesteps)
    pipeline = few_step_pipeline(vae, text_encoder, tokenizer, target_unet, scheduler)
    pipeline.save_pretrained(args.output_dir)
    online_unet.save_pretrained(os.path.join(args.output_dir, "unet_online"))
    with open(os.path.join(args.output_dir, "README.md"), "w", encoding="utf-8") as card:
        card.write(model_card(args, global_step, samples_seen))


def model_card(args, global_step: int, samples_seen: int) -> str:
    """A Hub model card: YAML metadata, what the model is, how it was trained, how to use it."""
    settings = "\n".join(f"| `{key}` | `{value}` |" for key, value in sorted(public_config(args).items()))
    return f"""---
base_model: {args.pretrained_teacher_model}
library_name: diffusers
pipeline_tag: text-to-image
tags:
- splam
- lcm
- distillation
- text-to-image
- stable-diffusion
inference: true
---

# SPLAM-distilled {os.path.basename(os.path.normpath(args.pretrained_teacher_model))}

A 1 to 4 step text-to-image model distilled from `{args.pretrained_teacher_model}` with the
Sub-path Linear Approximation Model (SPLAM, Xu et al., ECCV 2024). `unet/` is the EMA target
network; `unet_online/` is the online student. Trained for {global_step} optimizer steps
({samples_seen} samples) with teacher guidance w = {args.w_scale} over {args.num_ddim_timesteps} sub-paths.

## Usage

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))}")
pipe.to("cuda", torch.float16)
image = pipe("a painting of a majestic kingdom", num_inference_steps=2, guidance_scale=1.0,
             original_inference_steps={args.num_ddim_timesteps}).images[0]
```

The scheduler is `LCMScheduler`; keep `guidance_scale=1`, which selects the sub-path endpoint
the model was trained to predict. 1, 2 and 4 steps are supported.

## Training settings

| flag | value |
| --- | --- |
{settings}

## Citation

```bibtex
{CITATION}
```
"""
