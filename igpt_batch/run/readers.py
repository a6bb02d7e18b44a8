"""Readers of a job's output: only the files its commit markers name, streamed (a pyarrow Dataset) or as a table;
safe while a job runs. An output of output.format: lance reads its embeddings from the dataset's latest version."""
from __future__ import annotations

import pyarrow as pa

from igpt_batch.run import lance_output
from igpt_batch.run.storage import KINDS, OutputFolder


def output_files(url: str, kind: str = "embeddings", storage_options: dict | None = None) -> list[str]:
    """The full URLs of the committed Parquet files of one kind, in shard order: for DuckDB, Polars, Ray Data.
    The embeddings of a Lance output: the dataset's URL (for lance.dataset, ray.data.read_lance), once it exists."""
    out = _output(url, kind, storage_options)
    if kind == "embeddings" and lance_output.is_lance(out):
        return [lance_output.uri(out)] if lance_output.open_dataset(out) is not None else []
    return [out.fs.unstrip_protocol(out.path(f)) for f in out.committed_files(kind)]


def output_dataset(url: str, kind: str = "embeddings", storage_options: dict | None = None):
    """A pyarrow Dataset over only the committed files of one kind. Nothing is loaded: scan it with columns and a
    filter (pushed down to the Parquet reader), e.g. `.to_batches(columns=["id"], filter=pc.field("id") > "k")`.
    The embeddings of a Lance output: its lance.LanceDataset at the latest committed version (a pyarrow Dataset too:
    the same to_table/to_batches/scanner calls), or an empty Dataset before its first commit."""
    import pyarrow.dataset as ds

    out = _output(url, kind, storage_options)
    if kind == "embeddings" and lance_output.is_lance(out):
        found = lance_output.open_dataset(out)
        return found if found is not None else ds.dataset([], format="parquet")
    return ds.dataset([out.path(f) for f in out.committed_files(kind)], format="parquet", filesystem=out.fs)


def read_output(url: str, kind: str = "embeddings", storage_options: dict | None = None,
                columns: list[str] | None = None, filter=None) -> pa.Table:
    """Read the committed rows of one output kind (embeddings, samples, errors) as a pyarrow Table.

    Only parts named in _commits/ markers are read, so a job that is still running, or died mid-shard, never exposes
    half-written or stale data. `columns` and `filter` (a pyarrow.compute expression) are pushed down; for outputs
    larger than memory use output_dataset() and scan it in batches. Works for local folders and any fsspec URL.
    """
    import pyarrow.dataset as ds

    dataset = output_dataset(url, kind, storage_options)
    # nothing committed yet; or no errors at all (a shard without errors writes no part); a Lance dataset is its own
    if isinstance(dataset, ds.FileSystemDataset) and not dataset.files:
        if kind != "errors":
            return pa.table({})
        from igpt_batch.run.tasks.base import ERRORS_SCHEMA

        return ERRORS_SCHEMA.empty_table().select(columns or ERRORS_SCHEMA.names)
    return dataset.to_table(columns=columns, filter=filter)


def _output(url: str, kind: str, storage_options: dict | None) -> OutputFolder:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return OutputFolder(url, storage_options)
