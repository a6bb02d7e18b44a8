"""The per-actor worker: builds the model once, then runs shards read -> tokenise -> model -> write -> commit."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa

from . import batching, images, palette
from .checkpoint import resolve_layers
from .config import JobConfig
from .manifest import Shard
from .storage import OutputFolder

log = logging.getLogger(__name__)
TASKS = ("extract", "generate", "complete")


def error_table(rows: list[dict]) -> pa.Table:
    schema = pa.schema([("id", pa.string()), ("uri", pa.string()), ("stage", pa.string()), ("error", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


class ShardWorker:
    """Holds one model replica; `run(shard, rows)` processes and commits one shard and returns its stats.

    Used directly by the in-process executor and wrapped with ray.remote by the Ray executor, so both
    behave the same. The model is built here, inside the actor, from the config.
    """

    def __init__(self, cfg: JobConfig, task: str, meta: dict[str, str]):
        import torch

        from .model import load_model

        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if cfg.run.torch_threads:
            torch.set_num_threads(cfg.run.torch_threads)
        self.cfg, self.task = cfg, task
        self.model = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device)
        self.out = OutputFolder(cfg.output.path, cfg.storage_options)
        self.meta = {k: str(v) for k, v in meta.items()}
        self.n_px = self.model.n_px
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="igpt-read")
        # The Ray executor keeps two shards in flight per actor (max_concurrency=2) so one shard's reading,
        # decoding and writing overlap the other's compute; the lock keeps model calls one at a time.
        self.model_lock = threading.Lock()
        on_gpu = self.model.device.type == "cuda"
        self.tokenize = (lambda rgb, c: palette.tokenize_torch(rgb, c, self.model.device)) if on_gpu else palette.tokenize
        if task == "extract":
            self.layers = resolve_layers(cfg.extract.layers, self.model.n_layer)
            self.batch_size = batching.extract_batch_size(self.model, self.layers, cfg.extract.batch_size)
        else:
            if on_gpu and cfg.model.compile:
                self.model.compile_decode()
            self.batch_size = batching.sample_batch_size(self.model, cfg.generate.batch_size)

    # -- reading ---------------------------------------------------------------
    def _load(self, uri: str) -> tuple[images.Loaded, float]:
        t0 = time.perf_counter()
        i = self.cfg.input
        got = images.load(uri, self.n_px, self.cfg.storage_options, timeout=i.read_timeout,
                          max_bytes=i.max_bytes, max_pixels=i.max_pixels, draft=i.draft)
        return got, time.perf_counter() - t0

    def _loaded(self, ids: list[str], uris: list[str], stats: dict) -> Iterator[tuple[str, str, object]]:
        """Yield (id, uri, result-or-ImageError) in order, decoding ahead in threads with a bounded window."""
        window = 4 * self.batch_size  # bounds memory whatever the shard size
        pending: deque = deque()
        rows = iter(zip(ids, uris))
        for row in rows:
            pending.append((row, self.pool.submit(self._load, row[1])))
            if len(pending) >= window:
                break
        while pending:
            (id_, uri), fut = pending.popleft()
            nxt = next(rows, None)
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

    # -- tasks -----------------------------------------------------------------
    def run(self, shard: Shard) -> dict:
        """Process one shard and commit it; returns the commit record plus timings."""
        t0 = time.perf_counter()
        stats = {"read_s": 0.0, "wait_s": 0.0, "preprocess_s": 0.0, "model_s": 0.0, "write_s": 0.0}
        rows = None
        if self.task != "generate":  # the driver wrote this shard's input rows to _plan/
            plan = self.out.read_table(f"_plan/{shard.name}.parquet")
            rows = {"id": plan.column("id").to_pylist(), "uri": plan.column("uri").to_pylist()}
        if self.task == "extract":
            tables = self._extract(rows, stats)
        elif self.task == "generate":
            tables = self._generate(shard, stats)
        else:
            tables = self._complete(shard, rows, stats)
        tw = time.perf_counter()
        files = [self.out.write_part(kind, shard.name, t) for kind, t in tables.items()]
        record = {
            "shard": shard.name, "start": shard.start, "stop": shard.stop, "files": files,
            "rows": {kind: t.num_rows for kind, t in tables.items()},
            "fingerprint": self.meta.get("weights_fingerprint"), "worker_pid": os.getpid(),
        }
        stats["write_s"] = time.perf_counter() - tw
        record["stats"] = {k: round(v, 4) for k, v in stats.items()} | {"total_s": round(time.perf_counter() - t0, 4)}
        self.out.commit(shard.name, record)
        return record

    def _schema_meta(self, extra: dict) -> dict:
        return {**self.meta, **{k: str(v) for k, v in extra.items()}}

    def _extract(self, rows: dict, stats: dict) -> dict[str, pa.Table]:
        import torch

        layers, bs = self.layers, self.batch_size
        ok: dict[str, list] = {"id": [], "uri": [], "width": [], "height": [], "sha256": []}
        embs: list[np.ndarray] = []
        errors: list[dict] = []
        batch: list[tuple] = []

        def flush() -> None:
            t = time.perf_counter()
            tokens = self.tokenize(np.stack([got.rgb for _, _, got in batch]), self.model.clusters)
            stats["preprocess_s"] += time.perf_counter() - t
            with self.model_lock, torch.inference_mode():
                t = time.perf_counter()
                feats = self.model.features(torch.from_numpy(tokens).to(self.model.device), layers)
                embs.append(feats.float().cpu().numpy())
                stats["model_s"] += time.perf_counter() - t
            for id_, uri, got in batch:
                for key, value in (("id", id_), ("uri", uri), ("width", got.width), ("height", got.height), ("sha256", got.sha256)):
                    ok[key].append(value)
            batch.clear()

        for id_, uri, res in self._loaded(rows["id"], rows["uri"], stats):
            if isinstance(res, images.ImageError):
                errors.append({"id": id_, "uri": uri, "stage": res.stage, "error": res.reason})
                continue
            batch.append((id_, uri, res))
            if len(batch) == bs:
                flush()
        if batch:
            flush()
        dim = len(layers) * self.model.n_embd
        emb = np.concatenate(embs) if embs else np.zeros((0, dim), np.float32)
        table = pa.table({
            "id": pa.array(ok["id"], pa.string()),
            "uri": pa.array(ok["uri"], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
            "width": pa.array(ok["width"], pa.int32()),
            "height": pa.array(ok["height"], pa.int32()),
            "sha256": pa.array(ok["sha256"], pa.string()),
        }).replace_schema_metadata(self._schema_meta({"layers": ",".join(map(str, layers)), "pooling": "mean(ln_1(h[l]))"}))
        return {"embeddings": table, "errors": error_table(errors)}

    def _sample(self, seeds: list[int], prompts: np.ndarray | None, stats: dict) -> tuple[np.ndarray, list[bytes]]:
        from .sampling import generate

        g = self.cfg.generate
        with self.model_lock:
            t = time.perf_counter()
            tokens = generate(self.model, seeds, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, prompt=prompts)
            stats["model_s"] += time.perf_counter() - t
        t = time.perf_counter()
        rgb = palette.detokenize(tokens, self.model.clusters, self.n_px)
        pngs = [palette.to_png(im) for im in rgb]
        if self.cfg.output.write_png_files:
            for seed, png in zip(seeds, pngs):
                self.out.write_bytes(f"pngs/seed-{seed:012d}.png", png)
        stats["preprocess_s"] += time.perf_counter() - t
        return tokens, pngs

    def _samples_table(self, columns: dict, tokens: np.ndarray, pngs: list[bytes]) -> pa.Table:
        n_tok = self.n_px * self.n_px
        g = self.cfg.generate
        flat = pa.array(tokens.reshape(-1).astype(np.uint16), pa.uint16())
        return pa.table({
            **columns,
            "tokens": pa.FixedSizeListArray.from_arrays(flat, n_tok),
            "png": pa.array(pngs, pa.binary()),
        }).replace_schema_metadata(self._schema_meta({
            "temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p, "n_px": self.n_px}))

    def _generate(self, shard: Shard, stats: dict) -> dict[str, pa.Table]:
        bs = self.batch_size
        all_seeds = list(range(shard.start, shard.stop))
        toks, pngs = [], []
        for i in range(0, len(all_seeds), bs):
            t, p = self._sample(all_seeds[i:i + bs], None, stats)
            toks.append(t), pngs.extend(p)
        tokens = np.concatenate(toks) if toks else np.zeros((0, self.n_px * self.n_px), np.int64)
        return {"samples": self._samples_table({"seed": pa.array(all_seeds, pa.int64())}, tokens, pngs)}

    def _complete(self, shard: Shard, rows: dict, stats: dict) -> dict[str, pa.Table]:
        g = self.cfg.generate
        k, r = g.samples_per_image, g.prompt_rows * self.n_px
        cols: dict[str, list] = {"prompt_id": [], "sample_index": [], "seed": []}
        toks, pngs, errors = [], [], []
        pending: list[tuple[int, str, np.ndarray]] = []  # (row index, id, prompt tokens)

        def flush() -> None:
            seeds = [g.seed + row * k + j for row, _, _ in pending for j in range(k)]
            prompts = np.repeat(np.stack([p for _, _, p in pending]), k, axis=0) if r else None
            t, p = self._sample(seeds, prompts, stats)
            toks.append(t), pngs.extend(p)
            for row, id_, _ in pending:
                cols["prompt_id"] += [id_] * k
                cols["sample_index"] += list(range(k))
            cols["seed"] += seeds
            pending.clear()

        per_batch = max(1, self.batch_size // k)
        for offset, (id_, uri, res) in enumerate(self._loaded(rows["id"], rows["uri"], stats)):
            if isinstance(res, images.ImageError):
                errors.append({"id": id_, "uri": uri, "stage": res.stage, "error": res.reason})
                continue
            tokens = self.tokenize(res.rgb[None], self.model.clusters)[0]
            pending.append((shard.start + offset, id_, tokens[:r]))
            if len(pending) == per_batch:
                flush()
        if pending:
            flush()
        tokens = np.concatenate(toks) if toks else np.zeros((0, self.n_px * self.n_px), np.int64)
        columns = {"prompt_id": pa.array(cols["prompt_id"], pa.string()),
                   "sample_index": pa.array(cols["sample_index"], pa.int32()),
                   "seed": pa.array(cols["seed"], pa.int64())}
        return {"samples": self._samples_table(columns, tokens, pngs), "errors": error_table(errors)}
