"""The change feed: three real nights with known changes give exactly those rows; a night with none gives none."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_manifest
from test_refresh import cfg_for, manifest, photos

from igpt_batch.cli import main
from igpt_batch.store.changes import changes
from igpt_batch.store.refresh import read_current, refresh


def feed(store, since, until=None, **kw) -> dict:
    rows = [r for t in changes(str(store), since, until, **kw) for r in t.to_pylist()]
    assert len({r["id"] for r in rows}) == len(rows)  # one row per id
    return {r["id"]: r for r in rows}


def kinds(rows: dict) -> dict:
    return {i: (r["kind"], r["night"]) for i, r in rows.items()}


def test_three_nights_of_changes(tiny_ckpt, tmp_path, capsys):
    from PIL import Image

    d = tmp_path / "img"
    names = photos(d)
    store = tmp_path / "store"
    n1 = refresh(cfg_for(tiny_ckpt, store, manifest(tmp_path / "m1.parquet", d, names[:6])))["snapshot"]
    # night 2: one new image, one re-encoded (new bytes, new embedding), one gone from the manifest
    Image.open(d / names[0]).save(d / names[0], quality=40)
    n2 = refresh(cfg_for(tiny_ckpt, store, manifest(tmp_path / "m2.parquet", d, [names[0], *names[2:7]])))["snapshot"]
    got = feed(store, n1, n2)
    assert kinds(got) == {names[6]: ("inserted", n2), names[0]: ("updated", n2), names[1]: ("deleted", n2)}
    live = {r["id"]: r["embedding"] for r in read_current(str(store), snapshot=n2).to_pylist()}
    for i in (names[6], names[0]):
        np.testing.assert_array_equal(got[i]["embedding"], live[i])
    assert got[names[1]]["embedding"] is None
    # night 3: the gone one comes back unchanged, another leaves; night 1 falls out of retention
    m3 = manifest(tmp_path / "m3.parquet", d, [names[0], names[1], *names[3:7]])
    n3 = refresh(cfg_for(tiny_ckpt, store, m3, **{"refresh.keep_current": 2}))["snapshot"]
    got = feed(store, n2)
    assert kinds(got) == {names[1]: ("revived", n3), names[2]: ("deleted", n3)}
    np.testing.assert_array_equal(got[names[1]]["embedding"], live_at(store, n3)[names[1]])
    assert feed(store, n3) == {} and feed(store, n2, n2) == {}
    with pytest.raises(ValueError, match=f"pruned by retention.*oldest kept night is {n2}"):
        feed(store, n1)
    # a night with nothing to embed publishes no night and changes nothing
    assert refresh(cfg_for(tiny_ckpt, store, m3)).get("snapshot") is None
    assert feed(store, n3) == {}
    # the command: Parquet with the embeddings, or JSON lines; a pruned --since exits 2 naming the oldest kept night
    assert main(["changes", str(store), "--since", n2, "--output", str(tmp_path / "c.parquet")]) == 0
    t = pq.read_table(tmp_path / "c.parquet")
    assert sorted(t.column("id").to_pylist()) == sorted([names[1], names[2]]) and t.schema.field("embedding").type.list_size == 32
    capsys.readouterr()
    assert main(["changes", str(store), "--since", n2, "--until", n3]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sorted((x["id"], x["kind"]) for x in lines) == sorted([(names[1], "revived"), (names[2], "deleted")])
    assert main(["changes", str(store), "--since", n1]) == 2
    assert n2 in capsys.readouterr().err


def live_at(store, night) -> dict:
    return {r["id"]: r["embedding"] for r in read_current(str(store), snapshot=night).to_pylist()}


def test_dropped_ids_are_deletions(tiny_ckpt, tmp_path):
    d = tmp_path / "img"
    names = photos(d)[:4]
    store = tmp_path / "store"
    drop = {"refresh.deleted": "drop"}
    n1 = refresh(cfg_for(tiny_ckpt, store, manifest(tmp_path / "m1.parquet", d, names), **drop))["snapshot"]
    n2 = refresh(cfg_for(tiny_ckpt, store, manifest(tmp_path / "m2.parquet", d, names[1:]), **drop))["snapshot"]
    assert names[0] not in live_at(store, n2)
    assert kinds(feed(store, n1, n2)) == {names[0]: ("deleted", n2)}


def moved_nights(tiny_ckpt, work, store, **so) -> tuple[list[str], str, str, object]:
    """Two nights of four photos under `work`: night 2 moves one (same bytes, new path) and embeds nothing.
    Returns (names, night 1, night 2, the photos' folder)."""
    d = work / "img"
    names = photos(d)[:4]
    n1 = refresh(cfg_for(tiny_ckpt, store, manifest(work / "m1.parquet", d, names), **so))["snapshot"]
    (d / "moved").mkdir()
    shutil.move(d / names[1], d / "moved" / names[1])
    uris = [str(d / n) for n in names]
    uris[1] = str(d / "moved" / names[1])
    s2 = refresh(cfg_for(tiny_ckpt, store, write_manifest(work / "m2.parquet", uris, names), **so))
    assert (s2["computed"], s2["metadata_updates"]) == (0, 1)
    return names, n1, s2["snapshot"], d


def test_metadata_only_changes_only_with_include_metadata(tiny_ckpt, tmp_path, capsys):
    from PIL import Image

    store = tmp_path / "store"
    names, n1, n2, d = moved_nights(tiny_ckpt, tmp_path, store)
    Image.open(d / names[0]).save(d / names[0], quality=40)
    n3 = refresh(cfg_for(tiny_ckpt, store, tmp_path / "m2.parquet"))["snapshot"]
    assert feed(store, n1, n2) == {}  # left out by default: the embedding did not change
    assert kinds(feed(store, n1)) == {names[0]: ("updated", n3)}
    got = feed(store, n1, include_metadata=True)
    assert kinds(got) == {names[1]: ("metadata", n2), names[0]: ("updated", n3)}
    np.testing.assert_array_equal(got[names[1]]["embedding"], live_at(store, n1)[names[1]])
    assert kinds(feed(store, n1, n2, include_metadata=True)) == {names[1]: ("metadata", n2)}
    assert kinds(feed(store, n2, include_metadata=True)) == {names[0]: ("updated", n3)}
    capsys.readouterr()
    assert main(["changes", str(store), "--since", n1, "--include-metadata"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sorted((x["id"], x["kind"]) for x in lines) == sorted([(names[1], "metadata"), (names[0], "updated")])


def test_changes_on_s3_equal_those_of_a_local_store(s3_server, tiny_ckpt, tmp_path):
    """The same three nights into a local store and an S3 store (SeaweedFS) give the same changes."""
    from PIL import Image

    s3_server.fs().mkdir("igpt-changes")
    found = {}
    for name, url, so in (("local", str(tmp_path / "store"), {}),
                          ("s3", "s3://igpt-changes/store", {"storage_options": s3_server.storage_options()})):
        work = tmp_path / name
        names, n1, n2, d = moved_nights(tiny_ckpt, work, url, **so)
        Image.open(d / names[0]).save(d / names[0], quality=40)
        m3 = write_manifest(work / "m3.parquet", [str(d / names[0]), str(d / "moved" / names[1])], names[:2])
        n3 = refresh(cfg_for(tiny_ckpt, url, m3, **so))["snapshot"]  # names[0] changed, names[2:] left
        nights = {n1: 1, n2: 2, n3: 3}
        rows = feed(url, n1, include_metadata=True, **so)
        found[name] = {i: (r["kind"], nights[r["night"]], r["embedding"]) for i, r in rows.items()}
        assert {i: k[:2] for i, k in found[name].items()} == {
            names[0]: ("updated", 3), names[1]: ("metadata", 2), names[2]: ("deleted", 3), names[3]: ("deleted", 3)}
        assert kinds(feed(url, n2, n3, **so)) == {names[0]: ("updated", n3), names[2]: ("deleted", n3),
                                                  names[3]: ("deleted", n3)}
    assert found["s3"] == found["local"]
