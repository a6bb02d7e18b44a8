"""The refresh store: its layout, its Lance current table, failed-rows record, commits, reads, retention and listing."""
from __future__ import annotations

import datetime as dt
import logging
import posixpath
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from igpt_batch.run.storage import OutputFolder, errors_by_reason

log = logging.getLogger("igpt_batch")
TABLE = "current.lance"  # the current table of a version, a Lance dataset
FAILED = "failed.parquet"  # rows that could not be embedded, kept beside the table
FRAGMENT_ROWS = 1024 * 1024  # Lance's target fragment size: smaller fragments count towards compaction
NIGHT = "igpt_snapshot"  # the Lance transaction property naming the night a commit publishes
FAILED_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("sha256", pa.string()), ("size", pa.int64()),
                           ("mtime", pa.string()), ("etag", pa.string()), ("stage", pa.string()),
                           ("reason", pa.string()), ("first_night", pa.string()), ("last_night", pa.string())])


def current_schema(dim: int, metadata: dict | None = None) -> pa.Schema:
    """The current table's columns (docs/REFRESH.md)."""
    return pa.schema([("id", pa.string()), ("uri", pa.string()), ("sha256", pa.string()), ("size", pa.int64()),
                      ("mtime", pa.string()), ("etag", pa.string()), ("embedding", pa.list_(pa.float32(), dim)),
                      ("width", pa.int32()), ("height", pa.int32()), ("snapshot", pa.string()), ("deleted", pa.bool_())],
                     metadata=metadata)


def write_parquet(folder: OutputFolder, rel: str, table: pa.Table) -> None:
    """One whole Parquet file that readers see complete or not at all."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    folder.write_bytes(rel, sink.getvalue().to_pybytes())


def lance_options(url: str, storage_options: dict | None) -> dict | None:
    """fsspec storage_options -> Lance's object-store options: the one place the two vocabularies meet."""
    so = dict(storage_options or {})
    if "://" not in url or url.startswith("file://"):
        return None
    client = so.pop("client_kwargs", None) or {}
    out = {k: str(v) for k, v in so.items() if k.startswith(("aws_", "google_", "azure_", "allow_", "timeout"))}
    names = {"key": "aws_access_key_id", "secret": "aws_secret_access_key", "token": "aws_session_token",
             "endpoint_url": "aws_endpoint", "region_name": "aws_region"}
    for src in (client, so):
        out |= {names[k]: str(v) for k, v in src.items() if k in names and v is not None}
    if so.get("anon"):
        out["aws_skip_signature"] = "true"
    if out.get("aws_endpoint", "").startswith("http://"):
        out["allow_http"] = "true"
    return out or None


class Store:
    """One refresh store: STORE/_LATEST.json and a folder per version (docs/REFRESH.md, "Store layout").

    The only module that spells the store's file names. The current table is a Lance dataset: each night is one
    atomic commit, tagged with its snapshot id, so a reader sees the previous night or the new one, never a mix.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url, self.storage_options = url.rstrip("/"), storage_options or {}
        self.root = OutputFolder(self.url, storage_options)

    # -- layout ----------------------------------------------------------------
    def folder(self, version: str) -> OutputFolder:
        return OutputFolder(f"{self.url}/{version}", self.storage_options)

    def table_url(self, version: str) -> str:
        return f"{self.url}/{version}/{TABLE}"

    def snapshot_url(self, version: str, snap: str) -> str:
        return f"{self.url}/{version}/snapshots/{snap}"

    def manifest_url(self, version: str, snap: str) -> str:
        return f"{self.url}/{version}/manifests/{snap}.parquet"

    def scratch(self, version: str) -> OutputFolder:
        """Planning's bucket files for one night (removed when the night is planned)."""
        return OutputFolder(f"{self.url}/{version}/_planning", self.storage_options)

    @staticmethod
    def bucket_file(kind: str, bucket: int) -> str:
        return f"{kind}-{bucket:05d}.parquet"

    def _list(self, version: str, sub: str) -> list[str]:
        """Names directly under a version's folder `sub` (snapshots, manifests), sorted."""
        v = self.folder(version)
        v.fs.invalidate_cache(v.path(sub))  # object stores cache listings
        if not v.exists(sub):
            return []
        found = v.fs.ls(v.path(sub), detail=False)
        return sorted(posixpath.basename(p.rstrip("/")) for p in found)

    # -- versions and the latest pointer -------------------------------------
    def versions(self) -> list[str]:
        found = self.root.fs.glob(self.root.path("v-*", "_version.json"))
        return sorted(f.split("/")[-2] for f in found)

    def version_info(self, version: str) -> dict | None:
        return self.folder(version).read_json("_version.json")

    def create_version(self, version: str, info: dict) -> None:
        if self.version_info(version) is None:
            self.folder(version).write_json("_version.json", info)

    def latest(self) -> dict:
        """{"version", "snapshot", "updated_at"} of the night refreshed last ({} before any)."""
        return self.root.read_json("_LATEST.json") or {}

    def set_latest(self, version: str, snap: str) -> None:
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
        self.root.write_json("_LATEST.json", {"version": version, "snapshot": snap, "updated_at": now})

    def resolve(self, version: str | None) -> str:
        """The version to read: the one named, else the latest, else the newest created."""
        version = version or self.latest().get("version")
        if version is None:
            created = {v: (self.version_info(v) or {}).get("created_at", "") for v in self.versions()}
            if not created:
                raise FileNotFoundError(f"no refresh versions under {self.url}")
            version = max(created, key=created.get)
        return version

    # -- nights ----------------------------------------------------------------
    def snapshots(self, version: str) -> list[str]:
        """Every night that ran the model (snapshots/<id>/, never deleted), oldest first."""
        return self._list(version, "snapshots")

    def write_night_manifest(self, version: str, snap: str, table: pa.Table) -> str:
        write_parquet(self.folder(version), f"manifests/{snap}.parquet", table)
        return self.manifest_url(version, snap)

    def pending(self, version: str) -> dict | None:
        """A night in flight: a to-compute manifest newer than the last published night. {"snapshot", "rows"}."""
        nights = self.nights(version)
        last = max(nights) if nights else ""
        mine = [m[: -len(".parquet")] for m in self._list(version, "manifests") if m.endswith(".parquet")]
        newer = [s for s in mine if s > last]
        if not newer:
            return None
        v = self.folder(version)
        rows = pq.read_metadata(v.path("manifests", f"{newer[-1]}.parquet"), filesystem=v.fs).num_rows
        return {"snapshot": newer[-1], "rows": rows}

    def taken(self, version: str, snap: str) -> bool:
        return snap in self.nights(version) or self.folder(version).exists(f"snapshots/{snap}")

    # -- the Lance table ---------------------------------------------------------
    def open(self, version: str, snapshot: str | None = None):
        """The current table (a lance.LanceDataset) as of `snapshot` (a tag), or its latest version; None if absent."""
        import lance

        if not self.folder(version).exists(TABLE):
            return None
        opts = lance_options(self.url, self.storage_options)
        return lance.dataset(self.table_url(version), version=snapshot, storage_options=opts)

    def nights(self, version: str) -> dict[str, int]:
        """Published nights: snapshot id -> Lance version of its commit, oldest first."""
        ds = self.open(version)
        if ds is None:
            return {}
        return dict(sorted((name, t["version"]) for name, t in ds.tags.list().items()))

    def commit(self, version: str, snap: str, rows: pa.RecordBatchReader, drop: str | None = None):
        """One atomic commit of a night: upsert `rows` on id (and delete rows matching `drop`), named by `snap`."""
        import lance

        opts, uri = lance_options(self.url, self.storage_options), self.table_url(version)
        ds = self.open(version)
        if ds is None:
            return lance.write_dataset(rows, uri, mode="create", storage_options=opts,
                                       transaction_properties={NIGHT: snap})
        builder = ds.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
        if drop:
            builder = builder.when_not_matched_by_source_delete(drop)
        txn, stats = builder.execute_uncommitted(rows)
        txn.transaction_properties = {NIGHT: snap}
        log.info("refresh %s/%s: merge_insert %s", version, snap, stats)
        return lance.LanceDataset.commit(uri, txn, read_version=ds.version, storage_options=opts)

    def publish(self, version: str, snap: str, lance_version: int) -> None:
        """Tag the night's commit with its snapshot id and point _LATEST.json at it."""
        ds = self.open(version)
        if snap not in ds.tags.list():
            ds.tags.create(snap, lance_version)
        self.set_latest(version, snap)

    def finish_interrupted(self, version: str) -> str | None:
        """A night killed between its commit and its tag: tag it now. Returns its snapshot id, or None."""
        ds = self.open(version)
        if ds is None:
            return None
        tagged = max((t["version"] for t in ds.tags.list().values()), default=0)
        for v in sorted((x["version"] for x in ds.versions() if x["version"] > tagged), reverse=True):
            txn = ds.read_transaction(v)
            snap = (txn.transaction_properties or {}).get(NIGHT) if txn else None
            if snap:
                log.info("refresh %s: night %s was committed but not tagged; tagging it now", version, snap)
                self.publish(version, snap, v)
                return snap
        return None

    def prune(self, version: str, keep: int, compact_fragments: int) -> list[str]:
        """Keep the newest `keep` nights (0 = all), compact small fragments past a threshold, and let Lance remove
        every version nobody can reach any more. Returns the nights removed."""
        ds = self.open(version)
        nights = list(self.nights(version))
        old = nights[:-keep] if keep > 0 else []
        for snap in old:
            ds.tags.delete(snap)
        small = [f for f in ds.get_fragments() if f.metadata.physical_rows < FRAGMENT_ROWS]
        if compact_fragments and len(small) >= compact_fragments:
            log.info("refresh %s: compacting %d small fragments", version, len(small))
            ds.optimize.compact_files()
        stats = ds.cleanup_old_versions(older_than=dt.timedelta(0), error_if_tagged_old_versions=False)
        log.info("refresh %s: kept nights %s; cleanup removed %s bytes", version, nights[len(old):], stats.bytes_removed)
        return old

    def read(self, version: str, snapshot: str | None = None, columns: list[str] | None = None,
             include_deleted: bool = True, filter: str | None = None) -> pa.Table:
        """Rows of the current table (as of `snapshot`), optionally only live ones or those matching `filter`."""
        ds = self.open(version, snapshot)
        if ds is None:
            return pa.table({})
        where = [f for f in (filter, None if include_deleted else "deleted = false") if f]
        return ds.to_table(columns=columns, filter=" AND ".join(f"({f})" for f in where) or None)

    def verify(self, version: str) -> list[str]:
        """Problems with a version's table: missing data files, kept nights that cannot be read."""
        ds, v, problems = self.open(version), self.folder(version), []
        if ds is None:
            return problems
        for frag in ds.get_fragments():
            for f in frag.data_files():
                if not v.exists(f"{TABLE}/data/{f.path}"):
                    problems.append(f"{version}: {TABLE}/data/{f.path} is missing (fragment {frag.fragment_id})")
        for night, lance_version in self.nights(version).items():
            try:
                ds.checkout_version(lance_version).to_table(columns=["id", "deleted"])
            except Exception as e:  # noqa: BLE001 - any failure to read a kept night is what --verify reports
                problems.append(f"{version}: night {night} (Lance version {lance_version}) cannot be read: {e}")
        return problems

    # -- failed rows ---------------------------------------------------------------
    def read_failed(self, version: str) -> pa.Table:
        v = self.folder(version)
        return v.read_table(FAILED).cast(FAILED_SCHEMA) if v.exists(FAILED) else FAILED_SCHEMA.empty_table()

    def write_failed(self, version: str, table: pa.Table) -> None:
        write_parquet(self.folder(version), FAILED, table.cast(FAILED_SCHEMA))

    def failed_by_reason(self, version: str) -> Counter:
        t = self.read_failed(version)
        return errors_by_reason(t.rename_columns([{"reason": "error"}.get(c, c) for c in t.column_names]))
