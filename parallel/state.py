"""The parallel-state object: validates the sequence-parallel degree and hands out groups.

The world is split into ``world_size // sp_size`` sequence-parallel groups of consecutive ranks,
each of which prefills one prompt. (The worker uses one group spanning the world today; the
split is here so that several groups can later serve documents side by side.) Groups are
created once here and passed explicitly to whatever communicates.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch.distributed as dist

from apb.parallel.comm import Comm, CommStats
from apb.parallel.rendezvous import DistEnv


@dataclass
class ParallelState:
    env: DistEnv
    sp_size: int
    sp_group: dist.ProcessGroup
    sp_rank: int

    def comm(self, stats: CommStats | None = None) -> Comm:
        return Comm(self.sp_group, stats)


def validate_degrees(world_size: int, sp_size: int) -> None:
    if sp_size < 1:
        raise ValueError(f"sequence-parallel size must be >= 1, got sp_size={sp_size}")
    if world_size % sp_size != 0:
        raise ValueError(f"sequence-parallel size sp_size={sp_size} does not divide world_size={world_size}; "
                         f"choose sp_size among {[d for d in range(1, world_size + 1) if world_size % d == 0]}")


def build_parallel_state(env: DistEnv, sp_size: int | None = None) -> ParallelState:
    """Create the sequence-parallel groups (collective: every rank must call this)."""
    sp_size = env.world_size if sp_size is None else sp_size
    validate_degrees(env.world_size, sp_size)
    if sp_size == env.world_size:
        group = dist.group.WORLD
    else:
        group = None
        for start in range(0, env.world_size, sp_size):
            g = dist.new_group(list(range(start, start + sp_size)), timeout=_timeout(env))
            if start <= env.rank < start + sp_size:
                group = g
    return ParallelState(env, sp_size, group, env.rank % sp_size)


def _timeout(env: DistEnv) -> datetime.timedelta:
    return datetime.timedelta(seconds=env.timeout_s)
