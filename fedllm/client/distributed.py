"""One client's round on N processes with DDP: ``torchrun --nproc_per_node N client_http.py ...`` or
``accelerate launch client_http.py ...``.

Rank 0 is the client: it alone talks to the server (join, poll, download, upload) and keeps the client's
state in ``--output_dir``. The other ranks are its replicas: they load the same base model and data, and for
every round rank 0 trains they receive from it, through the process group, the round's order (round, learning
rate, steps, clip norm), the global adapter and the committed hook state, then train alongside it. The HF
Trainer wraps the model in DDP and hands each rank its share of every batch, so the global batch is
N × ``--batch_size`` × ``--gradient_accumulation_steps`` and the delta equals one process's with that batch
(up to floating-point summation order); rank 0's is uploaded. At the end rank 0 sends its report, which every
rank returns.

The control messages travel on a gloo group of their own, on CPU, with a deadline of :data:`CONTROL_TIMEOUT`:
between rounds a replica waits for as long as the federation does (hours, while the client is not sampled).
Training uses the default group (NCCL on GPUs, gloo on CPU). When a rank dies or rank 0 exits with an error,
the launcher ends the others.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

CONTROL_TIMEOUT = timedelta(days=30)
# What accelerate launch sets for FSDP and DeepSpeed, which shard the base model across ranks: the adapter's
# tensors, the delta and the algorithm hooks are read and written whole on every rank, so sharding is refused.
SHARDED_LAUNCH_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")


@dataclass(frozen=True)
class RoundOrder:
    """What rank 0 trains this round, which every replica trains too."""

    round: int
    learning_rate: float
    max_steps: int
    clip_norm: float | None


class ProcessGroup:
    """This process's place in a multi-process client, and the channel from rank 0 to the others."""

    def __init__(self, rank: int, world_size: int, control: Any):
        self.rank = rank
        self.world_size = world_size
        self.control = control

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, value: Any = None) -> Any:
        """Rank 0's ``value`` on every rank (a replica passes nothing)."""
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def share_tensors(self, tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Rank 0's ``tensors`` (on CPU) on every rank: their names, shapes and dtypes first, then each tensor."""
        import torch.distributed as dist

        spec = self.share({name: (tuple(t.shape), t.dtype) for name, t in tensors.items()} if self.is_main else None)
        if self.is_main:
            shared = {name: tensors[name].detach().cpu().contiguous() for name in spec}
        else:
            shared = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in spec.items()}
        for name in spec:
            dist.broadcast(shared[name], src=0, group=self.control)
        return shared


def join_process_group(device: str) -> ProcessGroup | None:
    """This process's group when a launcher started several (``WORLD_SIZE`` > 1), else None.

    ``device`` is the resolved training device: on ``cuda`` each rank takes its ``LOCAL_RANK``'s GPU and trains
    over NCCL, on CPU over gloo. A launch with FSDP or DeepSpeed is refused (docs/scaling.md).
    """
    sharded = [name for name in SHARDED_LAUNCH_ENV if os.environ.get(name, "").lower() == "true"]
    if sharded:
        raise ValueError(f"{sharded[0]}: the client trains with DDP only, each process holding the whole base model "
                         "(FSDP and DeepSpeed are not supported; --load_in_4bit fits a larger model on one GPU)")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        on_gpu = device.startswith("cuda")
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if on_gpu else "gloo")
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), control)
