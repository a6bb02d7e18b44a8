"""What users read: a Ray night's stderr without lance's fork notice or colour codes, --help, mtime's one type."""
import os
import subprocess
import sys

import pytest
from conftest import write_manifest


def test_a_ray_night_prints_no_fork_notice_and_no_colour_codes(image_dir, tmp_path):
    """A night with the Ray executor (a local Ray of its own), stderr a pipe: worker lines come, plain."""
    names = ["coffee", "rocket"]
    m = write_manifest(tmp_path / "m.parquet", [str(image_dir / f"{n}.jpg") for n in names], names)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_COLOR_PREFIX", "RAY_ADDRESS")}
    r = subprocess.run([sys.executable, "-m", "igpt_batch.cli", "refresh", "--manifest", str(m), "--store",
                        str(tmp_path / "store"), "--model", "demo", "--layer", "0", "--executor", "ray",
                        "--workers", "1"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pid=" in r.stderr  # worker lines did reach the driver's stderr
    assert "\x1b[" not in r.stderr, r.stderr[-3000:]
    assert "fork-safe" not in r.stderr, r.stderr[-3000:]


def test_every_package_imported_is_declared():
    """Each third-party module the package imports (lazily too) comes from a distribution pyproject.toml names."""
    import ast
    import importlib.metadata
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    block = re.search(r"^dependencies = \[(.*?)^\]", (root / "pyproject.toml").read_text(), re.M | re.S).group(1)
    declared = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower().replace("_", "-")
                for d in re.findall(r'^\s*"([^"]+)"', block, re.M)}
    assert {"torch", "pyarrow", "scipy", "huggingface-hub"} <= declared
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for f in (root / "igpt_batch").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"igpt_batch", "__future__"}:
                if not {d.lower().replace("_", "-") for d in dists.get(top, [top])} & declared:
                    missing.setdefault(top, []).append(str(f.relative_to(root)))
    assert not missing, missing
    pins = dict(line.split("==") for line in (root / "constraints.txt").read_text().split() if "==" in line)
    assert all(d in {k.lower() for k in pins} for d in declared), declared - {k.lower() for k in pins}


def test_help_describes_every_subcommand_and_shows_the_choices():
    import argparse

    from igpt_batch.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"extract", "generate", "complete", "refresh", "export", "neighbors", "dedup",
                                "inspect", "probe", "demo"}
    for name, p in sub.choices.items():
        assert p.description and len(p.description) > 10, name
        assert p.description in p.format_help()
    for name in ("extract", "generate", "complete", "refresh"):
        text = " ".join(sub.choices[name].format_help().split())
        assert "--executor {ray,local}" in text and "--dtype {fp32,bf16,fp16,auto}" in text, name
    with pytest.raises(SystemExit):
        parser.parse_args(["extract", "--executor", "dask"])


@pytest.mark.parametrize("argv, layers", [
    (["--layer", "2", "OUT", "LABELS"], [2]),  # before the positionals, as extract takes it
    (["OUT", "LABELS", "--layer", "2", "--layer", "4"], [2, 4]),
    (["OUT", "LABELS", "--layers", "3"], [3]),
    (["OUT", "LABELS"], None),
])
def test_probe_layer_is_repeated_like_everywhere_else(argv, layers):
    from igpt_batch.cli import parse

    args = parse(["probe", *argv])
    assert (args.output_url, args.labels, args.layers) == ("OUT", "LABELS", layers)
