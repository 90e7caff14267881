"""The data-parallel world: one process per device, set up by ``torchrun`` or standing alone as a world of one.

Why always a process group, even alone: FSDP2 shards over a device mesh, and one code path for 1 and N ranks means
the single-process run on a laptop exercises exactly the collectives a multi-GPU node runs. On CPU the backend is
gloo, on GPU NCCL (with a gloo group beside it for Python objects). Collectives wait up to
:data:`COLLECTIVE_TIMEOUT` — long, because the non-engine ranks wait at the next collective while rank 0 generates.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class World:
    """This process's place in the data-parallel world."""

    rank: int
    size: int
    local_rank: int
    device: torch.device
    mesh: object
    """The 1-D DeviceMesh FSDP2 shards over."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def world_size_from_env() -> int:
    """The number of processes ``torchrun`` started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_world() -> World:
    """Join (or create, when run without torchrun) the default process group and build the device mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if use_cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                    timeout=COLLECTIVE_TIMEOUT)
    size = dist.get_world_size()
    mesh = init_device_mesh(device.type, (size,))
    return World(dist.get_rank(), size, local_rank, device, mesh)
