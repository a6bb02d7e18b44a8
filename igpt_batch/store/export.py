"""`export`: a snapshot of a refresh store's current table as plain Parquet parts, for readers of nothing else."""
from __future__ import annotations

import pyarrow as pa

from igpt_batch.run.storage import OutputFolder
from igpt_batch.store.layout import LIVE, Store

EXPORT_ROWS = 100_000  # rows per exported part-*.parquet


def export(store_url: str, out_url: str, snapshot: str | None = None, version: str | None = None,
           storage_options: dict | None = None, include_deleted: bool = False) -> dict:
    """Write the live rows of a snapshot (the latest by default) as Parquet parts under out_url, then
    _export.json; streams the table a part at a time."""
    store = Store(store_url, storage_options)
    version = store.resolve(version)
    ds = store.open(version, snapshot)
    if ds is None:
        raise FileNotFoundError(f"{store_url}/{version} has no current table yet")
    out, n, parts = OutputFolder(out_url, storage_options), 0, 0
    for batch in ds.to_batches(filter=None if include_deleted else LIVE, batch_size=EXPORT_ROWS):
        out.write_table(f"part-{parts:05d}.parquet", pa.Table.from_batches([batch]))
        n, parts = n + batch.num_rows, parts + 1
    summary = {"version": version, "snapshot": snapshot or max(store.kept_snapshots(version)), "rows": n,
               "parts": parts}
    out.write_json("_export.json", summary)
    return summary
