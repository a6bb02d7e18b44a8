"""`igpt-batch outliers OUT|STORE -n 50`: the least likely images by nll_bits (written by `extract --score`)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from igpt_batch.errors import UsageError

COLUMNS = ["id", "uri", "nll_bits"]


def add_arguments(sub) -> None:
    p = sub.add_parser("outliers", help="list the least likely images (nll_bits from extract --score)")
    p.add_argument("output", help="an extract output written with --score, or a refresh store with an nll_bits column")
    p.add_argument("-n", "--num", type=int, default=50, help="how many images; default 50")
    p.add_argument("--contact-sheet", metavar="FILE", help="also draw them, most unlikely first, into this PNG")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.add_argument("--storage-options", help="JSON fsspec options, e.g. an S3 endpoint (prefer env vars for keys)")


def scores(url: str, storage_options: dict | None = None) -> tuple[pa.Table, int]:
    """(id, uri, nll_bits) of every committed row of an output (or live row of a store's latest night), and n_px."""
    from igpt_batch.run.storage import OutputFolder

    out = OutputFolder(url, storage_options)
    job = out.read_job()
    if job is not None:
        if not job.get("compat", {}).get("score"):
            raise UsageError(f"{url} was not extracted with --score (extract.score): it has no nll_bits column")
        from igpt_batch.run.readers import read_output

        table = read_output(url, "embeddings", storage_options, columns=COLUMNS)  # Parquet parts or a Lance dataset
        empty = pa.schema([("id", pa.string()), ("uri", pa.string()), ("nll_bits", pa.float64())]).empty_table()
        return (table if table.num_columns else empty), int(job["n_px"])
    from igpt_batch.store.layout import Store

    store = Store(url, storage_options)
    if not store.versions():
        raise UsageError(f"{url}: not an igpt-batch output (no job record) and not a refresh store")
    version = store.resolve(None)
    ds = store.open(version)
    if ds is None or "nll_bits" not in ds.schema.names:
        raise UsageError(f"{url}: the store's table has no nll_bits column (its nights ran without refresh.score)")
    n_px = int((store.version_info(version) or {}).get("n_px", 0))
    return store.read(version, columns=COLUMNS, include_deleted=False), n_px


def outliers(url: str, n: int = 50, storage_options: dict | None = None) -> tuple[pa.Table, int]:
    """The n rows with the highest nll_bits (least likely first; ties by id), and the model's n_px."""
    if n < 1:
        raise UsageError(f"-n must be >= 1, got {n}")
    table, n_px = scores(url, storage_options)
    return table.sort_by([("nll_bits", "descending"), ("id", "ascending")]).slice(0, n), n_px


def contact_sheet(table: pa.Table, n_px: int, path: str, storage_options: dict | None = None) -> str:
    """Draw the rows' images as the model saw them (n_px square), in order; grey where one cannot be read now."""
    import fsspec

    from igpt_batch.inputs import images
    from igpt_batch.model import palette
    from igpt_batch.run.pictures import grid

    if not table.num_rows:
        raise UsageError("no scored rows to draw")
    grey = np.full((n_px, n_px, 3), 128, np.uint8)
    pics = []
    for uri in table.column("uri").to_pylist():
        try:
            pics.append(images.load_rgb(uri, n_px, storage_options or {})[0])
        except Exception:  # gone, moved or a redacted signed URL: the list still names it
            pics.append(grey)
    png = palette.to_png(grid(pics, ncols=int(np.ceil(np.sqrt(len(pics)))), scale=max(1, 128 // n_px)))
    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        f.write(png)
    return path


def run(args, storage_options: dict | None, echo=print) -> int:
    table, n_px = outliers(args.output, args.num, storage_options)
    for rank, row in enumerate(table.to_pylist(), 1):
        if args.json:
            echo(json.dumps({"rank": rank, **row}))
        else:
            echo(f"{rank:4d}  {row['nll_bits']:8.4f}  {row['id']}  {row['uri']}")
    if args.contact_sheet:
        contact_sheet(table, n_px, args.contact_sheet, storage_options)
        if not args.json:
            echo(f"contact sheet: {args.contact_sheet}")
    return 0
