"""The per-actor worker: builds the model once, then runs shards: read plan rows -> task runner -> write -> commit."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pyarrow as pa

from . import images
from .config import JobConfig
from .manifest import Shard
from .storage import OutputFolder
from .tasks import Resolved, Task

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

        from .model import load_model

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

    def _load(self, uri: str) -> tuple[images.Loaded, float]:
        t0 = time.perf_counter()
        i = self.cfg.input
        got = images.load(uri, self.model.n_px, self.cfg.storage_options, timeout=i.read_timeout,
                          max_bytes=i.max_bytes, max_pixels=i.max_pixels, draft=i.draft)
        return got, time.perf_counter() - t0

    def loaded(self, rows: pa.Table, stats: dict, window: int) -> Iterator[tuple[str, str, object]]:
        """Yield (id, uri, images.Loaded or ImageError) in row order, decoding up to `window` rows ahead in threads
        (a bounded window bounds memory whatever the shard size)."""
        pending: deque = deque()
        it = zip(rows.column("id").to_pylist(), rows.column("uri").to_pylist())
        for row in it:
            pending.append((row, self.pool.submit(self._load, row[1])))
            if len(pending) >= window:
                break
        while pending:
            (id_, uri), fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, self.pool.submit(self._load, nxt[1])))
            t0 = time.perf_counter()
            try:
                result, seconds = fut.result()
                stats["read_s"] += seconds
            except images.ImageError as e:
                result = e
            except Exception as e:  # any other decoder failure is still a per-row error, never a lost row
                result = images.ImageError("decode", f"{type(e).__name__}: {e}")
            stats["wait_s"] += time.perf_counter() - t0
            yield id_, uri, result

    def run(self, shard: Shard) -> dict:
        """Process one shard and commit it; returns the commit record plus timings."""
        self.load()
        t0 = time.perf_counter()
        stats = dict.fromkeys(STAGES, 0.0)
        rows = self.out.read_plan(shard.name) if self.task.reads_manifest else None  # written by the driver
        tables = self.runner(shard, rows, stats)
        tw = time.perf_counter()
        files = [self.out.write_part(kind, shard.name, t) for kind, t in tables.items()]
        record = {
            "shard": shard.name, "start": shard.start, "stop": shard.stop, "files": files,
            "rows": {kind: t.num_rows for kind, t in tables.items()},
            "fingerprint": self.fingerprint, "worker_pid": os.getpid(),
        }
        stats["write_s"] = time.perf_counter() - tw
        record["stats"] = {k: round(v, 4) for k, v in stats.items()} | {"total_s": round(time.perf_counter() - t0, 4)}
        self.out.commit(shard.name, record)
        return record
