"""Bounded inputs: -k beyond the cap, YAML alias bombs, a null image in a bytes column, each refused or an error row."""
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_manifest

from igpt_batch import config
from igpt_batch.cli import main
from igpt_batch.run.driver import run_job
from igpt_batch.run.readers import read_output
from igpt_batch.store.index import MAX_K
from igpt_batch.store.refresh import refresh


@pytest.fixture(scope="module")
def store(tmp_path_factory, image_dir, one_torch_thread):
    d = tmp_path_factory.mktemp("bounds")
    names = ["coffee", "rocket", "chelsea"]
    m = write_manifest(d / "m.parquet", [str(image_dir / f"{n}.jpg") for n in names], names)
    s = refresh(config.load(None, {"model.name": "demo", "input.manifest": str(m), "refresh.store": str(d / "store"),
                                   "run.executor": "local", "extract.layers": [0]}))
    assert s["computed"] == 3
    return d / "store"


@pytest.mark.parametrize("argv", [["neighbors", "--id", "coffee"], ["dedup", "--threshold", "0.95"]])
@pytest.mark.parametrize("k", [str(MAX_K + 1), str(10**11), "99999999999999999999", "0"])
def test_k_beyond_the_cap_is_refused_before_any_work(store, capsys, argv, k):
    rc = main([argv[0], str(store), *argv[1:], "-k", k])
    err = capsys.readouterr().err
    assert rc == 2 and f"-k must be in [{1 if argv[0] == 'neighbors' else 2}, {MAX_K}]" in err and k in err


def test_k_up_to_the_cap_above_the_live_rows_gives_them_all(store, capsys):
    import json

    assert main(["neighbors", str(store), "--id", "coffee", "-k", str(MAX_K)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [h["id"] for h in out["neighbors"]][0] == "coffee" and len(out["neighbors"]) == 3


def bomb(levels: int) -> str:
    lines, prev = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'], "a0"
    for n in range(1, levels):
        lines.append(f"a{n}: &a{n} [" + ", ".join([f"*{prev}"] * 9) + "]")
        prev = f"a{n}"
    return "storage_options:\n" + "".join(f"  {line}\n" for line in lines)


@pytest.mark.parametrize("text, words", [
    (bomb(9), "expands to over"),
    ("storage_options:\n  a: &a [x, *a]\n", "expands to over"),  # an alias inside itself
    ("storage_options:\n  a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
])
def test_yaml_alias_bombs_are_refused_before_any_work(tmp_path, text, words):
    (tmp_path / "c.yaml").write_text(text)
    r = subprocess.run([sys.executable, "-m", "igpt_batch.cli", "extract", "--config", str(tmp_path / "c.yaml"),
                        "--manifest", "x", "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_yaml_anchors_within_the_limit_still_work(tmp_path):
    (tmp_path / "c.yaml").write_text(bomb(3) + "extract:\n  layers: [1, 2]\ngenerate:\n  seed: &s 7\n"
                                     "  num_samples: *s\n")
    cfg = config.load(str(tmp_path / "c.yaml"))
    assert cfg.generate.num_samples == 7 and len(cfg.storage_options["a2"]) == 9


def test_a_null_image_in_a_bytes_column_is_an_error_row(tiny_ckpt, image_dir, tmp_path):
    blobs = [(image_dir / "coffee.jpg").read_bytes(), None, (image_dir / "rocket.jpg").read_bytes()]
    pq.write_table(pa.table({"id": ["a", "b", "c"], "jpg": pa.array(blobs, pa.binary())}), tmp_path / "m.parquet")
    cfg = config.load(None, {"model.name": tiny_ckpt, "output.path": str(tmp_path / "out"), "run.executor": "local",
                             "extract.layers": [1], "input.manifest": str(tmp_path / "m.parquet"),
                             "input.bytes_column": "jpg", "output.contact_sheet": 0})
    s = run_job(cfg, "extract")
    assert s["rows"] == {"embeddings": 2, "errors": 1}
    e = read_output(str(tmp_path / "out"), "errors")
    assert e.column("id").to_pylist() == ["b"] and "bytes column is null" in e.column("error")[0].as_py()
    assert read_output(str(tmp_path / "out"), "embeddings").sort_by("id").column("id").to_pylist() == ["a", "c"]
