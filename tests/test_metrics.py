"""Job metrics: a no-op without Ray, and counters on the session head's Prometheus endpoint that match the rows
written."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
from conftest import http_get, wait_for, write_manifest

from igpt_batch.run import metrics
from igpt_batch.run.readers import read_output
from igpt_batch.run.storage import OutputFolder

BIN = Path(sys.executable).parent


def test_errors_by_stage_counts_the_errors_table():
    t = pa.table({"id": ["a", "b", "c"], "uri": ["x", "y", "z"], "stage": ["read", "decode", "decode"],
                  "error": ["", "", ""]})
    assert metrics.errors_by_stage({"embeddings": pa.table({"id": []}), "errors": t}) == {"read": 1, "decode": 2}
    assert metrics.errors_by_stage({"samples": t}) == {}


def test_no_op_and_no_ray_import_without_ray():
    code = ("import sys; from igpt_batch.run import metrics as m, executors, worker\n"
            "m.shard(m.job_tags('extract', 's3://u:pw@b/o'), 'committed'); m.actors({}, 1, 0)\n"
            "m.shard_committed('extract', 'o', {'rows': {'embeddings': 2}, 'stats': {'model_s': 1.0}}, {})\n"
            "assert 'ray' not in sys.modules and m._metrics is None, sorted(k for k in sys.modules if 'ray' in k)\n"
            "assert m.job_tags('extract', 's3://u:pw@b/o') == {'task': 'extract', 'job': 's3://b/o'}")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def values(text: str | None, name: str, job: str, by: str) -> dict[str, float]:
    """{label `by`: value summed over workers} of metric `name` for one job, from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Counter = Counter()
    for family in text_string_to_metric_families(text or ""):
        for s in family.samples:
            if s.name == name and s.labels.get("job") == job:
                out[s.labels.get(by, "")] += s.value
    return dict(out)


def test_job_counters_on_the_prometheus_endpoint_match_the_rows_written(ray_head, tiny_ckpt, image_dir, tmp_path, gate):
    url, gate_uri = ray_head.metrics_url, gate.uri
    # 2 undecodable, 1 unread, and one that is served only once the workers-alive gauge has been seen
    uris = sorted(str(p) for p in image_dir.iterdir()) + [str(image_dir / "missing.png"), gate_uri]
    manifest = write_manifest(tmp_path / "m.parquet", uris)
    out = str(tmp_path / "out")
    cmd = [str(BIN / "igpt-batch"), "extract", "--model", tiny_ckpt, "--manifest", str(manifest), "--output", out,
           "--shard-size", "2", "--torch-threads", "1", "--read-timeout", "300", "--address", ray_head.address]
    proc = subprocess.Popen(cmd, env=ray_head.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the job cannot finish before the gate opens: wait for the gauge, however late the export comes
        alive = wait_for(lambda: values(http_get(url), "ray_igpt_actors", out, "state").get("alive"), while_running=proc)
    finally:
        gate.open()
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert alive == 1, "one worker alive while the job ran"
    summary = json.loads(stdout.splitlines()[-1])  # the one-line JSON summary, last on stdout

    n_shards = len(OutputFolder(out).committed())
    errors = read_output(out, "errors").column("stage").to_pylist()
    embeddings = read_output(out, "embeddings")
    want = {"ray_igpt_rows_done_total": {"embeddings": embeddings.num_rows},
            "ray_igpt_rows_failed_total": dict(Counter(errors)), "ray_igpt_shards_total": {"committed": n_shards}}
    assert want["ray_igpt_rows_failed_total"] == {"read": 1, "decode": 2} and summary["errors"] == 3
    assert embeddings.num_rows == len(uris) - 3 and gate_uri in embeddings.column("uri").to_pylist()
    by = {"ray_igpt_rows_done_total": "kind", "ray_igpt_rows_failed_total": "stage", "ray_igpt_shards_total": "outcome"}

    def counters():  # the metrics agent exports what the workers sent, a few seconds late
        text = http_get(url)
        return text if {name: values(text, name, out, label) for name, label in by.items()} == want else None

    text = wait_for(counters)
    assert text, {name: values(http_get(url), name, out, label) for name, label in by.items()}
    seconds = values(text, "ray_igpt_stage_seconds_total", out, "stage")
    assert set(seconds) >= {"read", "model", "write"} and seconds["model"] > 0, seconds
    assert values(text, "ray_igpt_shard_seconds_count", out, "task") == {"extract": n_shards}
