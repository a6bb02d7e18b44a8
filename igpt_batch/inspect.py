"""`igpt-batch inspect OUTPUT`: what a run planned, committed and produced; --verify checks committed files."""
from __future__ import annotations

import posixpath
from collections import Counter

import pyarrow.parquet as pq

from .storage import KINDS, OutputFolder, committed_files, errors_by_reason, read_output


def inspect(url: str, verify: bool = False, storage_options: dict | None = None, echo=print) -> int:
    """Print a summary of an output folder; returns the exit code (1 when --verify finds a problem)."""
    out = OutputFolder(url, storage_options)
    job = out.read_json("_job.json")
    if job is None:
        echo(f"{url}: no _job.json, not an igpt-batch output")
        return 1
    commits = out.committed()
    success = out.read_json("_SUCCESS")
    echo(f"output:      {url}")
    echo(f"task:        {job['task']}   model: {job['model']}   weights: {job['weights_fingerprint']}   palette: {job['palette_hash']}")
    if job.get("layers"):
        echo(f"layers:      {job['layers']}")
    echo(f"shards:      {len(commits)} committed of {job['shards']} planned")
    echo(f"status:      {'complete (_SUCCESS)' if success else 'failed (_FAILED)' if out.exists('_FAILED') else 'incomplete'}")
    rows = Counter()
    for rec in commits.values():
        rows.update(rec.get("rows", {}))
    for kind in KINDS:
        files = committed_files(out, kind)
        if files:
            schema = pq.read_schema(out.path(files[0]), filesystem=out.fs)
            cols = ", ".join(f"{f.name}: {f.type}" for f in schema)
            echo(f"{kind + ':':<12} {rows[kind]} rows in {len(files)} files  [{cols}]")
    if rows.get("errors"):
        errors = read_output(url, "errors", storage_options)
        echo("errors by reason:")
        for reason, n in errors_by_reason(errors).most_common(10):
            echo(f"  {n:>6}  {reason}")
    for pic in ("contact_sheet.png", "preview.png"):
        if out.exists(pic):
            echo(f"picture:     {posixpath.join(url, pic)}")
    if out.exists("pngs"):
        echo(f"pngs:        {posixpath.join(url, 'pngs')}/seed-*.png")
    if success:
        echo(f"wall time:   {success['wall_s']} s   throughput: {success['rows_per_s']} rows/s")
    if not verify:
        return 0
    problems = []
    for name, rec in sorted(commits.items()):
        for f in rec.get("files", []):
            if not out.exists(f["path"]):
                problems.append(f"{name}: {f['path']} is missing")
                continue
            n = pq.read_metadata(out.path(f["path"]), filesystem=out.fs).num_rows
            if n != f["rows"]:
                problems.append(f"{name}: {f['path']} has {n} rows, commit says {f['rows']}")
    for p in problems:
        echo(f"VERIFY FAILED  {p}")
    echo("verify: ok" if not problems else f"verify: {len(problems)} problem(s)")
    return 1 if problems else 0
