"""The final output: ``output_dir`` as a diffusers pipeline that samples in 1 to 4 steps.

``unet/`` is the EMA target (SPEC section 4), ``unet_online/`` the online student,
``scheduler/`` an ``LCMScheduler`` on the training's DDIM grid, and the VAE, text
encoder and tokenizer are the teacher's (the VAE ``--pretrained_vae_model_name_or_path``'s
where given), loaded afresh in float32. The authors' script left two bare UNet folders that
no pipeline loads (SPEC defect 6).
"""

import os

from .model_card import model_card, teacher_license
from .models import lcm_scheduler
from .validation import few_step_pipeline, image_grid, sample_validation_images

GRID_FILE = "samples.png"
MODEL_INDEX = "model_index.json"


def export_pipeline(args, tokenizer, text_encoder, vae, target_unet, online_unet, teacher_scheduler_config,
                    global_step: int, samples_seen: int, repo_id=None) -> None:
    """Save the distilled pipeline, a grid of its samples and its model card into ``args.output_dir``;
    ``repo_id`` is the Hub repository it goes to, if any, for the card's usage snippet.

    ``text_encoder`` and ``vae`` must be float32 copies (training may hold them in half precision).
    """
    # model_index.json makes a folder a pipeline (DiffusionPipeline, the scripts' checks): an earlier
    # export's goes first and this one's, which diffusers writes after the components, comes last,
    # so that a run killed mid-export leaves no folder that loads a mix of two exports or half of one.
    index_path = os.path.join(args.output_dir, MODEL_INDEX)
    if os.path.exists(index_path):
        os.remove(index_path)
    scheduler = lcm_scheduler(teacher_scheduler_config, args.num_ddim_timesteps)
    pipeline = few_step_pipeline(vae, text_encoder, tokenizer, target_unet, scheduler)
    online_unet.save_pretrained(os.path.join(args.output_dir, "unet_online"))
    seed = 0 if args.seed is None else args.seed
    images = sample_validation_images(pipeline.to(target_unet.device), args.validation_prompts, args.resolution, seed)
    image_grid(list(images.values())).save(os.path.join(args.output_dir, GRID_FILE))
    card = model_card(args, global_step, samples_seen, GRID_FILE, teacher_license(args), repo_id)
    with open(os.path.join(args.output_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)
    pipeline.save_pretrained(args.output_dir)
