"""The refresh store's reader commands (export, neighbors, dedup, changes): their arguments and their dispatch."""
from __future__ import annotations

import argparse
import json

from igpt_batch.errors import ConfigError

COMMANDS = ("export", "neighbors", "dedup", "changes")


def storage_options(text: str | None) -> dict | None:
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--storage-options is not valid JSON: {e.msg}") from None


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--snapshot", help="the night to read (a kept snapshot id); default the latest")
    p.add_argument("--version", help="the store version (v-...); default the latest")
    p.add_argument("--storage-options", help="JSON fsspec options, e.g. an S3 endpoint (prefer env vars for keys)")


def add_commands(sub) -> None:
    """`export`, `neighbors` and `dedup`: readers of a refresh store (igpt_batch.store.export, .neighbors)."""
    e = sub.add_parser("export", help="write a refresh store's current table as plain Parquet files")
    e.add_argument("store", help="the refresh store (folder or fsspec URL)")
    e.add_argument("out", help="output folder or fsspec URL for part-*.parquet")
    e.add_argument("--include-deleted", action="store_true", help="also rows marked deleted")
    _store_options(e)
    n = sub.add_parser("neighbors", help="the k nearest live rows of a refresh store to an id or an image (cosine)")
    n.add_argument("store", help="the refresh store (folder or fsspec URL)")
    q = n.add_mutually_exclusive_group(required=True)
    q.add_argument("--id", dest="row_id", help="a row of the store's table")
    q.add_argument("--image", help="an image path or fsspec URI, embedded with the store's own model and layers")
    n.add_argument("-k", type=int, default=10, help="neighbours to return; default 10")
    n.add_argument("--contact-sheet", metavar="FILE", help="also draw the query beside its neighbours as a PNG")
    n.add_argument("--device", default="auto", help="--image: where the model runs (auto, cpu, cuda); default auto")
    _store_options(n)
    d = sub.add_parser("dedup", help="groups of near-duplicate live rows of a refresh store, as Parquet")
    d.add_argument("store", help="the refresh store (folder or fsspec URL)")
    d.add_argument("--threshold", type=float, required=True,
                   help="cosine similarity a pair needs; required: it depends on the model and layer (docs/REFRESH.md)")
    d.add_argument("--output", help="Parquet file for the groups (path or fsspec URL); default none, summary only")
    d.add_argument("-k", type=int, default=10, help="neighbours queried per row; default 10")
    d.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where the k-NN tasks over the table's fragments run; default local (this process)")
    _store_options(d)
    c = sub.add_parser("changes", help="the ids whose embedding changed between two nights of a refresh store")
    c.add_argument("store", help="the refresh store (folder or fsspec URL)")
    c.add_argument("--since", required=True, metavar="SNAPSHOT", help="a kept night: changes after it")
    c.add_argument("--until", metavar="SNAPSHOT", help="a kept night: changes up to it; default the latest")
    c.add_argument("--version", help="the store version (v-...); default the latest")
    c.add_argument("--include-metadata", action="store_true", help="also metadata-only changes (kind metadata: "
                   "the same embedding, another uri, size, mtime or etag, e.g. a file moved with the same bytes)")
    c.add_argument("--output", metavar="FILE", help="write Parquet (id, kind, night, embedding) here; default: "
                   "one JSON line per change (without the embedding) on stdout")
    c.add_argument("--storage-options", help="JSON fsspec options, e.g. an S3 endpoint (prefer env vars for keys)")


def run(args: argparse.Namespace) -> int:
    """Run `export`, `neighbors`, `dedup` or `changes`; export/neighbors/dedup print one JSON line."""
    from igpt_batch.store import neighbors as nn
    from igpt_batch.store.export import export

    so = storage_options(args.storage_options)
    if args.command == "changes":
        from igpt_batch.store.changes import run as changes

        return changes(args, so)
    if args.command == "export":
        out = export(args.store, args.out, args.snapshot, args.version, so, args.include_deleted)
    elif args.command == "neighbors":
        out = nn.neighbors(args.store, args.row_id, args.image, args.k, args.snapshot, args.version, so,
                           args.contact_sheet, args.device)
    else:
        from igpt_batch.store.dedup import dedup

        out = dedup(args.store, args.threshold, args.output, args.k, args.snapshot, args.version, so, args.executor)
    print(json.dumps(out), flush=True)
    return 0
