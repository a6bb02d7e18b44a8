"""bench/capacity.py: its figures against hand computation, and the doc holds its current output."""
import pytest
from conftest import REPO, bench_module

C = bench_module("capacity")

MEDIUM = next(m for m in C.MODELS if m.name == "imagegpt-medium")
H100 = next(g for g in C.GPUS if g.name == "H100")


def test_work_per_image_by_hand():
    # medium, layer 18: 18 * (24 * 1024^2 * 1024 + 2 * 1024^2 * 1024) = 18 * 26 * 2^30
    assert C.extract_flops(MEDIUM) == 18 * 26 * 2**30
    small = C.MODELS[0]
    assert C.extract_flops(small) == 12 * (24 * 512**2 * 1024 + 2 * 1024**2 * 512)  # 90.2 GFLOP
    assert C.extract_flops(MEDIUM, layer=36) == 2 * C.extract_flops(MEDIUM)  # truncation halves the work
    # generate ~ twice the extract work at half depth, plus the head: 36 * (24 d^2 T + 2 T (T+1) d) + 2 d V T
    assert C.generate_flops(MEDIUM) == pytest.approx(1.0062e12, rel=1e-4)
    assert C.kv_cache_bytes(MEDIUM) == 2 * 36 * 1024 * 1024 * 2 == 150_994_944
    assert C.kv_read_bytes(MEDIUM) / 1e9 == pytest.approx(77.2, abs=0.05)  # the KV-read floor BENCHMARKS.md quotes
    assert MEDIUM.params / 1e6 == pytest.approx(455, abs=1)  # the paper's iGPT-M
    assert C.MODELS[2].params / 1e9 == pytest.approx(1.36, abs=0.01)  # iGPT-L, 1.4B


def test_ceilings_and_dollars_by_hand():
    c = C.ceilings(MEDIUM, H100)
    assert c["extract"] == pytest.approx(989.4e12 / 502.5e9, rel=1e-3)  # ~1,969 images/s
    b = c["batch"]
    assert b == int((0.9 * 80e9 - MEDIUM.params * 2) // C.kv_cache_bytes(MEDIUM))
    bytes_per_image = C.kv_read_bytes(MEDIUM) + 1024 * MEDIUM.params * 2 / b
    assert c["generate"] == pytest.approx(3352e9 / bytes_per_image) and c["generate_bound"] == "memory"
    assert C.dollars_per_million(1000 / 3600, 2.0) == pytest.approx(2000.0)  # 1,000 images/h at $2/h


def test_script_runs_and_the_doc_holds_its_output(capsys):
    assert C.main([]) == 0
    out = capsys.readouterr().out
    assert "| imagegpt-medium | extract | H100 | 1,968.9 |" in out
    doc = (REPO / "docs" / "CAPACITY.md").read_text()
    assert out.strip() in doc, "docs/CAPACITY.md is out of date: paste `python bench/capacity.py` into it"
    assert C.main(["--price", "H100=3.44"]) == 0
    price = capsys.readouterr().out
    assert "| 3.440 |" in price and f"| {C.dollars_per_million(C.ceilings(MEDIUM, H100)['extract'], 3.44):,.2f} |" in price
