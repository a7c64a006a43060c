"""Let accelerate take its FSDP code path in CPU processes (gloo).

accelerate selects FSDP only for GPU-like devices and falls back to MULTI_CPU on CPUs, though
torch's FSDP2 (``fully_shard``) runs on CPU meshes. On the path of the FSDP test's training
processes only: everything after this switch (wrapping, gathering, sharded checkpoints) is
accelerate's and torch's own code.
"""

from accelerate import state
from accelerate.utils import DistributedType

_original_init = state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # AcceleratorState copies the process state's type on every later construction.
        self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)


state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu
