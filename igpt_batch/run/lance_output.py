"""output.format: lance: workers write a shard's rows as uncommitted Lance fragments and name them in its commit
marker; the driver (the lease's holder, the one writer) commits them into the output's one dataset, exactly once.

A marker is the shard's commit point, as for Parquet, but it is created once (the first attempt's marker wins, so
a marker never changes after the driver may have committed its fragments). The driver's Lance commits are appends
in batches (every `output.lance_commit_s` seconds or COMMIT_RECORDS records, and at the end), each skipping the
fragments whose data files the dataset already holds, so a driver killed anywhere commits nothing twice, and a
resume commits the fragments of markers an earlier run left uncommitted. Data files no marker names (an actor
killed before its marker) are never committed, and are removed at the next start or success once older than the
lease timeout (a younger one may be a previous driver's worker, still finishing its shard).

The store may be unreachable for a while (restarted, overloaded): Lance's own client retries each request a few
seconds (LANCE_CLIENT_RETRIES); a worker's fragment write and the driver's commit are retried with backoff for
COMMIT_RETRY_S, a commit on the dataset's latest version, skipping the fragments it holds (a failed attempt may
have committed); past that the job fails naming the commit (exit 1), its markers kept, and a rerun commits them.
"""
from __future__ import annotations

import itertools
import json
import logging
import posixpath
import time
import uuid
from collections import Counter

from igpt_batch.errors import OutputError
from igpt_batch.redact import redact_text
from igpt_batch.run.lease import Fence, check_fence
from igpt_batch.run.lease_files import Conflict, lease_file
from igpt_batch.run.storage import COMMITS, LANCE, OutputFolder

log = logging.getLogger(__name__)
COMMIT_RECORDS = 64  # records a batch commits at least up to (a job of more than 6400 shards: shards / 100)
# a timed commit (every lance_commit_s) takes at least shards / TIMED_SHARDS records, so a job makes at most about
# TIMED_SHARDS Lance commits (about 7 driver requests each, with the fence and the pruning) whatever its hours
TIMED_SHARDS = 100
PRUNE_EVERY = 100  # Lance commits between removals of the dataset's old manifests (each holds every fragment)
COMMIT_RETRY_S = 120.0  # how long a Lance write or commit waits out an unreachable store (botocore's 10 tries: ~2 min)
LANCE_CLIENT_RETRIES = "10"  # Lance's object-store client: retries of each request (its default, 3: 1-2 s)


def lance_options(url: str, storage_options: dict | None) -> dict | None:
    """fsspec storage_options -> Lance's object-store options: the one place the two vocabularies meet."""
    so = dict(storage_options or {})
    if "://" not in url or url.startswith("file://"):
        return None
    client = so.pop("client_kwargs", None) or {}
    out = {k: str(v) for k, v in so.items()
           if k.startswith(("aws_", "google_", "azure_", "allow_", "timeout", "connect_timeout", "client_"))}
    names = {"key": "aws_access_key_id", "secret": "aws_secret_access_key", "token": "aws_session_token",
             "endpoint_url": "aws_endpoint", "region_name": "aws_region"}
    for src in (client, so):
        out |= {names[k]: str(v) for k, v in src.items() if k in names and v is not None}
    if so.get("anon"):
        out["aws_skip_signature"] = "true"
    if out.get("aws_endpoint", "").startswith("http://"):
        out["allow_http"] = "true"
    return out or None


def is_lance(out: OutputFolder) -> bool:
    """Whether this output's embeddings are a Lance dataset (its _job.json's output.format)."""
    return ((out.read_job() or {}).get("config", {}).get("output") or {}).get("format") == "lance"


def uri(out: OutputFolder) -> str:
    return out.fs.unstrip_protocol(out.path(LANCE))


def _options(out: OutputFolder) -> dict | None:
    """The output's Lance options: an object store's client retries longer than Lance's default (a user's own wins)."""
    opts = lance_options(out.url, out.fs.storage_options)
    return {"client_max_retries": LANCE_CLIENT_RETRIES} | opts if opts is not None else None


def open_dataset(out: OutputFolder):
    """The output's dataset at its latest version (a lance.LanceDataset, a pyarrow Dataset); None before it exists."""
    import lance

    if not out.exists(posixpath.join(LANCE, "_versions")):
        return None
    return lance.dataset(uri(out), storage_options=_options(out))


class FragmentWriter:
    """A worker's writer of shards' rows as data files of uncommitted fragments (no manifest version). The dataset
    (made by the driver before any worker) is opened once per worker: Lance reads its manifest, which grows with
    the fragments committed, only then."""

    def __init__(self, out: OutputFolder):
        import threading

        self.out, self.ds, self.lock = out, None, threading.Lock()

    def write(self, table) -> list[dict]:
        """The fragments' metadata (JSON), for the shard's marker."""
        from lance.fragment import write_fragments

        if not table.num_rows:
            return []
        with self.lock:  # two shards in flight share one handle
            if self.ds is None:
                self.ds = open_dataset(self.out)
        if self.ds is None:
            raise FileNotFoundError(f"{uri(self.out)} is missing: the driver creates it before any worker runs")
        frags = retrying(lambda _: write_fragments(table, self.ds, mode="append"),
                         f"{uri(self.out)}: the write of a shard's Lance fragments", COMMIT_RETRY_S)
        return [f.to_json() for f in frags]


def retrying(fn, what: str, retry_s: float):
    """fn(attempt number) until it returns, retried with backoff for `retry_s` on OSError (LanceError(IO): the
    store unreachable or timing out, past its client's own retries); then OutputError naming `what`."""
    delay, deadline = 0.5, time.monotonic() + retry_s
    for attempt in itertools.count():
        try:
            return fn(attempt)
        except OSError as e:
            why = redact_text(str(e).splitlines()[0][:300]) if str(e) else type(e).__name__
            if time.monotonic() + delay > deadline:
                raise OutputError(f"{what} failed for {retry_s:.0f} s ({why})") from None
            log.warning("%s failed (%s); retrying in %.1f s", what, why, delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def commit_marker_once(out: OutputFolder, shard_name: str, record: dict, lease: Fence | None) -> dict:
    """Create the shard's marker unless one exists (a conditional create: local link, S3 If-None-Match); returns
    the marker that holds: ours, or an earlier attempt's (whose fragments are the shard's, ours left uncommitted)."""
    if lease is not None:
        check_fence(out, lease)
        record = record | {"lease": lease.record()}
    record = record | {"nonce": uuid.uuid4().hex}
    rel = f"{COMMITS}/{shard_name}.json"
    try:
        lease_file(out, rel).create(json.dumps(record, indent=2, sort_keys=True, default=str).encode())
        return record
    except Conflict:
        held = out.commit_record(shard_name)
        if held is None:  # a marker there that does not read: never guess which fragments are the shard's
            raise OutputError(f"{posixpath.join(out.url, rel)} exists but cannot be read") from None
        log.info("%s: committed by an earlier attempt; this attempt's data files stay uncommitted", shard_name)
        return held


def prune(ds) -> None:
    """Remove the manifests of the dataset's earlier versions: appends only, so the latest references every data
    file they did; data files no version references (shards in flight) are younger than Lance's 7 days: kept."""
    import datetime

    ds.cleanup_old_versions(older_than=datetime.timedelta(0))


def data_files(record: dict) -> list[str]:
    return [f["path"] for frag in record.get("fragments") or [] for f in frag["files"]]


def present(ds) -> list[str]:
    """The data files of the dataset's version, one entry per fragment file (a file twice: committed twice)."""
    return [str(d.path) for frag in ds.get_fragments() for d in frag.metadata.files] if ds is not None else []


def committer(job, out: OutputFolder, committed: dict[str, dict]) -> "Committer | None":
    """For a job of output.format: lance, the started Committer (dataset created, an earlier run's markers
    committed); None otherwise."""
    if job.cfg.output.format != "lance":
        return None
    shards = len(job.plan.shards)
    c = Committer(out, job.task.embeddings_schema(job.cfg, job.resolved), job.resolved.lease,
                  job.cfg.output.lance_commit_s, max(COMMIT_RECORDS, shards // 100), max(1, shards // TIMED_SHARDS),
                  COMMIT_RETRY_S)
    c.start(committed)
    return c


class Committer:
    """The driver's side: creates the dataset (empty, with the task's schema) if absent, commits the fragments of
    arriving commit records in batches, and once, under the job's lease. The lease makes it the dataset's one
    writer, so the version it last read or committed (`ds`) is the latest: a commit reads nothing first."""

    def __init__(self, out: OutputFolder, schema, lease: Fence | None, every_s: float = 30.0,
                 batch: int = COMMIT_RECORDS, timed_min: int = 1, retry_s: float = COMMIT_RETRY_S):
        self.out, self.schema, self.lease, self.every_s, self.batch = out, schema, lease, every_s, batch
        self.timed_min = timed_min  # records a timed commit waits for: commits stay bounded by shards, not hours
        self.retry_s, self.failed = retry_s, False  # failed: a commit gave up (the job fails; nothing more is tried)
        self.ds = None
        self.pending: list[dict] = []
        self.named: set[str] = set()  # the data files every marker seen names (start, add)
        self.last = time.monotonic()
        self.commits = 0  # Lance commits this run made

    def start(self, committed: dict[str, dict]) -> None:
        """Before any worker: the dataset exists; markers an earlier (killed) run did not commit are committed now;
        data files no marker names (actors killed before their marker) are removed."""
        import lance

        self.ds = open_dataset(self.out)
        if self.ds is None:
            self.ds = lance.write_dataset(self.schema.empty_table(), uri(self.out), mode="create",
                                          storage_options=_options(self.out))
        self.named = {p for rec in committed.values() for p in data_files(rec)}  # every marker's data files
        foreign = [p for p in present(self.ds) if p not in self.named]
        if foreign:  # compacted or written to by hand: a shard's data files no longer tell whether it is in
            raise OutputError(f"{uri(self.out)} holds {len(foreign)} data files that no commit marker names (was it "
                              "compacted or changed by hand?): resuming could commit rows twice. Use --overwrite "
                              "to write it again")
        self.pending = list(committed.values())
        self.flush()
        self.sweep()

    def add(self, record: dict) -> None:
        self.named.update(data_files(record))
        self.pending.append(record)
        timed = len(self.pending) >= self.timed_min and time.monotonic() - self.last >= self.every_s
        if len(self.pending) >= self.batch or timed:
            self.flush()

    def flush(self) -> None:
        """One Lance append of the pending records' fragments that the dataset's latest version does not hold,
        retried with backoff while the store cannot be reached (then OutputError: the job fails, a rerun commits)."""
        self.last = time.monotonic()
        if not self.pending or self.failed:
            return
        if self.lease is not None:
            check_fence(self.out, self.lease)  # a driver that lost its lease commits nothing more
        try:
            retrying(lambda attempt: self._append(fresh=attempt > 0),
                     f"{uri(self.out)}: the Lance commit of {len(self.pending)} shards", self.retry_s)
        except OutputError as e:
            self.failed = True
            raise OutputError(f"{e}; their commit markers are kept: rerun the job to commit them (none twice)") from None
        self.pending = []

    def _append(self, fresh: bool) -> None:
        """Append the pending fragments the dataset does not hold. `fresh` (a retry): first read its latest version,
        which holds the fragments of a failed attempt that committed after all; those are skipped."""
        import lance
        from lance.fragment import FragmentMetadata

        if fresh:
            read, self.ds = self.ds.version, lance.dataset(uri(self.out), storage_options=_options(self.out))
            if self.ds.version != read:
                self._check_once(read, "a failed attempt of this commit (it landed after all), or another writer,")
        held, new = set(present(self.ds)), {}
        for f in (f for rec in self.pending for f in rec.get("fragments") or []):
            if not any(d["path"] in held for d in f["files"]):
                new.setdefault(f["files"][0]["path"], f)  # a record added twice (a retried shard) counts once
        if not new:
            return
        read = self.ds.version
        self.ds = lance.LanceDataset.commit(self.ds, lance.LanceOperation.Append(
            [FragmentMetadata.from_json(json.dumps(f)) for f in new.values()]), read_version=read,
            storage_options=_options(self.out))
        self.commits += 1
        if self.ds.version != read + 1:  # another writer committed in between (a driver past its lease)
            self._check_once(read, "another writer (a driver that lost its lease)")
        if self.commits % PRUNE_EVERY == 0:
            prune(self.ds)

    def _check_once(self, read: int, whose: str) -> None:
        """After a version other than the one this driver expected: no data file may be in the dataset twice."""
        twice = sorted(p for p, n in Counter(present(self.ds)).items() if n > 1)
        log.warning("%s: %s committed after version %d", uri(self.out), whose, read)
        if twice:
            raise OutputError(f"{uri(self.out)}: {whose} committed while this one did: {len(twice)} data files are "
                              f"in the dataset twice (e.g. {twice[0]}); write the output again with --overwrite")

    def close(self) -> None:
        """At the end (however the job ended): what arrived is committed (unless a commit gave up already)."""
        self.flush()
        log.info("%s: version %d, %d Lance commits this run", uri(self.out), self.ds.version, self.commits)

    def sweep(self) -> int:
        """Remove the data files that neither the dataset nor a marker names (never read: an actor's uncommitted
        write) and are older than the lease timeout (a younger one may be a previous driver's worker finishing its
        shard, whose marker, if its fence still passes, names it); returns how many. Run under the lease."""
        folder = self.out.path(LANCE, "data")
        if not self.out.fs.exists(folder):
            return 0
        prune(self.ds)
        keep = set(present(self.ds)) | self.named
        self.out.fs.invalidate_cache(folder)
        min_age = self.lease.timeout if self.lease is not None else 0.0
        orphans = [f["name"] for f in self.out.fs.ls(folder, detail=True)
                   if posixpath.basename(f["name"]) not in keep and _age(f) > min_age]
        if orphans:
            self.out.fs.rm(orphans)
            log.info("removed %d uncommitted Lance data files (actors killed before their commit marker)", len(orphans))
        return len(orphans)


def _age(info: dict) -> float:
    """Seconds since a listed file was written (local `mtime`, S3 `LastModified`); unknown: old."""
    t = info.get("mtime") or info.get("LastModified")
    t = t.timestamp() if hasattr(t, "timestamp") else t
    return time.time() - float(t) if t else float("inf")
