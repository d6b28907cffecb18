"""Process-group set-up from torchrun's environment, cross-rank flags, and stop signals.

`torchrun` (or SLURM through it) sets RANK, LOCAL_RANK and WORLD_SIZE; `env://` reads
MASTER_ADDR / MASTER_PORT. NCCL carries the gradients on GPUs, gloo on the CPU; a gloo
group beside NCCL carries host-side flags (a stop request) without touching the GPU stream.

Stop signals (SIGTERM, SIGUSR1, and a first SIGINT) only set a flag: the trainer finishes
its step, checkpoints and exits 0. A second SIGINT raises KeyboardInterrupt at once.
Loader workers ignore these signals (data_pipeline.workers), so a signal to the whole
process group (Ctrl-C in a terminal, `scancel`, `kill -TERM -PGID`) reaches the trainer
alone.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from deit_fast.data_pipeline.workers import STOP_SIGNALS


@dataclass
class Distributed:
    """This process's place in the job; world_size 1 means no process group."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    control_group: Any = None  # gloo group for host flags
    owns_group: bool = False  # setup() created the process group, so teardown() ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on some rank (a host-side collective)."""
        if not self.active:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(value.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control_group)
        return out


def setup(device: torch.device) -> Distributed:
    """Join the process group torchrun describes (or the one already joined); one process
    without it. Each rank drives the GPU of its LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://",
                                device_id=device if device.type == "cuda" else None)
    gloo = dist.get_backend() == "gloo"
    control = dist.group.WORLD if gloo else dist.new_group(backend="gloo")
    return Distributed(rank, local_rank, world_size, device, control, owns)


def teardown(job: Distributed) -> None:
    if job.owns_group:
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process outside one (read from the environment)."""
    return int(os.environ.get("RANK", "0")) == 0


class StopRequest:
    """Records a stop signal so the trainer can finish its step, checkpoint and exit 0;
    a second SIGINT (Ctrl-C twice) raises KeyboardInterrupt where the program is."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        again = "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
        print(f"deit-fast train: received {self.signal_name}; stopping after this step and "
              f"writing a checkpoint{again}", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
