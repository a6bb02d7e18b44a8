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
    assert len(commits) == 4 and all(c["started_at"] <= c["committed_at"] for c in commits)
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
    assert got["svgImages"] == 20 and got["svgBroken"] == 0  # the thumbnails on the map: every row readable here
    assert got["svgs"] == 4  # throughput, stage seconds, errors, map
    assert shown(got["figures"]) == pytest.approx(expected(json.loads((out / "_SUCCESS").read_text())), abs=5e-4)
    shot = np.asarray(Image.open(io.BytesIO(got["png"])).convert("RGB")).astype(float)
    assert shot.shape == (1600, 1100, 3)
    assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 50  # not blank: text, charts, pictures
