"""The target network: an exponential moving average of the student (SPEC step 8)."""

import torch


@torch.no_grad()
def update_ema(target_params, online_params, decay: float) -> None:
    """``target <- decay * target + (1 - decay) * online``, in place, as one fused foreach op."""
    target_params = list(target_params)
    online_params = [param.detach() for param in online_params]
    torch._foreach_lerp_(target_params, online_params, 1.0 - decay)
