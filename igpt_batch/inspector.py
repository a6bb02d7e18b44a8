"""`igpt-batch inspect OUTPUT|STORE`: what a run committed and produced, or the state of a refresh store (--verify checks)."""
from __future__ import annotations

import posixpath
from collections import Counter

import pyarrow.parquet as pq

from .storage import KINDS, OutputFolder, errors_by_reason, read_output


def inspect(url: str, verify: bool = False, storage_options: dict | None = None, echo=print) -> int:
    """Print a summary of an output folder; returns the exit code (1 when --verify finds a problem)."""
    out = OutputFolder(url, storage_options)
    job = out.read_json("_job.json")
    if job is None:
        from .store import Store

        store = Store(url, storage_options)
        if store.versions():
            return inspect_store(store, verify, echo)
        echo(f"{url}: no _job.json (not an igpt-batch output) and no v-*/_version.json (not a refresh store)")
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
        files = out.committed_files(kind)
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


def inspect_store(store, verify: bool, echo) -> int:
    """A refresh store: each version's Lance table (rows, nights kept as tags, fragments, index), its snapshots,
    a night in flight and the failed rows by reason; --verify reads every kept night and checks the data files."""
    latest = store.latest()
    echo(f"store:       {store.url}")
    echo(f"latest:      {latest.get('version', '-')}  snapshot {latest.get('snapshot', '-')}  at {latest.get('updated_at', '-')}")
    problems = []
    for name in store.versions():
        keys = store.version_info(name)
        echo(f"version {name}: model {keys.get('model')}  layers {keys.get('layers')}  dtype {keys.get('dtype')}  "
             f"n_px {keys.get('n_px')}  weights {keys.get('weights_fingerprint')}  created {keys.get('created_at')}")
        ds, nights = store.open(name), store.nights(name)
        try:
            rows, live = (ds.count_rows(), ds.count_rows("deleted = false")) if ds is not None else (0, 0)
        except OSError as e:  # a data file gone: --verify names it
            echo(f"  current:   unreadable ({e})")
            ds = None
            problems += [] if verify else [str(e)]
        if ds is not None:
            index = ", ".join(f"{i.name} ({i.index_type}, {i.num_rows_indexed} rows)" for i in ds.describe_indices()) \
                or "none (exact search)"
            echo(f"  current:   {max(nights) if nights else '-'}: {rows} rows, {live} live, {rows - live} deleted  "
                 f"[{store.table_url(name)}, Lance version {ds.version}, {len(ds.get_fragments())} fragments]")
            echo(f"  nights:    {len(nights)} kept as tags ({', '.join(nights) or '-'})")
            echo(f"  index:     {index}")
        elif not store.nights(name):
            echo("  current:   none yet (no night has finished)")
        snapshots = store.snapshots(name)
        echo(f"  snapshots: {len(snapshots)}" + (f", newest {snapshots[-1]}" if snapshots else ""))
        pending = store.pending(name)
        if pending:
            echo(f"  in flight: snapshot {pending['snapshot']} ({pending['rows']} rows to embed); a rerun resumes it")
        failed = store.failed_by_reason(name)
        echo(f"  failed:    {sum(failed.values())} rows not embedded (not retried while their source is unchanged)")
        for reason, n in failed.most_common(10):
            echo(f"    {n:>6}  {reason}")
        if verify:
            problems += store.verify(name)
    if not verify:
        return 0
    for p in problems:
        echo(f"VERIFY FAILED  {p}")
    echo("verify: ok" if not problems else f"verify: {len(problems)} problem(s)")
    return 1 if problems else 0
