"""bitsandbytes' 8-bit AdamW (``--use_8bit_adam``) without a wait for the device after every tensor."""

import bitsandbytes as bnb
import torch


class AdamW8bit(bnb.optim.AdamW8bit):
    """``bitsandbytes.optim.AdamW8bit`` with the same update, queued without host waits.

    bitsandbytes' ``step`` (0.45.0, 0.48.2 and 0.50.2 read) synchronises the device after
    updating each parameter tensor, which its paged states need and ordinary ones do not: every
    update is a kernel on the current stream, ordered after the backward pass that wrote the
    gradient and before the next forward that reads the weight. For the SD 1.5 student's
    nearly 700 tensors the optimizer step spanned 125 ms of a 0.56 s step on an H100 (batch
    12, 512 px), 25 ms of it its kernels and the rest the GPU idling while the host queued one
    tensor at a time. The states are
    never paged here (``is_paged`` is False), so this ``step`` takes the same per-tensor
    updates without the waits.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for group_index, group in enumerate(self.param_groups):
            for param_index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                if not self.state[param]:
                    self.init_state(group, param, group_index, param_index)
                self.update_step(group, param, group_index, param_index)
        return loss
