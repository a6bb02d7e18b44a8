"""`export`: a snapshot of a refresh store's current table as plain Parquet parts, for readers of nothing else."""
from __future__ import annotations

import posixpath
import re

import pyarrow as pa

from igpt_batch.errors import UsageError
from igpt_batch.run.storage import OutputFolder
from igpt_batch.store.layout import LIVE, Store

EXPORT_ROWS = 100_000  # rows per exported part-*.parquet
MARKER = "_export.json"  # names the parts of the export in the folder; {"writing": true} while one is written
PART = re.compile(r"^part-\d{5}\.parquet$")


def export(store_url: str, out_url: str, snapshot: str | None = None, version: str | None = None,
           storage_options: dict | None = None, include_deleted: bool = False) -> dict:
    """Write the live rows of a snapshot (the latest by default) as Parquet parts under out_url, then
    _export.json; streams the table a part at a time.

    out_url is a new (or empty) folder, or one holding only an earlier export of ours: its _export.json is first
    replaced by {"writing": true} and its parts removed, so no reader ever counts parts of two exports."""
    store = Store(store_url, storage_options)
    version = store.resolve(version)
    ds = store.open_current(version, snapshot)
    out = OutputFolder(out_url, storage_options)
    old = _earlier_export(out)
    out.write_json(MARKER, {"writing": True})  # the folder is ours from here; readers wait for the summary
    for name in old:
        out.remove(name)
    n, names = 0, []
    for batch in ds.to_batches(filter=None if include_deleted else LIVE, batch_size=EXPORT_ROWS):
        names.append(f"part-{len(names):05d}.parquet")
        out.write_table(names[-1], pa.Table.from_batches([batch]))
        n += batch.num_rows
    summary = {"version": version, "snapshot": snapshot or max(store.kept_snapshots(version)), "rows": n,
               "parts": len(names), "files": names}
    out.write_json(MARKER, summary)
    return summary


def _earlier_export(out: OutputFolder) -> list[str]:
    """The part files of an earlier export in `out` ([] for a new or empty folder); UsageError (exit 2) for a folder
    holding anything else, a user's own part-*.parquet included."""
    if not out.fs.exists(out.path("")):
        return []
    out.fs.invalidate_cache(out.path(""))
    names = sorted(posixpath.basename(p.rstrip("/")) for p in out.fs.ls(out.path(""), detail=False))
    names = [n for n in names if n and not n.startswith(".")]  # a local write's temp files are ours too
    if not names:
        return []
    others = [n for n in names if n != MARKER and not PART.match(n)]
    if MARKER not in names or others:
        shown = ", ".join((others or names)[:3]) + (", ..." if len(others or names) > 3 else "")
        raise UsageError(f"export: {out.url} holds files that are not an igpt-batch export ({shown}): export into a "
                         "new folder, or one holding only an earlier export")
    return [n for n in names if n != MARKER]
