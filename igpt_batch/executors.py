"""Executors: run shards in-process or on a Ray actor pool, retrying failed shards; both behave the same."""
from __future__ import annotations

import logging
import os
from typing import Callable

from .config import JobConfig
from .manifest import Shard
from .tasks import Resolved, Task

log = logging.getLogger("igpt_batch")
Done = Callable[[dict], None]


def execute(cfg: JobConfig, task: Task, resolved: Resolved, shards: list[Shard], done: Done) -> dict[str, str]:
    """Run `shards`, calling done(record) after each commit; returns {shard name: last error} for shards that gave up."""
    if not shards:
        return {}
    if cfg.run.executor == "local":
        return execute_local(cfg, task, resolved, shards, done)
    return execute_ray(cfg, task, resolved, shards, done)


def execute_local(cfg, task, resolved, shards, done) -> dict[str, str]:
    from .worker import ShardWorker

    worker = ShardWorker(cfg, task, resolved)
    failed = {}
    for shard in shards:
        for attempt in range(cfg.run.max_retries + 1):
            try:
                done(worker.run(shard))
                break
            except Exception as e:  # a shard failure is retried, then reported; never silently dropped
                log.warning("%s attempt %d failed: %s: %s", shard.name, attempt + 1, type(e).__name__, e)
                failed[shard.name] = f"{type(e).__name__}: {e}"
        else:
            continue
        failed.pop(shard.name, None)
    return failed


def init_ray(address: str | None) -> None:
    """Join the given cluster, the job's cluster (RAY_ADDRESS under `ray job submit`), or start an isolated local Ray."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", include_dashboard=False, configure_logging=False)


IN_FLIGHT = 2  # shards per actor: one computing while the other reads, decodes or writes


def execute_ray(cfg, task, resolved, shards, done) -> dict[str, str]:
    import ray

    from .worker import ShardWorker

    from .storage import OutputFolder

    init_ray(cfg.run.address)
    out = OutputFolder(cfg.output.path, cfg.storage_options)
    gpus = cfg.run.gpus_per_worker
    if gpus is None:
        gpus = 1 if cfg.model.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0
    actor_cls = ray.remote(ShardWorker).options(num_cpus=cfg.run.cpus_per_worker, num_gpus=gpus,
                                                max_concurrency=IN_FLIGHT)
    n = min(cfg.run.workers, len(shards))
    actors = [actor_cls.remote(cfg, task, resolved) for _ in range(n)]
    queue = list(reversed(shards))  # pop() takes shards in plan order
    attempts: dict[str, int] = {}
    failed: dict[str, str] = {}
    running: dict = {}  # ObjectRef -> (actor slot, actor handle, shard)

    def fill(slot: int) -> None:
        """Keep IN_FLIGHT shards on the actor in `slot` while there is work."""
        while queue and sum(1 for s, _, _ in running.values() if s == slot) < IN_FLIGHT:
            shard = queue.pop()
            running[actors[slot].run.remote(shard)] = (slot, actors[slot], shard)

    for slot in range(n):
        fill(slot)
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        slot, actor, shard = running.pop(ref)
        try:
            done(ray.get(ref))
            failed.pop(shard.name, None)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            # The actor died (SIGKILL, OOM, node loss): retry the shard on a fresh actor.
            if actors[slot] is actor:  # replace it once, even though all of its shards in flight fail
                log.warning("worker for %s died (%s); starting a new worker", shard.name, type(e).__name__)
                ray.kill(actor, no_restart=True)
                actors[slot] = actor_cls.remote(cfg, task, resolved)
            record = out.commit_record(shard.name)
            if record is not None:  # it died after committing this shard, before the reply: the shard is done
                done(record)
                failed.pop(shard.name, None)
            else:
                _requeue(shard, attempts, failed, queue, cfg.run.max_retries, f"worker died: {type(e).__name__}")
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            log.warning("%s failed: %s: %s", shard.name, type(cause).__name__, cause)
            _requeue(shard, attempts, failed, queue, cfg.run.max_retries, f"{type(cause).__name__}: {cause}")
        fill(slot)
    for a in actors:
        ray.kill(a, no_restart=True)
    return failed


def _requeue(shard, attempts, failed, queue, max_retries, reason) -> None:
    attempts[shard.name] = attempts.get(shard.name, 0) + 1
    failed[shard.name] = reason
    if attempts[shard.name] <= max_retries:
        queue.append(shard)
