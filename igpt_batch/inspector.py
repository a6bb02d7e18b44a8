"""`igpt-batch inspect OUTPUT|STORE`: what a run committed and produced, or the state of a refresh store (--verify checks)."""
from __future__ import annotations

import json
import posixpath
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from igpt_batch.errors import OutputError
from igpt_batch.run import lance_output, lance_verify
from igpt_batch.run.readers import read_output
from igpt_batch.run.storage import KINDS, PICTURES, OutputFolder, errors_by_reason


def inspect(url: str, verify: bool = False, storage_options: dict | None = None, echo=print,
            as_json: bool = False) -> int:
    """Print a summary of an output folder or a refresh store (one JSON object with as_json); returns the exit code
    (1 when --verify finds a problem, a file of the output cannot be read, or `url` is neither)."""
    out = OutputFolder(url, storage_options)
    try:
        job = out.read_job()
    except OutputError as e:  # _job.json that is not JSON: nothing else can be trusted
        echo(f"VERIFY FAILED  {e}" if verify else f"inspect: {e}")
        return 1
    if job is not None:
        report, show = describe_output(out, verify), show_output
    else:
        from igpt_batch.store.layout import Store

        store = Store(url, storage_options)
        if not store.versions():
            echo(f"{url}: not an igpt-batch output (no job record) and not a refresh store (no version)")
            return 1
        report, show = describe_store(store, verify), show_store
    if as_json:
        echo(json.dumps(report, sort_keys=True, default=str))
    else:
        show(report, echo)
        for p in report["problems"]:
            echo(f"VERIFY FAILED  {p}" if verify else f"PROBLEM  {p}")
        if verify:
            echo("verify: ok" if not report["problems"] else f"verify: {len(report['problems'])} problem(s)")
    return 1 if report["problems"] else 0


def describe_output(out: OutputFolder, verify: bool) -> dict:
    """An output's job, status, committed rows and files per kind, errors by reason, pictures; problems if verify
    (files that cannot be read are problems whether or not verify was asked)."""
    job, (commits, bad) = out.read_job(), out.markers()
    problems = [f"{posixpath.join(out.url, rel)} is {why}" for rel, why in sorted(bad.items())]
    try:
        status, summary = out.status()
    except OutputError as e:
        status, summary = "unreadable", None
        problems.append(str(e))
    rows = Counter()
    for rec in commits.values():
        rows.update(rec["rows"])
    kinds, lance = {}, lance_output.is_lance(out)
    if lance:  # the embeddings are one Lance dataset
        try:
            kinds["embeddings"] = lance_verify.describe(out)
        except (OSError, ValueError) as e:
            problems.append(f"{lance_output.uri(out)} cannot be read ({e})")
    for kind in KINDS:
        files = out.committed_files(kind, commits)
        if files:
            try:
                schema = {f.name: str(f.type) for f in pq.read_schema(out.path(files[0]), filesystem=out.fs)}
            except (pa.ArrowException, OSError) as e:
                schema, problems = {}, problems + [f"{posixpath.join(out.url, files[0])} cannot be read ({e})"]
            kinds[kind] = {"rows": rows[kind], "files": len(files), "schema": schema}
    return {
        "output": out.url, "task": job.get("task"), "model": job.get("model"),
        "weights_fingerprint": job.get("weights_fingerprint"), "palette_hash": job.get("palette_hash"),
        "layers": job.get("layers"), "shards_planned": job.get("shards"), "shards_committed": len(commits),
        "status": status, "summary": summary, "kinds": kinds,
        "errors_by_reason": dict(Counter(_errors_by_reason(out, commits, rows)).most_common()),
        "pictures": [posixpath.join(out.url, p) for p in PICTURES if out.exists(p)],
        "pngs": posixpath.join(out.url, "pngs") if out.has_pngs() else None,
        "problems": sorted(set(problems)) + (_verify_output(out, commits, status) if verify else [])
        + (lance_verify.verify(out, commits) if verify and lance else []),
    }


def _errors_by_reason(out: OutputFolder, commits: dict, rows: Counter) -> Counter:
    """From the commit records (v2); records written before they carried it are read from errors/ parts."""
    if not rows.get("errors"):
        return Counter()
    if all(rec["errors_by_reason"] is not None for rec in commits.values()):
        return sum((Counter(rec["errors_by_reason"]) for rec in commits.values()), Counter())
    try:
        return errors_by_reason(read_output(out.url, "errors", out.fs.storage_options))
    except (pa.ArrowException, OSError):
        return Counter()  # a truncated errors part: --verify names it


def _verify_output(out: OutputFolder, commits: dict, status: str) -> list[str]:
    """Every planned shard committed, every committed file present, readable and of its recorded row count."""
    missing = [name for name in out.planned_shards() if name not in commits]
    problems = [f"{name}: planned but not committed (its commit marker is missing: its rows are not in the output)"
                for name in missing[:20]]
    if len(missing) > 20:
        problems.append(f"... and {len(missing) - 20} more planned shards not committed")
    for name, rec in sorted(commits.items()):
        for f in rec["files"]:
            where = posixpath.join(out.url, f["path"])
            if not out.exists(f["path"]):
                problems.append(f"{name}: {f['path']} is missing")
                continue
            try:
                n = pq.read_metadata(out.path(f["path"]), filesystem=out.fs).num_rows
            except (pa.ArrowException, OSError) as e:
                problems.append(f"{name}: {where} cannot be read (truncated or not Parquet: {e})")
                continue
            if n != f["rows"]:
                problems.append(f"{name}: {f['path']} has {n} rows, commit says {f['rows']}")
    return problems


def show_output(r: dict, echo) -> None:
    echo(f"output:      {r['output']}")
    echo(f"task:        {r['task']}   model: {r['model']}   weights: {r['weights_fingerprint']}   palette: {r['palette_hash']}")
    if r["layers"]:
        echo(f"layers:      {r['layers']}")
    echo(f"shards:      {r['shards_committed']} committed of {r['shards_planned']} planned")
    echo(f"status:      {r['status']}")
    for kind, k in r["kinds"].items():
        cols = ", ".join(f"{name}: {t}" for name, t in k["schema"].items())
        unit = f"fragments of Lance version {k.get('lance_version', '-')}" if k.get("format") == "lance" else "files"
        echo(f"{kind + ':':<12} {k['rows']} rows in {k['files']} {unit}  [{cols}]")
    if r["errors_by_reason"]:
        echo("errors by reason:")
        for reason, n in list(r["errors_by_reason"].items())[:10]:
            echo(f"  {n:>6}  {reason}")
    for pic in r["pictures"]:
        echo(f"picture:     {pic}")
    if r["pngs"]:
        echo(f"pngs:        {r['pngs']}/seed-*.png")
    if r["status"] == "succeeded" and "wall_s" in r["summary"]:
        echo(f"wall time:   {r['summary']['wall_s']} s   throughput: {r['summary']['rows_per_s']} rows/s")


def describe_store(store, verify: bool) -> dict:
    """A refresh store: each version's Lance table (rows, nights kept as tags, fragments, index), its snapshots,
    a night in flight and the failed rows by reason; with verify, problems found reading every kept night."""
    versions, problems = {}, []
    for name in store.versions():
        v = {"info": store.version_info(name), "nights": store.kept_snapshots(name), "snapshots": store.snapshot_outputs(name),
             "pending": store.pending(name), "failed_by_reason": dict(store.failed_by_reason(name).most_common()),
             "vector_index": store.index_info(name)}
        ds = store.open(name)
        try:
            if ds is not None:
                v |= {"rows": ds.count_rows(), "live": ds.count_rows("deleted = false"), "table": store.table_url(name),
                      "lance_version": ds.version, "fragments": len(ds.get_fragments()),
                      "indices": [f"{i.name} ({i.index_type}, {i.num_rows_indexed} rows)" for i in ds.describe_indices()]}
        except OSError as e:  # a data file gone: --verify names it
            v["unreadable"] = str(e)
            problems += [] if verify else [str(e)]
        if verify:
            problems += store.verify(name)
        versions[name] = v
    return {"store": store.url, "latest": store.latest(), "versions": versions, "problems": problems}


def show_store(r: dict, echo) -> None:
    latest = r["latest"]
    echo(f"store:       {r['store']}")
    echo(f"latest:      {latest.get('version', '-')}  snapshot {latest.get('snapshot', '-')}  at {latest.get('updated_at', '-')}")
    for name, v in r["versions"].items():
        keys, nights = v["info"], v["nights"]
        echo(f"version {name}: model {keys.get('model')}  layers {keys.get('layers')}  dtype {keys.get('dtype')}  "
             f"n_px {keys.get('n_px')}  weights {keys.get('weights_fingerprint')}  created {keys.get('created_at')}")
        if "unreadable" in v:
            echo(f"  current:   unreadable ({v['unreadable']})")
        elif "rows" in v:
            echo(f"  current:   {max(nights) if nights else '-'}: {v['rows']} rows, {v['live']} live, "
                 f"{v['rows'] - v['live']} deleted  [{v['table']}, Lance version {v['lance_version']}, "
                 f"{v['fragments']} fragments]")
            echo(f"  nights:    {len(nights)} kept as tags ({', '.join(nights) or '-'})")
            echo(f"  index:     {', '.join(v['indices']) or 'none (exact search)'}")
            vi = v["vector_index"]
            if vi:
                echo(f"  recall:    recall@{vi['recall_k']} {vi['recall']} against exact search ({vi['recall_queries']} "
                     f"queries), measured at its {vi['built']} on {vi['trained_rows']} rows, {vi['partitions']} "
                     f"partitions, {vi['trained_at']}; re-trained at {4 * vi['trained_rows']} rows")
        elif not nights:
            echo("  current:   none yet (no night has finished)")
        snaps = v["snapshots"]
        echo(f"  snapshots: {len(snaps)}" + (f", newest {snaps[-1]}" if snaps else ""))
        if v["pending"]:
            echo(f"  in flight: snapshot {v['pending']['snapshot']} ({v['pending']['rows']} rows to embed); "
                 "a rerun resumes it")
        echo(f"  failed:    {sum(v['failed_by_reason'].values())} rows not embedded "
             "(not retried while their source is unchanged)")
        for reason, n in list(v["failed_by_reason"].items())[:10]:
            echo(f"    {n:>6}  {reason}")
