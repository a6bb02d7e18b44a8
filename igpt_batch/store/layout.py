"""The refresh store: its layout, its Lance current table, failed-rows record, commits, reads, retention and listing."""
from __future__ import annotations

import datetime as dt
import logging
import posixpath

import pyarrow as pa
import pyarrow.compute as pc

from igpt_batch.errors import UsageError
from igpt_batch.run.lance_output import lance_options
from igpt_batch.run.storage import OutputFolder
from igpt_batch.store.files import FAILED_SCHEMA, SOURCE, StoreFiles  # noqa: F401 - FAILED_SCHEMA for readers

log = logging.getLogger("igpt_batch")
TABLE = "current.lance"  # the current table of a version, a Lance dataset
FRAGMENT_ROWS = 1024 * 1024  # Lance's target fragment size: smaller fragments count towards compaction
SNAPSHOT_PROPERTY = "igpt_snapshot"  # the Lance transaction property naming the snapshot a commit publishes
SNAPSHOT_FORMAT = "%Y%m%dT%H%M%SZ"  # snapshot ids are UTC times, so they sort by time
LIVE = pc.field("deleted") == pa.scalar(False)  # the rows not marked deleted, as a Lance/Arrow filter


def current_schema(dim: int, metadata: dict | None = None, score: bool = False) -> pa.Schema:
    """The current table's columns (docs/REFRESH.md); with refresh.score, nll_bits after the image size."""
    return pa.schema([*SOURCE, ("embedding", pa.list_(pa.float32(), dim)), ("width", pa.int32()),
                      ("height", pa.int32()), *([("nll_bits", pa.float64())] if score else []),
                      ("snapshot", pa.string()), ("deleted", pa.bool_())], metadata=metadata)


class Store(StoreFiles):
    """One refresh store: STORE/_LATEST.json and a folder per version (docs/REFRESH.md, "Store layout").

    The only module that spells the store's file names and speaks to its Lance table. Each night publishes at most
    one snapshot: one atomic commit of the current table, tagged with its snapshot id, so a reader sees the previous
    snapshot or the new one, never a mix. `version` is always the store's `v-<hash>`; Lance's integer versions of
    the table are `table_version`.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url, self.storage_options = url.rstrip("/"), storage_options or {}
        self.root = OutputFolder(self.url, storage_options)

    # -- layout ----------------------------------------------------------------
    def folder(self, version: str) -> OutputFolder:
        return OutputFolder(f"{self.url}/{version}", self.storage_options)

    def table_url(self, version: str) -> str:
        return f"{self.url}/{version}/{TABLE}"

    def snapshot_url(self, version: str, snapshot: str) -> str:
        """The extract output of the rows a snapshot computed."""
        return f"{self.url}/{version}/snapshots/{snapshot}"

    def planning(self, version: str, folder: str = "") -> OutputFolder:
        """The night plan's bucket files (removed when the night is planned): under the version, or under `folder`
        (refresh.planning_folder: a dry run's temporary folder)."""
        return OutputFolder(f"{folder.rstrip('/') if folder else f'{self.url}/{version}'}/_planning", self.storage_options)

    @staticmethod
    def planning_bucket(kind: str, bucket: int) -> str:
        """A planning bucket's folder: `kind` (manifest, current, stat) rows in hash bucket `bucket`."""
        return f"{kind}/bucket={bucket:05d}"

    @staticmethod
    def planning_part(kind: str, bucket: int, part: str) -> str:
        """One task's part of a planning bucket, written whole (store/plan_tasks.py)."""
        return f"{Store.planning_bucket(kind, bucket)}/part-{part}.parquet"

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
        """{"version", "snapshot", "updated_at"} of the snapshot published last ({} before any)."""
        return self.root.read_json("_LATEST.json") or {}

    def set_latest(self, version: str, snapshot: str) -> None:
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
        self.root.write_json("_LATEST.json", {"version": version, "snapshot": snapshot, "updated_at": now})

    def resolve(self, version: str | None) -> str:
        """The version to read: the one named, else the latest, else the newest created."""
        version = version or self.latest().get("version")
        if version is None:
            created = {v: (self.version_info(v) or {}).get("created_at", "") for v in self.versions()}
            if not created:
                raise UsageError(f"no refresh versions under {self.url}")
            version = max(created, key=created.get)
        return version

    # -- snapshots -------------------------------------------------------------
    def snapshot_outputs(self, version: str) -> list[str]:
        """Every snapshot that ran the model (snapshots/<id>/, never deleted), oldest first."""
        return self._list(version, "snapshots")

    def pending(self, version: str) -> dict | None:
        """A snapshot in flight: an extract output newer than the last kept snapshot. {"snapshot", "rows"}."""
        kept = self.kept_snapshots(version)
        last = max(kept) if kept else ""
        for snapshot in reversed([s for s in self.snapshot_outputs(version) if s > last]):
            job = self.folder(version).read_json(f"snapshots/{snapshot}/_job.json")  # none: killed before any work
            if job:
                return {"snapshot": snapshot, "rows": (job.get("compat") or {}).get("rows")}
        return None

    def taken(self, version: str, snapshot: str) -> bool:
        return snapshot in self.kept_snapshots(version) or self.folder(version).exists(f"snapshots/{snapshot}")

    # -- the Lance table ---------------------------------------------------------
    def open(self, version: str, snapshot: str | None = None):
        """The current table (a lance.LanceDataset) as of `snapshot` (a tag), or its latest; None if absent."""
        import lance

        if not self.folder(version).exists(TABLE):
            return None
        opts = lance_options(self.url, self.storage_options)
        try:
            return lance.dataset(self.table_url(version), version=snapshot, storage_options=opts)
        except ValueError:  # Lance's "not found": a table never committed is no table yet
            if not self.committed(version):
                return None
            raise

    def open_current(self, version: str, snapshot: str | None = None):
        """The current table, as open(); UsageError when no night has finished there yet."""
        ds = self.open(version, snapshot)
        if ds is None:
            raise UsageError(f"{self.url}/{version} has no current table: no refresh has finished there yet")
        return ds

    def committed(self, version: str) -> bool:
        """Whether the current table exists with a committed version: a first night killed inside Lance's create
        leaves data/ without _versions/, a table never committed (clear_uncommitted removes it)."""
        v = self.folder(version)
        if not v.exists(TABLE):
            return False
        v.fs.invalidate_cache(v.path(TABLE, "_versions"))
        return v.exists(f"{TABLE}/_versions") and bool(v.fs.ls(v.path(TABLE, "_versions"), detail=False))

    def clear_uncommitted(self, version: str) -> bool:
        """Remove a current table that was never committed (ours: no reader could ever open it). Under the lease."""
        if self.folder(version).exists(TABLE) and not self.committed(version):
            log.warning("refresh %s: %s was never committed (a first night killed while writing it); removing it",
                        version, TABLE)
            self.folder(version).remove(TABLE)
            return True
        return False

    def repair_latest(self, version: str) -> None:
        """Point _LATEST.json at the version's newest kept snapshot when it says otherwise (a night killed between
        its tag and the pointer, or the first night of this version after another)."""
        kept = self.kept_snapshots(version)
        latest = self.latest()
        if kept and (latest.get("version"), latest.get("snapshot")) != (version, max(kept)):
            log.info("refresh %s: _LATEST.json named %s/%s; now %s", version, latest.get("version"),
                     latest.get("snapshot"), max(kept))
            self.set_latest(version, max(kept))

    def kept_snapshots(self, version: str) -> dict[str, int]:
        """Published snapshots still kept as tags: snapshot id -> table_version of its commit, oldest first."""
        ds = self.open(version)
        if ds is None:
            return {}
        return dict(sorted((name, t["version"]) for name, t in ds.tags.list().items()))

    def commit(self, version: str, snapshot: str, rows: pa.RecordBatchReader, drop_ids: pa.Array | None = None):
        """One atomic commit of a snapshot: upsert `rows` on id and delete the rows of `drop_ids`."""
        import lance

        opts, uri = lance_options(self.url, self.storage_options), self.table_url(version)
        ds = self.open(version)
        if ds is None:
            return lance.write_dataset(rows, uri, mode="create", storage_options=opts,
                                       transaction_properties={SNAPSHOT_PROPERTY: snapshot})
        builder = ds.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
        if drop_ids is not None and len(drop_ids):
            builder = builder.when_not_matched_by_source_delete(_sql_id_in(drop_ids))
        txn, stats = builder.execute_uncommitted(rows)
        txn.transaction_properties = {SNAPSHOT_PROPERTY: snapshot}
        log.info("refresh %s/%s: merge_insert %s", version, snapshot, stats)
        return lance.LanceDataset.commit(uri, txn, read_version=ds.version, storage_options=opts)

    def publish(self, version: str, snapshot: str, table_version: int) -> None:
        """Tag a snapshot's commit with its id and point _LATEST.json at it."""
        ds = self.open(version)
        if snapshot not in ds.tags.list():
            ds.tags.create(snapshot, table_version)
        self.set_latest(version, snapshot)

    def finish_interrupted(self, version: str) -> str | None:
        """A night killed between its commit and its tag: tag its snapshot now. Returns the snapshot id, or None."""
        ds = self.open(version)
        if ds is None:
            return None
        tagged = max((t["version"] for t in ds.tags.list().values()), default=0)
        for table_version in sorted((x["version"] for x in ds.versions() if x["version"] > tagged), reverse=True):
            txn = ds.read_transaction(table_version)
            snapshot = (txn.transaction_properties or {}).get(SNAPSHOT_PROPERTY) if txn else None
            if snapshot:
                log.info("refresh %s: snapshot %s was committed but not tagged; tagging it now", version, snapshot)
                self.publish(version, snapshot, table_version)
                return snapshot
        return None

    def prune(self, version: str, keep: int, compact_fragments: int) -> list[str]:
        """Keep the newest `keep` snapshots (0 = all), compact small fragments past a threshold, and let Lance remove
        every table version nobody can reach any more. Returns the snapshots removed."""
        ds = self.open(version)
        kept = list(self.kept_snapshots(version))
        old = kept[:-keep] if keep > 0 else []
        for snapshot in old:
            ds.tags.delete(snapshot)
        small = [f for f in ds.get_fragments() if f.metadata.physical_rows < FRAGMENT_ROWS]
        if compact_fragments and len(small) >= compact_fragments:
            log.info("refresh %s: compacting %d small fragments", version, len(small))
            ds.optimize.compact_files()
        stats = ds.cleanup_old_versions(older_than=dt.timedelta(0), error_if_tagged_old_versions=False)
        log.info("refresh %s: kept snapshots %s; cleanup removed %s bytes", version, kept[len(old):], stats.bytes_removed)
        return old

    def read(self, version: str, snapshot: str | None = None, columns: list[str] | None = None,
             include_deleted: bool = True, filter: pc.Expression | None = None) -> pa.Table:
        """Rows of the current table (as of `snapshot`), optionally only live ones or those matching `filter`."""
        ds = self.open(version, snapshot)
        if ds is None:
            return pa.table({})
        if not include_deleted:
            filter = LIVE if filter is None else filter & LIVE
        return ds.to_table(columns=columns, filter=filter)

    def verify(self, version: str) -> list[str]:
        """Problems with a version's table: missing data files, kept snapshots that cannot be read."""
        ds, v, problems = self.open(version), self.folder(version), []
        if ds is None:
            return problems
        for frag in ds.get_fragments():
            for f in frag.data_files():
                if not v.exists(f"{TABLE}/data/{f.path}"):
                    problems.append(f"{version}: {TABLE}/data/{f.path} is missing (fragment {frag.fragment_id})")
        for snapshot, table_version in self.kept_snapshots(version).items():
            try:
                ds.checkout_version(table_version).to_table(columns=["id", "deleted"])
            except Exception as e:  # noqa: BLE001 - any failure to read a kept snapshot is what --verify reports
                problems.append(f"{version}: night {snapshot} (Lance version {table_version}) cannot be read: {e}")
        return problems

def _sql_id_in(ids: pa.Array) -> str:
    """`id IN (...)` as SQL: Lance's merge_insert takes its delete condition only as SQL (pylance 14), so this is the
    one place that quotes ids (every other filter is an Arrow expression)."""
    return "id IN (" + ", ".join("'" + i.replace("'", "''") + "'" for i in ids.to_pylist()) + ")"
