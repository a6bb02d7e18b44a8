"""The per-actor worker: builds the model once, then runs shards: read plan rows -> task runner -> write -> commit."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pyarrow as pa

from igpt_batch import errors, redact
from igpt_batch.config import JobConfig
from igpt_batch.inputs import images
from igpt_batch.inputs.manifest import Shard
from igpt_batch.run import metrics
from igpt_batch.run.records import make_record
from igpt_batch.run.storage import OutputFolder
from igpt_batch.run.tasks import Resolved, Task

log = logging.getLogger(__name__)
STAGES = ("read_s", "wait_s", "preprocess_s", "model_s", "write_s")


class ShardWorker:
    """Holds one model replica; `run(shard)` processes one shard, commits it and returns its commit record.

    Task-agnostic: the task's runner turns (shard, input rows) into output tables. Used directly by the in-process
    executor and wrapped with ray.remote by the Ray executor, so both behave the same. The model is built here,
    inside the actor, from the checkpoint the driver resolved.
    """

    def __init__(self, cfg: JobConfig, task: Task, resolved: Resolved):
        self.cfg, self.task, self.resolved = cfg, task, resolved
        self.out = OutputFolder(cfg.output.path, cfg.storage_options)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="igpt-read")
        # The Ray executor keeps two shards in flight per actor (max_concurrency=2) so one shard's reading,
        # decoding and writing overlap the other's compute; the lock keeps model calls one at a time.
        self.model_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self.model = self.runner = self._load_error = None
        self.fingerprint = resolved.info.weights_fingerprint

    def load(self) -> None:
        """Build the model and the task's runner once (on the first shard, so an actor is placed before it loads);
        a model that cannot load fails every later call at once with the same error."""
        with self._load_lock:
            if self._load_error is not None:
                raise self._load_error
            if self.runner is not None:
                return
            try:
                self._build()
            except Exception as e:
                self._load_error = e
                raise

    def _build(self) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        from igpt_batch.model.transformer import load_model

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # in actors
        hf_logging.disable_progress_bar()  # one line below says the model loaded, not a bar per actor
        if self.cfg.run.torch_threads:
            torch.set_num_threads(self.cfg.run.torch_threads)
        t0 = time.perf_counter()
        self.model = load_model(self.resolved.info.path, self.cfg.model.dtype, self.cfg.model.device)
        log.info("model %s (%s) loaded on %s in %.1f s", self.cfg.model.name, self.cfg.model.dtype, self.model.device,
                 time.perf_counter() - t0)
        self.runner = self.task.runner(self, self.resolved)

    def node_id(self) -> str:
        """The Ray node this actor runs on (the pool's placement probe: it answers as soon as the actor is up)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def _load(self, uri: str) -> tuple[object, float, int]:
        """Fetch and decode one row: (images.Loaded or ImageError, seconds, http retries)."""
        t0 = time.perf_counter()
        i, tries = self.cfg.input, []
        try:
            got = images.load(uri, self.model.n_px, self.cfg.storage_options, timeout=i.read_timeout,
                              max_bytes=i.max_bytes, max_pixels=i.max_pixels, draft=i.draft, retries=i.retries,
                              host_connections=i.host_connections, counter=tries)
        except errors.ImageError as e:
            got = e
        return got, time.perf_counter() - t0, sum(tries)

    def _decode(self, data: "bytes | errors.ImageError", where: str) -> tuple[object, float, int]:
        """Decode bytes already read (from the plan file or a tar): (images.Loaded or ImageError, seconds, 0)."""
        t0, i = time.perf_counter(), self.cfg.input
        try:
            if isinstance(data, errors.ImageError):
                raise data
            got = images.load_bytes(data, self.model.n_px, i.max_bytes, i.max_pixels, i.draft, where=where)
        except errors.ImageError as e:
            got = e
        return got, time.perf_counter() - t0, 0

    def _jobs(self, rows: pa.Table) -> Iterator[tuple[tuple[str, str], object]]:
        """((id, uri), the call that reads and decodes it) in row order: image bytes carried by the plan, tar members
        (one streaming pass per tar, here), or uris to fetch."""
        from functools import partial
        from itertools import groupby

        from igpt_batch.inputs import tars

        ids, uris = rows.column("id").to_pylist(), rows.column("uri").to_pylist()
        if "bytes" in rows.column_names:
            data = rows.column("bytes")
            for j in range(rows.num_rows):
                yield (ids[j], uris[j]), partial(self._decode, data[j].as_py(), redact.redact_uri(uris[j]))
        elif "member" in rows.column_names:
            names = rows.column("member").to_pylist()
            tar_of = lambda j: uris[j][:len(uris[j]) - len(names[j]) - 1]  # noqa: E731  (uri = tar#member)
            for url, group in groupby(range(rows.num_rows), key=tar_of):
                group = list(group)
                got = tars.members(url, [names[j] for j in group], self.cfg.storage_options, self.cfg.input.max_bytes)
                for j, item in zip(group, got):
                    yield (ids[j], uris[j]), partial(self._decode, item, redact.redact_uri(uris[j]))
        else:
            for row in zip(ids, uris):
                yield row, partial(self._load, row[1])

    def loaded(self, rows: pa.Table, stats: dict, window: int) -> Iterator[tuple[str, str, object]]:
        """Yield (id, uri, images.Loaded or ImageError) in row order, decoding up to `window` rows ahead in threads
        (a bounded window bounds memory whatever the shard size). stats gains `retries` (http retries)."""
        pending: deque = deque()
        jobs = self._jobs(rows)
        stats.setdefault("retries", 0)

        def submit() -> bool:
            t0 = time.perf_counter()
            job = next(jobs, None)  # a tar member is read here, in order
            stats["read_s"] += time.perf_counter() - t0
            if job is not None:
                pending.append((job[0], self.pool.submit(job[1])))
            return job is not None

        while len(pending) < window and submit():
            pass
        while pending:
            (id_, uri), fut = pending.popleft()
            submit()
            t0 = time.perf_counter()
            try:
                result, seconds, retries = fut.result()
                stats["read_s"] += seconds
                stats["retries"] += retries
            except Exception as e:  # any other decoder failure is still a per-row error, never a lost row
                result = errors.ImageError("decode", f"{type(e).__name__}: {e}")
            stats["wait_s"] += time.perf_counter() - t0
            yield id_, uri, result

    def run(self, shard: Shard) -> dict:
        """Process one shard and commit it; returns the commit record plus timings."""
        self.load()
        t0, started = time.perf_counter(), time.time()
        stats = dict.fromkeys(STAGES, 0.0)
        rows = self.out.read_plan(shard.name) if self.task.reads_manifest else None  # written by the driver
        tables = self.runner(shard, rows, stats)
        tw = time.perf_counter()
        files = [self.out.write_part(kind, shard.name, t) for kind, t in tables.items()]
        record = make_record(shard, files, tables, fingerprint=self.fingerprint, started_at=started)  # h-output: v2
        stats["write_s"] = time.perf_counter() - tw
        record["stats"] = {k: round(v, 4) for k, v in stats.items()} | {"total_s": round(time.perf_counter() - t0, 4)}
        self.out.commit(shard.name, record, lease=self.resolved.lease)  # h-output: refused under a lost lease
        metrics.shard_committed(self.task.name, self.cfg.output.path, record, tables)  # a no-op without Ray
        return record
