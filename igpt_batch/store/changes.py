"""A change feed over a refresh store's nights: the ids whose embedding changed between two kept nights (Lance tags).

Built on Lance time travel and the current table's `snapshot` column (the night a row's embedding was computed):
rows embedded after `since` are found with a filter as of `until`, and only those ids (plus deletion marks) are
looked up as of `since`, so the cost follows the changed rows, not the table. Ids dropped outright
(refresh.deleted=drop) are the exception: finding them compares the two nights' id columns.
Kinds: inserted (absent or never live at since), updated (live at both, another embedding), deleted (live at since,
not at until), revived (deleted-marked at since, live at until). `night` is the night the change happened.
With include_metadata also metadata (live at both, the same embedding, another uri, size, mtime or etag: a moved
or touched file with the same bytes): found in the fragments Lance wrote after `since` (an upsert rewrites its rows
into new fragments), so their cost follows the rows written since, or the compacted ones when compaction ran.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from igpt_batch.errors import UsageError
from igpt_batch.store.decide import TOUCH

BATCH = 8192
COLUMNS = ["id", "snapshot", "deleted", "embedding"]
METADATA = list(TOUCH[1:])  # uri, size, mtime, etag


def schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("kind", pa.string()), ("night", pa.string()),
                      ("embedding", pa.list_(pa.float32(), dim))])


def _lookup(ds, ids: list[str], columns=COLUMNS) -> dict[str, dict]:
    if not ids:
        return {}
    return {r["id"]: r for r in ds.to_table(columns=columns, filter=pc.field("id").isin(ids)).to_pylist()}


def _check_night(store, version: str, kept: dict, night: str, flag: str) -> None:
    if night in kept:
        return
    oldest = min(kept) if kept else None
    if night in store.snapshot_outputs(version) or (oldest and night < oldest):
        raise UsageError(f"{flag} {night}: that night was pruned by retention (refresh.keep_current); "
                         f"the oldest kept night is {oldest}")
    raise UsageError(f"{flag} {night}: no such night in {version}; kept nights: {', '.join(kept) or 'none'}")


def changes(store_url: str, since: str, until: str | None = None, version: str | None = None,
            storage_options: dict | None = None, include_metadata: bool = False) -> Iterator[pa.Table]:
    """Stream the changes between the kept nights `since` and `until` (default the latest) as tables of
    (id, kind, night, embedding: null when deleted); with include_metadata, metadata-only changes too."""
    from igpt_batch.store.layout import Store

    store = Store(store_url, storage_options)
    version = store.resolve(version)
    kept = store.kept_snapshots(version)
    _check_night(store, version, kept, since, "--since")
    until = until or (max(kept) if kept else since)
    _check_night(store, version, kept, until, "--until")
    if until < since:
        raise UsageError(f"--until {until} is before --since {since}")
    old, new = store.open(version, since), store.open(version, until)
    out = schema(new.schema.field("embedding").type.list_size)
    between = [n for n in kept if since < n <= until]
    quoted = since.replace("'", "''")
    feeds = (_embedded(old, new, f"snapshot > '{quoted}'"), _marked(store, version, between, old, new, since),
             _dropped(store, version, between, old, new))
    if include_metadata:
        feeds += (_metadata(store, version, between, old, new),)
    for feed in feeds:
        for rows in feed:
            if rows:
                yield pa.Table.from_pylist(rows, schema=out)


def _embedded(old, new, where: str) -> Iterator[list[dict]]:
    """Rows whose embedding was computed after `since`: inserted, updated (a different vector) or revived."""
    for batch in new.to_batches(columns=COLUMNS, filter=where, batch_size=BATCH):
        rows = batch.to_pylist()
        before = _lookup(old, [r["id"] for r in rows])
        found = []
        for r in rows:
            b = before.get(r["id"])
            if r["deleted"]:
                if b is not None and not b["deleted"]:  # recomputed, then marked deleted by `until`
                    found.append({"id": r["id"], "kind": "deleted", "night": r["snapshot"], "embedding": None})
                continue
            if b is None:
                kind = "inserted"
            elif b["deleted"]:
                kind = "revived"
            elif np.array_equal(np.asarray(b["embedding"], np.float32), np.asarray(r["embedding"], np.float32)):
                continue  # recomputed from unchanged bytes: the embedding did not change
            else:
                kind = "updated"
            found.append({"id": r["id"], "kind": kind, "night": r["snapshot"], "embedding": r["embedding"]})
        yield found


def _first_night(store, version: str, between: list[str], ids: list[str], live: bool | None = None,
                 since: dict | None = None) -> dict[str, str]:
    """For each id, the first night in `between` at which it is live (or not); or, given `since` (id -> its row at
    since), at which its metadata differs from that row's. Looked up for those ids only."""
    first, left = {}, list(ids)
    for night in between:
        if not left:
            break
        state = _lookup(store.open(version, night), left, ["id", "deleted", *METADATA])
        if since is None:
            done = [i for i in left if (i in state and not state[i]["deleted"]) == live]
        else:
            done = [i for i in left if i in state and any(state[i][c] != since[i][c] for c in METADATA)]
        first |= {i: night for i in done}
        left = [i for i in left if i not in first]
    return first


def _marked(store, version, between, old, new, since: str) -> Iterator[list[dict]]:
    """Embedding unchanged since `since`, deleted flag flipped: deleted (marked) or revived."""
    quoted = since.replace("'", "''")
    for batch in new.to_batches(columns=["id"], filter=f"deleted = true AND snapshot <= '{quoted}'", batch_size=BATCH):
        ids = [i for i, r in _lookup(old, batch.column("id").to_pylist(), ["id", "deleted"]).items() if not r["deleted"]]
        nights = _first_night(store, version, between, ids, live=False)
        yield [{"id": i, "kind": "deleted", "night": nights.get(i), "embedding": None} for i in ids]
    for batch in old.to_batches(columns=["id"], filter="deleted = true", batch_size=BATCH):
        now = _lookup(new, batch.column("id").to_pylist())
        back = [r for r in now.values() if not r["deleted"] and r["snapshot"] <= since]
        nights = _first_night(store, version, between, [r["id"] for r in back], live=True)
        yield [{"id": r["id"], "kind": "revived", "night": nights.get(r["id"]), "embedding": r["embedding"]}
               for r in back]


def _metadata(store, version, between, old, new) -> Iterator[list[dict]]:
    """Rows live at both nights with the same embedding and other metadata, read from the fragments written since."""
    before = {f.fragment_id for f in old.get_fragments()}
    columns = [*COLUMNS, *METADATA]
    for frag in new.get_fragments():
        if frag.fragment_id in before:
            continue
        for batch in frag.to_batches(columns=columns, filter="deleted = false", batch_size=BATCH):
            rows = batch.to_pylist()
            was = _lookup(old, [r["id"] for r in rows], columns)
            moved = [r for r in rows if (b := was.get(r["id"])) is not None and not b["deleted"]
                     and any(r[c] != b[c] for c in METADATA)
                     and np.array_equal(np.asarray(b["embedding"], np.float32), np.asarray(r["embedding"], np.float32))]
            nights = _first_night(store, version, between, [r["id"] for r in moved], since=was)
            yield [{"id": r["id"], "kind": "metadata", "night": nights.get(r["id"]), "embedding": r["embedding"]}
                   for r in moved]


def _dropped(store, version, between, old, new) -> Iterator[list[dict]]:
    """Ids live at `since` and absent at `until` (refresh.deleted=drop)."""
    present = new.to_table(columns=["id"]).column("id").combine_chunks()
    for batch in old.to_batches(columns=["id"], filter="deleted = false", batch_size=BATCH):
        gone = batch.column("id").filter(pc.invert(pc.is_in(batch.column("id"), value_set=present))).to_pylist()
        nights = _first_night(store, version, between, gone, live=False)
        yield [{"id": i, "kind": "deleted", "night": nights.get(i), "embedding": None} for i in gone]



def run(args, storage_options: dict | None, echo=print) -> int:
    import json

    feed = changes(args.store, args.since, args.until, args.version, storage_options, args.include_metadata)
    if not args.output:
        for table in feed:
            for r in table.select(["id", "kind", "night"]).to_pylist():
                echo(json.dumps(r))
        return 0
    import fsspec
    import pyarrow.parquet as pq

    n, writer = 0, None
    with fsspec.open(args.output, "wb", **(storage_options or {})) as f:
        for table in feed:
            writer = writer or pq.ParquetWriter(f, table.schema, compression="zstd")
            writer.write_table(table)
            n += table.num_rows
        if writer is None:  # no change: an empty file with the schema still
            from igpt_batch.store.layout import Store

            store = Store(args.store, storage_options)
            ds = store.open(store.resolve(args.version))
            writer = pq.ParquetWriter(f, schema(ds.schema.field("embedding").type.list_size))
        writer.close()
    echo(json.dumps({"changes": n, "output": args.output}))
    return 0
