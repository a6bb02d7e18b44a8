"""The command line: exit codes, fail-fast messages, inspect --verify, and the demo command."""
import json
from pathlib import Path

import pyarrow.parquet as pq

from igpt_batch.cli import main


def test_bad_values_and_manifests_exit_2_naming_the_problem(tiny_ckpt, tmp_path, capsys):
    assert main(["generate", "--model", tiny_ckpt, "--output", str(tmp_path / "o"), "--top-p", "7"]) == 2
    assert "generate.top_p must be in (0, 1]" in capsys.readouterr().err
    (tmp_path / "empty.csv").write_text("id,uri\n")
    assert main(["extract", "--model", tiny_ckpt, "--manifest", str(tmp_path / "empty.csv"), "--output", str(tmp_path / "o")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["extract", "--model", str(tmp_path / "no-such-model"), "--manifest", str(tmp_path / "empty.csv"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_hub_id_goes_through_the_hub_path_and_fails_clearly_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    assert main(["generate", "--model", "openai/imagegpt-small", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot fetch model 'openai/imagegpt-small' from the Hugging Face hub" in err
    assert not (tmp_path / "o").exists()


def test_generate_then_inspect_and_verify(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["generate", "--model", tiny_ckpt, "--output", str(out), "--num-samples", "5", "--shard-size", "2",
                 "--executor", "local", "--temperature", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == {"samples": 5} and summary["shards"] == 3
    assert main(["inspect", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "3 committed of 3 planned" in text and "samples:     5 rows in 3 files" in text and "verify: ok" in text
    # tamper: a committed file loses rows -> verify fails
    part = out / "samples" / "part-00001.parquet"
    pq.write_table(pq.read_table(part).slice(0, 1), part)
    assert main(["inspect", str(out), "--verify"]) == 1
    assert "has 1 rows, commit says 2" in capsys.readouterr().out


def test_demo_writes_every_output(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "demo"), "--num-samples", "8", "--executor", "local"]) == 0
    d = tmp_path / "demo"
    for rel in ("extract/_SUCCESS", "extract/_job.json", "extract/embeddings/part-00000.parquet",
                "extract/errors/part-00000.parquet", "extract/_commits/part-00000.json", "extract/preview.png",
                "generate/_SUCCESS", "generate/samples/part-00000.parquet", "generate/contact_sheet.png"):
        assert (d / rel).exists(), rel
    emb = pq.read_table(d / "extract" / "embeddings")
    assert emb.num_rows == 200 and pq.read_table(d / "extract" / "errors").column("id").to_pylist() == ["broken"]
    assert pq.read_table(d / "generate" / "samples").num_rows == 8


def test_every_flag_is_in_the_readme_and_its_help_shows_the_config_default(capsys):
    import re

    import pytest
    from conftest import REPO

    from igpt_batch.cli import FLAGS, TASK_FLAGS
    from igpt_batch.config import JobConfig

    table = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `--")]
    documented = {flag for line in table for flag in re.findall(r"`(--[a-z-]+)", line.split("|")[1])}
    assert set(FLAGS) <= documented, sorted(set(FLAGS) - documented)
    keys = " ".join(line.split("|")[2] for line in table)
    assert all(f"`{key}`" in keys or f"`{key.split('.')[0]}.*`" in keys for key, _, _ in FLAGS.values())
    with pytest.raises(SystemExit):
        main(["refresh", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default {JobConfig().refresh.keep_current}" in text and f"default {JobConfig().input.read_timeout}" in text
    assert all(flag in text for flag in TASK_FLAGS["refresh"]) and "--output" not in text


def _code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own refusals
        return e.code


def test_exit_codes_of_every_command(tiny_ckpt, image_dir, tmp_path, capsys):
    """0 done; 1 the job ran but failed; 2 refused before any work: the README's contract, command by command."""
    m = tmp_path / "m.csv"
    m.write_text("id,uri\n" + "".join(f"r{i},{image_dir / n}\n" for i, n in enumerate(["coffee.jpg", "text.jpg"])))
    common = ["--model", tiny_ckpt, "--executor", "local", "--torch-threads", "1"]
    missing = str(tmp_path / "nope.csv")
    refused = {
        "extract": ["extract", *common, "--manifest", missing, "--output", str(tmp_path / "e")],
        "generate": ["generate", *common, "--output", str(tmp_path / "g"), "--top-k", "-1"],
        "complete": ["complete", *common, "--manifest", str(m), "--output", str(tmp_path / "c"), "--prompt-rows", "99"],
        "refresh": ["refresh", *common, "--manifest", str(m)],  # no --store
        "export": ["export", str(tmp_path / "no-store"), str(tmp_path / "x")],
        "neighbors": ["neighbors", str(tmp_path / "no-store"), "--id", "a"],
        "dedup": ["dedup", str(tmp_path / "no-store"), "--threshold", "0.9"],
        "probe": ["probe", str(tmp_path / "no-output"), missing],
        "inspect": ["inspect", str(tmp_path), "--no-such-flag"],
        "demo": ["demo", "--executor", "nowhere"],
    }
    for command, argv in refused.items():
        assert _code(argv) == 2, command
        assert "Traceback" not in capsys.readouterr().err, command
    assert _code(["extract", *common, "--manifest", str(m), "--output", str(tmp_path / "e1"),
                  "--max-error-fraction", "0.1"]) == 1  # one of two rows cannot decode
    assert "input rows failed" in capsys.readouterr().err
    assert _code(["inspect", str(tmp_path / "e1")]) == 0
    assert _code(["generate", *common, "--output", str(tmp_path / "g1"), "--num-samples", "2", "--contact-sheet", "0"]) == 0


def test_a_lance_error_during_a_night_is_exit_1_with_a_message_not_a_bad_input(tiny_ckpt, image_dir, tmp_path, capsys):
    """Exit 2 is only for the project's own config and input errors found before work: a table whose data files
    vanished makes Lance fail mid-night, and that is a failed run (1), named, without a traceback."""
    import shutil

    from igpt_batch.store.layout import Store

    photos = tmp_path / "photos"
    photos.mkdir()
    for n in ("coffee.jpg", "rocket.jpg"):
        shutil.copy(image_dir / n, photos / n)
    m = tmp_path / "m.csv"
    m.write_text("id,uri\n" + "".join(f"{n},{photos / n}\n" for n in ("coffee.jpg", "rocket.jpg")))
    argv = ["refresh", "--model", tiny_ckpt, "--executor", "local", "--torch-threads", "1", "--manifest", str(m),
            "--store", str(tmp_path / "store")]
    assert _code(argv) == 0
    store = Store(str(tmp_path / "store"))
    data = Path(store.table_url(store.latest()["version"]).removeprefix("file://")) / "data"
    for f in data.iterdir():
        f.unlink()  # the table's rows are gone from under it
    shutil.copy(image_dir / "chelsea.jpg", photos / "rocket.jpg")  # a changed row: the night must merge
    capsys.readouterr()
    assert _code(argv) == 1
    err = capsys.readouterr().err
    assert "igpt-batch: failed:" in err or "igpt-batch: job failed:" in err, err
    assert "Traceback" not in err and "igpt-batch: error:" not in err, err
