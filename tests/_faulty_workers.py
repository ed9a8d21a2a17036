"""The engine's worker with one deliberate fault, for tests that must see a broken method caught.

Kept apart from ``_workers.py``: these import the whole runtime (transformers), which the small
communication workers there do not need. A test selects a group from here by pointing
``apb.parallel.groups.LAUNCHERS["local"]`` at it, in its own process.
"""

import torch

from apb.parallel.groups.local import LocalWorkerGroup
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
