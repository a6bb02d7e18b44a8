"""report.html: one self-contained page of a job (inline SVG and PNG, no script, no network).

The summary (the figures of _SUCCESS), throughput over time from the commit records, stage seconds, errors by
reason, a 2-D PCA map of a sample of the embeddings with thumbnails, and the preview and contact sheets.
Every job writes it beside _SUCCESS unless output.report is off (`maybe_write`, which never raises);
`igpt-batch report OUT [-o FILE]` writes it again, or elsewhere.
"""
from __future__ import annotations

import base64
import html
import logging

import numpy as np

from igpt_batch.errors import UsageError
from igpt_batch.run.storage import PICTURES, REPORT, OutputFolder

log = logging.getLogger("igpt_batch")
SAMPLE_ROWS = 2000  # embeddings drawn on the map
THUMBS = 24  # of which this many as thumbnails
MAP_FILES = 2  # embeddings parts read for the map, at most
FIGURES = ("input_rows", "errors", "shards", "shards_run", "shards_skipped", "wall_s", "rows_per_s", "http_retries")
STYLE = """body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1000px}h1{font-size:22px}
h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}table{border-collapse:collapse}
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
svg text{font:11px system-ui,sans-serif;fill:#444}.muted{color:#888}img.sheet{max-width:100%;image-rendering:pixelated}"""


def maybe_write(cfg, out: OutputFolder, summary: dict, status: str = "succeeded", commits: dict | None = None) -> None:
    """The job's report.html, unless output.report is off; any failure is a warning, never a failed job. `commits`:
    the commit records the driver has in hand (else they are read)."""
    if not cfg.output.report:
        return
    try:
        out.write_bytes(REPORT, build(out, summary, status, cfg.storage_options, commits).encode())
    except Exception as e:  # noqa: BLE001 - a report is a convenience: the output is complete without it
        log.warning("could not write %s (%s: %s); the output is complete", REPORT, type(e).__name__, e)


def write(url: str, path: str | None = None, storage_options: dict | None = None) -> str:
    """`igpt-batch report`: the report of the output at url, to path (default url/report.html); returns where."""
    out = OutputFolder(url, storage_options)
    if out.read_job() is None:
        raise UsageError(f"{url}: not an igpt-batch output (no job record)")
    status, summary = out.status()
    page = build(out, summary or {}, status, storage_options or {}).encode()
    if path is None:
        out.write_bytes(REPORT, page)
        return out.path(REPORT)
    import fsspec

    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        f.write(page)
    return path


def build(out: OutputFolder, summary: dict, status: str, storage_options: dict, commits: dict | None = None) -> str:
    from igpt_batch.redact import redact_uri

    job = out.read_job() or {}
    commits = out.committed() if commits is None else commits
    parts = [f"<h1>igpt-batch {html.escape(job.get('task', '?'))}: {html.escape(status)}</h1>",
             f"<p class=muted>{html.escape(redact_uri(out.url))} &middot; model {html.escape(str(job.get('model')))}"
             f" &middot; dtype {html.escape(str(job.get('compat', {}).get('dtype')))}</p>",
             "<h2>Summary</h2>", summary_table(summary),
             "<h2>Throughput over time</h2>", throughput(commits),
             "<h2>Stage seconds</h2>", bars(sorted((k, v) for k, v in summary.get("stage_seconds", {}).items()
                                                   if k != "total_s"), "s"),
             "<h2>Errors by reason</h2>", bars(list(summary.get("errors_by_reason", {}).items()), "rows")]
    if any(f["path"].startswith("embeddings/") for rec in commits.values() for f in rec.get("files", [])):
        # thumbnails load each image by its uri: not when the images were inside the manifest or its tars
        thumbs = job.get("input_kind", "uri") == "uri"
        parts += ["<h2>Embeddings (PCA)</h2>",
                  embedding_map(out, commits, int(job.get("n_px", 8)), storage_options, thumbs=thumbs)]
    for name in PICTURES:
        if out.exists(name):
            data = base64.b64encode(out.fs.cat_file(out.path(name))).decode()
            parts += [f"<h2>{html.escape(name)}</h2>", f'<img class=sheet alt="{name}" src="data:image/png;base64,{data}">']
    body = "\n".join(parts)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>igpt-batch report</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _fmt(v) -> str:
    return f"{v:,.3f}".rstrip("0").rstrip(".") if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def summary_table(summary: dict) -> str:
    """The figures of _SUCCESS, each cell tagged with its key (data-key, dotted for rows.<kind>)."""
    if not summary:
        return "<p class=muted>no _SUCCESS or _FAILED yet: the job is running or was stopped</p>"
    keyed = [(f"rows.{k}", v) for k, v in sorted(summary.get("rows", {}).items())]
    keyed += [(k, summary[k]) for k in FIGURES if k in summary and summary[k] is not None]
    rows = "".join(f'<tr><th>{html.escape(k)}</th><td class=n data-key="{html.escape(k)}">{_fmt(v)}</td></tr>'
                   for k, v in keyed)
    return f"<table>{rows}</table>"


def _axes(w: int, h: int, x_max: float, y_max: float, x_label: str, y_label: str) -> str:
    return (f'<line x1="50" y1="{h - 30}" x2="{w - 10}" y2="{h - 30}" stroke="#999"/>'
            f'<line x1="50" y1="10" x2="50" y2="{h - 30}" stroke="#999"/>'
            f'<text x="50" y="{h - 12}">0</text><text x="{w - 10}" y="{h - 12}" text-anchor="end">{_fmt(x_max)} '
            f'{x_label}</text><text x="46" y="16" text-anchor="end">{_fmt(y_max)}</text>'
            f'<text x="46" y="{h - 32}" text-anchor="end">0</text><text x="56" y="22">{y_label}</text>')


def throughput(commits: dict, w: int = 640, h: int = 220) -> str:
    """Cumulative output rows against seconds since the first shard started (commit records' wall times)."""
    recs = sorted((r for r in commits.values() if "ended_at" in r and "started_at" in r),
                  key=lambda r: r["ended_at"])
    if not recs:
        return "<p class=muted>no commit record carries wall times (written by an older igpt-batch)</p>"
    t0 = min(r["started_at"] for r in recs)
    xs = [0.0] + [r["ended_at"] - t0 for r in recs]
    ys = np.cumsum([0] + [sum(v for k, v in r.get("rows", {}).items() if k != "errors") for r in recs])
    x_max, y_max = max(max(xs), 1e-3), max(int(ys[-1]), 1)
    pts = " ".join(f"{50 + x / x_max * (w - 60):.1f},{h - 30 - y / y_max * (h - 40):.1f}" for x, y in zip(xs, ys))
    rate = ys[-1] / x_max
    return (f'<svg width="{w}" height="{h}" role="img" aria-label="rows committed over time">'
            f'{_axes(w, h, round(x_max, 1), int(y_max), "s", "rows committed")}'
            f'<polyline points="{pts}" fill="none" stroke="#2a6fdb" stroke-width="2"/></svg>'
            f"<p>{len(recs)} shards, {_fmt(int(ys[-1]))} rows in {_fmt(round(x_max, 1))} s from the first shard's "
            f"start: {_fmt(round(float(rate), 2))} rows/s</p>")


def bars(items: list[tuple[str, float]], unit: str, w: int = 640) -> str:
    if not items:
        return "<p class=muted>none</p>"
    top, h = max(v for _, v in items) or 1, 22 * len(items) + 4
    rows = "".join(
        f'<text x="0" y="{22 * i + 15}">{html.escape(k)}</text>'
        f'<rect x="230" y="{22 * i + 4}" width="{max(1.0, v / top * (w - 330)):.1f}" height="15" fill="#2a6fdb"/>'
        f'<text x="{236 + v / top * (w - 330):.1f}" y="{22 * i + 15}">{_fmt(v)} {unit}</text>'
        for i, (k, v) in enumerate(items))
    return f'<svg width="{w}" height="{h}" role="img">{rows}</svg>'


def _sample(out: OutputFolder, commits: dict, n: int):
    """Up to n embedding rows from at most MAP_FILES committed files spread over the shards (id, uri, embedding)."""
    import pyarrow as pa

    from igpt_batch.run import lance_output

    if lance_output.is_lance(out):  # rows spread over the dataset, taken by index
        ds = lance_output.open_dataset(out)
        rows = ds.count_rows() if ds is not None else 0
        if not rows:
            return pa.table({"id": pa.array([], pa.string())})
        return ds.take(np.linspace(0, rows - 1, min(n, rows)).astype(int).tolist(), columns=["id", "uri", "embedding"])
    files = out.committed_files("embeddings", commits)
    per_file = max(1, max(f["rows"] for rec in commits.values() for f in rec.get("files", [])
                          if f["path"].startswith("embeddings/")))
    k = min(len(files), MAP_FILES, -(-n // per_file))  # a few parts, spread over the shards: reads do not grow with them
    take = [files[i] for i in sorted(set(np.linspace(0, len(files) - 1, k).astype(int)))]
    table = pa.concat_tables([out.read_table(f, columns=["id", "uri", "embedding"]) for f in take])
    return table.take(np.linspace(0, table.num_rows - 1, min(n, table.num_rows)).astype(int))


def _thumb(uri: str, n_px: int, storage_options: dict) -> str | None:
    from igpt_batch.inputs import images
    from igpt_batch.model import palette

    try:
        rgb = images.load_rgb(uri, n_px, storage_options)[0]
    except Exception:  # noqa: BLE001 - an input gone since the job: its point stays, without a picture
        return None
    scale = max(1, 32 // n_px)
    return base64.b64encode(palette.to_png(np.repeat(np.repeat(rgb, scale, 0), scale, 1))).decode()


def embedding_map(out: OutputFolder, commits: dict, n_px: int, storage_options: dict, w: int = 640,
                  h: int = 480, thumbs: bool = True) -> str:
    """The first two principal components of a sample of the embeddings, with thumbnails of some of them."""
    from sklearn.decomposition import PCA

    table = _sample(out, commits, SAMPLE_ROWS)
    if table.num_rows < 3:
        return "<p class=muted>fewer than 3 embeddings: no map</p>"
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float64)
    pca = PCA(n_components=2, random_state=0).fit(emb)
    xy = pca.transform(emb)
    lo, span = xy.min(0), np.maximum(np.ptp(xy, 0), 1e-12)
    px = 20 + (xy - lo) / span * np.array([w - 60, h - 60])
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#2a6fdb" fill-opacity=".55"/>' for x, y in px)
    uris = table.column("uri").to_pylist()
    n_thumbs, thumbs = (min(THUMBS, len(px)) if thumbs else 0), ""
    for i in np.linspace(0, len(px) - 1, n_thumbs).astype(int):
        data = _thumb(uris[i], n_px, storage_options)
        if data is not None:
            thumbs += (f'<image x="{px[i, 0] - 12:.1f}" y="{px[i, 1] - 12:.1f}" width="24" height="24" '
                       f'href="data:image/png;base64,{data}" style="image-rendering:pixelated"/>')
    var = pca.explained_variance_ratio_
    return (f'<svg width="{w}" height="{h}" role="img" aria-label="embedding map">{dots}{thumbs}</svg>'
            f"<p>{len(px)} of the embeddings; PC1 and PC2 explain {var[0]:.0%} and {var[1]:.0%} of their variance</p>")
