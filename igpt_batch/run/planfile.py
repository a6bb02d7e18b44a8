"""The plan files: each shard's input rows in its own row groups of a few large Parquet files, and the ranged reads
that get one shard's rows back (one GET a shard, after one footer read per file). OutputFolder names the files."""
from __future__ import annotations

import io
import json
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

PLAN_SHARDS_PER_FILE = 1000  # shards (row groups) per plan file: the driver writes O(shards / 1000) plan objects
PLAN_FILE_BYTES = 64 << 20  # a plan file is cut after this many bytes (images inside the manifest make big rows)
MAX_ROW_GROUP_ROWS = 1 << 20
_PLAN_KEY = b"igpt_plan"  # key-value metadata: {"shards": {name: [first row group, row groups]}}


class PlanWriter:
    """Writes the plan: shards' rows into files (put(first shard id, bytes); OutputFolder names them) of up to PLAN_SHARDS_PER_FILE
    shards or PLAN_FILE_BYTES, one row group per shard (more past MAX_ROW_GROUP_ROWS rows); each file's footer maps
    shard names to their row groups. One PUT per file."""

    def __init__(self, put: Callable[[int, bytes], None]):
        self.put, self.writer, self.files = put, None, 0

    def add(self, shard, rows: pa.Table) -> None:
        if self.writer is None:
            self.first, self.index, self.groups = shard.shard_id, {}, 0
            self.sink = pa.BufferOutputStream()
            self.writer = pq.ParquetWriter(self.sink, rows.schema, compression="zstd")
        self.writer.write_table(rows, row_group_size=MAX_ROW_GROUP_ROWS)
        n = max(1, -(-rows.num_rows // MAX_ROW_GROUP_ROWS))
        self.index[shard.name], self.groups = [self.groups, n], self.groups + n
        if len(self.index) >= PLAN_SHARDS_PER_FILE or self.sink.tell() >= PLAN_FILE_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.writer is None:
            return
        self.writer.add_key_value_metadata({_PLAN_KEY: json.dumps({"shards": self.index})})
        self.writer.close()
        self.put(self.first, self.sink.getvalue().to_pybytes())
        self.writer, self.sink, self.files = None, None, self.files + 1

    def __enter__(self) -> "PlanWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.flush()
        elif self.writer is not None:
            self.writer.close()


def read_footer(fs, path: str, size: int) -> tuple[pq.FileMetaData, dict]:
    """A plan file's footer in one ranged read (two when it is over 1 MiB), and its shard index."""
    tail = fs.cat_file(path, start=max(0, size - (1 << 20)), end=size)
    need = int.from_bytes(tail[-8:-4], "little") + 8
    if need > len(tail):
        tail = fs.cat_file(path, start=size - need, end=size)
    meta = pq.read_metadata(pa.BufferReader(tail[-need:]))
    return meta, json.loads(meta.metadata[_PLAN_KEY])["shards"]


def chunk_span(col) -> tuple[int, int]:
    start = col.dictionary_page_offset if col.has_dictionary_page and col.dictionary_page_offset else col.data_page_offset
    return start, start + col.total_compressed_size


class Window(io.RawIOBase):
    """A read-only file of `size` bytes of which only [lo, lo + len(data)) is held: what pyarrow reads of one
    shard's row groups when given the footer."""

    def __init__(self, size: int, lo: int, data: bytes):
        super().__init__()
        self.size, self.lo, self.data, self.pos = size, lo, data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        start = self.pos - self.lo
        if start < 0 or start + len(b) > len(self.data) and self.pos + len(b) <= self.size:
            raise OSError(f"read of [{self.pos}, {self.pos + len(b)}) outside the plan window")
        got = self.data[start:start + len(b)]
        b[:len(got)] = got
        self.pos += len(got)
        return len(got)


def read_shard(fs, path: str, size: int, meta: pq.FileMetaData, index: dict, name: str) -> pa.Table:
    """Shard `name`'s rows: its row groups of the plan file at `path`, in one ranged read."""
    if name not in index:
        raise FileNotFoundError(f"plan file {path} does not hold {name}")
    first, n = index[name]
    groups = list(range(first, first + n))
    spans = [chunk_span(meta.row_group(g).column(c)) for g in groups for c in range(meta.num_columns)]
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    window = Window(size, lo, fs.cat_file(path, start=lo, end=hi))
    return pq.ParquetFile(window, metadata=meta).read_row_groups(groups)
