"""Nearest neighbours over a refresh store's current table: Lance vector search by cosine (dedup: store/dedup.py)."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow.compute as pc

from igpt_batch.errors import UsageError
from igpt_batch.store.index import check_k, has_index, knn, open_table

log = logging.getLogger("igpt_batch")
THUMB = 64  # contact-sheet tile side, px


def store_model(store, version: str, device: str = "auto"):
    """The store version's own model and layers, checked against the weights the version was computed with."""
    from igpt_batch.model import checkpoint
    from igpt_batch.model.loading import load_model

    info = store.version_info(version) or {}
    name, layers = info.get("model"), info.get("layers")
    if not name or layers is None:
        raise UsageError(f"{store.url}/{version}/_version.json does not name its model and layers")
    fp = checkpoint.read_info(name).weights_fingerprint
    if info.get("weights_fingerprint") not in (None, fp):
        raise UsageError(f"model {name!r} now has other weights than {version} was computed with; "
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
        raise UsageError(f"cannot read image {uri}: {e}") from None
    return Extractor(model, layers, batch_size=1)(rgb[None])[0]


def row_vector(ds, row_id: str) -> tuple[np.ndarray, str]:
    """(embedding, uri) of the row `row_id` (live or marked deleted); ValueError if the snapshot has no such id."""
    t = ds.to_table(columns=["embedding", "uri"], filter=pc.field("id") == row_id)
    if not t.num_rows:
        raise UsageError(f"id {row_id!r} is not in the store's table")
    return np.asarray(t.column("embedding")[0].values.to_numpy(), np.float32), t.column("uri")[0].as_py()


def neighbors(store_url: str, row_id: str | None = None, image: str | None = None, k: int = 10,
              snapshot: str | None = None, version: str | None = None, storage_options: dict | None = None,
              contact_sheet: str | None = None, device: str = "auto") -> dict:
    """The k nearest live rows to a row of the table (`row_id`) or to an image embedded with the store's model."""
    if (row_id is None) == (image is None):
        raise UsageError("give exactly one of --id and --image")
    check_k(k, 1)
    store, version, ds = open_table(store_url, snapshot, version, storage_options)
    if row_id is not None:
        q, uri = row_vector(ds, row_id)
    else:
        q, uri = embed_image(store, version, image, device), image
    t = knn(ds, q, k)
    hits = [{"rank": i + 1, "id": r["id"], "uri": r["uri"], "score": round(1.0 - r["_distance"], 6)}
            for i, r in enumerate(t.to_pylist())]
    out = {"version": version, "snapshot": snapshot or max(store.kept_snapshots(version)), "index": has_index(ds),
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
