"""A Ray Serve replica that is a sequence-parallel group: N GPUs (or CPU slots) make each of its images.

The deployment gives each replica a placement group of N bundles on one node (`STRICT_PACK`: the
all-to-alls stay inside the machine, NVLink on a GPU box); the replica actor, rank 0, runs in bundle 0
and serves HTTP as any replica does. In its constructor it starts ranks 1..N-1 as Ray actors, one in
each other bundle (Ray gives each its own GPU), and every rank joins one torch.distributed group
(NCCL on GPUs, gloo on CPUs) through a TCP store that rank 0 opens on a free port of that node (each
rank is shown all the group's GPUs, so that NCCL can use NVLink between the processes). Then
each rank loads the pipeline with `sequence_parallel=N`; the ranks other than 0 run `pipe.serve()`
(their share of each image) until rank 0 closes its pipeline.

Life cycle, as Serve sees one replica:
- ready only once every rank has loaded and rank 0 has warmed every served size through the group;
  a rank that fails or dies while loading fails the replica's constructor (Serve starts another);
- once any rank's `serve()` ends (it died, or its collective failed), a watcher thread marks rank 0's
  service failed at once (the requests waiting in it are answered 503 with Retry-After, not run into a
  broken group), and Serve's health check replaces the whole group. On GPUs rank 0 then also ends its
  own process: a collective with a dead peer over NVLink does not fail, it waits for NCCL's time-out
  (300 s), so the request in flight would hang; ending the process makes Serve answer it 500 at once;
- a graceful stop (scaling down, a new deployment) closes the service, whose pipeline releases the
  ranks, and then ends their actors; a killed replica takes its rank actors with it (Ray ends the
  actors a process owns when it dies).

`ray` is imported only where used, as in `ray_deployment.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from ..parallel.group import DEFAULT_TIMEOUT_S
from .command import pipeline_factory

log = logging.getLogger("zimage_trt.serving")

RANK_NAMESPACE = "zimage-trt"
GPU_KEY = "zimage-trt-gpu-of-rank-"
RENDEZVOUS_HOST = "127.0.0.1"  # the ranks of one replica share a node (STRICT_PACK)
WATCH_PERIOD_S = 0.5  # how often rank 0 looks at the other ranks while it loads
STOP_WAIT_S = 30.0  # a graceful stop waits this long for the ranks to leave serve()


def shared_gpu_ids(store: dist.Store, rank: int, degree: int, own: str) -> list[str]:
    """Every rank's GPU id in rank order, through the store (each rank puts its own, then reads all)."""
    store.set(f"{GPU_KEY}{rank}", own)
    return [store.get(f"{GPU_KEY}{r}").decode() for r in range(degree)]


def rank_device(device: str, store: dist.Store, rank: int, degree: int) -> torch.device:
    """This rank's device. On GPUs: Ray shows each rank actor (and the replica) only its own GPU, and NCCL
    then cannot open CUDA peer access (NVLink) between the ranks' processes and falls back to shared host
    memory; so every rank is shown all the group's GPUs, in rank order, and takes cuda:RANK (before CUDA
    starts in this process; where it has started, its own GPU as Ray gave it)."""
    if device != "cuda":
        return torch.device("cpu")
    import ray

    ids = shared_gpu_ids(store, rank, degree, ",".join(str(i) for i in ray.get_gpu_ids()))
    if torch.cuda.is_initialized() or any("," in i or not i for i in ids):
        log.warning("rank %d: CUDA already started here (or not one GPU a rank: %s); the ranks see only their "
                    "own GPU, so NCCL may not use peer access between them", rank, ids)
        return torch.device("cuda", 0)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    os.environ["LOCAL_RANK"] = str(rank)  # the pipeline's "cuda" is cuda:LOCAL_RANK under sequence parallelism
    return torch.device("cuda", rank)


def rank_bundle(args) -> dict:
    """What one rank reserves (a placement-group bundle): `--cpus-per-replica` cores, and a GPU on "cuda"."""
    bundle = {"CPU": float(args.cpus_per_replica)}
    if args.device == "cuda":
        bundle["GPU"] = 1.0
    return bundle


def join_group(store: dist.Store, rank: int, degree: int, device: torch.device, timeout_s: float) -> None:
    """This process as `rank` of the replica's group (the pipeline's own join then finds it initialised)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=degree,
                            timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None)


class RankProcess:
    """Ranks 1..N-1 of a replica (a Ray actor each): join, load, serve rank 0's calls until it closes."""

    def run(self, args, pipeline, port: int, rank: int, degree: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
        store = dist.TCPStore(RENDEZVOUS_HOST, port, degree, is_master=False, timeout=timedelta(seconds=timeout_s))
        join_group(store, rank, degree, rank_device(args.device, store, rank, degree), timeout_s)
        try:
            pipe = (pipeline or pipeline_factory(args))()
            if pipe.is_main_process:  # (a custom factory that forgot sequence_parallel=N)
                raise RuntimeError(f"rank {rank}'s pipeline is not sequence-parallel: make it with "
                                   f"sequence_parallel={degree}")
            with pipe:
                served = pipe.serve()
            log.info("rank %d of %d: rank 0 closed after %d call(s)", rank, degree, served)
            return served
        finally:
            dist.destroy_process_group()


class ReplicaRanks:
    """Rank 0's side: the rendezvous store, ranks 1..N-1 as actors in this replica's placement group."""

    def __init__(self, args, pipeline=None, name: str = "replica", timeout_s: float = DEFAULT_TIMEOUT_S):
        """`name`: the replica's; its rank actors are "NAME:rankR" in the namespace `RANK_NAMESPACE`."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.degree, self.timeout_s, self.device_name = int(args.sequence_parallel), timeout_s, args.device
        self.device = torch.device("cpu")  # (set at `join`)
        group = ray.util.get_current_placement_group()
        if group is None or len(group.bundle_specs) < self.degree:
            raise RuntimeError(f"a sequence_parallel={self.degree} replica needs a placement group of {self.degree} "
                               "bundles (the deployment's placement_group_bundles), one per rank")
        self.store = dist.TCPStore(RENDEZVOUS_HOST, 0, self.degree, is_master=True,
                                   timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        bundle = rank_bundle(args)
        actor = ray.remote(RankProcess)
        self.actors = [actor.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                                     name=f"{name}:rank{rank}", namespace=RANK_NAMESPACE,
                                     scheduling_strategy=PlacementGroupSchedulingStrategy(group, rank)).remote()
                       for rank in range(1, self.degree)]
        self.runs = [a.run.remote(args, pipeline, self.store.port, rank, self.degree, timeout_s)
                     for rank, a in enumerate(self.actors, start=1)]
        self._closing = False

    def join(self) -> None:
        self.device = rank_device(self.device_name, self.store, 0, self.degree)
        join_group(self.store, 0, self.degree, self.device, self.timeout_s)

    def watch(self, service) -> None:
        """From now on, a rank that ends while the replica is not closing fails `service` (and on GPUs ends
        this process, whose NCCL collectives would wait for their time-out)."""

        def wait_for_a_rank_to_end():
            import ray

            ray.wait(self.runs, num_returns=1, timeout=None)
            if self._closing:
                return
            reason = self.failure() or "a rank ended"
            # (Not while the service stops: its closing pipeline is what released the ranks.)
            if service.mark_failed(f"the sequence-parallel group is broken: {reason}") and self.device.type == "cuda":
                log.error("ending this replica's process: its NCCL collectives cannot be interrupted")
                logging.shutdown()
                os._exit(70)

        threading.Thread(target=wait_for_a_rank_to_end, name="zimage-trt-rank-watch", daemon=True).start()

    async def while_watching(self, work) -> None:
        """Await `work` (rank 0 joining, loading, warming); a rank that ends meanwhile fails it at once."""
        task = asyncio.ensure_future(work)
        while True:
            done, _ = await asyncio.wait({task}, timeout=WATCH_PERIOD_S)
            if done:
                return task.result()
            reason = self.failure()
            if reason is not None:
                raise RuntimeError(f"the sequence-parallel group could not start: {reason}")

    def failure(self) -> str | None:
        """Why the group cannot serve (a rank's serve() ended: it failed, died or was released), or None."""
        import ray

        ready, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        if not ready:
            return None
        rank = self.runs.index(ready[0]) + 1
        try:
            served = ray.get(ready[0], timeout=5)
        except Exception as error:  # noqa: BLE001 - said in the health check's message and the log
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[-1]
            return f"rank {rank} of {self.degree} failed: {first_line[:300]}"
        return f"rank {rank} of {self.degree} left after {served} call(s)"

    def closing(self) -> None:
        """Before rank 0's pipeline closes: the ranks leaving serve() is now expected."""
        self._closing = True

    def close(self) -> None:
        """After rank 0's pipeline closed (which releases the ranks): let them finish, then end them."""
        import ray

        self._closing = True
        ray.wait(self.runs, num_returns=len(self.runs), timeout=STOP_WAIT_S)
        for actor in self.actors:
            ray.kill(actor)
        if dist.is_initialized():
            dist.destroy_process_group()
