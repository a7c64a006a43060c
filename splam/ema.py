"""The target network: an exponential moving average of the student (SPEC step 8)."""

import torch
from torch.distributed.tensor import DTensor

from .sharding import whole_tensor


@torch.no_grad()
def update_ema(target_params, online_params, decay: float) -> None:
    """``target <- decay * target + (1 - decay) * online``, in place, as one fused foreach op.

    Online parameters that are sharded (FSDP2) or held in another dtype than the fp32 target
    (DeepSpeed's half-precision student) are taken one tensor at a time, gathered or cast, so
    that the whole student is never held twice; every process must call it then.
    """
    target_params = list(target_params)
    online_params = [param.detach() for param in online_params]
    if any(isinstance(online, DTensor) or online.dtype != target.dtype
           for target, online in zip(target_params, online_params)):
        for target, online in zip(target_params, online_params):
            target.lerp_(whole_tensor(online).to(target.dtype), 1.0 - decay)
        return
    torch._foreach_lerp_(target_params, online_params, 1.0 - decay)
