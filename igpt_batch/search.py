"""Nearest neighbours, near-duplicates and Parquet export over a refresh store's Lance current table."""
from __future__ import annotations

import logging

log = logging.getLogger("igpt_batch")


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
