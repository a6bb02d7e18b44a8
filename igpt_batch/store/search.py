"""Over a refresh store's Lance current table: the vector index, `export`, `neighbors` and `dedup` (neighbors.py)."""
from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger("igpt_batch")
EXPORT_ROWS = 100_000  # rows per exported part-*.parquet


def update_index(store, version: str, min_rows: int) -> None:
    """Build the IVF-PQ cosine index once the table has `min_rows` rows; afterwards add each night's rows to it."""
    ds = store.open(version)
    if ds is None or ds.count_rows() < min_rows:
        return
    if not ds.describe_indices():
        dim = ds.schema.field("embedding").type.list_size
        ds.create_index("embedding", "IVF_PQ", metric="cosine", num_partitions=max(1, int(ds.count_rows() ** 0.5) // 4),
                        num_sub_vectors=next(d for d in (16, 8, 4, 2, 1) if dim % d == 0))
    else:
        ds.optimize.optimize_indices()


def export(store_url: str, out_url: str, snapshot: str | None = None, version: str | None = None,
           storage_options: dict | None = None, include_deleted: bool = False) -> dict:
    """Write the live rows of a night (the latest by default) as Parquet parts under out_url, for readers of
    nothing else; streams the table a part at a time."""
    import pyarrow as pa

    from igpt_batch.run.storage import OutputFolder
    from igpt_batch.store.layout import Store, write_parquet

    store = Store(store_url, storage_options)
    version = store.resolve(version)
    ds = store.open(version, snapshot)
    if ds is None:
        raise FileNotFoundError(f"{store_url}/{version} has no current table yet")
    out, n, parts = OutputFolder(out_url, storage_options), 0, 0
    for batch in ds.to_batches(filter=None if include_deleted else "deleted = false", batch_size=EXPORT_ROWS):
        write_parquet(out, f"part-{parts:05d}.parquet", pa.Table.from_batches([batch]))
        n, parts = n + batch.num_rows, parts + 1
    summary = {"version": version, "snapshot": snapshot or max(store.nights(version)), "rows": n, "parts": parts}
    out.write_json("_export.json", summary)
    return summary


def _common(p, command: str) -> None:
    p.set_defaults(search_command=command)  # run() dispatches on it, whatever the caller named its subparsers' dest
    p.add_argument("--snapshot", help="the night to read (a kept snapshot id); default the latest")
    p.add_argument("--version", help="the store version (v-...); default the latest")
    p.add_argument("--storage-options", help="JSON fsspec options, e.g. an S3 endpoint (prefer env vars for keys)")


def add_arguments(sub) -> None:
    """Register `export`, `neighbors` and `dedup` on the CLI's subparsers."""
    e = sub.add_parser("export", help="write a refresh store's current table as plain Parquet files")
    e.add_argument("store", help="the refresh store (folder or fsspec URL)")
    e.add_argument("out", help="output folder or fsspec URL for part-*.parquet")
    e.add_argument("--include-deleted", action="store_true", help="also rows marked deleted")
    _common(e, "export")
    n = sub.add_parser("neighbors", help="the k nearest live rows of a refresh store to an id or an image (cosine)")
    n.add_argument("store", help="the refresh store (folder or fsspec URL)")
    q = n.add_mutually_exclusive_group(required=True)
    q.add_argument("--id", dest="row_id", help="a row of the store's table")
    q.add_argument("--image", help="an image path or fsspec URI, embedded with the store's own model and layers")
    n.add_argument("-k", type=int, default=10, help="neighbours to return; default 10")
    n.add_argument("--contact-sheet", metavar="FILE", help="also draw the query beside its neighbours as a PNG")
    n.add_argument("--device", default="auto", help="--image: where the model runs (auto, cpu, cuda); default auto")
    _common(n, "neighbors")
    d = sub.add_parser("dedup", help="groups of near-duplicate live rows of a refresh store, as Parquet")
    d.add_argument("store", help="the refresh store (folder or fsspec URL)")
    d.add_argument("--threshold", type=float, default=0.95, help="cosine similarity a pair needs; default 0.95")
    d.add_argument("--output", help="Parquet file for the groups (path or fsspec URL); default none, summary only")
    d.add_argument("-k", type=int, default=10, help="neighbours queried per row; default 10")
    _common(d, "dedup")


def run(args: argparse.Namespace) -> int:
    """Run `export`, `neighbors` or `dedup`; prints one JSON line. ValueError/FileNotFoundError mean bad input."""
    from igpt_batch.store import neighbors as nn

    so = json.loads(args.storage_options) if args.storage_options else None
    if args.search_command == "export":
        out = export(args.store, args.out, args.snapshot, args.version, so, args.include_deleted)
    elif args.search_command == "neighbors":
        out = nn.neighbors(args.store, args.row_id, args.image, args.k, args.snapshot, args.version, so,
                           args.contact_sheet, args.device)
    else:
        out = nn.dedup(args.store, args.threshold, args.output, args.k, args.snapshot, args.version, so)
    print(json.dumps(out), flush=True)
    return 0
