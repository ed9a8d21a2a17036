"""The engine's worker with one deliberate fault, for tests that must see a broken method caught.

Kept apart from ``_workers.py``: these import the whole runtime (transformers), which the small
communication workers there do not need. A test selects a group from here by pointing
``apb.parallel.groups.LAUNCHERS["local"]`` at it, in its own process.
"""

import os
import signal

import torch

from apb.methods.base import AttnContext
from apb.parallel.groups.local import LocalWorkerGroup
from apb.parallel.groups.ray import RayWorkerGroup
from apb.runtime.worker import Worker


class NaNLogitsWorker(Worker):
    """Returns NaN last-token logits for method ``apb`` (not its variants), as a method that
    overflowed would; everything else (cache, tokens) is the real run's."""

    def run_prompt(self, req):
        out = super().run_prompt(req)
        if req.method == "apb" and out.last_logits is not None:
            out.last_logits = torch.full_like(out.last_logits, float("nan"))
        return out


class NaNLogitsGroup(LocalWorkerGroup):
    """A local group whose ranks run :class:`NaNLogitsWorker`."""

    def __init__(self, world_size, worker_kwargs=None, timeout_s=300.0, **kwargs):
        super().__init__(world_size, "_faulty_workers:NaNLogitsWorker", worker_kwargs, timeout_s, **kwargs)


class DieMidPrefillWorker(Worker):
    """Rank 1 SIGKILLs itself at layer 1 of a prefill, once: when the file named by
    ``APB_DIE_ONCE`` does not exist yet (it is created first, so the retry runs clean). The other
    ranks are then inside the layer's collectives, as with a host lost mid-prefill."""

    def run_prompt(self, req):
        marker = os.environ.get("APB_DIE_ONCE")
        if marker and self.env.rank == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            real = AttnContext.step

            def step(ctx, module, *args, **kwargs):
                if int(module.layer_idx) == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(ctx, module, *args, **kwargs)

            AttnContext.step = step
        return super().run_prompt(req)


class DieMidPrefillGroup(LocalWorkerGroup):
    def __init__(self, world_size, worker_kwargs=None, timeout_s=300.0, **kwargs):
        super().__init__(world_size, "_faulty_workers:DieMidPrefillWorker", worker_kwargs, timeout_s, **kwargs)


class DieMidPrefillRayGroup(RayWorkerGroup):
    """A Ray group whose actors run :class:`DieMidPrefillWorker` (tests/ must be on the actors' path)."""

    def __init__(self, world_size, ray_cfg, worker_cls=None, worker_kwargs=None, timeout_s=300.0):
        super().__init__(world_size, ray_cfg, "_faulty_workers:DieMidPrefillWorker", worker_kwargs, timeout_s)


class RefusingWorker(Worker):
    """Refuses (ValueError, on every rank, before any collective) a prompt asking for 7 new tokens,
    as a model or size check inside the worker would."""

    def run_prompt(self, req):
        if req.sampling.max_new_tokens == 7:
            raise ValueError("layer 3 does something this runtime refuses; use another model")
        return super().run_prompt(req)


class RefusingGroup(LocalWorkerGroup):
    def __init__(self, world_size, worker_kwargs=None, timeout_s=300.0, **kwargs):
        super().__init__(world_size, "_faulty_workers:RefusingWorker", worker_kwargs, timeout_s, **kwargs)
