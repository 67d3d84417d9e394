"""`accelerate launch ... tests/fsdp_cpu.py finetune ...`: the prunetune CLI under accelerate's FSDP on a machine
without accelerators. Accelerate turns FSDP on only for accelerator back ends (on CPUs its state stays MULTI_CPU
and the model is never sharded), while PyTorch's FSDP2 itself runs on CPU with gloo. This stand-in makes the state
FSDP when the launch asked for it, exactly as it is on GPUs; everything after (the Trainer, accelerate's
`fully_shard` wrapping, its checkpoint save/load, prunetune) is the code users run."""

from __future__ import annotations

import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    # Every AcceleratorState() (accelerate makes new ones to read the state) copies the process state's MULTI_CPU
    # back in: decide again each time, from the plugin the Accelerator registered.
    plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin


AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    from prunetune.cli import main

    sys.exit(main(sys.argv[1:]))
