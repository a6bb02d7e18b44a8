"""Issue 18 items 5, 7, 13 (store side): no credential kept in a store, a killed first night recovers, a stale
_LATEST.json is repaired, and every night leaves a record."""
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import numpy as np
import pytest
from conftest import REPO, S3Server
from test_refresh import cfg_for, manifest, one_version, photos, photos_on_s3

from igpt_batch.errors import JobError
from igpt_batch.store.export import export
from igpt_batch.store.layout import Store
from igpt_batch.store.neighbors import THUMB, neighbors
from igpt_batch.store.refresh import read_current, refresh

KILL_INSIDE_CREATE = """
import os, signal, sys
import lance, numpy as np, pyarrow as pa
from igpt_batch.store.layout import Store, current_schema
schema = current_schema(32)
def batches():
    for i in range(30):
        n = 100
        yield pa.record_batch({"id": [f"{i}-{j}" for j in range(n)], "uri": ["u"] * n, "sha256": ["s"] * n,
                               "size": [1] * n, "mtime": ["m"] * n, "etag": [""] * n,
                               "embedding": pa.FixedSizeListArray.from_arrays(np.zeros(n * 32, np.float32), 32),
                               "width": [1] * n, "height": [1] * n, "snapshot": ["x"] * n, "deleted": [False] * n},
                              schema=schema)
        if i == 20:
            os.kill(os.getpid(), signal.SIGKILL)  # inside Lance's create: data files written, no version committed
lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), Store(sys.argv[1]).table_url(sys.argv[2]),
                    mode="create", max_rows_per_file=100)
"""


def test_first_night_killed_inside_the_lance_create_recovers(tiny_ckpt, tmp_path):
    from igpt_batch.model import checkpoint
    from igpt_batch.store.refresh import version_of

    d, store = tmp_path / "img", tmp_path / "store"
    m = manifest(tmp_path / "m.parquet", d, photos(d))
    version, _ = version_of(cfg_for(tiny_ckpt, store, m), checkpoint.read_info(tiny_ckpt))
    proc = subprocess.run([sys.executable, "-c", KILL_INSIDE_CREATE, str(store), version], cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True)
    table = store / version / "current.lance"
    assert proc.returncode == -9 and list((table / "data").glob("*.lance")) and not (table / "_versions").exists()
    s = refresh(cfg_for(tiny_ckpt, store, m))  # today: exit 2 'Dataset ... not found', every night
    assert (s["computed"], s["live_rows"]) == (8, 8)
    assert sorted(read_current(str(store)).column("id").to_pylist()) == sorted(photos(d))


def test_stale_latest_is_repaired_even_by_a_night_with_nothing_to_embed(tiny_ckpt, tmp_path):
    d, store = tmp_path / "img", tmp_path / "store"
    names = photos(d)
    m = manifest(tmp_path / "m.parquet", d, names)
    s1 = refresh(cfg_for(tiny_ckpt, store, m))
    stale = (store / "_LATEST.json").read_text()
    s2 = refresh(cfg_for(tiny_ckpt, store, manifest(tmp_path / "m2.parquet", d, names[:-1])))  # a deletion
    assert s2["snapshot"] > s1["snapshot"] and json.loads((store / "_LATEST.json").read_text())["snapshot"] == s2["snapshot"]
    (store / "_LATEST.json").write_text(stale)  # a night killed after its tag, before the pointer
    s3 = refresh(cfg_for(tiny_ckpt, store, manifest(tmp_path / "m2.parquet", d, names[:-1])))
    assert s3["snapshot"] is None and s3["computed"] == 0
    assert json.loads((store / "_LATEST.json").read_text())["snapshot"] == s2["snapshot"]  # today: still s1's


def test_every_night_leaves_a_record_failed_ones_too(tiny_ckpt, tmp_path):
    d, store = tmp_path / "img", tmp_path / "store"
    names = photos(d)
    (d / "broken.jpg").write_text("not an image")
    m = manifest(tmp_path / "m.parquet", d, names + ["broken.jpg"])
    with pytest.raises(JobError, match="1 of 9 manifest rows failed"):
        refresh(cfg_for(tiny_ckpt, store, m, **{"run.max_error_fraction": 0.01}))
    v = one_version(store)
    assert not (v / "_night").exists()  # the night manifest went with the failed night
    s = refresh(cfg_for(tiny_ckpt, store, m))
    refresh(cfg_for(tiny_ckpt, store, m))
    recs = Store(str(store)).night_summaries(v.name)
    assert [r["status"] for r in recs] == ["failed", "ok", "ok"]
    assert "1 of 9 manifest rows failed" in recs[0]["error"] and recs[0]["ended_at"] > recs[0]["started_at"]
    assert recs[1]["summary"]["snapshot"] == s["snapshot"] and recs[1]["summary"]["errors"] == 1
    assert recs[2]["summary"]["snapshot"] is None and recs[2]["summary"]["failed_unchanged"] == 1
    assert recs[1]["started_at"] < recs[1]["ended_at"] <= recs[2]["started_at"]


def _presigned(fs, keys: list[str], expires: int) -> list[str]:
    return [fs.sign(f"igpt-cred/{k}", expiration=expires) for k in keys]


def test_no_credential_is_kept_in_a_store(s3_server: S3Server, tiny_ckpt, tmp_path):
    """Presigned URLs and a user:pass@ URL: the table, failed.parquet, export and every store file keep none of
    their secrets; a re-signed URL is the same image (nothing read again); a stored row's picture is a grey tile."""
    from PIL import Image

    fs, names = photos_on_s3(s3_server, tmp_path / "img", "igpt-cred")
    host = s3_server.endpoint.split("://", 1)[1]

    def night(expires: int) -> tuple[dict, list[str]]:
        uris = _presigned(fs, names + ["missing.png"], expires) + [f"http://alice:hunter2pw@{host}/igpt-cred/{names[0]}"]
        ids = names + ["missing.png", "with-password"]
        return refresh(cfg_for(tiny_ckpt, tmp_path / "store", manifest_of(tmp_path / f"m{expires}.csv", uris, ids))), uris

    s1, uris1 = night(3600)
    assert s1["computed"] == 6 and s1["live_rows"] == 4 and s1["errors"] == 2
    signatures = [v for u in uris1 for k, v in parse_qsl(urlsplit(u).query) if k.lower().endswith("signature")]
    assert len(signatures) == 5 and all(len(sig) > 10 for sig in signatures)
    secrets = [*signatures, *(quote(sig, safe="") for sig in signatures), "hunter2pw", s3_server.key, s3_server.secret]
    cur = read_current(str(tmp_path / "store"), include_deleted=True)
    v = Store(str(tmp_path / "store"))
    failed = v.read_failed(v.resolve(None))
    kept = cur.column("uri").to_pylist() + failed.column("uri").to_pylist()
    assert len(kept) == 6 and sum("Signature=***" in u for u in kept) == 5 and not [u for u in kept if "alice" in u]
    assert not [s for s in secrets for u in kept if s in u]
    out = export(str(tmp_path / "store"), str(tmp_path / "export"))
    assert out["rows"] == 4
    assert not leaks(tmp_path / "store", secrets) and not leaks(tmp_path / "export", secrets)
    assert not (one_version(tmp_path / "store") / "_night").exists()
    # the URLs re-signed (other expiry, other signature): the same images, not moved, nothing fetched or embedded
    s2, uris2 = night(7200)
    assert uris2[0] != uris1[0]
    assert (s2["computed"], s2["unchanged"], s2["metadata_updates"], s2["precheck"]["hashed"]) == (0, 4, 0, 0)
    assert s2["failed_unchanged"] == 2 and s2["snapshot"] is None
    # a stored row's redacted uri cannot be fetched: its tile is grey
    sheet = tmp_path / "sheet.png"
    got = neighbors(str(tmp_path / "store"), row_id=names[0], k=2, contact_sheet=str(sheet))
    assert "***" in got["query"]["uri"]
    tiles = np.asarray(Image.open(sheet).convert("RGB"))
    cells = [tiles[2:2 + THUMB, 2 + i * (THUMB + 2): 2 + i * (THUMB + 2) + THUMB] for i in range(3)]
    assert tiles.shape[1] == 3 * THUMB + 8 and all((c == 128).all() for c in cells)  # query + 2 neighbours: grey


def manifest_of(path: Path, uris: list[str], ids: list[str]) -> str:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    pcsv.write_csv(pa.table({"id": ids, "uri": uris}), path)
    return str(path)


def leaks(root: Path, secrets: list[str]) -> list[str]:
    """Files under root holding one of the secrets, but the extract job's _plan/ (run/'s own working files)."""
    found = []
    for f in root.rglob("*"):
        if f.is_file() and "_plan" not in f.parts:
            data = f.read_bytes()
            found += [f"{f}: {s}" for s in secrets if s.encode() in data]
    return found


def test_dedup_needs_a_threshold(capsys):
    """The docs support no one default (0.95 merges unrelated photos on the demo model): the flag is required."""
    from igpt_batch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["dedup", "some-store"])
    assert e.value.code == 2 and "--threshold" in capsys.readouterr().err
