"""The files a refresh store keeps beside its Lance table: night records, working manifests, the failed rows, the
index record, near-duplicates. Mixed into `Store` (store/layout.py), which stays the one owner of the layout."""
from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from igpt_batch.run.storage import errors_by_reason

FAILED = "failed.parquet"  # rows that could not be embedded, kept beside the table
NIGHT = "_night"  # a night's working files that hold fetchable uris: removed when it ends, swept by the next
NIGHTS = "nights"  # one summary record per night: nights/<start>.json
WORKING = (NIGHT, "_planning", "manifests")  # swept at the start of a night (manifests/: stores from before 0.x)
INDEX_INFO = "_index.json"  # the vector index: rows it was trained on, its partitions, its measured recall
SOURCE = [("id", pa.string()), ("uri", pa.string()), ("sha256", pa.string()), ("size", pa.int64()),
          ("mtime", pa.string()), ("etag", pa.string())]  # a row's source: the first columns of both tables
# first_night / last_night: the snapshot ids of the nights a row failed in first and last
FAILED_SCHEMA = pa.schema([*SOURCE, ("stage", pa.string()), ("reason", pa.string()), ("first_night", pa.string()),
                           ("last_night", pa.string())])


class StoreFiles:
    """The side files of a store's versions (Store supplies folder(), _list() and clear_uncommitted())."""

    def night_manifest_url(self, version: str, snapshot: str) -> str:
        """A night's to-compute manifest: fetchable uris (credentials included), so removed when the night ends."""
        return f"{self.url}/{version}/{NIGHT}/{snapshot}.parquet"

    def write_night_manifest(self, version: str, snapshot: str, tables) -> str:
        """Stream a night's to-compute rows (an iterator of tables of one schema) into its working manifest."""
        v, rel = self.folder(version), f"{NIGHT}/{snapshot}.parquet"
        v.fs.makedirs(v.path(NIGHT), exist_ok=True)
        writer = None
        with v.fs.open(v.path(rel), "wb") as sink:
            for t in tables:
                writer = writer or pq.ParquetWriter(sink, t.schema)
                writer.write_table(t)
            if writer:
                writer.close()
        return self.night_manifest_url(version, snapshot)

    def sweep(self, version: str) -> None:
        """A night's first step, under the lease: remove the working files a killed night left (they hold fetchable
        uris) and a current table that was never committed."""
        v = self.folder(version)
        for sub in WORKING:
            v.remove(sub)
        self.clear_uncommitted(version)

    def end_night(self, version: str) -> None:
        """A night's last step, whether it succeeded or failed: its working files go."""
        self.folder(version).remove(NIGHT)

    def save_night(self, version: str, record: dict) -> None:
        """One night's record (its summary, start, end, status), named by its start; never rewritten by others."""
        self.folder(version).write_json(f"{NIGHTS}/{_stamp(record['started_at'])}.json", record)

    def night_summaries(self, version: str) -> list[dict]:
        """Every night's record of a version, oldest first (docs/REFRESH.md, "Night records")."""
        v = self.folder(version)
        return [v.read_json(f"{NIGHTS}/{name}") for name in self._list(version, NIGHTS) if name.endswith(".json")]

    def index_info(self, version: str) -> dict:
        """What the vector index was last (re-)trained on and its measured recall ({} before it exists)."""
        return self.folder(version).read_json(INDEX_INFO) or {}

    def set_index_info(self, version: str, info: dict) -> None:
        self.folder(version).write_json(INDEX_INFO, info)

    def scratch_url(self, version: str, name: str) -> str:
        """A folder for one `dedup` run's pair files (removed by it when done)."""
        return f"{self.url}/{version}/_scratch/{name}"

    def write_duplicates(self, version: str, snapshot: str, table: pa.Table) -> None:
        """A night's near-duplicate pairs (id, duplicate_of, cosine) found for its new and updated rows."""
        self.folder(version).write_table(f"duplicates/{snapshot}.parquet", table)

    def read_duplicates(self, version: str, snapshot: str) -> pa.Table | None:
        v = self.folder(version)
        return v.read_table(f"duplicates/{snapshot}.parquet") if v.exists(f"duplicates/{snapshot}.parquet") else None

    def read_failed(self, version: str) -> pa.Table:
        v = self.folder(version)
        return v.read_table(FAILED).cast(FAILED_SCHEMA) if v.exists(FAILED) else FAILED_SCHEMA.empty_table()

    def write_failed(self, version: str, table: pa.Table) -> None:
        """The failed-rows record; its uris are redacted (no credential is kept in a store)."""
        from igpt_batch.redact import redact_uri

        uris = pa.array([None if u is None else redact_uri(u) for u in table.column("uri").to_pylist()], pa.string())
        table = table.set_column(table.schema.get_field_index("uri"), "uri", uris)
        self.folder(version).write_table(FAILED, table.cast(FAILED_SCHEMA))

    def failed_by_reason(self, version: str) -> Counter:
        t = self.read_failed(version)
        return errors_by_reason(t.rename_columns([{"reason": "error"}.get(c, c) for c in t.column_names]))




def _stamp(iso: str) -> str:
    """An ISO time as a file name that sorts by time: 2026-01-02T03:04:05.678901+00:00 -> 20260102T030405.678901+0000."""
    return iso.replace("-", "").replace(":", "")
