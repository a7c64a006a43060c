"""The teacher's noise schedule and the DDIM solver of its probability-flow ODE.

Notation (SPEC section 2): ``alphas_cumprod`` is the teacher's DDPM table,
``a(t) = sqrt(alphas_cumprod[t])`` and ``s(t) = sqrt(1 - alphas_cumprod[t])``.
The DDIM grid has ``K = num_train_timesteps // num_ddim_timesteps`` and
``ddim_t[i] = (i + 1) * K - 1``; a sub-path runs from ``ts = ddim_t[i]`` to
``te = max(ts - K, 0)``. Where ``num_ddim_timesteps`` does not divide ``num_train_timesteps`` the
grid stops short of the last timestep (989 for 1000 / 30), as LCMScheduler's original grid does.

Every table is float32: the authors' solver kept float64 tables, which turned the
student's input into float64 and broke its forward under autocast (SPEC defect 4).
"""

import torch


def append_dims(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a per-sample vector ``[B]`` as ``[B, 1, ..., 1]`` with ``ndim`` dimensions."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


class DDIMSolver:
    """Tables of the teacher's schedule on the training and DDIM grids, and one DDIM step.

    Args:
        alphas_cumprod: the teacher scheduler's ``alphas_cumprod`` (length ``timesteps``).
        timesteps: ``num_train_timesteps`` of the teacher (usually 1000).
        ddim_timesteps: ``num_ddim_timesteps``, the number of sub-paths (50 by default).
    """

    def __init__(self, alphas_cumprod, timesteps: int = 1000, ddim_timesteps: int = 50):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
        if alphas_cumprod.shape != (timesteps,):
            raise ValueError(f"alphas_cumprod has shape {tuple(alphas_cumprod.shape)}, expected ({timesteps},)")
        if not 1 <= ddim_timesteps <= timesteps:
            raise ValueError(f"num_ddim_timesteps={ddim_timesteps} must lie in [1, num_train_timesteps={timesteps}]")
        self.step_ratio = timesteps // ddim_timesteps
        self.alphas = alphas_cumprod.sqrt()
        self.sigmas = (1.0 - alphas_cumprod).sqrt()
        self.ddim_timesteps = torch.arange(1, ddim_timesteps + 1, dtype=torch.long) * self.step_ratio - 1
        # acp_prev[i] = alphas_cumprod[ddim_t[i - 1]], and alphas_cumprod[0] for i = 0.
        self.ddim_alpha_cumprods_prev = torch.cat(
            [alphas_cumprod[:1], alphas_cumprod[self.ddim_timesteps[:-1]]]
        )

    def to(self, device) -> "DDIMSolver":
        self.alphas = self.alphas.to(device)
        self.sigmas = self.sigmas.to(device)
        self.ddim_timesteps = self.ddim_timesteps.to(device)
        self.ddim_alpha_cumprods_prev = self.ddim_alpha_cumprods_prev.to(device)
        return self

    def sub_path(self, timestep_index: torch.Tensor):
        """The sub-path of each DDIM index: ``(ts, te) = (ddim_t[i], max(ddim_t[i] - K, 0))``."""
        start = self.ddim_timesteps[timestep_index]
        return start, (start - self.step_ratio).clamp(min=0)

    def alpha_sigma(self, timesteps: torch.Tensor, ndim: int):
        """``(a(t), s(t))`` for each timestep, shaped ``[B, 1, ..., 1]`` to broadcast over ``ndim``."""
        return append_dims(self.alphas[timesteps], ndim), append_dims(self.sigmas[timesteps], ndim)

    def ddim_step(self, pred_x0: torch.Tensor, pred_noise: torch.Tensor, timestep_index: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM step from ``ddim_t[i]`` to the previous grid point:

        ``x_e = sqrt(acp_prev[i]) * x0 + sqrt(1 - acp_prev[i]) * eps``.

        The result has the dtype of ``pred_x0``.
        """
        alpha_cumprod_prev = append_dims(self.ddim_alpha_cumprods_prev[timestep_index], pred_x0.ndim)
        alpha_cumprod_prev = alpha_cumprod_prev.to(pred_x0.dtype)
        return alpha_cumprod_prev.sqrt() * pred_x0 + (1.0 - alpha_cumprod_prev).sqrt() * pred_noise
