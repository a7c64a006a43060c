"""The SPLAM math against independent float64 derivations (SPEC sections 2 and 3)."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, LatentConsistencyModelPipeline

from splam import (
    DDIMSolver,
    consistency_output,
    distillation_loss,
    gamma_embedding,
    guided_teacher_prediction,
    predicted_origin,
    sample_gamma,
    scalings_for_boundary_conditions,
    sub_path_point,
    update_ema,
)
from splam.models import lcm_scheduler


def sd_alphas_cumprod():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def float64_alphas_cumprod():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_ddim_grid_is_the_spec_grid():
    solver = DDIMSolver(sd_alphas_cumprod(), timesteps=1000, ddim_timesteps=50)
    assert solver.ddim_timesteps.dtype == torch.long
    assert solver.ddim_timesteps.tolist() == [(i + 1) * 20 - 1 for i in range(50)]
    start, end = solver.sub_path(torch.tensor([0, 1, 49]))
    assert start.tolist() == [19, 39, 999]
    assert end.tolist() == [0, 19, 979]


@pytest.mark.parametrize("num_ddim", [50, 25, 10])
def test_ddim_step_matches_float64(rng, num_ddim):
    acp64 = float64_alphas_cumprod()
    solver = DDIMSolver(torch.tensor(acp64, dtype=torch.float32), 1000, num_ddim)
    step = 1000 // num_ddim
    index = rng.integers(0, num_ddim, size=6)
    x0 = rng.standard_normal((6, 4, 8, 8))
    eps = rng.standard_normal((6, 4, 8, 8))
    grid = (np.arange(num_ddim) + 1) * step - 1
    prev = np.where(index > 0, acp64[grid[np.maximum(index - 1, 0)]], acp64[0]).reshape(-1, 1, 1, 1)
    expected = np.sqrt(prev) * x0 + np.sqrt(1 - prev) * eps
    result = solver.ddim_step(torch.tensor(x0, dtype=torch.float32), torch.tensor(eps, dtype=torch.float32), torch.tensor(index))
    assert result.dtype == torch.float32
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_no_float64_leaks_into_the_student_input():
    solver = DDIMSolver(torch.tensor(float64_alphas_cumprod()), 1000, 50)
    for table in (solver.alphas, solver.sigmas, solver.ddim_alpha_cumprods_prev):
        assert table.dtype == torch.float32
    index = torch.tensor([3, 7])
    start, end = solver.sub_path(index)
    alpha_start, _ = solver.alpha_sigma(start, 4)
    alpha_end, sigma_end = solver.alpha_sigma(end, 4)
    x_start = torch.randn(2, 4, 8, 8)
    x_end = solver.ddim_step(x_start, torch.randn(2, 4, 8, 8), index)
    x_gamma, sigma_gamma = sub_path_point(x_start, x_end, torch.rand(2, 1, 1, 1), alpha_start, alpha_end, sigma_end)
    assert x_end.dtype == x_gamma.dtype == sigma_gamma.dtype == torch.float32
    half = solver.ddim_step(x_start.half(), x_start.half(), index)
    assert half.dtype == torch.float16


@pytest.mark.parametrize("num_ddim", [50, 30])
def test_the_exported_sampler_follows_the_training_schedule_and_grid(num_ddim):
    """Only the noise schedule comes from the teacher's config: a config written without
    ``clip_sample`` reads as DDPM's default (clipping), and thresholding or another timestep
    scaling would change how the sampler forms x0 from what training taught."""
    teacher = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, thresholding=True)
    sampler = lcm_scheduler(dict(teacher.config, timestep_scaling=1.0), num_ddim)
    assert not sampler.config.clip_sample and not sampler.config.thresholding
    assert sampler.config.timestep_scaling == 10.0 and sampler.config.prediction_type == "epsilon"
    assert torch.equal(sampler.alphas_cumprod, teacher.alphas_cumprod)
    sampler.set_timesteps(num_ddim)  # all of the original grid: 999, 979, ... (989, 956, ... for 30)
    solver = DDIMSolver(teacher.alphas_cumprod, 1000, num_ddim)
    assert sampler.timesteps.tolist() == solver.ddim_timesteps.flip(0).tolist()


def test_boundary_scalings_match_float64(rng):
    t = rng.integers(0, 1000, size=20).astype(np.float64)
    c_skip, c_out = scalings_for_boundary_conditions(torch.tensor(t, dtype=torch.float32))
    np.testing.assert_allclose(c_skip.numpy(), 0.25 / ((10 * t) ** 2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(c_out.numpy(), 10 * t / np.sqrt((10 * t) ** 2 + 0.25), rtol=1e-6)
    c_skip0, c_out0 = scalings_for_boundary_conditions(torch.tensor(0.0))
    assert c_skip0.item() == 1.0 and c_out0.item() == 0.0


@pytest.mark.parametrize("dim", [256, 255, 32])
def test_gamma_embedding_matches_float64_and_diffusers(rng, dim):
    gamma = rng.random(7)
    w = (10.0 - 10.0 * gamma) * 1000.0
    half = dim // 2
    freqs = np.exp(-np.arange(half) * math.log(10000.0) / (half - 1))
    expected = np.concatenate([np.sin(w[:, None] * freqs), np.cos(w[:, None] * freqs)], axis=1)
    if dim % 2:
        expected = np.pad(expected, ((0, 0), (0, 1)))
    result = gamma_embedding(torch.tensor(gamma, dtype=torch.float32), dim)
    assert result.shape == (7, dim) and result.dtype == torch.float32
    # Angles up to 1e4 rad in float32 carry ~1e-3 absolute phase error, as in diffusers.
    np.testing.assert_allclose(result.numpy(), expected, atol=2e-3)
    reference = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.tensor(10.0 - 10.0 * gamma, dtype=torch.float32), embedding_dim=dim
    )
    np.testing.assert_allclose(result.numpy(), reference.numpy(), atol=2e-3)


def test_gamma_one_is_what_lcm_pipelines_feed_at_guidance_scale_one():
    pipeline_embedding = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.tensor([1.0 - 1.0]), embedding_dim=256
    )
    assert torch.equal(gamma_embedding(torch.ones(1), 256), pipeline_embedding)


def float64_schedule_points(rng, batch):
    acp = float64_alphas_cumprod()
    ts = (rng.integers(0, 50, size=batch) + 1) * 20 - 1
    te = np.maximum(ts - 20, 0)
    shape = (batch, 1, 1, 1)
    a_s, s_s = np.sqrt(acp[ts]).reshape(shape), np.sqrt(1 - acp[ts]).reshape(shape)
    a_e, s_e = np.sqrt(acp[te]).reshape(shape), np.sqrt(1 - acp[te]).reshape(shape)
    return ts, a_s, s_s, a_e, s_e


def test_sub_path_point_matches_float64(rng):
    _, a_s, s_s, a_e, s_e = float64_schedule_points(rng, 8)
    x_s, x_e = rng.standard_normal((8, 4, 8, 8)), rng.standard_normal((8, 4, 8, 8))
    gamma = rng.random((8, 1, 1, 1))
    r = a_s / a_e
    as_t = lambda array: torch.tensor(array, dtype=torch.float32)  # noqa: E731
    x_g, sigma_g = sub_path_point(as_t(x_s), as_t(x_e), as_t(gamma), as_t(a_s), as_t(a_e), as_t(s_e))
    np.testing.assert_allclose(x_g.numpy(), gamma * x_s + (1 - gamma) * r * x_e, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sigma_g.numpy(), np.sqrt((s_e * r) ** 2 + gamma**2 * (1 - r**2)), rtol=1e-5)


def test_sub_path_endpoints(rng):
    a_s, s_s, a_e, s_e = (torch.tensor(v, dtype=torch.float64) for v in float64_schedule_points(rng, 8)[1:])
    x_s, x_e = torch.randn(8, 4, 2, 2, dtype=torch.float64), torch.randn(8, 4, 2, 2, dtype=torch.float64)
    r = a_s / a_e
    x_g, sigma_g = sub_path_point(x_s, x_e, torch.ones(8, 1, 1, 1, dtype=torch.float64), a_s, a_e, s_e)
    torch.testing.assert_close(x_g, x_s)
    torch.testing.assert_close(sigma_g, s_s)
    x_g, sigma_g = sub_path_point(x_s, x_e, torch.zeros(8, 1, 1, 1, dtype=torch.float64), a_s, a_e, s_e)
    torch.testing.assert_close(x_g, r * x_e)
    torch.testing.assert_close(sigma_g, r * s_e)


def test_sigma_gamma_is_the_noise_level_of_the_sub_path_point(rng):
    """Monte Carlo: with x_e = a(te) z + s(te) n and x_s its forward diffusion to ts,
    x_g - a(ts) z has standard deviation sigma_g."""
    a_s, _, a_e, s_e = (v.item() for v in float64_schedule_points(rng, 1)[1:])
    r = a_s / a_e
    z = rng.standard_normal(400_000)
    x_e = a_e * z + s_e * rng.standard_normal(z.shape)
    x_s = r * x_e + math.sqrt(1 - r**2) * rng.standard_normal(z.shape)
    for gamma in (0.0, 0.3, 0.8, 1.0):
        x_g, sigma_g = sub_path_point(
            torch.tensor(x_s), torch.tensor(x_e), torch.tensor(gamma), torch.tensor(a_s), torch.tensor(a_e), torch.tensor(s_e)
        )
        assert (x_g.numpy() - a_s * z).std() == pytest.approx(sigma_g.item(), rel=1e-2)


def test_gamma_one_reduces_to_the_lcm_consistency_target(rng):
    """At gamma = 1 the student's endpoint is LCM's c_skip(ts) x_s + c_out(ts) (x_s - s(ts) eps) / a(ts)."""
    ts, a_s, s_s, a_e, s_e = float64_schedule_points(rng, 4)
    x_s, x_e, eps = (rng.standard_normal((4, 4, 8, 8)) for _ in range(3))
    t64 = lambda array: torch.tensor(array, dtype=torch.float64)  # noqa: E731
    x_g, sigma_g = sub_path_point(t64(x_s), t64(x_e), t64(np.ones((4, 1, 1, 1))), t64(a_s), t64(a_e), t64(s_e))
    c_skip, c_out = scalings_for_boundary_conditions(t64(ts).reshape(4, 1, 1, 1))
    y_student = consistency_output(x_g, predicted_origin(t64(eps), x_g, t64(a_s), sigma_g), c_skip, c_out)
    scaled = 10.0 * ts.reshape(4, 1, 1, 1)
    lcm_target = 0.25 / (scaled**2 + 0.25) * x_s + scaled / np.sqrt(scaled**2 + 0.25) * (x_s - s_s * eps) / a_s
    np.testing.assert_allclose(y_student.numpy(), lcm_target, rtol=1e-10, atol=1e-10)


def test_guided_teacher_prediction_is_lcm_cfg(rng):
    eps_c, eps_u, x0_c, x0_u = (rng.standard_normal((2, 4, 4, 4)) for _ in range(4))
    x0, eps = guided_teacher_prediction(*(torch.tensor(v) for v in (eps_c, eps_u, x0_c, x0_u)), 8.0)
    np.testing.assert_allclose(x0.numpy(), x0_c + 8.0 * (x0_c - x0_u))
    np.testing.assert_allclose(eps.numpy(), eps_c + 8.0 * (eps_c - eps_u))


def test_predicted_origin_inverts_the_forward_process(rng):
    z, noise = rng.standard_normal((2, 4, 4, 4)), rng.standard_normal((2, 4, 4, 4))
    alpha, sigma = 0.6, 0.8
    x0 = predicted_origin(torch.tensor(noise), torch.tensor(alpha * z + sigma * noise), alpha, sigma)
    np.testing.assert_allclose(x0.numpy(), z, atol=1e-12)


def test_losses_match_float64(rng):
    prediction, target = rng.standard_normal((3, 4, 4, 4)), rng.standard_normal((3, 4, 4, 4))
    as_t = lambda array: torch.tensor(array, dtype=torch.float32)  # noqa: E731
    assert distillation_loss(as_t(prediction), as_t(target), "l2").item() == pytest.approx(((prediction - target) ** 2).mean(), rel=1e-5)
    huber = (np.sqrt((prediction - target) ** 2 + 0.001**2) - 0.001).mean()
    assert distillation_loss(as_t(prediction), as_t(target), "huber", 0.001).item() == pytest.approx(huber, rel=1e-5)
    with pytest.raises(ValueError):
        distillation_loss(as_t(prediction), as_t(target), "l1")


def test_ema_update_matches_formula():
    target = [torch.randn(3, 3), torch.randn(5)]
    online = [torch.randn(3, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    expected = [0.95 * t + 0.05 * o.detach() for t, o in zip(target, online)]
    update_ema(target, online, 0.95)
    for result, reference in zip(target, expected):
        torch.testing.assert_close(result, reference)


def test_gamma_sampling_one_makes_the_student_input_lcms(rng):
    """--gamma_sampling one: every sample's student sees x_s at s(ts), i.e. LCM's objective."""
    gamma = sample_gamma(6, "cpu", 4, "one")
    assert gamma.shape == (6, 1, 1, 1) and torch.equal(gamma, torch.ones_like(gamma))
    uniform = sample_gamma(4000, "cpu", 1, "uniform")
    assert 0.0 <= uniform.min() and uniform.max() < 1.0 and abs(uniform.mean().item() - 0.5) < 0.03
    _, a_s, s_s, a_e, s_e = (torch.tensor(v, dtype=torch.float64) for v in float64_schedule_points(rng, 6))
    x_s, x_e = torch.randn(6, 4, 2, 2, dtype=torch.float64), torch.randn(6, 4, 2, 2, dtype=torch.float64)
    x_g, sigma_g = sub_path_point(x_s, x_e, gamma.double(), a_s, a_e, s_e)
    assert torch.equal(x_g, x_s) and torch.allclose(sigma_g, s_s)
    with pytest.raises(ValueError):
        sample_gamma(2, "cpu", 4, "half")


def test_solver_alpha_sigma_tables_match_float64():
    """``a(t) = sqrt(alphas_cumprod[t])`` and ``s(t) = sqrt(1 - alphas_cumprod[t])`` at the training's
    timesteps, t = 0 included (the other tests take them from their own float64 table)."""
    acp64 = float64_alphas_cumprod()
    solver = DDIMSolver(torch.tensor(acp64, dtype=torch.float32), 1000, 50)
    t = torch.tensor([0, 19, 500, 999])
    alpha, sigma = solver.alpha_sigma(t, 4)
    assert alpha.shape == sigma.shape == (4, 1, 1, 1)
    np.testing.assert_allclose(alpha.flatten().numpy(), np.sqrt(acp64[t.numpy()]), rtol=1e-6)
    np.testing.assert_allclose(sigma.flatten().numpy(), np.sqrt(1 - acp64[t.numpy()]), rtol=1e-4)  # float32 1 - acp near t = 0


@pytest.mark.parametrize("num_ddim", [50, 30])
def test_the_exported_sampler_steps_like_the_training_endpoint_at_gamma_one(rng, num_ddim):
    """Each LCMScheduler step of the exported sampler (1, 2 and 4 steps) forms the endpoint the
    student was trained to give at gamma = 1: ``c_skip(t) x + c_out(t) (x - s(t) eps) / a(t)``, and
    noises it to the next timestep of the grid with ``alphas_cumprod`` of that timestep."""
    teacher = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    sampler = lcm_scheduler(teacher.config, num_ddim)
    solver = DDIMSolver(teacher.alphas_cumprod, 1000, num_ddim)
    for steps in (1, 2, 4):
        sampler.set_timesteps(steps)
        timesteps = sampler.timesteps.tolist()
        assert set(timesteps) <= set(solver.ddim_timesteps.tolist())
        x = torch.tensor(rng.standard_normal((1, 4, 4, 4)))
        for k, t in enumerate(timesteps):
            eps = torch.tensor(rng.standard_normal((1, 4, 4, 4)))
            out = sampler.step(eps, t, x, generator=torch.Generator().manual_seed(k))
            alpha, sigma = solver.alpha_sigma(torch.tensor([t]), 4)
            c_skip, c_out = scalings_for_boundary_conditions(torch.tensor(float(t), dtype=torch.float64))
            expected = consistency_output(x, predicted_origin(eps, x, alpha.double(), sigma.double()), c_skip, c_out)
            torch.testing.assert_close(out.denoised, expected, rtol=1e-6, atol=1e-6)
            if k + 1 < len(timesteps):
                # prev_sample = sqrt(acp[t_next]) * denoised + sqrt(1 - acp[t_next]) * fresh noise
                acp_next = teacher.alphas_cumprod[timesteps[k + 1]].double()
                noise = (out.prev_sample - acp_next.sqrt() * out.denoised) / (1 - acp_next).sqrt()
                assert abs(noise.std().item() - 1.0) < 0.5  # unit noise, not a rescaled denoised sample
            else:
                torch.testing.assert_close(out.prev_sample, out.denoised)
            x = out.prev_sample


def test_ema_update_of_a_half_precision_student_matches_formula():
    """The per-tensor path (DeepSpeed's half student against the fp32 target): same formula."""
    target = [torch.randn(3, 3), torch.randn(5)]
    online = [torch.randn(3, 3).bfloat16(), torch.randn(5).bfloat16()]
    expected = [0.95 * t + 0.05 * o.float() for t, o in zip(target, online)]
    update_ema(target, online, 0.95)
    for result, reference in zip(target, expected):
        assert result.dtype == torch.float32
        torch.testing.assert_close(result, reference)
