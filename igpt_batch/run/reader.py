"""A shard's input rows read ahead in threads, in row order, by the kind the driver decided: fetch, bytes or tar."""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import groupby
from typing import Callable, Iterator

import pyarrow as pa

from igpt_batch import errors, redact
from igpt_batch.config import JobConfig
from igpt_batch.inputs import images
from igpt_batch.inputs.manifest import KINDS
from igpt_batch.run.context import Stats


class RowReader:
    """Reads and decodes plan rows to `n_px` images, up to a window of rows ahead in a small thread pool.

    `kind` (manifest.KINDS, from the driver's scan) says where a row's image is: "uri" fetches it, "bytes" decodes
    the plan row's `bytes`, "tar" reads the plan row's `member` from the tar its uri names (one pass per tar).
    """

    def __init__(self, cfg: JobConfig, kind: str, n_px: int, threads: int = 4):
        if kind not in KINDS:
            raise ValueError(f"input kind must be one of {KINDS}, got {kind!r}")
        self.cfg, self.kind, self.n_px = cfg, kind, n_px
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="igpt-read")

    def _load(self, uri: str) -> tuple[object, float, int]:
        """Fetch and decode one row: (images.Loaded or ImageError, seconds, http retries)."""
        t0 = time.perf_counter()
        i, tries = self.cfg.input, []
        try:
            got = images.load(uri, self.n_px, self.cfg.storage_options, timeout=i.read_timeout,
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
            got = images.load_bytes(data, self.n_px, i.max_bytes, i.max_pixels, i.draft, where=where)
        except errors.ImageError as e:
            got = e
        return got, time.perf_counter() - t0, 0

    def _jobs(self, rows: pa.Table) -> Iterator[tuple[tuple[str, str], Callable]]:
        """((id, uri), the call that reads and decodes it) in row order."""
        from igpt_batch.inputs import tars

        ids, uris = rows.column("id").to_pylist(), rows.column("uri").to_pylist()
        if self.kind == "bytes":
            data = rows.column("bytes")
            for j in range(rows.num_rows):
                yield (ids[j], uris[j]), partial(self._decode, data[j].as_py(), redact.redact_uri(uris[j]))
        elif self.kind == "tar":
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

    def read(self, rows: pa.Table, stats: Stats, window: int) -> Iterator[tuple[str, str, object]]:
        """Yield (id, uri, images.Loaded or ImageError) in row order, decoding up to `window` rows ahead in threads
        (a bounded window bounds memory whatever the shard size); adds read_s, wait_s and http_retries to stats."""
        pending: deque = deque()
        jobs = self._jobs(rows)

        def submit() -> bool:
            t0 = time.perf_counter()
            job = next(jobs, None)  # a tar member is read here, in order
            stats.read_s += time.perf_counter() - t0
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
                stats.read_s += seconds
                stats.http_retries += retries
            except Exception as e:  # any other decoder failure is still a per-row error, never a lost row
                result = errors.ImageError("decode", f"{type(e).__name__}: {e}")
            stats.wait_s += time.perf_counter() - t0
            yield id_, uri, result
