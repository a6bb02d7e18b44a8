"""Step 3 of a night: its changes as rows to upsert into the current table, and its failed-rows record.

`night` is the store.refresh.Night handed from step to step (its plan, snapshot, layers, errors)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from igpt_batch.config import JobConfig
from igpt_batch.inputs.stat import STAT_SCHEMA
from igpt_batch.run.storage import OutputFolder
from igpt_batch.store.decide import TOUCH
from igpt_batch.store.layout import FAILED_SCHEMA, current_schema

TAKE = 4096  # ids per read of old rows (metadata updates, deletion marks)


def merge(cfg: JobConfig, night) -> tuple[pa.RecordBatchReader, pa.Array | None]:
    """Step 3: the night's changes as rows to upsert on id (tonight's embeddings, metadata updates, deletion marks),
    streamed, and the ids to delete (--deleted drop; else None)."""
    plan = night.plan
    out = OutputFolder(night.store.snapshot_url(night.version, night.snapshot), cfg.storage_options)
    parts = out.committed_files("embeddings") if plan.compute.num_rows else []
    first = out.read_table(parts[0]).schema.metadata if parts else None
    night.meta = {k.decode(): v.decode() for k, v in (first or {}).items()} | {
        "version": night.version, "layers": ",".join(map(str, night.layers))}
    schema = current_schema(len(night.layers) * night.info.n_embd, night.meta, score=cfg.extract.score)
    gone = plan.gone
    marks = pa.array([], pa.string()) if night.dropped else gone.filter(pc.invert(gone.column("deleted"))).column("id")

    def batches():
        for rel in parts:
            emb = out.read_table(rel)
            st = plan.compute.take(pc.index_in(emb.column("id"), value_set=plan.compute.column("id")))
            yield pa.table({"id": emb.column("id"), "uri": emb.column("uri"), "sha256": emb.column("sha256"),
                            **{c: st.column(c) for c in STAT_SCHEMA.names}, "embedding": emb.column("embedding"),
                            "width": emb.column("width"), "height": emb.column("height"),
                            **({"nll_bits": emb.column("nll_bits")} if cfg.extract.score else {}),
                            "snapshot": pa.array([night.snapshot] * emb.num_rows, pa.string()),
                            "deleted": pa.array(np.zeros(emb.num_rows, bool))}).cast(schema).to_batches()
        touch = plan.touch.append_column("deleted", pa.array(np.zeros(plan.touch.num_rows, bool)))
        updates = pa.concat_tables([touch, pa.table({"id": marks, "deleted": pa.array(np.ones(len(marks), bool))})],
                                   promote_options="default")
        table = night.store.open(night.version) if updates.num_rows else None  # one open: its index pages cached
        for s in range(0, updates.num_rows, TAKE):
            yield _updated(table, updates.slice(s, TAKE), schema).to_batches()

    reader = pa.RecordBatchReader.from_batches(schema, (b for bs in batches() for b in bs))
    return reader, (gone.column("id") if night.dropped else None)


def _updated(table, updates: pa.Table, schema: pa.Schema) -> pa.Table:
    """The previous rows of `updates`' ids with their new uri/size/mtime/etag (a deletion mark, with a null uri,
    keeps them) and deleted flag. `table` is the current table; the ids are looked up through its BTREE on id."""
    old = table.to_table(filter=pc.field("id").isin(updates.column("id")))
    new = updates.take(pc.index_in(old.column("id"), value_set=updates.column("id")))
    touched = pc.is_valid(new.column("uri"))
    for c in (*TOUCH[1:], "deleted"):
        fresh = new.column(c) if c == "deleted" else pc.if_else(touched, new.column(c).cast(schema.field(c).type), old.column(c))
        old = old.set_column(old.schema.get_field_index(c), c, fresh)
    return old.select(schema.names).cast(schema)


def failed_record(night) -> pa.Table:
    """Entries kept (not retried tonight) plus tonight's failures, which keep the night they first failed."""
    plan, err, snapshot = night.plan, night.errors, night.snapshot
    computed = plan.compute.column("id")
    kept = plan.failed.filter(pc.invert(pc.is_in(plan.failed.column("id"), value_set=computed)))
    if not err.num_rows:
        return kept
    st = plan.compute.take(pc.index_in(err.column("id"), value_set=computed))
    first = plan.failed.column("first_night").take(pc.index_in(err.column("id"), value_set=plan.failed.column("id")))
    # sha256: the content of an image inside the manifest (so an unchanged one is not retried), else unknown
    tonight = pa.table({"id": err.column("id"), "uri": st.column("uri"), "sha256": st.column("sha256"),
                        **{c: st.column(c) for c in STAT_SCHEMA.names}, "stage": err.column("stage"),
                        "reason": err.column("error"), "first_night": pc.fill_null(first, snapshot),
                        "last_night": pa.array([snapshot] * err.num_rows, pa.string())})
    return pa.concat_tables([kept.cast(FAILED_SCHEMA), tonight.cast(FAILED_SCHEMA)])
