"""Ray Data integration: `Embedder`, a callable class for `Dataset.map_batches`.

    import ray, igpt_batch.ray_data
    ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)
    ds = ds.map_batches(
        igpt_batch.ray_data.Embedder,
        fn_constructor_kwargs={"model": "demo", "layers": [2], "dtype": "fp32", "device": "auto", "column": "bytes"},
        compute=ray.data.ActorPoolStrategy(size=2), batch_size=64,
        num_cpus=0.5,  # fractional: on a small machine whole-CPU actors can starve the read stage
    )
    ds.rename_columns({"path": "id"}).write_parquet("out/")  # id, error, embedding: the CLI's columns

Each output batch (a pyarrow Table) is the input batch (row order kept) without the image bytes column it read
(unless keep_bytes=True: the CLI's outputs never hold images), plus
  - "embedding": fixed_size_list<float32>[len(layers) * n_embd] as `extract` writes it, the layers concatenated in order
    (the same features as the batch job: mean over positions of ln_1 of block l's input);
  - "error": null for rows that worked (as the CLI's outputs), else "<stage>: <reason>" (stage "read" or
    "decode"); such rows carry a NaN embedding. Rows are never dropped.

No torch import at module import time: the model is loaded in Embedder.__init__, inside the actor.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from igpt_batch import errors
from igpt_batch.inputs import fetch, images

if TYPE_CHECKING:
    import pyarrow as pa

BYTES_TYPES = (bytes, bytearray, memoryview, np.bytes_)
AUTO_COLUMNS = ("bytes", "path", "uri")


class Embedder:
    """Loads an ImageGPT once per actor; `__call__(batch)` adds "embedding" and "error" columns.

    model: "demo", a local checkpoint folder or a hub id (see igpt_batch.model.checkpoint.resolve).
    layers: feature layers (0..n_layer); empty/None means the job default n_layer // 2.
    dtype: "fp32", "bf16" or "fp16"; device: "auto", "cpu", "cuda" or "cuda:N".
    column: the input column. Values that are bytes are decoded directly (read_binary_files' "bytes");
        strings are read as paths/URIs (local, file://, http(s)://, any fsspec URL) with
        storage_options, read_timeout and max_bytes. None picks the first of "bytes", "path", "uri"
        present in the batch. With read_binary_files prefer "bytes": its "path" column has no scheme
        for object stores ("bucket/key"), so reading it again as a path only works for local files.
    model_batch_size: most images per model call (bounds memory whatever Ray's batch_size).
    torch_threads: torch intra-op threads in this actor (0 leaves torch's default).
    read_threads: threads decoding (and reading) images of a batch in parallel.
    draft, max_pixels: as in igpt_batch.inputs.images.decode.
    keep_bytes: keep the input column in the output when it holds image bytes (dropped by default).
    """

    def __init__(self, model: str = "demo", layers: list[int] | None = None, dtype: str = "fp32",
                 device: str = "auto", column: str | None = "bytes", model_batch_size: int = 64,
                 torch_threads: int = 0, read_threads: int = 4, storage_options: dict | None = None,
                 read_timeout: float = 30.0, max_bytes: int = fetch.DEFAULT_MAX_BYTES,
                 max_pixels: int = images.DEFAULT_MAX_PIXELS, draft: bool = False, keep_bytes: bool = False):
        import torch

        from igpt_batch.model.checkpoint import resolve_layers
        from igpt_batch.model.extractor import Extractor
        from igpt_batch.model.loading import load_model

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model = load_model(model, dtype, device)
        self.extractor = Extractor(self.model, resolve_layers(list(layers or []), self.model.n_layer), model_batch_size)
        self.layers, self.dim, self.n_px = self.extractor.layers, self.extractor.dim, self.model.n_px
        self.column = column
        self.storage_options = dict(storage_options or {})
        self.read_timeout, self.max_bytes = read_timeout, max_bytes
        self.max_pixels, self.draft, self.keep_bytes = max_pixels, draft, keep_bytes
        self.pool = ThreadPoolExecutor(max_workers=max(1, read_threads), thread_name_prefix="igpt-embed")

    # -- one row ---------------------------------------------------------------
    def _load(self, value: Any) -> tuple[np.ndarray | None, str | None]:
        """One cell -> (uint8 (n_px, n_px, 3), None) or (None, "stage: reason"); never raises."""
        try:
            if isinstance(value, BYTES_TYPES):
                img = images.decode(bytes(value), max_pixels=self.max_pixels,
                                    draft_size=self.n_px if self.draft else None)
                return images.resize(img, self.n_px), None
            if isinstance(value, (str, np.str_)):
                rgb, _, _ = images.load_rgb(str(value), self.n_px, self.storage_options, timeout=self.read_timeout,
                                            max_bytes=self.max_bytes, max_pixels=self.max_pixels, draft=self.draft)
                return rgb, None
            if value is None or (isinstance(value, float) and np.isnan(value)):
                return None, "read: missing value"
            return None, f"read: unsupported value type {type(value).__name__} (expected bytes or a path/URI string)"
        except errors.ImageError as e:
            return None, f"{e.stage}: {e.reason}"
        except Exception as e:  # any other decoder failure is still a per-row error, never a lost row
            return None, f"decode: {type(e).__name__}: {e}"

    def _pick_column(self, batch: dict) -> str:
        if self.column is not None:
            if self.column not in batch:
                raise KeyError(f"Embedder: column {self.column!r} not in batch (columns: {sorted(batch)}); "
                               f"pass column= one of them")
            return self.column
        for name in AUTO_COLUMNS:
            if name in batch:
                return name
        raise KeyError(f"Embedder: batch has none of the columns {AUTO_COLUMNS} (columns: {sorted(batch)}); "
                       f"pass column=")

    # -- one batch -------------------------------------------------------------
    def embed_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 (B, n_px, n_px, 3) -> float32 (B, dim), through the one extraction path."""
        return self.extractor(rgb)

    def __call__(self, batch: dict[str, np.ndarray]) -> "pa.Table":
        if not isinstance(batch, dict):
            raise TypeError(f"Embedder expects a dict of numpy arrays (batch_format='numpy'), got {type(batch).__name__}")
        for name in ("embedding", "error"):
            if name in batch:
                raise ValueError(f"Embedder: the input batch already has a column {name!r}")
        name = self._pick_column(batch)
        values = batch[name]
        results = list(self.pool.map(self._load, list(values)))
        if not self.keep_bytes and any(isinstance(v, BYTES_TYPES) for v in values):  # images stay out of outputs
            batch = {k: v for k, v in batch.items() if k != name}
        emb = np.full((len(results), self.dim), np.nan, np.float32)
        ok = [i for i, (rgb, _) in enumerate(results) if rgb is not None]
        if ok:
            emb[ok] = self.embed_rgb(np.stack([results[i][0] for i in ok]))
        return _arrow({**batch, "error": np.array([err for _, err in results], dtype=object)}, emb)

    def __del__(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


def _arrow(columns: dict[str, np.ndarray], emb: np.ndarray) -> "pa.Table":
    """The output batch as Arrow: the input columns as they were, and `embedding` as the fixed_size_list<float32>
    that `igpt-batch extract` writes (so a write_parquet of the dataset has the CLI's schema)."""
    import pyarrow as pa

    from igpt_batch.model.extractor import embedding_array

    out = {}
    for name, values in columns.items():
        values = np.asarray(values)
        if values.ndim > 1:  # an image tensor column, say: Ray's own tensor type, as Ray Data would make it
            from ray.data.extensions import ArrowTensorArray

            out[name] = ArrowTensorArray.from_numpy(values)
        else:
            out[name] = pa.array(list(values) if values.dtype == object else values,
                                 type=pa.string() if name == "error" else None)
    return pa.table({**out, "embedding": embedding_array(emb)})
