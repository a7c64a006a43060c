"""The sub-path linear approximation objective (SPEC section 3, steps 3 to 7).

Each function is one formula of the paper in SPEC's notation; ``splam.training.splam_loss``
composes them in the order of the paper's Algorithm.
"""

import math

import torch

from .solver import append_dims

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
# E(gamma) embeds w = GAMMA_EMBEDDING_SCALE * (1 - gamma), so that gamma = 1 is the
# embedding of 0, which is what LCM pipelines feed at guidance_scale = 1.
GAMMA_EMBEDDING_SCALE = 10.0


def scalings_for_boundary_conditions(timestep):
    """LCM's boundary-condition scalings, the same ones ``LCMScheduler`` uses at sampling (its
    default ``timestep_scaling`` of 10, ``sigma_data = 0.5``):

    ``c_skip(t) = sigma_data^2 / ((10 t)^2 + sigma_data^2)``,
    ``c_out(t) = 10 t / sqrt((10 t)^2 + sigma_data^2)``.
    """
    scaled_timestep = timestep * TIMESTEP_SCALING
    denominator = scaled_timestep**2 + SIGMA_DATA**2
    c_skip = SIGMA_DATA**2 / denominator
    c_out = scaled_timestep / denominator**0.5
    return c_skip, c_out


def gamma_embedding(gamma: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """``E(gamma)``: the sinusoidal guidance-scale embedding of diffusers' LCM pipelines
    (``get_guidance_scale_embedding``) applied to ``w = 10 - 10 * gamma``.

    With ``v = 1000 w`` and ``f_k = exp(-k log(10000) / (d/2 - 1))`` for ``k < d/2``:
    ``E = [sin(v f_0), ..., sin(v f_{d/2-1}), cos(v f_0), ..., cos(v f_{d/2-1})]``,
    zero-padded by one when ``d`` is odd. Returns float32 ``[B, embedding_dim]``.
    """
    w = GAMMA_EMBEDDING_SCALE * (1.0 - gamma.float()) * 1000.0
    half_dim = embedding_dim // 2
    frequencies = torch.exp(
        torch.arange(half_dim, dtype=torch.float32, device=w.device) * (-math.log(10000.0) / (half_dim - 1))
    )
    angles = w[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding


def predicted_origin(model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The clean latent implied by an epsilon prediction: ``x0 = (x - sigma * eps) / alpha``."""
    return (sample - sigma * model_output) / alpha


def guided_teacher_prediction(eps_cond, eps_uncond, x0_cond, x0_uncond, guidance_scale):
    """Classifier-free guidance in LCM's formulation, on both predictions:

    ``eps = eps_c + w * (eps_c - eps_u)``, ``x0 = x0_c + w * (x0_c - x0_u)``.
    Returns ``(x0, eps)``.
    """
    x0 = x0_cond + guidance_scale * (x0_cond - x0_uncond)
    eps = eps_cond + guidance_scale * (eps_cond - eps_uncond)
    return x0, eps


def consistency_output(sample: torch.Tensor, pred_x0: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
    """The parameterised endpoint ``y = c_skip(t) * x + c_out(t) * x0`` (SPEC steps 4 and 6)."""
    return c_skip * sample + c_out * pred_x0


def sub_path_point(x_start, x_end, gamma, alpha_start, alpha_end, sigma_end):
    """A point of the sub-path linear ODE between ``x_s`` (at ``ts``) and ``x_e`` (at ``te``).

    With the drift factor ``r = a(ts) / a(te)`` that brings ``x_e`` to the signal scale of ``ts``:

    ``x_g = gamma * x_s + (1 - gamma) * r * x_e``,
    ``sigma_g = sqrt((s(te) * r)^2 + gamma^2 * (1 - r^2))``.

    ``gamma = 1`` gives ``(x_s, s(ts))``; ``gamma = 0`` gives ``(r * x_e, r * s(te))``.
    All arguments broadcast against each other; returns ``(x_gamma, sigma_gamma)``.
    """
    drift = alpha_start / alpha_end
    x_gamma = gamma * x_start + (1.0 - gamma) * drift * x_end
    sigma_gamma = ((sigma_end * drift) ** 2 + gamma**2 * (1.0 - drift**2)).sqrt()
    return x_gamma, sigma_gamma


def distillation_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: float = 0.001) -> torch.Tensor:
    """The distance between the student's and the target's endpoints, in float32:

    ``l2``: ``mean((y_S - y_T)^2)``; ``huber``: ``mean(sqrt((y_S - y_T)^2 + c^2) - c)``.
    """
    difference = prediction.float() - target.float()
    if loss_type == "l2":
        return difference.pow(2).mean()
    if loss_type == "huber":
        return (torch.sqrt(difference.pow(2) + huber_c**2) - huber_c).mean()
    raise ValueError(f"unknown loss_type {loss_type!r}: expected 'l2' or 'huber'")


def sample_gamma(batch_size: int, device, ndim: int, sampling: str = "uniform") -> torch.Tensor:
    """Where on the sub-path each sample's student looks, shaped ``[B, 1, ..., 1]``.

    ``uniform``: ``gamma ~ U[0, 1)``, SPLAM. ``one``: ``gamma = 1``, where ``x_g = x_s`` and
    ``sigma_g = s(ts)``, so the objective is LCM's consistency distillation exactly.
    """
    if sampling == "uniform":
        gamma = torch.rand(batch_size, device=device)
    elif sampling == "one":
        gamma = torch.ones(batch_size, device=device)
    else:
        raise ValueError(f"unknown gamma sampling {sampling!r}: expected 'uniform' or 'one'")
    return append_dims(gamma, ndim)
