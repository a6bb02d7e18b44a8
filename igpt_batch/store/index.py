"""The vector index of a refresh store's current table: IVF-PQ on `embedding` by cosine, built once and updated."""
from __future__ import annotations

from igpt_batch.store.layout import Store


def update_index(store: Store, version: str, min_rows: int) -> None:
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


def has_index(ds) -> bool:
    """Whether a table version (a lance.LanceDataset) has the vector index on `embedding`."""
    return any("embedding" in ix.field_names for ix in ds.describe_indices())
