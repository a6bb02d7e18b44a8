"""The task objects: what each task resolves, its compatibility keys, its plan, and the schemas its runner writes."""
from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from igpt_batch import config
from igpt_batch.errors import ConfigError, ImageError
from igpt_batch.inputs.manifest import ManifestScan, Shard
from igpt_batch.model import checkpoint
from igpt_batch.model.loading import load_model
from igpt_batch.run.context import ShardContext, Stats
from igpt_batch.run.reader import RowReader
from igpt_batch.run.storage import OutputFolder
from igpt_batch.run.tasks import Complete, Extract, Generate, Plan, Task, get
from igpt_batch.run.tasks.base import ERRORS_SCHEMA, NIGHTLY, error_row, error_table

SCAN = ManifestScan(10, "0123456789abcdef", kind="uri")


def cfg_for(ckpt, out="/tmp/unused-out", **over):
    return config.load(None, {"model.name": ckpt, "output.path": str(out), "run.shard_size": 4,
                              "extract.batch_size": 2, "generate.batch_size": 4, **over})


@pytest.fixture(scope="module")
def info(tiny_ckpt):
    return checkpoint.read_info(tiny_ckpt)


def test_get_names_every_task_and_refuses_others():
    assert [type(get(n)) for n in ("extract", "generate", "complete")] == [Extract, Generate, Complete]
    task = Extract()
    assert get(task) is task
    assert all(isinstance(get(n), Task) for n in ("extract", "generate", "complete"))
    assert (Extract.reads_manifest, Generate.reads_manifest, Complete.reads_manifest) == (True, False, True)
    with pytest.raises(ValueError, match="task must be one of"):
        get("embed")


def test_extract_resolves_layers_and_the_schema_metadata(tiny_ckpt, info):
    r = Extract().resolve(cfg_for(tiny_ckpt), info)  # no layers given: the middle one, n_layer // 2
    assert r.layers == (info.n_layer // 2,) == (1,)
    assert r.meta["layers"] == "1" and r.meta["pooling"] == "mean(ln_1(h[l]))" and r.meta["task"] == "extract"
    assert r.meta["weights_fingerprint"] == info.weights_fingerprint and r.meta["palette_hash"] == info.palette_hash
    assert Extract().resolve(cfg_for(tiny_ckpt, **{"extract.layers": [3, 0]}), info).layers == (3, 0)  # order kept
    with pytest.raises(ConfigError, match="extract.layers"):
        Extract().resolve(cfg_for(tiny_ckpt, **{"extract.layers": [4]}), info)


def test_compat_keys_name_what_decides_a_shard(tiny_ckpt, info):
    cfg = cfg_for(tiny_ckpt, **{"extract.layers": [2]})
    t = Extract()
    keys = t.compat_keys(cfg, t.resolve(cfg, info), t.plan(cfg, SCAN))
    assert keys == {"task": "extract", "weights_fingerprint": info.weights_fingerprint,
                    "palette_hash": info.palette_hash, "dtype": "fp32", "shard_size": 4, "rows": 10,
                    "manifest_fingerprint": "0123456789abcdef", "draft": False, "max_pixels": 64_000_000,
                    "max_bytes": 64 * 1024 * 1024, "layers": [2]}
    assert t.version_keys(cfg, info) == {k: v for k, v in keys.items() if k not in NIGHTLY}  # a store's version
    g = Generate()
    gcfg = cfg_for(tiny_ckpt, **{"generate.num_samples": 6, "generate.seed": 7, "generate.top_k": 5})
    gkeys = g.compat_keys(gcfg, g.resolve(gcfg, info), g.plan(gcfg, None))
    assert gkeys["rows"] == 6 and gkeys["manifest_fingerprint"] is None and "draft" not in gkeys  # reads no images
    assert (gkeys["seed"], gkeys["top_k"], gkeys["write_png_files"]) == (7, 5, False)
    c = Complete()
    ccfg = cfg_for(tiny_ckpt, **{"generate.prompt_rows": 3, "generate.samples_per_image": 2})
    ckeys = c.compat_keys(ccfg, c.resolve(ccfg, info), c.plan(ccfg, SCAN))
    assert (ckeys["prompt_rows"], ckeys["samples_per_image"], ckeys["draft"]) == (3, 2, False)


def test_plans_cut_the_scan_or_the_seeds_into_shards(tiny_ckpt):
    cfg = cfg_for(tiny_ckpt, **{"generate.num_samples": 10, "generate.seed": 100})
    plan = Extract().plan(cfg, SCAN)
    assert plan == Plan(10, [Shard(0, 0, 4), Shard(1, 4, 8), Shard(2, 8, 10)], SCAN)
    assert plan.manifest_fingerprint == SCAN.fingerprint
    tars = ManifestScan(5, "f" * 16, groups=(3, 2), kind="tar")  # no shard crosses a tar
    assert [(s.start, s.stop) for s in Extract().plan(cfg_for(tiny_ckpt, **{"run.shard_size": 2}), tars).shards] == \
        [(0, 2), (2, 3), (3, 5)]
    seeds = Generate().plan(cfg, None)
    assert seeds.rows == 10 and seeds.scan is None and seeds.manifest_fingerprint is None
    assert [(s.start, s.stop) for s in seeds.shards] == [(100, 104), (104, 108), (108, 110)]
    assert Complete().outputs_per_row(cfg_for(tiny_ckpt, **{"generate.samples_per_image": 3})) == 3
    with pytest.raises(ConfigError, match="passes the largest seed"):
        Complete().plan(cfg_for(tiny_ckpt, **{"generate.seed": 2**63 - 5, "generate.num_samples": 1,
                                              "generate.samples_per_image": 2}), SCAN)  # 10 rows x 2 seeds


def test_complete_checks_the_prompt_rows_against_the_model(tiny_ckpt, info):
    Complete().check(cfg_for(tiny_ckpt, **{"generate.prompt_rows": info.n_px - 1}), info)
    with pytest.raises(ConfigError, match=r"prompt_rows must be in \[0, 8\)"):
        Complete().check(cfg_for(tiny_ckpt, **{"generate.prompt_rows": info.n_px}), info)


def test_error_rows_redact_their_uri():
    row = error_row("a", "https://user:pass@host/x.jpg?X-Amz-Signature=abc", ImageError("read", "HTTP 404"))
    assert "pass" not in row["uri"] and "abc" not in row["uri"] and (row["stage"], row["error"]) == ("read", "HTTP 404")
    assert error_table([row]).schema == ERRORS_SCHEMA and error_table([]).num_rows == 0


def context(tiny_ckpt, info, task, kind, out, **over):
    cfg = cfg_for(tiny_ckpt, out, **over)
    read = RowReader(cfg, kind, info.n_px).read
    return ShardContext(cfg, task.resolve(cfg, info), load_model(tiny_ckpt, "fp32", "cpu"), threading.Lock(),
                        OutputFolder(str(out)), read)


def test_runners_write_their_schemas_with_the_metadata(tiny_ckpt, info, image_dir, tmp_path):
    rows = pa.table({"id": ["a", "b", "c"], "uri": [str(image_dir / n) for n in ("coffee.jpg", "text.jpg", "astronaut.jpg")]})
    stats = Stats()
    got = Extract().runner(context(tiny_ckpt, info, Extract(), "uri", tmp_path, **{"extract.layers": [1, 2]}))(
        Shard(0, 0, 3), rows, stats)
    emb = got["embeddings"]
    assert emb.schema.names == ["id", "uri", "embedding", "width", "height", "sha256"]
    assert emb.schema.field("embedding").type == pa.list_(pa.float32(), 2 * 32)
    assert emb.column("id").to_pylist() == ["a", "c"] and emb.schema.metadata[b"layers"] == b"1,2"
    assert got["errors"].schema == ERRORS_SCHEMA and got["errors"].column("id").to_pylist() == ["b"]
    assert stats.model_s > 0 and stats.preprocess_s > 0 and stats.read_s > 0  # the extractor's seconds reached Stats

    stats = Stats()
    samples = Generate().runner(context(tiny_ckpt, info, Generate(), "uri", tmp_path / "g"))(Shard(0, 5, 8), None, stats)
    t = samples["samples"]
    assert t.schema.names == ["seed", "tokens", "png"] and t.column("seed").to_pylist() == [5, 6, 7]
    assert t.schema.field("tokens").type == pa.list_(pa.uint16(), info.n_px * info.n_px)
    assert t.schema.metadata[b"task"] == b"generate" and stats.model_s > 0 and stats.read_s == 0

    ctx = context(tiny_ckpt, info, Complete(), "uri", tmp_path / "c", **{"generate.samples_per_image": 2,
                                                                         "generate.prompt_rows": 2})
    got = Complete().runner(ctx)(Shard(0, 0, 3), rows, Stats())
    t = got["samples"]
    assert t.schema.names == ["prompt_id", "sample_index", "seed", "tokens", "png"]
    assert t.column("prompt_id").to_pylist() == ["a", "a", "c", "c"] and t.column("sample_index").to_pylist() == [0, 1] * 2
    assert got["errors"].column("id").to_pylist() == ["b"]
