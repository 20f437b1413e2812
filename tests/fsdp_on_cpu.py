"""Run ``diffaccel distill`` under accelerate's FSDP on the CPU (a test helper, launched by ``accelerate launch
--config_file configs/accelerate/fsdp.yaml ... tests/fsdp_on_cpu.py <distill arguments>``).

accelerate only turns FSDP on for GPU-like devices: on a CPU machine its state falls back to plain multi-CPU
(gloo) data parallelism.  This helper makes one change: when accelerate was configured for FSDP (the
plugin it built from the config file) and settled on MULTI_CPU, the state says FSDP with that plugin and its mixed precision, as accelerate's branch
for GPUs sets them.  Everything
after it is accelerate's own FSDP2 path (``fsdp2_prepare_model`` -> ``torch.distributed.fsdp.fully_shard``),
which PyTorch runs on the CPU over gloo.
"""
import sys

import accelerate.state as _state
from accelerate.utils import DistributedType

_init = _state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # what accelerate's own branch for GPU-like devices does (AcceleratorState.__init__)
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        _state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate's own init does


_state.AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    from diffaccel.distill.cli import main

    sys.exit(main(sys.argv[1:]))
