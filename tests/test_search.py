"""neighbors and dedup over a refresh store of real photos with planted copies (exact; the index: test_index.py)."""
import functools
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import job_cfg, write_manifest
from PIL import Image

from igpt_batch.cli import main
from igpt_batch.store.refresh import refresh

# skimage photos (grey ones drawn as RGB). The demo model's layer 0 (8x8 px), measured on this store: a copy (JPEG q30,
# half size, left-right flip) has cosine >= 0.9987 with its original and its other copies, two unrelated images
# <= 0.9751 (<= 0.9798 with copies of all 18). A random tiny checkpoint does not separate them (all ~0.9998).
NAMES = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
         "colorwheel", "camera", "coins", "moon", "brick", "grass", "gravel", "clock", "page", "text", "cell"]
PLANTED = ["astronaut", "coffee", "chelsea", "rocket"]  # each stored with a q30 JPEG, a half-size and a flipped copy
COPIES = {"q30": lambda im, p: im.save(p, quality=30), "half": lambda im, p: im.resize((im.width // 2, im.height // 2)).save(p, quality=85),
          "flip": lambda im, p: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(p)}
THRESHOLD = 0.99  # between the two measured figures above


def photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


cfg_for = functools.partial(job_cfg, "demo", keys=("refresh.store", "input.manifest"),  # (store, manifest, **over)
                            **{"run.executor": "local", "run.shard_size": 64, "extract.layers": [0]})


def family(row_id: str) -> str:
    return row_id.split("~")[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory, one_torch_thread):
    """One night over the 18 photos (PNG) and 3 copies of each planted one (ids name, name~q30, ...)."""
    d = tmp_path_factory.mktemp("photos")
    img = d / "img"  # the images' folder may not hold the store
    img.mkdir()
    ids, uris = [], []
    for name in NAMES:
        im = photo(name)
        im.save(img / f"{name}.png")
        ids, uris = ids + [name], uris + [str(img / f"{name}.png")]
        for kind, save in COPIES.items() if name in PLANTED else ():
            p = img / f"{name}-{kind}.{'png' if kind == 'flip' else 'jpg'}"
            save(im, p)
            ids, uris = ids + [f"{name}~{kind}"], uris + [str(p)]
    s = refresh(cfg_for(d / "store", write_manifest(d / "m.parquet", uris, ids)))
    assert s["computed"] == len(NAMES) + 3 * len(PLANTED) and s["errors"] == 0
    return d


def cli(capsys, *argv) -> tuple[int, dict | None, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc == 0 else None), err


def test_nearest_is_itself_and_copies_rank_above_unrelated(store, capsys):
    for name in PLANTED:
        rc, got, _ = cli(capsys, "neighbors", str(store / "store"), "--id", name, "-k", "6")
        hits = got["neighbors"]
        assert rc == 0 and got["index"] is False and hits[0]["id"] == name and abs(hits[0]["score"] - 1.0) < 1e-5
        assert {family(h["id"]) for h in hits[:4]} == {name}  # itself and its three copies, before anything else
        assert hits[3]["score"] > 0.998 and hits[4]["score"] < 0.98 and family(hits[4]["id"]) != name
        assert hits[0]["uri"].endswith(f"{name}.png")


def test_an_image_from_outside_is_embedded_with_the_store_model(store, tmp_path, capsys):
    photo("coffee").resize((300, 200)).save(tmp_path / "new.jpg", quality=50)  # a copy the store has never seen
    rc, got, _ = cli(capsys, "neighbors", str(store / "store"), "--image", str(tmp_path / "new.jpg"), "-k", "5")
    assert rc == 0 and [family(h["id"]) for h in got["neighbors"][:4]] == ["coffee"] * 4
    assert got["neighbors"][3]["score"] > 0.998 and got["neighbors"][4]["score"] < 0.98
    rc, got, _ = cli(capsys, "neighbors", str(store / "store"), "--image", str(store / "img" / "moon.png"), "-k", "1")
    assert got["neighbors"][0]["id"] == "moon" and abs(got["neighbors"][0]["score"] - 1.0) < 1e-5  # same pixels


def test_contact_sheet_with_a_grey_tile_for_a_lost_source(store, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    rc, got, _ = cli(capsys, "neighbors", str(store / "store"), "--id", "rocket", "-k", "3", "--contact-sheet", str(sheet))
    assert rc == 0 and got["contact_sheet"] == str(sheet)
    pic = np.asarray(Image.open(sheet))
    assert pic.shape == (64 + 4, 4 * 64 + 5 * 2, 3)  # the query and 3 neighbours, 64 px tiles, 2 px white gaps
    first = pic[2:66, 2:66]
    assert np.array_equal(first, np.asarray(Image.open(store / "img" / "rocket.png").resize((64, 64), Image.Resampling.BILINEAR)))
    # a source that cannot be read any more is drawn grey
    from igpt_batch.store.neighbors import write_sheet

    write_sheet(str(sheet), [str(store / "img" / "rocket.png"), str(tmp_path / "gone.png")], None)
    pic = np.asarray(Image.open(sheet))
    assert (pic[2:66, 68:132] == 128).all() and not (pic[2:66, 2:66] == 128).all()


def test_bad_input_exits_2(store, tmp_path, capsys):
    (tmp_path / "bad.jpg").write_text("not an image")
    for argv, words in [(["--id", "nope"], "id 'nope' is not in"), (["--image", str(tmp_path / "bad.jpg")], "cannot read image"),
                        (["--id", "coffee", "--snapshot", "20200101T000000Z"], "not a kept night")]:
        rc, _, err = cli(capsys, "neighbors", str(store / "store"), *argv)
        assert rc == 2 and "igpt-batch: error:" in err and words in err
    (tmp_path / "empty").mkdir()
    rc, _, err = cli(capsys, "dedup", str(tmp_path / "empty"), "--threshold", "0.99")
    assert rc == 2 and "no refresh versions" in err


def test_dedup_finds_every_planted_group_and_merges_nothing_else(store, tmp_path, capsys):
    out = tmp_path / "dups.parquet"
    rc, got, _ = cli(capsys, "dedup", str(store / "store"), "--threshold", str(THRESHOLD), "--output", str(out))
    assert rc == 0 and got["groups"] == len(PLANTED) and got["duplicates"] == 3 * len(PLANTED)
    assert got["live_rows"] == len(NAMES) + 3 * len(PLANTED) and got["index"] is False
    t = pq.read_table(out).to_pylist()
    groups = {}
    for r in t:
        groups.setdefault(r["group"], set()).add(r["id"])
        assert r["group_size"] == 4 and r["score"] >= THRESHOLD and r["uri"]
    assert sorted(map(sorted, groups.values())) == sorted(sorted([n, *(f"{n}~{k}" for k in COPIES)]) for n in PLANTED)
