"""Folding the constant gamma = 1 conditioning into a plain Stable Diffusion UNet.

At inference gamma is always 1, so the student's time-conditioning input is the constant
``e = E(1)``. diffusers' ``TimestepEmbedding`` adds ``P e`` (``cond_proj``, no bias) to the
sinusoidal timestep features ``s`` before ``linear_1``, so

``linear_1(s + P e) = W s + (b + W P e)``:

the projection folds exactly into ``linear_1``'s bias, ``b' = b + W P e``, and the UNet loses
its ``time_cond_proj_dim`` input: it has the teacher's architecture again.
"""

import torch
from diffusers import UNet2DConditionModel

from .objective import gamma_embedding


@torch.no_grad()
def fold_gamma_embedding(unet: UNet2DConditionModel, gamma: float = 1.0) -> UNet2DConditionModel:
    """A UNet without ``time_cond_proj_dim`` that computes what ``unet`` computes at ``gamma``
    (computed in float64, returned in float32)."""
    if unet.config.time_cond_proj_dim is None:
        raise ValueError("this UNet has no time-conditioning projection to fold")
    embedding = gamma_embedding(torch.tensor([gamma]), unet.config.time_cond_proj_dim)[0].double()
    projection = unet.time_embedding.cond_proj.weight.double()
    linear_1 = unet.time_embedding.linear_1
    folded_bias = linear_1.bias.double() + linear_1.weight.double() @ (projection @ embedding.to(projection.device))

    folded = UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=None)
    weights = {name: value for name, value in unet.state_dict().items() if not name.startswith("time_embedding.cond_proj")}
    weights["time_embedding.linear_1.bias"] = folded_bias.float()
    folded.load_state_dict(weights)
    return folded
