"""SPLAM: Sub-path Linear Approximation Model distillation of Stable Diffusion (Xu et al., ECCV 2024)."""

from .ema import update_ema
from .objective import (
    consistency_output,
    distillation_loss,
    gamma_embedding,
    guided_teacher_prediction,
    predicted_origin,
    sample_gamma,
    scalings_for_boundary_conditions,
    sub_path_point,
)
from .solver import DDIMSolver, append_dims

__all__ = [
    "DDIMSolver",
    "append_dims",
    "consistency_output",
    "distillation_loss",
    "gamma_embedding",
    "guided_teacher_prediction",
    "predicted_origin",
    "sample_gamma",
    "scalings_for_boundary_conditions",
    "sub_path_point",
    "update_ema",
]
