"""`igpt-batch inspect OUTPUT|STORE`: what a run planned, committed and produced, or the state of a refresh store;
--verify checks the committed files (of a run) or the live current tables' files (of a store)."""
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
        versions = sorted(f.split("/")[-2] for f in out.fs.glob(out.path("v-*", "_version.json")))
        if versions:
            return inspect_store(out, versions, verify, storage_options, echo)
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


def inspect_store(store: OutputFolder, versions: list[str], verify: bool, storage_options: dict | None, echo) -> int:
    """A refresh store: each version's live current table, its kept tables and snapshots, and a night in flight."""
    from .refresh import current_tables

    latest = store.read_json("_LATEST.json") or {}
    echo(f"store:       {store.url}")
    echo(f"latest:      {latest.get('version', '-')}  snapshot {latest.get('snapshot', '-')}  at {latest.get('updated_at', '-')}")
    problems = []
    for name in versions:
        v = OutputFolder(posixpath.join(store.url, name), storage_options)
        keys = v.read_json("_version.json")
        echo(f"version {name}: model {keys.get('model')}  layers {keys.get('layers')}  dtype {keys.get('dtype')}  "
             f"n_px {keys.get('n_px')}  weights {keys.get('weights_fingerprint')}  created {keys.get('created_at')}")
        # snapshots are never deleted, so listing their folders is enough (no walk through their files)
        snapshots = sorted(posixpath.basename(p.rstrip("/")) for p in v.fs.ls(v.path("snapshots"), detail=False)) \
            if v.exists("snapshots") else []
        tables = current_tables(v)
        cur = v.read_json("_CURRENT.json")
        if cur:
            echo(f"  current:   {cur['snapshot']}: {cur['rows']} rows, {cur['live_rows']} live, {cur['deleted']} deleted; "
                 f"that night computed {cur['computed']}, {cur['errors']} failed  [{cur['path']}]")
        else:
            echo("  current:   none yet (no night has finished)")
        echo(f"  tables:    {len(tables)} kept in current/ ({', '.join(tables) or '-'})")
        echo(f"  snapshots: {len(snapshots)}" + (f", newest {snapshots[-1]}" if snapshots else ""))
        pending = v.read_json("_PENDING.json")
        if pending:
            echo(f"  in flight: snapshot {pending['snapshot']} ({pending.get('rows', '?')} rows), started "
                 f"{pending.get('started_at', '?')}; a rerun resumes it")
        if verify and cur:
            rows = 0
            for f in cur["files"]:
                if not v.exists(f):
                    problems.append(f"{name}: {f} is missing")
                    continue
                rows += pq.read_metadata(v.path(f), filesystem=v.fs).num_rows
            if rows != cur["rows"] and not any(p.startswith(f"{name}:") for p in problems):
                problems.append(f"{name}: the current table's files hold {rows} rows, _CURRENT.json says {cur['rows']}")
    if not verify:
        return 0
    for p in problems:
        echo(f"VERIFY FAILED  {p}")
    echo("verify: ok" if not problems else f"verify: {len(problems)} problem(s)")
    return 1 if problems else 0
