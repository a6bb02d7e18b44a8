"""The indices of a refresh store's current table and the k-NN query through them.

Scalar: a BTREE on `id` (merge_insert and the reads of updated rows look ids up through it) and a BITMAP on `deleted`
(the live filter), both built on the first night and brought up to date every night. Vector: IVF-PQ on `embedding`
by cosine, built once the table has refresh.index_min_rows rows, updated every night, and re-trained (about sqrt(N)
partitions) when the table has grown 4x since it was trained. After every build or re-training its recall@10
against exact search is measured and kept with the version (Store.index_info), where `inspect` shows it.
"""
from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from igpt_batch.errors import UsageError
from igpt_batch.store.layout import LIVE, Store

log = logging.getLogger("igpt_batch")
REFINE = 4  # with an IVF-PQ index, re-rank refine_factor * k candidates by their exact cosine distance
QUERY_ROWS = 256  # query vectors per batched nearest-neighbour query
SCALAR = {"id": ("btree", {"zone_size": 256}), "deleted": ("bitmap", {})}  # column -> scalar index type, parameters
# zone_size: rows per BTREE page. Lance's 4,096 means 0.1% changed random ids touch nearly every page (a night's
# merge at 3M rows read 39 MB, the whole index); 256 rows a page read 20 MB (bench/bench_refresh_commit.py).
RETRAIN_GROWTH = 4  # re-train the vector index when the table has this many times the rows it was trained on
RECALL_QUERIES = 1000  # sample queries for the recall@10 measurement
RECALL_K = 10
EXACT_ROWS = 8192  # table rows per step of the exact pass (a RECALL_QUERIES x EXACT_ROWS float32 block: 32 MiB)
MAX_K = 10_000  # -k above this is refused (README: neighbors and dedup)


def check_k(k: int, least: int, why: str = "") -> None:
    """-k is bounded before any work: Lance allocates room for k results per query up front (k = 10**11 asks
    for terabytes; a 20-digit k overflows)."""
    if not least <= k <= MAX_K:
        raise UsageError(f"-k must be in [{least}, {MAX_K}]{why}, got {k}")


def open_table(store_url: str, snapshot: str | None, version: str | None, storage_options: dict | None):
    """(Store, version, lance dataset as of the kept `snapshot`); UsageError for a store or snapshot that is not there."""
    store = Store(store_url, storage_options)
    version = store.resolve(version)
    current = store.open_current(version)
    if snapshot is None:
        return store, version, current
    kept = store.kept_snapshots(version)
    if snapshot not in kept:
        raise UsageError(f"snapshot {snapshot!r} is not a kept night of {version} (kept: {', '.join(kept)})")
    return store, version, store.open(version, snapshot)


def has_index(ds) -> bool:
    """Whether a table version (a lance.LanceDataset) has the vector index on `embedding`."""
    return any("embedding" in ix.field_names for ix in ds.describe_indices())


def knn(ds, q: np.ndarray, k: int, columns: tuple[str, ...] = ("id", "uri")) -> pa.Table:
    """The k nearest live rows of each query vector (float32 (dim,) or (Q, dim)) by cosine: `columns`, _distance
    (1 - cosine), plus query_index for a batch. Exact without an index; IVF-PQ candidates re-ranked exactly with one."""
    nearest = {"column": "embedding", "q": np.asarray(q, np.float32), "k": int(k), "metric": "cosine"}
    if has_index(ds):
        nearest["refine_factor"] = REFINE
    return ds.to_table(columns=[*columns, "_distance"], nearest=nearest, prefilter=True, filter=LIVE,
                       disable_scoring_autoprojection=True)


def update_index(store: Store, version: str, min_rows: int) -> dict | None:
    """Keep the table's indices current (see the module's docstring). Returns the vector index's info when it was
    built or re-trained tonight, else None."""
    ds = store.open(version)
    if ds is None or ds.count_rows() == 0:
        return None
    indexed = {f for ix in ds.describe_indices() for f in ix.field_names}
    missing = [c for c in SCALAR if c not in indexed]
    for column in missing:
        from lance.indices import IndexConfig

        ds.create_scalar_index(column, IndexConfig(*SCALAR[column]))
    if len(missing) < len(SCALAR) or "embedding" in indexed:
        ds.optimize.optimize_indices()  # tonight's rows into every index that existed before tonight
    rows, info = ds.count_rows(), store.index_info(version)
    if rows < min_rows:
        return None
    if "embedding" in indexed and rows < RETRAIN_GROWTH * info.get("trained_rows", min_rows):
        return None
    info = train(ds, rows) | {"built": "retrain" if "embedding" in indexed else "build"}
    info |= recall_at_k(store.open(version))
    store.set_index_info(version, info)
    log.info("refresh %s: vector index %s at %d rows, recall@%d %.4f", version, info["built"], rows, RECALL_K,
             info["recall"])
    return info


def train(ds, rows: int) -> dict:
    """(Re-)train the IVF-PQ cosine index over the whole table: about sqrt(rows) partitions."""
    dim = ds.schema.field("embedding").type.list_size
    parts = max(1, round(rows ** 0.5))
    sub = next(d for d in (16, 8, 4, 2, 1) if dim % d == 0)
    ds.create_index("embedding", "IVF_PQ", metric="cosine", num_partitions=parts, num_sub_vectors=sub, replace=True)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    return {"trained_rows": rows, "partitions": parts, "sub_vectors": sub, "trained_at": now}


def sample_queries(ds, n: int, seed: int = 0) -> pa.Table:
    """Up to `n` live rows (id, embedding) drawn at random, the same ones for the same table."""
    total = ds.count_rows()
    pos = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False))
    t = ds.take(pos, columns=["id", "embedding", "deleted"])
    return t.filter(pc.invert(pc.fill_null(t.column("deleted"), False))).select(["id", "embedding"])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def exact_topk(ds, q: np.ndarray, k: int) -> np.ndarray:
    """Ids (object array (Q, k)) of the k live rows of highest cosine with each query, in one pass over the table."""
    qn = _unit(np.asarray(q, np.float32))
    best_s = np.full((len(qn), 0), -np.inf, np.float32)
    best_id = np.empty((len(qn), 0), object)
    for b in ds.to_batches(columns=["id", "embedding"], filter=LIVE, batch_size=EXACT_ROWS):
        if not b.num_rows:
            continue
        e = _unit(b.column("embedding").values.to_numpy().reshape(b.num_rows, -1))
        s = np.concatenate([best_s, qn @ e.T], axis=1)
        ids = np.concatenate([best_id, np.broadcast_to(np.asarray(b.column("id").to_pylist(), object),
                                                       (len(qn), b.num_rows))], axis=1)
        top = np.argpartition(-s, min(k, s.shape[1]) - 1, axis=1)[:, :k] if s.shape[1] > k else np.argsort(-s, axis=1)
        best_s, best_id = np.take_along_axis(s, top, 1), np.take_along_axis(ids, top, 1)
    return best_id


def recall_at_k(ds, queries: int = RECALL_QUERIES, k: int = RECALL_K) -> dict:
    """recall@k of knn() (through the index) against exact search, over min(queries, live rows) sample rows."""
    sample = sample_queries(ds, queries)
    q = sample.column("embedding").combine_chunks().values.to_numpy().reshape(sample.num_rows, -1)
    k = min(k, ds.count_rows(LIVE))
    exact = exact_topk(ds, q, k)
    found = [set() for _ in range(len(q))]
    for s in range(0, len(q), QUERY_ROWS):
        hits = knn(ds, q[s:s + QUERY_ROWS], k, columns=("id",))
        for qi, hid in zip(hits.column("query_index").to_pylist(), hits.column("id").to_pylist()):
            found[s + qi].add(hid)
    hit = sum(len(f & set(e)) for f, e in zip(found, exact))
    return {"recall": round(hit / max(1, len(q) * k), 4), "recall_k": k, "recall_queries": len(q)}
