"""Linear probe (Chen et al. 2020, section 3.2): logistic regression on frozen iGPT features.

    from igpt_batch.probe import probe
    result = probe(embeddings_table, "labels.csv")          # {"accuracy": ..., "per_layer": {...}, ...}

    igpt-batch probe OUTPUT_URL LABELS [--layer 2 --layer 4] [--test-size 0.2] [--seed 0]   # the one entry point

Embeddings: a table with columns id and embedding (a fixed-size or plain list of floats), as the
extract job writes them; its schema metadata b"layers" ("2,4") names the layers concatenated in
each embedding, in order. Labels: columns id and label, as a table or a CSV/Parquet file.
Rows are joined on id (compared as strings); ids without a label, and rows whose embedding is not
finite (e.g. failed images from igpt_batch.ray_data), are left out and counted.

The classifier is the paper's: multinomial logistic regression (lbfgs), on standardised features
(StandardScaler fitted on the training split only), trained on a stratified split.
No torch import.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

import numpy as np
import pyarrow as pa

from igpt_batch.errors import UsageError


def read_labels(labels: pa.Table | str | os.PathLike, storage_options: dict | None = None) -> pa.Table:
    """A labels table, or a .csv / .parquet (or Parquet folder) path or fsspec URL -> pa.Table with id and label."""
    if isinstance(labels, pa.Table):
        table = labels
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(os.fspath(labels), **(storage_options or {}))
        if path.lower().endswith((".csv", ".csv.gz", ".tsv")):
            import pyarrow.csv as pcsv

            parse = pcsv.ParseOptions(delimiter="\t") if path.lower().endswith(".tsv") else None
            # ids and labels stay strings: "007" must not turn into 7
            with fs.open(path, "rb", compression="infer") as f:
                table = pcsv.read_csv(f, parse_options=parse, convert_options=pcsv.ConvertOptions(
                    column_types={"id": pa.string(), "label": pa.string()}))
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path, filesystem=fs)
    missing = {"id", "label"} - set(table.column_names)
    if missing:
        raise UsageError(f"labels need columns id and label; missing {sorted(missing)} (have {table.column_names})")
    return table


def embedding_layers(table: pa.Table) -> list[int] | None:
    """The layers named in the schema metadata b"layers" ("2,4" -> [2, 4]), or None if absent."""
    raw = (table.schema.metadata or {}).get(b"layers")
    if not raw:
        return None
    return [int(x) for x in raw.decode().split(",") if x.strip()]


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list/fixed-size-list column of floats -> float64 (N, D)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, 0))
    if pa.types.is_fixed_size_list(arr.type):
        return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(arr), arr.type.list_size)
    rows = arr.to_pylist()
    if any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
        raise UsageError("embeddings must all be non-null and of the same length")
    return np.asarray(rows, dtype=np.float64)


def _fit_score(x_train, y_train, x_test, y_test, max_iter: int, C: float) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # lbfgs fits the multinomial (softmax) model for more than two classes (the paper's probe).
    clf = make_pipeline(StandardScaler(), LogisticRegression(solver="lbfgs", C=C, max_iter=max_iter))
    clf.fit(x_train, y_train)
    return float(clf.score(x_test, y_test))


def _labelled_rows(embeddings: pa.Table, labels) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Join embeddings and labels on id (as strings) -> (x float64 (N, D), y (N,), n unlabelled, n non-finite)."""
    for col in ("id", "embedding"):
        if col not in embeddings.column_names:
            raise UsageError(f"embeddings need columns id and embedding; missing {col!r} (have {embeddings.column_names})")
    lab = read_labels(labels)
    label_ids = [str(i) for i in lab.column("id").to_pylist()]
    label_values = lab.column("label").to_pylist()
    if len(set(label_ids)) != len(label_ids):
        raise UsageError("labels: duplicate ids")
    label_of = dict(zip(label_ids, label_values))

    x_all = embedding_matrix(embeddings.column("embedding"))
    ids = [str(i) for i in embeddings.column("id").to_pylist()]
    keep_label = np.array([i in label_of and label_of[i] is not None for i in ids], dtype=bool)
    finite = np.isfinite(x_all).all(axis=1) if x_all.size else np.ones(len(ids), bool)
    keep = keep_label & finite
    y = np.array([label_of[i] for i, k in zip(ids, keep) if k], dtype=object)
    if len(y) == 0:
        raise UsageError("no embedding row has a label (ids are joined as strings)")
    y = y.astype(type(y[0]) if all(type(v) is type(y[0]) for v in y) else str)
    return x_all[keep], y, int((~keep_label).sum()), int((keep_label & ~finite).sum())


def _layer_columns(meta_layers: list[int] | None, layers: Sequence[int] | None, dim: int) -> tuple[dict, list]:
    """Which embedding columns belong to which layer ({layer: slice}), and the layers selected."""
    all_layers = meta_layers if meta_layers is not None else (list(layers) if layers is not None else None)
    if all_layers is None:
        all_layers = [-1]  # unknown single layer
    if dim % len(all_layers):
        raise UsageError(f"embedding width {dim} is not divisible by the {len(all_layers)} layers {all_layers}")
    width = dim // len(all_layers)
    chunk = {layer: slice(j * width, (j + 1) * width) for j, layer in enumerate(all_layers)}
    selected = list(layers) if layers is not None else all_layers
    unknown = [l for l in selected if l not in chunk]
    if unknown:
        raise UsageError(f"layers {unknown} are not in the embeddings (they hold layers {all_layers})")
    return chunk, selected


def probe(embeddings: pa.Table, labels: pa.Table | str | os.PathLike, layers: Sequence[int] | None = None,
          test_size: float = 0.2, seed: int = 0, max_iter: int = 1000, C: float = 1.0) -> dict:
    """Fit a linear probe on a stratified train split and score it on the held-out split.

    layers: which of the embedding's layers to use (default: all of them, from the b"layers"
    metadata). Without metadata, `layers` declares the layout: the embedding is split into
    len(layers) equal chunks, one per layer, in order.

    Returns {"accuracy": accuracy on the concatenation of the selected layers,
             "per_layer": {layer: accuracy of that layer's chunk alone} (for a single layer it is just
                          that layer's accuracy; with several, each chunk gets its own probe),
             "layers", "n_train", "n_test", "classes" (sorted), "n_dropped_unlabelled", "n_dropped_nonfinite"}.
    """
    from sklearn.model_selection import train_test_split

    x, y, n_unlabelled, n_nonfinite = _labelled_rows(embeddings, labels)
    chunk, selected = _layer_columns(embedding_layers(embeddings), layers, x.shape[1])

    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise UsageError(f"need at least 2 classes to probe, got {classes.tolist()}")
    if counts.min() < 2:
        raise UsageError(f"every class needs at least 2 labelled rows for a stratified split; "
                         f"{classes[counts.argmin()]!r} has {counts.min()}")
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y)

    def score(cols: np.ndarray) -> float:
        return _fit_score(cols[idx_train], y[idx_train], cols[idx_test], y[idx_test], max_iter, C)

    x_sel = np.concatenate([x[:, chunk[l]] for l in selected], axis=1)
    accuracy = score(x_sel)
    if len(selected) == 1:
        per_layer = {selected[0]: accuracy}
    else:
        per_layer = {l: score(x[:, chunk[l]]) for l in selected}
    return {
        "accuracy": accuracy,
        "per_layer": per_layer,
        "layers": selected,
        "n_train": int(len(idx_train)),
        "n_test": int(len(idx_test)),
        "classes": [c.item() if hasattr(c, "item") else c for c in classes],
        "n_dropped_unlabelled": n_unlabelled,
        "n_dropped_nonfinite": n_nonfinite,
    }


def format_result(result: dict) -> str:
    """A small text table of a probe() result."""
    lines = [f"linear probe: {result['n_train']} train / {result['n_test']} test rows, "
             f"{len(result['classes'])} classes"
             + (f", {result['n_dropped_unlabelled']} unlabelled rows left out" if result.get("n_dropped_unlabelled") else "")
             + (f", {result['n_dropped_nonfinite']} non-finite rows left out" if result.get("n_dropped_nonfinite") else ""),
             f"{'layer':>8}  accuracy"]
    for layer, acc in result["per_layer"].items():
        lines.append(f"{('?' if layer == -1 else layer):>8}  {acc:.4f}")
    if len(result["per_layer"]) > 1:
        lines.append(f"{'concat':>8}  {result['accuracy']:.4f}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `igpt-batch probe`."""
    p.add_argument("output_url", help="an extract job's output folder (local or fsspec URL)")
    p.add_argument("labels", help="CSV or Parquet with columns id, label")
    p.add_argument("--layer", "--layers", dest="layers", type=int, action="append", metavar="L",
                   help="layer to probe, repeatable: --layer 2 --layer 4 (default: all in the embeddings)")
    p.add_argument("--storage-options", dest="storage_options",
                   help="JSON fsspec options for the output and the labels, e.g. an S3 endpoint")
    p.add_argument("--test-size", dest="test_size", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-iter", dest="max_iter", type=int, default=1000)


def run_from_args(args: argparse.Namespace) -> dict:
    """`igpt-batch probe`: read the committed embeddings of an extract output, probe them, print a table."""
    from igpt_batch.run.readers import read_output

    so = json.loads(args.storage_options) if getattr(args, "storage_options", None) else None
    table = read_output(args.output_url, "embeddings", so)
    if table.num_rows == 0:
        raise UsageError(f"no committed embeddings in {args.output_url}")
    result = probe(table, read_labels(args.labels, so), layers=args.layers, test_size=args.test_size, seed=args.seed,
                   max_iter=args.max_iter)
    print(format_result(result))
    return result
