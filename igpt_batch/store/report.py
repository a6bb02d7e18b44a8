"""A refresh store's report.html: one self-contained page (inline SVG, no script, no network) from each night's record.

Per version: each night's inserted, updated, deleted and failed rows and its duration, the index's measured recall
and the duplicate counts when the night recorded them, the live rows over the nights, the kept snapshots (Lance
tags and table versions) and the failed rows by reason. `igpt-batch report STORE [-o FILE]` writes it (default
STORE/report.html); `write` also takes a job output and hands it to run/report.py.

The nights come from `night_records`, the one place that reads them: the store's saved records
(Store.night_summaries) when it has them, else derived from the Lance table (tags, versions and the change feed),
where a night's start, and so its duration, is not known.
"""
from __future__ import annotations

import datetime as dt
import html
from collections import Counter

from igpt_batch.run.report import STYLE, _fmt, bars
from igpt_batch.run.storage import REPORT, OutputFolder

COLUMNS = [("new", "inserted"), ("changed", "updated"), ("deleted", "deleted"), ("errors", "failed"),
           ("live_rows", "live rows"), ("duration_s", "duration s"), ("recall", "index recall"),
           ("duplicates", "duplicates")]
COLOURS = {"new": "#2a6fdb", "changed": "#f0a202", "deleted": "#888", "errors": "#d1495b"}


def is_store(url: str, storage_options: dict | None = None) -> bool:
    from igpt_batch.store.layout import Store

    return OutputFolder(url, storage_options).read_job() is None and bool(Store(url, storage_options).versions())


def write(url: str, path: str | None = None, storage_options: dict | None = None) -> str:
    """`igpt-batch report OUT|STORE`: the page of a store (else of a job output), to path (default URL/report.html)."""
    from igpt_batch.run import report as job_report
    from igpt_batch.store.layout import Store

    if not is_store(url, storage_options):
        return job_report.write(url, path, storage_options)
    store = Store(url, storage_options)
    page = build(store).encode()
    if path is None:
        store.root.write_bytes(REPORT, page)
        return store.root.path(REPORT)
    import fsspec

    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        f.write(page)
    return path


def night_records(store, version: str) -> list[dict]:
    """Every night of a version, oldest first, as {"status", "started_at", "ended_at", "summary"} records."""
    saved = getattr(store, "night_summaries", None)
    if saved is not None:
        return saved(version)
    return _from_lance(store, version)


def _from_lance(store, version: str) -> list[dict]:
    """Kept nights read back from the table: a night's new and changed rows are those it embedded (its `snapshot`
    column) that were absent or live the night before, its deletions and revivals the change feed's (the first kept
    night: all its rows new when it is the table's first version, else unknown); failures from the failed-rows
    record (the rows still failing whose last night it was, new ones counted as new); the end the commit's time."""
    import pyarrow.compute as pc

    from igpt_batch.store.changes import changes
    from igpt_batch.store.layout import LIVE

    ds, kept = store.open(version), store.kept_snapshots(version)
    if ds is None:
        return []
    stamps = {v["version"]: v["timestamp"] for v in ds.versions()}
    record = store.read_failed(version)
    failed = Counter(record.column("last_night").to_pylist())
    first = min(stamps) if stamps else None
    out, prev = [], None
    for night, table_version in kept.items():
        at = ds.checkout_version(table_version)
        s = {"snapshot": night, "errors": failed.get(night, 0), "current_rows": at.count_rows(),
             "live_rows": at.count_rows(LIVE)}
        # new ids that failed on their first night are new rows too (refresh counts them), outside the table
        tried = record.filter(pc.field("first_night") == night).column("id")
        new_failed = len(tried) - (at.count_rows(filter=pc.field("id").isin(tried)) if len(tried) else 0)
        if prev is not None:  # embedded tonight: new if absent the night before, changed if live then
            ids = at.to_table(columns=["id"], filter=pc.field("snapshot") == night).column("id")
            before = ds.checkout_version(kept[prev]).to_table(columns=["deleted"], filter=pc.field("id").isin(ids))
            kinds = Counter(k for t in changes(store.url, prev, night, version, store.storage_options)
                            for k in t.column("kind").to_pylist())
            live = int(pc.sum(pc.invert(before.column("deleted"))).as_py() or 0)
            s |= {"new": len(ids) - before.num_rows + new_failed, "changed": live, "deleted": kinds["deleted"],
                  "revived": kinds["revived"]}
        elif table_version == first:
            s |= {"new": at.count_rows(filter=pc.field("snapshot") == night) + new_failed, "changed": 0, "deleted": 0}
        end = stamps.get(table_version)
        out.append({"status": "ok", "version": version, "summary": s,
                    "ended_at": end.isoformat() if isinstance(end, dt.datetime) else None})
        prev = night
    return out


def _row(record: dict) -> dict:
    """A night's figures for the page (missing ones None)."""
    s = record.get("summary") or {}
    index = s.get("index") if isinstance(s.get("index"), dict) else {}
    dups = s.get("duplicates")
    row = {k: s.get(k) for k in ("new", "changed", "deleted", "errors", "live_rows")}
    row["recall"] = index.get("recall", s.get("recall"))
    row["duplicates"] = dups.get("pairs", dups.get("count")) if isinstance(dups, dict) else dups
    start, end = record.get("started_at"), record.get("ended_at")
    row["duration_s"] = (round((dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds(), 1)
                         if start and end else None)
    return row


def nights_table(version: str, records: list[dict]) -> str:
    """One row per night, each figure tagged data-key="VERSION/NIGHT/KEY"."""
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in COLUMNS)
    body = ""
    for r in records:
        night = (r.get("summary") or {}).get("snapshot") or "(nothing published)"
        fig = _row(r)
        cells = "".join(f'<td class=n data-key="{html.escape(f"{version}/{night}/{k}")}">{_fmt(fig[k])}</td>'
                        if fig[k] is not None else "<td class=muted>-</td>" for k, _ in COLUMNS)
        body += f"<tr><th>{html.escape(night)}</th><td>{html.escape(str(r.get('status', '?')))}</td>{cells}</tr>"
    return f"<table><tr><th>night</th><th>status</th>{head}</tr>{body}</table>"


def nights_chart(records: list[dict], w: int = 640, h: int = 240) -> str:
    """Bars of each night's inserted, updated, deleted and failed rows, side by side, under a legend."""
    rows = [(((r.get("summary") or {}).get("snapshot") or "-"), _row(r)) for r in records]
    top = max([v or 0 for _, f in rows for v in (f[k] for k in COLOURS)] + [1])
    slot = (w - 60) / max(1, len(rows))
    bar, span = slot / (len(COLOURS) + 1), h - 64  # bars between y = 34 and the axis at h - 30
    parts = []
    for i, (night, f) in enumerate(rows):
        for j, k in enumerate(COLOURS):
            v = f[k] or 0
            y = span * v / top
            parts.append(f'<rect x="{50 + i * slot + j * bar:.1f}" y="{h - 30 - y:.1f}" width="{bar * 0.9:.1f}" '
                         f'height="{max(y, 0.5):.1f}" fill="{COLOURS[k]}"><title>{night} {k}: {v}</title></rect>')
        parts.append(f'<text x="{50 + i * slot:.1f}" y="{h - 14}">{html.escape(night)}</text>')
    legend = "".join(f'<rect x="{50 + 90 * j}" y="4" width="10" height="10" fill="{c}"/>'
                     f'<text x="{64 + 90 * j}" y="13">{k}</text>' for j, (k, c) in
                     enumerate(zip(("inserted", "updated", "deleted", "failed"), COLOURS.values())))
    return (f'<svg width="{w}" height="{h}" role="img" aria-label="rows per night">'
            f'<line x1="50" y1="{h - 30}" x2="{w - 10}" y2="{h - 30}" stroke="#999"/>'
            f'<text x="46" y="38" text-anchor="end">{_fmt(top)}</text>{legend}{"".join(parts)}</svg>')


def snapshots_table(store, version: str) -> str:
    ds, kept = store.open(version), store.kept_snapshots(version)
    if not kept:
        return "<p class=muted>no kept snapshot</p>"
    rows = "".join(f'<tr><th>{html.escape(s)}</th><td class=n data-key="{html.escape(f"{version}/{s}/table_version")}">'
                   f"{v}</td><td class=n>{_fmt(ds.checkout_version(v).count_rows())}</td></tr>" for s, v in kept.items())
    return f"<table><tr><th>snapshot (tag)</th><th>Lance table version</th><th>rows</th></tr>{rows}</table>"


def build(store) -> str:
    from igpt_batch.redact import redact_uri

    latest = store.latest()
    parts = [f"<h1>igpt-batch store</h1><p class=muted>{html.escape(redact_uri(store.url))} &middot; latest "
             f"{html.escape(str(latest.get('version')))} / {html.escape(str(latest.get('snapshot')))}</p>"]
    for version in store.versions():
        info = store.version_info(version) or {}
        records = night_records(store, version)
        parts += [f"<h2>Version {html.escape(version)}</h2>",
                  f"<p>model {html.escape(str(info.get('model')))}, dtype {html.escape(str(info.get('dtype')))}, "
                  f"layers {html.escape(str(info.get('layers')))}, created {html.escape(str(info.get('created_at')))}; "
                  f"{len(records)} nights</p>",
                  "<h3>Nights</h3>", nights_table(version, records), nights_chart(records),
                  "<h3>Kept snapshots</h3>", snapshots_table(store, version),
                  "<h3>Failed rows by reason</h3>", bars(store.failed_by_reason(version).most_common(), "rows")]
    body = "\n".join(parts)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>igpt-batch store report</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")
