"""Read one manifest file (Parquet, CSV, JSONL) as batches of string `uri` (and `id`) columns, exactly as written."""
from __future__ import annotations

import json
from typing import BinaryIO, Iterator

import fsspec
import pyarrow as pa

BATCH_ROWS = 65_536  # Parquet rows read at a time
JSON_BLOCK_BYTES = 8 << 20  # JSONL is read in blocks of this size


class ManifestError(ValueError):
    """A manifest that cannot be used; raised before any model is loaded."""


def read_batches(fs: fsspec.AbstractFileSystem, path: str, batch_rows: int = BATCH_ROWS,
                 json_block_bytes: int = JSON_BLOCK_BYTES) -> Iterator[pa.Table]:
    """Stream one manifest file as tables with a string `uri` column and, when the file has one, a string `id`."""
    ext = path.lower().rpartition(".")[2]
    try:
        with fs.open(path, "rb") as f:
            if ext == "parquet":
                yield from _parquet(f, path, batch_rows)
            elif ext == "csv":
                yield from _csv(f, path)
            else:
                yield from _jsonl(f, path, json_block_bytes)
    except PermissionError as e:
        raise ManifestError(f"cannot read manifest {path}: permission denied") from e
    except (pa.ArrowInvalid, OSError) as e:
        raise ManifestError(f"cannot read manifest {path}: {e}") from e


def _stringy(tp: pa.DataType) -> bool:
    if pa.types.is_dictionary(tp):
        return _stringy(tp.value_type)
    return (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_binary(tp)
            or pa.types.is_large_binary(tp) or pa.types.is_string_view(tp) or pa.types.is_binary_view(tp))


def _parquet(f: BinaryIO, path: str, batch_rows: int) -> Iterator[pa.Table]:
    """Parquet: string columns as they are (checked to be UTF-8); an integer `id` becomes its decimal string."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    schema = pf.schema_arrow
    if "uri" not in schema.names:
        raise ManifestError(f"manifest {path} has no 'uri' column (columns: {', '.join(schema.names) or 'none'})")
    cols = [c for c in ("id", "uri") if c in schema.names]
    for c in cols:
        tp = schema.field(c).type
        if not (_stringy(tp) or (c == "id" and pa.types.is_integer(tp))):
            want = "strings (or integers)" if c == "id" else "strings"
            raise ManifestError(f"manifest {path}: column '{c}' has type {tp}; {c}s must be {want}")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
        yield pa.table({c: _utf8(batch.column(c), path, c, row) for c in cols})
        row += batch.num_rows


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


def _csv(f: BinaryIO, path: str) -> Iterator[pa.Table]:
    """CSV: `id` and `uri` read as strings, byte for byte (no type guessing: "007" stays "007"); other
    columns are never parsed, so they cannot fail."""
    import pyarrow.csv as pcsv

    opts = pcsv.ConvertOptions(column_types={"id": pa.string(), "uri": pa.string()}, include_columns=["id", "uri"],
                               include_missing_columns=True)  # an absent column reads as all nulls
    for batch in pcsv.open_csv(f, convert_options=opts):
        uri, id_ = batch.column("uri"), batch.column("id")
        if len(uri) and uri.null_count == len(uri):  # present string columns are never null in CSV
            raise ManifestError(f"manifest {path} has no 'uri' column")
        yield pa.table({"id": id_, "uri": uri} if len(id_) and not id_.null_count else {"uri": uri})


class _JsonInt(str):
    """A JSON integer, kept as the exact text it was written as."""


class _JsonFloat(str):
    """A JSON number with a fraction or exponent."""


_JSON_TYPES = {dict: "an object", list: "a list", bool: "a boolean", type(None): "null", _JsonFloat: "a float"}


def _jsonl(f: BinaryIO, path: str, block_bytes: int) -> Iterator[pa.Table]:
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
                _json_row(raw, path, line, state, ids, uris)
        line -= 1  # the split's last piece is the (empty) text after the final newline
        if uris:
            cols = {"uri": pa.array(uris, pa.string())}
            if state["has_id"]:
                cols = {"id": pa.array(ids, pa.string()), **cols}
            yield pa.table(cols)
        if not block:
            return


def _json_row(raw: bytes, path: str, line: int, state: dict, ids: list, uris: list) -> None:
    where = f"manifest {path}: line {line}"
    try:
        row = json.loads(raw, parse_int=_JsonInt, parse_float=_JsonFloat)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ManifestError(f"cannot read {where} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(row, dict):
        raise ManifestError(f"cannot read {where} is not a JSON object")
    if "uri" not in row:
        raise ManifestError(f"{where} has no 'uri'")
    uri = row["uri"]
    if type(uri) is not str:
        raise ManifestError(f"{where}: 'uri' must be a string, got {_JSON_TYPES.get(type(uri), 'a number')}")
    state.setdefault("has_id", "id" in row)
    if state["has_id"] != ("id" in row):
        raise ManifestError(f"{where} has no 'id'" if state["has_id"] else f"{where} has an 'id' but earlier rows have none")
    if state["has_id"]:
        id_ = row["id"]
        if type(id_) not in (str, _JsonInt):
            raise ManifestError(f"{where}: 'id' must be a string or an integer, got {_JSON_TYPES.get(type(id_), type(id_).__name__)}")
        kind = "number" if type(id_) is _JsonInt else "string"
        if state.setdefault("id_kind", kind) != kind:  # 7 and "7" would both read as "7": refuse the ambiguity
            raise ManifestError(f"cannot read {where}: 'id' is a {kind} here but a {state['id_kind']} in earlier rows "
                                "(quote your ids)")
        ids.append(str(id_))
    uris.append(uri)
