"""report.html: written beside _SUCCESS by every job (or not, with output.report off), never failing one; its
figures equal _SUCCESS; in a real headless Chromium it loads without console errors, every image decodes and the
screenshot is not blank."""
import io
import json
import logging

import numpy as np
import pytest
from browser import chromium, open_page
from conftest import write_manifest

from igpt_batch import config
from igpt_batch.cli import main
from igpt_batch.run import report
from igpt_batch.run.driver import run_job


def inputs(folder):
    """Real files: 16 digits (8x8 PNG), four photographs, and a file that is not an image."""
    from PIL import Image
    from skimage import data

    from igpt_batch.train_demo import digits_rgb

    folder.mkdir(parents=True)
    uris = []
    for i, rgb in enumerate(digits_rgb()[0][:16]):
        Image.fromarray(rgb).save(folder / f"digit-{i:02d}.png")
        uris.append(str(folder / f"digit-{i:02d}.png"))
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg", quality=90)
        uris.append(str(folder / f"{name}.jpg"))
    (folder / "notes.jpg").write_text("not an image")
    return uris + [str(folder / "notes.jpg")]


def job(root, **over):
    manifest = write_manifest(root / "m.parquet", inputs(root / "in"))
    cfg = config.load(None, {"input.manifest": str(manifest), "output.path": str(root / "out"),
                             "run.executor": "local", "run.shard_size": 6, "output.preview": 4, **over})
    return run_job(cfg, "extract"), root / "out"


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    return job(tmp_path_factory.mktemp("report"))


def shown(figures: dict) -> dict:
    return {k: float(v.replace(",", "")) for k, v in figures.items()}


def expected(success: dict) -> dict:
    want = {f"rows.{k}": v for k, v in success["rows"].items()}
    return want | {k: success[k] for k in report.FIGURES if success.get(k) is not None}


def test_every_job_writes_its_report_beside_success(done):
    summary, out = done
    page = (out / "report.html").read_text()
    success = json.loads((out / "_SUCCESS").read_text())
    assert success == summary and summary["rows"] == {"embeddings": 20, "errors": 1}
    for part in ("Summary", "Throughput over time", "Stage seconds", "Errors by reason", "Embeddings (PCA)",
                 "preview.png", "decode: "):
        assert part in page, part
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained
    commits = [json.loads(p.read_text()) for p in (out / "_commits").glob("*.json")]
    assert len(commits) == 4 and all(c["started_at"] <= c["ended_at"] for c in commits)
    assert "4 shards, 20 rows" in page


def test_report_off_and_a_failing_report_never_fails_the_job(tmp_path, monkeypatch, caplog):
    summary, out = job(tmp_path / "a", **{"output.report": False})
    assert (out / "_SUCCESS").exists() and not (out / "report.html").exists()
    monkeypatch.setattr(report, "build", lambda *a: 1 / 0)
    with caplog.at_level(logging.WARNING, logger="igpt_batch"):
        summary, out = job(tmp_path / "b")
    assert summary["rows"]["embeddings"] == 20 and (out / "_SUCCESS").exists() and not (out / "report.html").exists()
    assert "could not write report.html (ZeroDivisionError" in caplog.text


def test_report_command_rewrites_it_anywhere(done, tmp_path, capsys):
    _, out = done
    assert main(["report", str(out), "-o", str(tmp_path / "r.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text() == (out / "report.html").read_text()
    assert main(["report", str(tmp_path / "nowhere")]) == 2


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (make test installs it with "
                                                "apt-get when it can; else apt-get install -y chromium)")
def test_report_in_headless_chromium(done):
    from PIL import Image

    summary, out = done
    got = open_page(out / "report.html")
    assert got["errors"] == [] and got["external"] == []
    assert got["imgs"] == 1 and got["broken"] == 0  # preview.png
    # the thumbnails on the map: every row of the parts it reads is readable here; the map reads MAP_FILES=2 parts
    # spread over the shards (the first, 6 rows, and the last, 2): the driver's reads do not grow with shards
    assert got["svgImages"] == 8 and got["svgBroken"] == 0
    assert got["svgs"] == 4  # throughput, stage seconds, errors, map
    assert shown(got["figures"]) == pytest.approx(expected(json.loads((out / "_SUCCESS").read_text())), abs=5e-4)
    shot = np.asarray(Image.open(io.BytesIO(got["png"])).convert("RGB")).astype(float)
    assert shot.shape == (1600, 1100, 3)
    assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 50  # not blank: text, charts, pictures


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_ckpt):
    """Three real nights: 6 photos; then 2 new (one not an image), 1 re-encoded, 1 gone; then nothing new."""
    from PIL import Image
    from test_refresh import cfg_for, manifest, photos

    from igpt_batch.store.refresh import refresh

    root = tmp_path_factory.mktemp("store_report")
    d = root / "img"
    names = photos(d)
    (d / "notes.jpg").write_text("not an image")
    s = root / "store"
    nights = [refresh(cfg_for(tiny_ckpt, s, manifest(root / "m1.parquet", d, names[:6])))]
    Image.open(d / names[0]).save(d / names[0], quality=40)
    m2 = manifest(root / "m2.parquet", d, [names[0], *names[2:7], "notes.jpg"])
    nights.append(refresh(cfg_for(tiny_ckpt, s, m2)))
    Image.open(d / names[2]).save(d / names[2], quality=30)  # another jpg re-encoded
    nights.append(refresh(cfg_for(tiny_ckpt, s, m2)))
    return s, nights


def test_store_report_shows_each_night(store, tmp_path):
    from igpt_batch.store.layout import Store
    from igpt_batch.store.report import night_records

    s, nights = store
    assert main(["report", str(s)]) == 0
    page = (s / "report.html").read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    st = Store(str(s))
    (version,) = st.versions()
    records = night_records(st, version)
    got = [{k: r["summary"].get(k) for k in ("snapshot", "new", "changed", "deleted", "errors")} for r in records]
    assert got == [{k: n[k] for k in ("snapshot", "new", "changed", "deleted", "errors")} for n in nights]
    assert [(n["new"], n["changed"], n["deleted"], n["errors"]) for n in nights] == [(6, 0, 0, 0), (2, 1, 1, 1),
                                                                                     (0, 1, 0, 0)]
    assert main(["report", str(s), "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text() == page


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed")
def test_store_report_in_headless_chromium(store):
    from PIL import Image

    from igpt_batch.store.layout import Store

    s, nights = store
    page = s / "report.html"
    from igpt_batch.store.report import write

    write(str(s))
    got = open_page(page)
    assert got["errors"] == [] and got["external"] == [] and got["broken"] == 0 and got["svgBroken"] == 0
    assert got["svgs"] == 2  # the nights' bars, failed rows by reason
    st = Store(str(s))
    (version,) = st.versions()
    want = {}
    for n in nights:
        want |= {f"{version}/{n['snapshot']}/{k}": n[k] for k in ("new", "changed", "deleted", "errors", "live_rows")}
    want |= {f"{version}/{snap}/table_version": v for snap, v in st.kept_snapshots(version).items()}
    assert {k: v for k, v in shown(got["figures"]).items() if not k.endswith(("/duration_s", "/recall", "/duplicates"))} == want
    shot = np.asarray(Image.open(io.BytesIO(got["png"])).convert("RGB")).astype(float)
    assert shot.std() > 10 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 20  # not blank: tables and bars
