"""The driver folds commit records as they arrive (run/tally.py): the summary's figures equal those summed over the
whole records, the report and the pictures read the same files and times back, and what is kept a shard is a
fraction of the record."""
import json
import tracemalloc
import uuid
from collections import Counter

import pyarrow as pa

from igpt_batch.inputs.manifest import plan_shards
from igpt_batch.run.context import Stats
from igpt_batch.run.records import make_record, read_record
from igpt_batch.run.storage import OutputFolder
from igpt_batch.run.tally import Tally

FINGERPRINT = "0123456789abcdef"


def marker(shard, errors: int, seed: int) -> dict:
    """A commit record as a worker writes it (make_record, stats, the lease) and the driver reads it back (JSON)."""
    ok = pa.table({"id": [f"i{i}" for i in range(len(shard) - errors)]})
    bad = pa.table({"stage": ["decode"] * errors, "error": ["ImageError: not an image"] * errors})
    files = [{"path": f"embeddings/{shard.name}.parquet", "rows": ok.num_rows}]
    files += [{"path": f"errors/{shard.name}.parquet", "rows": errors}] if errors else []
    rec = make_record(shard, files, {"embeddings": ok, "errors": bad}, fingerprint=FINGERPRINT,
                      started_at=1_764_900_000.0 + seed)
    rec |= {"stats": {"read_s": 0.1 + seed / 7, "wait_s": 0.01, "preprocess_s": 0.2, "model_s": 0.5 + seed / 3,
                      "write_s": 0.05, "total_s": 0.9 + seed / 3}, "http_retries": seed % 2,
            "lease": {"token": uuid.uuid4().hex, "generation": 3}}
    return read_record(json.loads(json.dumps(rec)))


def test_the_tally_equals_the_sums_over_the_whole_records(tmp_path):
    shards = plan_shards(40 * 64, 64)
    earlier = {s.name: marker(s, s.shard_id % 3, s.shard_id) for s in shards[:10]}
    this_run = [marker(s, s.shard_id % 3, s.shard_id) for s in shards[10:]]
    tally = Tally()
    for rec in earlier.values():
        tally.add(rec, this_run=False)
    for rec in this_run:
        tally.add(rec)
    every = [*earlier.values(), *this_run]
    assert dict(tally.rows) == dict(sum((Counter(r["rows"]) for r in every), Counter()))
    assert tally.rows["errors"] == sum(s.shard_id % 3 for s in shards) == 39
    assert dict(tally.by_reason) == {"decode: ImageError": 39} and not tally.older
    stats = sum((Stats.of(r) for r in this_run), Stats())  # the driver's sum before the tally, in arrival order
    assert tally.stats == stats and tally.stats.http_retries == 15
    assert tally.new_rows == 30 * 64 and len(tally.run_shards) == 30 and len(tally.commits) == 40
    assert tally.running_seconds() == max(r["ended_at"] for r in this_run) - min(r["started_at"] for r in this_run)
    for rec in every:  # what the report and the pictures read of each record, as it was
        kept = tally.commits[rec["shard"]]
        assert kept == {k: rec[k] for k in ("shard", "start", "stop", "rows", "files", "started_at", "ended_at")}
    out = OutputFolder(str(tmp_path / "o"))
    assert out.committed_files("errors", tally.commits) == out.committed_files("errors", {r["shard"]: r for r in every})
    # a record arriving again (a shard committed twice) replaces its rows and errors, not adds to them
    again = marker(shards[12], 0, 12)
    tally.add(again)
    assert tally.rows["errors"] == 39 - 12 % 3 and dict(tally.by_reason) == {"decode: ImageError": 39 - 12 % 3}
    assert tally.new_rows == 30 * 64 and len(tally.run_shards) == 30 and tally.commits["part-00012"]["files"] == again["files"]
    old = read_record({"shard": shards[0].name, "start": 0, "stop": 64, "files": [], "rows": {"errors": 2}})  # v1
    tally.add(old, this_run=False)
    assert list(tally.older) == [shards[0].name]  # its errors parts are read by the summary, once


def test_what_the_driver_keeps_a_shard_is_a_quarter_of_its_record():
    """Measured with tracemalloc over 5,000 records read back from JSON: the whole records, as the driver held them
    before, against the tally of the same records."""
    shards = plan_shards(5_000 * 1_024, 1_024)
    raw = [json.dumps(marker(s, 1, s.shard_id % 50)) for s in shards]

    def held(keep) -> float:
        tracemalloc.start()
        try:
            kept = keep()
            return tracemalloc.get_traced_memory()[0] / len(raw)
        finally:
            tracemalloc.stop()
            del kept

    def fold():
        tally = Tally()
        for r in raw:
            tally.add(json.loads(r))
        return tally

    whole, folded = held(lambda: {s.name: json.loads(r) for s, r in zip(shards, raw)}), held(fold)
    print(f"bytes a record: whole {whole:.0f}, kept {folded:.0f}")
    assert whole > 2_500 and folded < 1_000 and folded < whole / 4, (whole, folded)
