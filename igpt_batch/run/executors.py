"""Executors: run shards in-process or on a Ray actor pool, retrying failed shards; both behave the same."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from igpt_batch.errors import ExecutorError, WorkerStartError
from igpt_batch.inputs.manifest import Shard
from igpt_batch.run import metrics
from igpt_batch.run.cluster import alive_nodes, check_resources, init_ray, worker_gpus
from igpt_batch.run.job import Job

log = logging.getLogger("igpt_batch")
Done = Callable[[dict], None]
IN_FLIGHT = 2  # shards per actor: one computing while the other reads, decodes or writes
POLL_S = 2.0  # how often the Ray executor looks at its actors and the cluster while shards run
LOG_PENDING_S = 60.0  # how often a wait for actors that cannot be placed is logged


def execute(job: Job, shards: list[Shard], done: Done) -> dict[str, str]:
    """Run `shards` of `job`, calling done(record) after each commit; returns {shard name: last error} for shards
    that gave up."""
    if not shards:
        return {}
    if job.cfg.run.executor == "local":
        return execute_local(job, shards, done)
    return RayPool(job, done).run(shards)


def execute_local(job: Job, shards: list[Shard], done: Done) -> dict[str, str]:
    """In this process, one shard at a time, each retried up to run.max_retries times."""
    from igpt_batch.run.worker import ShardWorker

    worker = ShardWorker(job.for_workers())
    failed = {}
    for shard in shards:
        for attempt in range(job.cfg.run.max_retries + 1):
            try:
                record = worker.run(shard)
            except Exception as e:  # a shard failure is retried, then reported; never silently dropped
                log.warning("%s attempt %d failed: %s: %s", shard.name, attempt + 1, type(e).__name__, e)
                failed[shard.name] = f"{type(e).__name__}: {e}"
                continue
            failed.pop(shard.name, None)
            done(record)  # the driver's side (a Lance commit): its failure is the job's, as on Ray, not the shard's
            break
    return failed


@dataclass
class ActorState:
    """One actor of the pool: its placement probe until it answers, then its node; the shards it holds."""

    ready: Any  # the ObjectRef of its node_id() probe; None once placed
    since: float  # time.monotonic() at its start: a pending actor is given up after run.actor_start_timeout
    node: str | None = None  # the Ray node it runs on, once placed
    shards: dict[Any, Shard] = field(default_factory=dict)  # {ObjectRef of run(shard): shard} in flight

    @property
    def placed(self) -> bool:
        return self.node is not None


class RayPool:
    """Actors holding one model replica each. Shards go to whichever live actor has room (IN_FLIGHT each), so a
    lost actor or node never strands work; a replacement that cannot be placed within run.actor_start_timeout is
    given up, and the job finishes on the capacity that remains, or fails with a message when none does."""

    def __init__(self, job: Job, done: Done):
        self.job, self.cfg, self.done = job.for_workers(), job.cfg, done
        self.actors: dict[Any, ActorState] = {}  # actor handle -> its state
        self.attempts: dict[str, int] = {}
        self.failed: dict[str, str] = {}
        self.queue: list[Shard] = []
        self.start_failures = 0  # in a row: a model that cannot load must not restart actors forever
        self.refused: dict[str, None] = {}  # why workers refused to start (WorkerStartError), in order, once each
        self.start_timeout = job.cfg.run.actor_start_timeout
        self.tags = metrics.job_tags(job.task.name, job.cfg.output.path)

    def run(self, shards: list[Shard]) -> dict[str, str]:
        import ray

        from igpt_batch.run.storage import OutputFolder

        owns_ray = init_ray(self.cfg.run.address)
        self.out = OutputFolder(self.cfg.output.path, self.cfg.storage_options)
        self._make_actor_class(ray)
        nodes = alive_nodes() or {}
        problem = check_resources(self.request, nodes)
        if problem and owns_ray:  # a local Ray never grows: waiting cannot help
            raise ExecutorError(problem)
        if problem:
            log.warning("%s; waiting up to %.0f s for the cluster to add a node (run.actor_start_timeout)",
                        problem, self.start_timeout)
        self.queue = list(reversed(shards))  # pop() takes shards in plan order
        try:
            for _ in range(min(self.cfg.run.workers, len(shards))):
                self._start_actor()
            self._loop(ray)
        finally:
            for actor in list(self.actors):
                ray.kill(actor, no_restart=True)
            metrics.actors(self.tags, 0, 0)
        return self.failed

    def _make_actor_class(self, ray) -> None:
        from igpt_batch.run.worker import ShardWorker

        gpus = worker_gpus(self.cfg)
        self.request = {"CPU": self.cfg.run.cpus_per_worker, "GPU": gpus}
        self.actor_cls = ray.remote(ShardWorker).options(num_cpus=self.cfg.run.cpus_per_worker, num_gpus=gpus,
                                                         max_concurrency=IN_FLIGHT)

    def _start_actor(self) -> None:
        actor = self.actor_cls.remote(self.job)
        self.actors[actor] = ActorState(actor.node_id.remote(), time.monotonic())

    def _loop(self, ray) -> None:
        last_log = time.monotonic()
        while self.queue or any(a.shards for a in self.actors.values()):
            self._fill()
            refs = [a.ready for a in self.actors.values() if a.ready is not None]
            refs += [r for a in self.actors.values() for r in a.shards]
            if not refs:
                raise ExecutorError(f"no worker is left to run {len(self.queue)} shard(s): every worker was lost "
                                    "and no replacement could be placed")
            ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_S)
            for ref in ready:
                self._settle(ray, ref)
            self._watch_nodes(ray)
            if time.monotonic() - last_log >= LOG_PENDING_S:
                last_log = time.monotonic()
                pending = [a for a in self.actors.values() if not a.placed]
                if pending:
                    log.info("waiting for %d worker(s) to be placed (%s each); %d shard(s) queued",
                             len(pending), self.request, len(self.queue))
            self._give_up_pending(ray)
            placed = sum(a.placed for a in self.actors.values())
            metrics.actors(self.tags, placed, len(self.actors) - placed)

    def _fill(self) -> None:
        """Hand queued shards to live actors with room, the least busy first."""
        while self.queue:
            live = [(len(a.shards), i, actor) for i, (actor, a) in enumerate(self.actors.items())
                    if a.placed and len(a.shards) < IN_FLIGHT]
            if not live:
                return
            _, _, actor = min(live, key=lambda x: x[:2])
            shard = self.queue.pop()
            self.actors[actor].shards[actor.run.remote(shard)] = shard

    def _settle(self, ray, ref) -> None:
        actor, state = next((k, a) for k, a in self.actors.items() if a.ready == ref or ref in a.shards)
        if state.ready == ref:
            try:
                state.node, state.ready = ray.get(ref), None
                self.start_failures = 0
            except Exception as e:  # the actor process could not start
                if isinstance(getattr(e, "cause", None), WorkerStartError):
                    return self._refuse(ray, actor, str(e.cause))
                self.start_failures += 1
                reason = f"worker failed to start: {type(e).__name__}: {e}"
                if self.start_failures > self.cfg.run.max_retries:
                    raise ExecutorError(f"{reason} ({self.start_failures} times in a row)") from None
                self._lose(ray, actor, reason)
            return
        shard = state.shards.pop(ref)
        try:
            self.done(ray.get(ref))
            self.failed.pop(shard.name, None)
            metrics.shard(self.tags, "committed")
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            # The actor died (SIGKILL, OOM, node lost): its shards go back to the queue, it is replaced.
            state.shards[ref] = shard
            self._lose(ray, actor, f"worker died: {type(e).__name__}")
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            log.warning("%s failed: %s: %s", shard.name, type(cause).__name__, cause)
            self._requeue(shard, f"{type(cause).__name__}: {cause}")

    def _refuse(self, ray, actor, reason: str) -> None:
        """An actor whose node has no usable copy of the model: it is not replaced, the others go on; with no
        worker left the job fails, listing every refusal."""
        self.actors.pop(actor)
        ray.kill(actor, no_restart=True)
        self.refused[reason] = None
        log.warning("a worker refused to start: %s; going on with %d other worker(s)", reason, len(self.actors))
        if not self.actors:
            raise ExecutorError("no worker could start:\n  " + "\n  ".join(self.refused))

    def _lose(self, ray, actor, reason: str) -> None:
        """An actor is gone: every shard it held is done (its commit marker exists) or requeued; start a new one."""
        state = self.actors.pop(actor)
        ray.kill(actor, no_restart=True)
        log.warning("%s (%d shard(s) in flight); starting a new worker", reason, len(state.shards))
        for shard in state.shards.values():
            record = self.out.commit_record(shard.name)
            if record is not None:  # it died after committing this shard, before the reply: the shard is done
                self.done(record)
                self.failed.pop(shard.name, None)
                metrics.shard(self.tags, "committed")
            else:
                self._requeue(shard, reason)
        if self.queue or any(a.shards for a in self.actors.values()):
            self._start_actor()

    def _requeue(self, shard: Shard, reason: str) -> None:
        self.attempts[shard.name] = self.attempts.get(shard.name, 0) + 1
        self.failed[shard.name] = reason
        if self.attempts[shard.name] <= self.cfg.run.max_retries:
            self.queue.append(shard)
        metrics.shard(self.tags, "retried" if self.attempts[shard.name] <= self.cfg.run.max_retries else "given_up")

    def _watch_nodes(self, ray) -> None:
        """Actors on nodes that died are lost; with no live node at all the job cannot go on."""
        nodes = alive_nodes()
        if nodes is None or not nodes:
            raise ExecutorError("the Ray cluster has no live node (the node died, or its raylet or GCS was killed); "
                                "committed shards are kept and a rerun resumes")
        for actor, state in list(self.actors.items()):
            if state.placed and state.node not in nodes:
                self._lose(ray, actor, "worker's node died")

    def _give_up_pending(self, ray) -> None:
        now = time.monotonic()
        for actor, state in list(self.actors.items()):
            if not state.placed and now - state.since > self.start_timeout:
                log.warning("gave up a worker that could not be placed within %.0f s (needs %s)",
                            self.start_timeout, self.request)
                self.actors.pop(actor)
                ray.kill(actor, no_restart=True)
        if self.queue and not self.actors:
            nodes = alive_nodes() or {}
            raise ExecutorError(check_resources(self.request, nodes) or
                                f"no worker could be placed within {self.start_timeout:.0f} s "
                                f"(run.actor_start_timeout); {len(self.queue)} shard(s) not run")
