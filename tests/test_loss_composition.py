"""The whole SPLAM step (splam.training.splam_loss) against an independent float64 recomputation
of SPEC section 3, built from diffusers' own pieces: DDIMScheduler.step for the teacher's DDIM step,
LCMScheduler's boundary scalings and the LCM pipeline's guidance embedding for E(gamma).

test_math checks each formula alone; this checks how the step composes them (which timestep,
which alpha and sigma, which embedding and which prompt go to which net)."""

import contextlib
import copy

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler

from splam.args import parse_args
from splam.models import load_teacher_scheduler
from splam.training import build_distillation_models, encode_batch, encode_prompts, splam_loss

BATCH = 8


def reference_loss(models, args, scheduler, latents, input_ids, index, noise, gamma):
    """SPEC section 3 steps 2-7 in float64, from the draws ``index``, ``noise`` and ``gamma``."""
    T, N = scheduler.config.num_train_timesteps, args.num_ddim_timesteps
    betas = np.linspace(scheduler.config.beta_start ** 0.5, scheduler.config.beta_end ** 0.5, T, dtype=np.float64) ** 2
    acp = torch.tensor(np.cumprod(1.0 - betas))
    K = T // N
    ts = (index + 1) * K - 1
    te = (ts - K).clamp(min=0)
    col = lambda values: values.reshape(-1, 1, 1, 1)  # noqa: E731
    a = lambda t: col(acp[t].sqrt())  # noqa: E731
    s = lambda t: col((1.0 - acp[t]).sqrt())  # noqa: E731
    with torch.no_grad():
        c = encode_prompts(input_ids, models.text_encoder).double()
        u = models.uncond_prompt_embeds.double().expand_as(c)
    teacher, target, student = (copy.deepcopy(net).double() for net in (models.teacher_unet, models.target_unet, models.unet))
    dim = target.config.time_cond_proj_dim

    def embedding(g):
        return LatentConsistencyModelPipeline.get_guidance_scale_embedding(
            None, (10.0 - 10.0 * g).float(), embedding_dim=dim, dtype=torch.float64)

    lcm = LCMScheduler.from_config(scheduler.config, timestep_scaling=10.0)

    def scalings(t):
        pairs = [lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(float(v), dtype=torch.float64)) for v in t]
        return col(torch.stack([p[0] for p in pairs])), col(torch.stack([p[1] for p in pairs]))

    ddim = DDIMScheduler.from_config(scheduler.config, clip_sample=False, steps_offset=0, timestep_spacing="leading")
    ddim.alphas_cumprod, ddim.final_alpha_cumprod, ddim.num_inference_steps = acp, acp[0], N

    z = latents.double()
    x_s = a(ts) * z + s(ts) * noise
    with torch.no_grad():
        eps_c = teacher(x_s, ts, encoder_hidden_states=c).sample
        eps_u = teacher(x_s, ts, encoder_hidden_states=u).sample
        eps = eps_c + args.w_scale * (eps_c - eps_u)
        x_e = torch.cat([ddim.step(eps[k:k + 1], int(ts[k]), x_s[k:k + 1], eta=0.0).prev_sample for k in range(len(ts))])
        eps_T = target(x_e, te, timestep_cond=embedding(torch.ones(len(ts))), encoder_hidden_states=c).sample
        c_skip, c_out = scalings(te)
        y_T = c_skip * x_e + c_out * (x_e - s(te) * eps_T) / a(te)
        r, g = a(ts) / a(te), col(gamma)
        x_g = g * x_s + (1.0 - g) * r * x_e
        sigma_g = ((s(te) * r) ** 2 + g ** 2 * (1.0 - r ** 2)).sqrt()
        eps_S = student(x_g, ts, timestep_cond=embedding(gamma), encoder_hidden_states=c).sample
        c_skip, c_out = scalings(ts)
        y_S = c_skip * x_g + c_out * (x_g - sigma_g * eps_S) / a(ts)
    d = y_S - y_T
    if args.loss_type == "l2":
        return (d ** 2).mean().item()
    return ((d ** 2 + args.huber_c ** 2).sqrt() - args.huber_c).mean().item()


@pytest.mark.parametrize("flags", [["--num_ddim_timesteps=4"], ["--num_ddim_timesteps=30", "--loss_type=huber", "--w_scale=3.0"]])
def test_the_step_composes_the_spec_formulas(tiny_teacher, flags):
    args = parse_args([f"--pretrained_teacher_model={tiny_teacher}", "--train_shards_path_or_url=unused",
                       "--max_train_steps=1", "--resolution=64", "--seed=0", *flags])
    scheduler = load_teacher_scheduler(args)
    models = build_distillation_models(args, Accelerator(cpu=True, mixed_precision="no"), scheduler)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # student, target and teacher all different, so that every input matters
        for net in (models.unet, models.target_unet):
            for param in net.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
    pixels = torch.rand((BATCH, 3, 64, 64), generator=generator) * 2 - 1
    input_ids = torch.randint(0, len(models.tokenizer), (BATCH, 77), generator=generator)
    latents, prompt_embeds = encode_batch(pixels, input_ids, models, args)

    torch.manual_seed(1)
    loss = splam_loss(latents, prompt_embeds, models, args, contextlib.nullcontext).item()
    torch.manual_seed(1)  # the same draws, in splam_loss's order: sub-path indices, noise, gamma
    index = torch.randint(0, args.num_ddim_timesteps, (BATCH,))
    noise = torch.randn(latents.shape).double()
    gamma = torch.rand(BATCH).double()
    expected = reference_loss(models, args, scheduler, latents, input_ids, index, noise, gamma)
    if args.num_ddim_timesteps == 4:
        assert 0 in index.tolist()  # the first sub-path, which ends at t = 0, is among the draws
    assert loss == pytest.approx(expected, rel=2e-5)
