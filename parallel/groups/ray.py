"""Workers as Ray actors: one per GPU (or per CPU slot), in one placement group.

The same :class:`apb.runtime.worker.Worker` runs inside each actor. Start-up:

1. ``ray.init`` joins ``ray.address`` (``auto``: a running cluster) or starts a local instance
   with the dashboard off and nothing listening beyond loopback;
2. a placement group of ``W`` bundles (``{"GPU": 1, "CPU": c}`` on GPU clusters, ``{"CPU": c}``
   otherwise) is reserved with the configured strategy; if it cannot be placed in time the
   error names the resources asked for and what the cluster has;
3. one actor per bundle reports its node; ranks are ordered by node (rank 0's node first),
   local ranks count actors on the same node; the rendezvous address is rank 0's node IP and a
   free port found there;
4. every actor builds its Worker (joins the process group) with a timeout.

``call`` behaves like :class:`LocalWorkerGroup.call`: one reply per rank, and a dead actor,
a failure or a timeout closes the group and raises :class:`WorkerError`.
"""

from __future__ import annotations

import importlib
import os
import socket
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from apb.parallel.groups import WorkerError, is_refusal


class _Host:
    """The actor body: where it runs, then a Worker."""

    def __init__(self):
        self.worker = None

    def where(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid(), "gpus": ray.get_gpu_ids()}

    def free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def setup(self, worker_cls: str, init_method: str, rank: int, world_size: int, local_rank: int,
              kwargs: dict) -> dict:
        module, name = worker_cls.split(":")
        cls = getattr(importlib.import_module(module), name)
        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so its device is always index 0
        self.worker = cls(init_method=init_method, rank=rank, world_size=world_size, local_rank=local_rank,
                          device_index=0, **kwargs)
        return self.worker.info()

    def call(self, fn: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.worker, fn)(*args, **kwargs)

    def pid(self) -> int:
        return os.getpid()


def _init_ray(cfg) -> None:
    if ray.is_initialized():
        return
    if cfg.address:
        try:
            ray.init(address=cfg.address, ignore_reinit_error=True, log_to_driver=False)
        except ConnectionError as e:
            raise WorkerError(f"ray.address={cfg.address!r}: no Ray cluster reachable ({e}); start one with "
                              "`ray start --head`, or remove ray.address to start a local instance") from None
    else:
        ray.init(include_dashboard=cfg.include_dashboard, dashboard_host=cfg.dashboard_host,
                 num_cpus=max(os.cpu_count() or 1, 1) * 4, ignore_reinit_error=True, log_to_driver=False,
                 _node_ip_address="127.0.0.1")


class RayWorkerGroup:
    def __init__(self, world_size: int, ray_cfg, worker_cls: str = "apb.runtime.worker:Worker",
                 worker_kwargs: dict | None = None, timeout_s: float = 300.0):

        self.world_size, self.timeout_s = world_size, timeout_s
        self.closed = False
        _init_ray(ray_cfg)
        kwargs = dict(worker_kwargs or {})
        use_gpu = kwargs.get("device", "auto") != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        bundle = {"CPU": ray_cfg.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
        self.pg = placement_group([dict(bundle) for _ in range(world_size)], strategy=ray_cfg.placement_strategy)
        try:
            ray.get(self.pg.ready(), timeout=ray_cfg.start_timeout_s)
        except GetTimeoutError:
            remove_placement_group(self.pg)
            raise WorkerError(
                f"cannot place {world_size} workers of {bundle} ({ray_cfg.placement_strategy}) within "
                f"{ray_cfg.start_timeout_s:.0f}s: the cluster has {ray.cluster_resources()}, of which "
                f"{ray.available_resources()} are free; lower parallel.world_size, use placement_strategy PACK/SPREAD, "
                "or add nodes") from None
        actor_cls = ray.remote(_Host)
        self.actors = [actor_cls.options(
            num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)).remote()
            for i in range(world_size)]
        try:
            where = self._get([a.where.remote() for a in self.actors], ray_cfg.start_timeout_s, "start")
            order = rank_order(where)
            self.actors = [self.actors[i] for i in order]
            where = [where[i] for i in order]
            port = self._get([self.actors[0].free_port.remote()], ray_cfg.start_timeout_s, "start")[0]
            init_method = f"tcp://{where[0]['ip']}:{port}"
            local = local_ranks(where)
            self._get([a.setup.remote(worker_cls, init_method, r, world_size, local[r], kwargs)
                       for r, a in enumerate(self.actors)], ray_cfg.start_timeout_s, "setup")
        except BaseException:
            self.close(force=True)
            raise

    def call(self, fn: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list[Any]:
        if self.closed:
            raise WorkerError("this worker group is closed (an earlier call failed); start a new one")
        return self._get([a.call.remote(fn, args, kwargs) for a in self.actors], timeout_s or self.timeout_s, fn)

    def pids(self) -> list[int]:
        return self._get([a.pid.remote() for a in self.actors], self.timeout_s, "pid")

    def _get(self, refs: list, timeout_s: float, what: str) -> list[Any]:

        try:
            return ray.get(refs, timeout=timeout_s)
        except RayActorError as e:
            self.close(force=True)
            raise WorkerError(f"a worker actor died during {what!r}: {e}") from None
        except RayTaskError as e:
            self.close(force=True)
            raise WorkerError(f"a worker failed during {what!r}:\n{e}", refused=is_refusal(e.cause),
                              reason=str(e.cause) if e.cause is not None else None) from None
        except GetTimeoutError:
            self.close(force=True)
            raise WorkerError(f"no reply to {what!r} within {timeout_s:.0f}s") from None

    def close(self, force: bool = False) -> None:
        if self.closed:
            return
        self.closed = True

        for a in getattr(self, "actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        try:
            remove_placement_group(self.pg)
        except Exception:
            pass

    def __enter__(self) -> "RayWorkerGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close(force=exc[0] is not None)


def rank_order(where: list[dict]) -> list[int]:
    """Actor indices in rank order: grouped by node, the first actor's node first (pure)."""
    nodes: list[str] = []
    for w in where:
        if w["node_id"] not in nodes:
            nodes.append(w["node_id"])
    return sorted(range(len(where)), key=lambda i: (nodes.index(where[i]["node_id"]), i))


def local_ranks(where: list[dict]) -> list[int]:
    """Index of each actor among the actors on its node, in the given order (pure)."""
    seen: dict[str, int] = {}
    out = []
    for w in where:
        out.append(seen.get(w["node_id"], 0))
        seen[w["node_id"]] = out[-1] + 1
    return out
