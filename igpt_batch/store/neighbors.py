"""Nearest neighbours and near-duplicates over a refresh store's current table: Lance vector search by cosine."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

log = logging.getLogger("igpt_batch")
LIVE = "deleted = false"
REFINE = 4  # with an IVF-PQ index, re-rank refine_factor * k candidates by their exact cosine distance
MAX_K = 10_000  # -k above this is refused (README: neighbors and dedup)
QUERY_ROWS = 256  # dedup: query vectors per batch nearest-neighbour query
THUMB = 64  # contact-sheet tile side, px
GROUPS_SCHEMA = pa.schema([("group", pa.int64()), ("id", pa.string()), ("uri", pa.string()),
                           ("group_size", pa.int64()), ("score", pa.float32())])


def open_table(store_url: str, snapshot: str | None, version: str | None, storage_options: dict | None):
    """(Store, version, lance dataset as of the night `snapshot`); FileNotFoundError/ValueError for bad input."""
    from igpt_batch.store.layout import Store

    store = Store(store_url, storage_options)
    version = store.resolve(version)
    if store.open(version) is None:
        raise FileNotFoundError(f"{store_url}/{version} has no current table: no refresh has finished there yet")
    if snapshot is not None and snapshot not in store.nights(version):
        raise ValueError(f"snapshot {snapshot!r} is not a kept night of {version} (kept: {', '.join(store.nights(version))})")
    return store, version, store.open(version, snapshot)


def check_k(k: int, least: int, why: str = "") -> None:
    """-k is bounded before any work: Lance allocates room for k results per query up front (k = 10**11 asks
    for terabytes; a 20-digit k overflows)."""
    if not least <= k <= MAX_K:
        raise ValueError(f"-k must be in [{least}, {MAX_K}]{why}, got {k}")


def has_index(ds) -> bool:
    return any("embedding" in ix.field_names for ix in ds.describe_indices())


def knn(ds, q: np.ndarray, k: int) -> pa.Table:
    """The k nearest live rows of each query vector (float32 (dim,) or (Q, dim)) by cosine: id, uri, _distance
    (1 - cosine), plus query_index for a batch. Exact without an index; IVF-PQ candidates re-ranked exactly with one."""
    nearest = {"column": "embedding", "q": np.asarray(q, np.float32), "k": int(k), "metric": "cosine"}
    if has_index(ds):
        nearest["refine_factor"] = REFINE
    return ds.to_table(columns=["id", "uri", "_distance"], nearest=nearest, prefilter=True, filter=LIVE,
                       disable_scoring_autoprojection=True)


def store_model(store, version: str, device: str = "auto"):
    """The store version's own model and layers, checked against the weights the version was computed with."""
    from igpt_batch.model import checkpoint
    from igpt_batch.model.transformer import load_model

    info = store.version_info(version) or {}
    name, layers = info.get("model"), info.get("layers")
    if not name or layers is None:
        raise ValueError(f"{store.url}/{version}/_version.json does not name its model and layers")
    fp = checkpoint.read_info(name).weights_fingerprint
    if info.get("weights_fingerprint") not in (None, fp):
        raise ValueError(f"model {name!r} now has other weights than {version} was computed with; "
                         "its embeddings cannot be compared with the store's")
    return load_model(name, info.get("dtype", "fp32"), device), list(layers)


def embed_image(store, version: str, uri: str, device: str = "auto") -> np.ndarray:
    """float32 (dim,): `uri` through the one extraction path with the store's model, layers and dtype."""
    from igpt_batch.errors import ImageError
    from igpt_batch.inputs.images import load_rgb
    from igpt_batch.model.extractor import Extractor

    model, layers = store_model(store, version, device)
    info = store.version_info(version)
    limits = {k: info[k] for k in ("max_pixels", "max_bytes", "draft") if info.get(k) is not None}  # as the night read
    try:
        rgb = load_rgb(uri, model.n_px, store.storage_options, **limits)[0]
    except ImageError as e:
        raise ValueError(f"cannot read image {uri}: {e}") from None
    return Extractor(model, layers, batch_size=1)(rgb[None])[0]


def row_vector(ds, row_id: str) -> tuple[np.ndarray, str]:
    """(embedding, uri) of the row `row_id` (live or marked deleted); ValueError if the night has no such id."""
    t = ds.to_table(columns=["embedding", "uri"], filter="id = '" + row_id.replace("'", "''") + "'")
    if not t.num_rows:
        raise ValueError(f"id {row_id!r} is not in the store's table")
    return np.asarray(t.column("embedding")[0].values.to_numpy(), np.float32), t.column("uri")[0].as_py()


def neighbors(store_url: str, row_id: str | None = None, image: str | None = None, k: int = 10,
              snapshot: str | None = None, version: str | None = None, storage_options: dict | None = None,
              contact_sheet: str | None = None, device: str = "auto") -> dict:
    """The k nearest live rows to a row of the table (`row_id`) or to an image embedded with the store's model."""
    if (row_id is None) == (image is None):
        raise ValueError("give exactly one of --id and --image")
    check_k(k, 1)
    store, version, ds = open_table(store_url, snapshot, version, storage_options)
    if row_id is not None:
        q, uri = row_vector(ds, row_id)
    else:
        q, uri = embed_image(store, version, image, device), image
    t = knn(ds, q, k)
    hits = [{"rank": i + 1, "id": r["id"], "uri": r["uri"], "score": round(1.0 - r["_distance"], 6)}
            for i, r in enumerate(t.to_pylist())]
    out = {"version": version, "snapshot": snapshot or max(store.nights(version)), "index": has_index(ds),
           "query": {"id": row_id, "uri": uri}, "k": k, "neighbors": hits}
    if contact_sheet:
        out["contact_sheet"] = write_sheet(contact_sheet, [uri] + [h["uri"] for h in hits], storage_options)
    return out


def _tile(uri: str, storage_options: dict | None) -> np.ndarray:
    from igpt_batch.errors import ImageError
    from igpt_batch.inputs.images import load_rgb

    try:
        return load_rgb(uri, THUMB, storage_options)[0]
    except (ImageError, OSError, ValueError):
        return np.full((THUMB, THUMB, 3), 128, np.uint8)  # grey: the source cannot be read any more


def write_sheet(path: str, uris: list[str], storage_options: dict | None) -> str:
    """The query (first tile) beside its neighbours, one row of up to 11 tiles, as a PNG at `path`."""
    import fsspec

    from igpt_batch.model.palette import to_png
    from igpt_batch.run.pictures import grid

    png = to_png(grid([_tile(u, storage_options) for u in uris], ncols=min(len(uris), 11), scale=1))
    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        f.write(png)
    return path


class _Groups:
    """Union-find over row positions."""

    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def dedup(store_url: str, threshold: float = 0.95, output: str | None = None, k: int = 10,
          snapshot: str | None = None, version: str | None = None, storage_options: dict | None = None) -> dict:
    """Groups of live ids whose embeddings have cosine >= threshold: a k-NN query per row (through the index when
    the table has one), pairs above the threshold joined by union-find. Writes them as Parquet to `output`."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold is a cosine similarity in [-1, 1], got {threshold}")
    check_k(k, 2, " (a row's nearest neighbour is itself)")
    store, version, ds = open_table(store_url, snapshot, version, storage_options)
    live = ds.to_table(columns=["id", "uri"], filter=LIVE)
    pos = {i: n for n, i in enumerate(live.column("id").to_pylist())}
    groups, best, pairs = _Groups(live.num_rows), np.zeros(live.num_rows, np.float32), 0
    for batch in ds.to_batches(columns=["id", "embedding"], filter=LIVE, batch_size=QUERY_ROWS):
        if not batch.num_rows:
            continue
        q = batch.column("embedding").values.to_numpy().reshape(batch.num_rows, -1)
        hits = knn(ds, q, k)
        src = [pos[i] for i in batch.column("id").to_pylist()]
        for qi, hid, d in zip(hits.column("query_index").to_pylist(), hits.column("id").to_pylist(),
                              hits.column("_distance").to_pylist()):
            a, b, score = src[qi], pos[hid], 1.0 - d
            if a != b and score >= threshold:
                groups.union(a, b)
                best[a], best[b], pairs = max(best[a], score), max(best[b], score), pairs + 1
    table = _group_table(live, groups, best)
    summary = {"version": version, "snapshot": snapshot or max(store.nights(version)), "index": has_index(ds),
               "threshold": threshold, "k": k, "live_rows": live.num_rows, "pairs": pairs,
               "groups": len(set(table.column("group").to_pylist())),
               "duplicates": table.num_rows - len(set(table.column("group").to_pylist())), "output": output}
    if output:
        _write(output, table, storage_options)
    return summary


def _group_table(live: pa.Table, groups: _Groups, best: np.ndarray) -> pa.Table:
    """One row per id in a group of 2 or more: group (numbered from 0, by its first id), id, uri, group_size,
    score (its highest cosine to another member)."""
    roots = np.array([groups.find(i) for i in range(live.num_rows)], np.int64)
    _, inverse, counts = np.unique(roots, return_inverse=True, return_counts=True)
    size = counts[inverse]
    keep = np.flatnonzero(size > 1)
    order = keep[np.lexsort((np.asarray(live.column("id").to_pylist(), dtype=object)[keep].astype(str), roots[keep]))]
    _, number = np.unique(roots[order], return_inverse=True)
    return pa.table({"group": number.astype(np.int64), "id": live.column("id").take(order),
                     "uri": live.column("uri").take(order), "group_size": size[order].astype(np.int64),
                     "score": best[order]}, schema=GROUPS_SCHEMA)


def _write(path: str, table: pa.Table, storage_options: dict | None) -> None:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        pq.write_table(table, f, compression="zstd")
