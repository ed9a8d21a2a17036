"""Joining the process group: the one rendezvous helper every launcher uses.

Rank names, as used everywhere in this project:

==============  ==============================================================
``rank``        global rank in the world group (0 .. world_size-1)
``local_rank``  index of this process on its node; the *only* thing that picks
                a CUDA device (never the global rank)
``sp_rank``     rank inside the sequence-parallel group (see ``state.py``)
==============  ==============================================================

Under torchrun the ``RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT`` variables are read;
otherwise the caller (local process group, Ray actor) passes an explicit ``tcp://host:port``.
The backend follows the device: NCCL on CUDA, gloo on CPU. Every group gets a timeout, so a
dead peer surfaces as an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout_s: float


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pick_device(local_rank: int, device: str = "auto", share_gpus: bool = False) -> torch.device:
    """``auto``: ``cuda:<local_rank>`` when CUDA is present, else CPU; with ``share_gpus``, local
    ranks beyond the GPU count wrap around (``cuda:<local_rank mod count>``)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device; use device: cpu")
        count = torch.cuda.device_count()
        if local_rank >= count and not share_gpus:
            raise RuntimeError(f"local_rank {local_rank} has no GPU: this node has {count}; start at most {count} "
                               f"processes per node, or set parallel.share_gpus: true to let ranks share GPUs "
                               f"(over gloo, for checks, not speed)")
        return torch.device("cuda", local_rank % count)
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(init_method: str | None = None, rank: int | None = None, world_size: int | None = None,
                     local_rank: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     device: str = "auto", device_index: int | None = None, share_gpus: bool = False) -> DistEnv:
    """Join (or create) the default process group and return who this process is.

    ``device_index`` overrides the CUDA index (default: the local rank), for launchers that
    give each process its own ``CUDA_VISIBLE_DEVICES`` (Ray). ``share_gpus``: ranks may share a
    GPU, and the group runs over gloo (NCCL refuses two ranks on one device; see
    :class:`apb.parallel.comm.Comm` for how CUDA tensors then travel).
    """
    if under_torchrun() and init_method is None:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        init_method = "env://"
    elif init_method is None:
        if world_size not in (None, 1):
            raise ValueError("init_distributed needs init_method='tcp://host:port' when world_size > 1 "
                             "outside torchrun")
        rank, world_size, init_method = 0, 1, f"tcp://127.0.0.1:{free_port()}"
    if rank is None or world_size is None:
        raise ValueError(f"init_method {init_method!r} needs rank and world_size")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    local_rank = rank if local_rank is None else local_rank
    dev = pick_device(local_rank if device_index is None else device_index, device, share_gpus)
    backend = "nccl" if dev.type == "cuda" and not share_gpus else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank, world_size, local_rank, dev, backend, timeout_s)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
