"""Process groups for the scripts that run on many processes (deepspeed, torchrun) or one (plain python).

The launchers start one process per device and tell each its place through the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); the deepspeed launcher also appends --local_rank=N to the arguments, which
`launcher_args` drops (the same value is in LOCAL_RANK).
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from common.cli import parse
from common.run import InputError, resolve_device

T = TypeVar("T")


class LaunchError(InputError):
    """A flag that does not fit a launch on many processes."""


def parse_launched(cls: type[T]) -> T:
    """`parse(cls)` of the command line without the --local_rank=N that the deepspeed launcher appends."""
    argv = [arg for arg in sys.argv[1:] if not re.fullmatch(r"--local[-_]rank=\d+", arg)]
    return parse(cls, args=argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_processes() -> int:
    """How many processes the launcher started (1 under plain python)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device) after joining the process group of deepspeed or torchrun; under
    plain python a one-process group. NCCL with the GPU numbered LOCAL_RANK when `device` allows CUDA ("auto",
    "cuda") and one is there, else gloo on the CPU."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if device not in ("auto", "cuda", "cpu"):
        raise LaunchError(f"--device {device}: on many processes use auto, cuda or cpu (each takes GPU LOCAL_RANK)")
    if device != "cpu" and torch.cuda.is_available():
        here = torch.device("cuda", local_rank)
        torch.cuda.set_device(here)
        # binding the device lets NCCL set up its communicator at once; one process has no peer to set up
        dist.init_process_group("nccl", device_id=here if launched_processes() > 1 else None)
    else:
        here = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), here


def this_process(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process for a stage that may run on many: in the launcher's process group
    when it started several (init_distributed), else (0, 1, `device` resolved) without one; only rank 0 prints."""
    if launched_processes() > 1:
        rank, world, here = init_distributed(device)
    else:
        rank, world, here = 0, 1, resolve_device(device)
    silence_other_ranks(rank)
    return rank, world, here


def leave_process_group() -> None:
    """At the end of a script: wait for every process, then close the group (a process that exits while a peer
    still talks to it can make the peer's gloo connection abort)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def silence_other_ranks(rank: int) -> None:
    """Only rank 0 prints and shows progress bars."""
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
        os.environ["RECSYS_QUIET"] = "1"


def rank0_first(make: Callable[[], T]) -> T:
    """make() on rank 0, then on the others: for steps that fill a cache file the others then read."""
    sharing = dist.is_initialized() and dist.get_world_size() > 1
    if sharing and dist.get_rank() == 0:
        made = make()
    if sharing:
        dist.barrier()
    if not sharing or dist.get_rank() != 0:
        made = make()
    return made


def from_rank0(make: Callable[[], T]) -> T:
    """make() on rank 0 only, its (picklable) result sent to every rank; e.g. a run directory with a timestamp."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return make()
    chosen = [make() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]
