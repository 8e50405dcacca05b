"""`peftctl` under accelerate's FSDP2 on CPU processes (gloo): a test harness, not a product path.

accelerate turns an FSDP config into FSDP only for GPU-type process groups; for CPU processes
it keeps `MULTI_CPU` and runs DDP. torch's FSDP2 (`fully_shard`) itself runs on CPUs over gloo,
so this marks the CPU group as a GPU group, the one fact accelerate checks, and runs the CLI
unchanged: accelerate's own FSDP2 preparation, sharding and gradient reduce-scatter then run.
"""

from __future__ import annotations

from accelerate.state import PartialState
from accelerate.utils import DistributedType

_partial_state_init = PartialState.__init__


def _as_gpu_group(self, *args, **kwargs):
    _partial_state_init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.MULTI_GPU


PartialState.__init__ = _as_gpu_group

if __name__ == "__main__":
    from peftctl.cli.commands import app

    app()
