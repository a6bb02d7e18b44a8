"""The per-actor worker: builds the model once, then runs shards: read plan rows -> task runner -> write -> commit."""
from __future__ import annotations

import logging
import threading
import time

from igpt_batch.inputs.manifest import Shard
from igpt_batch.run import lance_output, metrics
from igpt_batch.run.context import ShardContext, Stats
from igpt_batch.run.job import Job
from igpt_batch.run.reader import RowReader
from igpt_batch.run.records import make_record
from igpt_batch.run.storage import OutputFolder

log = logging.getLogger(__name__)


class ShardWorker:
    """Holds one model replica; `run(shard)` processes one shard, commits it and returns its commit record.

    Task-agnostic: the task's runner turns (shard, input rows) into output tables. Used directly by the in-process
    executor and wrapped with ray.remote by the Ray executor, so both behave the same. The model is built here,
    inside the actor, from the checkpoint the driver resolved; input rows are read by the kind the driver decided.
    """

    def __init__(self, job: Job):
        cfg = job.cfg
        self.job, self.cfg, self.task, self.resolved = job, cfg, job.task, job.resolved
        self.out = OutputFolder(cfg.output.path, cfg.storage_options)
        # output.format: lance: the embeddings go to uncommitted Lance fragments that the driver commits
        self.lance = lance_output.FragmentWriter(self.out) if cfg.output.format == "lance" else None
        self.reader = RowReader(cfg, job.kind, job.resolved.info.n_px) if job.kind else None
        # The Ray executor keeps two shards in flight per actor (max_concurrency=2) so one shard's reading,
        # decoding and writing overlap the other's compute; the lock keeps model calls one at a time.
        self.model_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self.model = self.runner = self._load_error = None
        self.fingerprint = job.resolved.info.weights_fingerprint
        self._model_path = None

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

        from igpt_batch.model import dtypes
        from igpt_batch.model.loading import load_model

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # in actors
        hf_logging.disable_progress_bar()  # one line below says the model loaded, not a bar per actor
        from igpt_batch.model.limits import torch_threads

        torch.set_num_threads(torch_threads(self.cfg.run.torch_threads, torch.get_num_threads()))  # cgroup cpu.max
        dtypes.check_worker(self.cfg.model)  # --dtype auto: this worker's hardware must resolve as the job's did
        t0 = time.perf_counter()
        self.model = load_model(self.model_path(), self.cfg.model.dtype, self.cfg.model.device)
        log.info("model %s (%s) loaded on %s in %.1f s", self.cfg.model.name, self.cfg.model.dtype, self.model.device,
                 time.perf_counter() - t0)
        self.runner = self.task.runner(ShardContext(self.cfg, self.resolved, self.model, self.model_lock, self.out,
                                                    self.reader.read if self.reader else _no_rows))

    def model_path(self) -> str:
        """This node's copy of the job's model, checked against the driver's fingerprint before any row;
        errors.WorkerStartError (naming node, model and the fix) where this node has none or a different one."""
        if self._model_path is None:
            from igpt_batch.model.checkpoint import open_on_node

            self._model_path = open_on_node(self.resolved.info, self.cfg.storage_options)
        return self._model_path

    def node_id(self) -> str:
        """The Ray node this actor runs on (the pool's placement probe: it answers once the actor is up and has
        found its node's copy of the model, so a node without one is refused in seconds, not shard by shard)."""
        import ray

        self.model_path()
        return ray.get_runtime_context().get_node_id()

    def run(self, shard: Shard) -> dict:
        """Process one shard and commit it; returns the commit record (with its stage seconds and http retries)."""
        self.load()
        t0, started_at = time.perf_counter(), time.time()
        stats = Stats()
        rows = self.out.read_plan(shard) if self.reader else None  # written by the driver
        tables = self.runner(shard, rows, stats)
        tw = time.perf_counter()
        # a shard without errors writes no errors part (its record says 0 error rows)
        files = [self.out.write_part(kind, shard.name, t) for kind, t in tables.items()
                 if (t.num_rows or kind != "errors") and not (self.lance and kind == "embeddings")]
        fragments = self.lance.write(tables["embeddings"]) if self.lance else None
        stats.write_s = time.perf_counter() - tw
        stats.total_s = time.perf_counter() - t0
        record = make_record(shard, files, tables, fingerprint=self.fingerprint, started_at=started_at)  # v2
        record |= {"stats": stats.seconds(), "http_retries": stats.http_retries}
        if self.lance:  # the first marker of a shard holds; the driver commits its fragments into the dataset
            record = lance_output.commit_marker_once(self.out, shard.name, record | {"fragments": fragments},
                                                     self.resolved.lease)
        else:
            self.out.commit(shard.name, record, lease=self.resolved.lease)  # refused under a lost lease
        metrics.shard_committed(self.task.name, self.cfg.output.path, record, tables)  # a no-op without Ray
        return record


def _no_rows(rows, stats, window):
    """The reader of a task that reads no manifest (generate): it is never given rows."""
    raise RuntimeError("this job reads no input rows")
