"""Read one manifest file (Parquet, CSV, JSONL) as batches of `id`, `uri` (and image `bytes`) columns, as written."""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import urllib.parse
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import fsspec
import numpy as np
import pyarrow as pa

from igpt_batch.errors import JobError, ManifestError
from igpt_batch.redact import redact_text, redact_uri

BATCH_ROWS = 65_536  # Parquet rows read at a time
JSON_BLOCK_BYTES = 8 << 20  # JSONL is read in blocks of this size
BYTES_BATCH_BYTES = 16 << 20  # image bytes read at a time when the Parquet rows carry them (as measured so far)
BYTES_BATCH_ROWS = (256, 8192)  # ... in batches of this many rows: the first, and at most


@dataclass(frozen=True)
class Columns:
    """The manifest's columns holding the id, the uri and (optionally) the encoded image; read as id, uri, bytes."""

    id: str = "id"
    uri: str = "uri"
    bytes: str | None = None  # a column, or a struct's field as a dotted path (image.bytes)
    member: str | None = None  # Parquet: the tar member of each row (its uri is tar#member), read as `member`

    @classmethod
    def of(cls, input_cfg) -> "Columns":
        """From the config's `input` section (id_column, uri_column, bytes_column, member_column)."""
        return cls(input_cfg.id_column, input_cfg.uri_column, input_cfg.bytes_column, input_cfg.member_column)


def name_of(path: str) -> str:
    """A listed file or URL as its kind is judged by the suffix: lower case, and for a URL (http, a presigned
    object) without its ?query or #fragment, so `.../m.csv?X-Amz-Signature=...` is a CSV."""
    if "://" in path:
        path = path.partition("#")[0].partition("?")[0]
    return path.lower()


def read_batches(fs: fsspec.AbstractFileSystem, path: str, batch_rows: int = BATCH_ROWS,
                 json_block_bytes: int = JSON_BLOCK_BYTES, columns: Columns = Columns(),
                 groups: tuple[int, int] | None = None, first_row: int = 0) -> Iterator[pa.Table]:
    """Stream one manifest file as tables with a string `uri` column and, when the file has one, a string `id`;
    with columns.bytes (Parquet only) a binary `bytes` column too, and `uri` only when the file has one. A Parquet
    file's row groups [lo, hi) alone with `groups` (`first_row`: the first one's first row, for messages)."""
    ext = name_of(path).rpartition(".")[2]
    where = redact_uri(path)  # every message names the manifest without its credentials
    if columns.bytes and ext != "parquet":
        raise ManifestError(f"manifest {where}: input.bytes_column needs a Parquet manifest")
    try:
        with fs.open(path, "rb") as f:
            if ext == "parquet":
                yield from _parquet(f, where, batch_rows, columns, groups, first_row)
            elif ext == "csv":
                yield from _csv(f, where, columns)
            else:
                yield from _jsonl(f, where, json_block_bytes, columns)
    except ManifestError:
        raise
    except PermissionError:
        raise ManifestError(f"cannot read manifest {where}: permission denied") from None
    except (pa.ArrowInvalid, FileNotFoundError, IsADirectoryError) as e:  # the file itself
        raise ManifestError(f"cannot read manifest {where}: {redact_text(str(e))}") from None
    except Exception as e:  # the connection or the store failed mid-read (a dropped HTTP read, a reset): exit 1
        raise JobError(f"cannot read manifest {where} ({type(e).__name__}: {redact_text(str(e)) or 'no detail'})") from None


def _stringy(tp: pa.DataType) -> bool:
    if pa.types.is_dictionary(tp):
        return _stringy(tp.value_type)
    return (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_binary(tp)
            or pa.types.is_large_binary(tp) or pa.types.is_string_view(tp) or pa.types.is_binary_view(tp))


def _parquet(f: BinaryIO, path: str, batch_rows: int, columns: Columns, groups: tuple[int, int] | None,
             row: int) -> Iterator[pa.Table]:
    """Parquet: string columns as they are (checked to be UTF-8); an integer id becomes its decimal string."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    schema = pf.schema_arrow
    names = {"id": columns.id, "uri": columns.uri}
    if columns.uri not in schema.names and not columns.bytes:
        raise ManifestError(f"manifest {path} has no '{columns.uri}' column (columns: {', '.join(schema.names) or 'none'})")
    if columns.id != "id" and columns.id not in schema.names:  # a misspelt id column is refused, not ignored
        raise ManifestError(f"manifest {path} has no '{columns.id}' column (columns: {', '.join(schema.names) or 'none'})")
    if columns.member:
        names["member"] = columns.member
    cols = [c for c in names if names[c] in schema.names]
    for c in cols:
        tp = schema.field(names[c]).type
        if not (_stringy(tp) or (c == "id" and pa.types.is_integer(tp))):
            want = "strings (or integers)" if c == "id" else "strings"
            raise ManifestError(f"manifest {path}: column '{names[c]}' has type {tp}; {c}s must be {want}")
    read = [names[c] for c in cols]
    if columns.bytes:
        read.append(_check_bytes_column(schema, path, columns.bytes))
    widest = 0  # the most bytes a row, on average over a batch, seen so far (images inside)
    for group in range(*groups) if groups else range(pf.metadata.num_row_groups):  # batches sized by what was seen
        size = batch_rows if not columns.bytes else BYTES_BATCH_ROWS[0] if not widest else \
            max(1, min(batch_rows, BYTES_BATCH_ROWS[1], BYTES_BATCH_BYTES // widest))
        for batch in pf.iter_batches(batch_size=size, row_groups=[group], columns=read):
            out = {c: _utf8(batch.column(names[c]), path, names[c], row) for c in cols}
            if columns.bytes:
                out["bytes"] = _field(batch.column(read[-1]), columns.bytes).cast(pa.large_binary())
                widest = max(widest, -(-out["bytes"].nbytes // max(1, batch.num_rows)))
            yield pa.table(out)
            row += batch.num_rows


def _field(column: pa.Array, dotted: str) -> pa.Array:
    """`image.bytes` -> the struct column image's field bytes (a plain name is the column itself)."""
    import pyarrow.compute as pc

    for name in dotted.split(".")[1:]:
        column = pc.struct_field(column, name)
    return column


def _check_bytes_column(schema: pa.Schema, path: str, dotted: str) -> str:
    """The top-level column to read for `dotted`, after checking that it leads to binary values."""
    top, *fields = dotted.split(".")
    if top not in schema.names:
        raise ManifestError(f"manifest {path} has no '{top}' column for input.bytes_column "
                            f"(columns: {', '.join(schema.names) or 'none'})")
    tp = schema.field(top).type
    for name in fields:
        if not pa.types.is_struct(tp) or tp.get_field_index(name) < 0:
            raise ManifestError(f"manifest {path}: input.bytes_column '{dotted}': no field '{name}' in {tp}")
        tp = tp.field(name).type
    if not (pa.types.is_binary(tp) or pa.types.is_large_binary(tp)):
        raise ManifestError(f"manifest {path}: input.bytes_column '{dotted}' has type {tp}; images must be binary")
    return top


def _utf8(column: pa.Array, path: str, name: str, first_row: int) -> pa.Array:
    """The column as pa.string(), or a ManifestError naming the first row that is not valid UTF-8."""
    try:
        out = column.cast(pa.string())
        out.validate(full=True)
        return out
    except pa.ArrowInvalid:
        raw = column.dictionary_decode() if pa.types.is_dictionary(column.type) else column
        for i, value in enumerate(raw.cast(pa.binary()).to_pylist()):
            try:
                value is None or value.decode("utf-8")
            except UnicodeDecodeError:
                raise ManifestError(f"manifest {path}: row {first_row + i}: '{name}' is not valid UTF-8") from None
        raise


def _csv(f: BinaryIO, path: str, columns: Columns) -> Iterator[pa.Table]:
    """CSV: `id` and `uri` read as strings, byte for byte (no type guessing: "007" stays "007"); other
    columns are never parsed, so they cannot fail."""
    import pyarrow.csv as pcsv

    opts = pcsv.ConvertOptions(column_types={columns.id: pa.string(), columns.uri: pa.string()},
                               include_columns=[columns.id, columns.uri],
                               include_missing_columns=True)  # an absent column reads as all nulls
    for batch in pcsv.open_csv(f, convert_options=opts):
        uri, id_ = batch.column(columns.uri), batch.column(columns.id)
        if len(uri) and uri.null_count == len(uri):  # present string columns are never null in CSV
            raise ManifestError(f"manifest {path} has no '{columns.uri}' column")
        if columns.id != "id" and len(id_) and id_.null_count == len(id_):  # a misspelt id column: refused
            raise ManifestError(f"manifest {path} has no '{columns.id}' column")
        yield pa.table({"id": id_, "uri": uri} if len(id_) and not id_.null_count else {"uri": uri})


class _JsonInt(str):
    """A JSON integer, kept as the exact text it was written as."""


class _JsonFloat(str):
    """A JSON number with a fraction or exponent."""


_JSON_TYPES = {dict: "an object", list: "a list", bool: "a boolean", type(None): "null", _JsonFloat: "a float"}


def _jsonl(f: BinaryIO, path: str, block_bytes: int, columns: Columns) -> Iterator[pa.Table]:
    """JSONL, read in blocks of whole lines: an `id` is a JSON string, or an integer kept as its exact text."""
    line, rest, state = 0, b"", {}
    while True:
        block = f.read(block_bytes)
        data, rest = rest + block, b""
        if block:
            cut = data.rfind(b"\n") + 1
            data, rest = data[:cut], data[cut:]
        ids, uris = [], []
        for raw in data.split(b"\n"):
            line += 1
            if raw.strip():
                _json_row(raw, path, line, state, ids, uris, columns)
        line -= 1  # the split's last piece is the (empty) text after the final newline
        if uris:
            cols = {"uri": pa.array(uris, pa.string())}
            if state["has_id"]:
                cols = {"id": pa.array(ids, pa.string()), **cols}
            yield pa.table(cols)
        if not block:
            return


def _json_row(raw: bytes, path: str, line: int, state: dict, ids: list, uris: list, columns: Columns) -> None:
    where = f"manifest {path}: line {line}"
    try:
        row = json.loads(raw, parse_int=_JsonInt, parse_float=_JsonFloat)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ManifestError(f"cannot read {where} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(row, dict):
        raise ManifestError(f"cannot read {where} is not a JSON object")
    u, k = columns.uri, columns.id
    if u not in row:
        raise ManifestError(f"{where} has no '{u}'")
    uri = row[u]
    if type(uri) is not str:
        raise ManifestError(f"{where}: '{u}' must be a string, got {_JSON_TYPES.get(type(uri), 'a number')}")
    state.setdefault("has_id", k in row)
    if k != "id" and not state["has_id"]:  # a misspelt id column is refused, not ignored
        raise ManifestError(f"{where} has no '{k}'")
    if state["has_id"] != (k in row):
        raise ManifestError(f"{where} has no '{k}'" if state["has_id"] else f"{where} has an '{k}' but earlier rows have none")
    if state["has_id"]:
        id_ = row[k]
        if type(id_) not in (str, _JsonInt):
            raise ManifestError(f"{where}: '{k}' must be a string or an integer, got {_JSON_TYPES.get(type(id_), type(id_).__name__)}")
        kind = "number" if type(id_) is _JsonInt else "string"
        if state.setdefault("id_kind", kind) != kind:  # 7 and "7" would both read as "7": refuse the ambiguity
            raise ManifestError(f"cannot read {where}: '{k}' is a {kind} here but a {state['id_kind']} in earlier rows "
                                "(quote your ids)")
        ids.append(str(id_))
    uris.append(uri)


class ColumnHash:
    """sha256 of a string or binary column's lengths and of its bytes, fed chunk by chunk, independent of chunking."""

    def __init__(self):
        self.lengths, self.data = hashlib.sha256(), hashlib.sha256()

    def update(self, column: pa.ChunkedArray) -> None:
        import pyarrow.compute as pc

        for chunk in column.chunks:
            chunk = chunk.cast(pa.large_binary())  # one layout (int64 offsets) whatever the reader produced
            self.lengths.update(pc.binary_length(chunk).fill_null(-1).to_numpy(zero_copy_only=False).astype("<i8").tobytes())
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)
            lo, hi = int(offsets[chunk.offset]), int(offsets[chunk.offset + len(chunk)])
            if hi > lo:
                self.data.update(memoryview(chunk.buffers()[2])[lo:hi])

    def digest(self) -> bytes:
        return self.lengths.digest() + self.data.digest()


def relative_id(path: str, base: str) -> str:
    rel = path[len(base) + 1:] if base and path.startswith(base.rstrip("/") + "/") else posixpath.basename(path)
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:  # undecodable bytes in a file name: percent-encoded, like its uri
        return urllib.parse.quote(os.fsencode(rel))


def file_uri(path: str) -> str:
    """A local path as a manifest uri: itself, or a percent-encoded file:// URL when it is not valid UTF-8."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:  # undecodable bytes in a file name (surrogateescape)
        return "file://" + urllib.parse.quote(os.fsencode(path))


def resolve_uris(fs: fsspec.AbstractFileSystem, manifest_path: str, uris: pa.ChunkedArray) -> pa.ChunkedArray:
    """Resolve relative uris against the manifest's folder, column-wise in Arrow (no per-row Python objects,
    so planning a large manifest costs about its own size in memory)."""
    import pyarrow.compute as pc

    base = posixpath.dirname(manifest_path)
    if "file" not in fs.protocol:
        base = fs.unstrip_protocol(base)
    absolute = pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/"))
    joined = pc.binary_join_element_wise(pa.scalar(base), uris, "/")
    return pc.if_else(pc.or_kleene(absolute, pc.is_null(uris)), uris, joined)
