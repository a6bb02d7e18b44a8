"""Installing: pyproject's ranges against constraints.txt's lock, the documented command lines, and the package
installed with --no-deps into a venv that holds the lowest Ray and pyarrow its ranges allow."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# The other Ray and pyarrow: the lowest of pyproject's ranges, so the lower bounds are what is tested.
OTHER = {"ray": "2.50.1", "pyarrow": "17.0.0"}


def requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            assert canonicalize_name(name) not in out, f"{name} pinned twice"
            out[canonicalize_name(name)] = version
    return out


def test_every_range_has_a_pin_inside_it():
    locked = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(locked[name], prereleases=True), f"{req.name}=={locked[name]} is outside {req}"
        assert not any(s.operator == "==" for s in req.specifier), f"pyproject.toml pins {req}: give a range"
    assert locked["torch"] == "2.13.0" and "+" not in locked["torch"]  # matches the CPU and the CUDA build alike
    assert "botocore" in locked and "aiobotocore" in locked and "pylance" in locked and "jsonschema" in locked
    assert OTHER["ray"] != locked["ray"] and OTHER["pyarrow"] != locked["pyarrow"]
    for name, version in OTHER.items():
        (req,) = [r for r in requirements() if canonicalize_name(r.name) == name]
        assert req.specifier.contains(version), f"{name}=={version} is not in range {req}"


def test_the_test_environment_is_the_lock():
    """Every installed dependency of igpt-batch[dev] (the whole closure) is pinned, at the installed version."""
    locked, seen, todo, missing, wrong = pins(), set(), requirements(), [], []
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            continue  # not for this platform
        installed = Version(dist.version).public
        if name not in locked:
            missing.append(f"{name}=={installed}")
        elif installed != locked[name]:
            wrong.append(f"{name}: installed {dist.version}, locked {locked[name]}")
        for r in map(Requirement, dist.requires or []):
            extras = req.extras or {""}
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras):
                todo.append(r)
    assert not missing, f"add to constraints.txt: {missing}"
    assert not wrong, f"the environment is not the lock (make install): {wrong}"


def test_make_and_ci_install_from_the_lock():
    make = (REPO / "Makefile").read_text()
    assert "pip install -q -c constraints.txt -e '.[dev]'" in make
    assert re.search(r"^\$\(VENV\)/\.installed: pyproject\.toml constraints\.txt", make, re.M)
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test"


def shell_lines(markdown: str) -> list[str]:
    """Commands in the ```bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        block = re.sub(r"<<'EOF'\n.*?\nEOF\n", "\n", block, flags=re.S).replace("\\\n", " ")
        out += [line.split(" #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]
    return out


def documented_lines() -> list[str]:
    readme = (REPO / "README.md").read_text()
    gpu = readme.split("## GPU install", 1)[1].split("\n## ", 1)[0]
    return shell_lines((REPO / "docs" / "INSTALL.md").read_text()) + shell_lines(gpu)


def test_documented_pip_lines_use_the_locked_versions():
    locked, n = pins(), 0
    for line in (seg.strip() for full in documented_lines() for seg in full.split("&&")):
        words = shlex.split(line)
        if not (words[0].endswith("pip") and words[1] == "install"):
            continue
        n += 1
        args = words[words.index("install") + 1:]
        it = iter(args)
        for a in it:
            if a in ("-c", "--index-url", "--extra-index-url"):
                next(it)
                continue
            if a.startswith("-") or a.startswith((".", "/home/ray/", "~/")):
                continue
            req = Requirement(a)
            assert str(req.specifier) == f"=={locked[canonicalize_name(req.name)]}", line
        if "torch==" not in line:
            assert "-c constraints.txt" in line or "-c /home/ray" in line, f"installs without the lock: {line}"
    assert n >= 4


def test_documented_model_download_and_run_lines_parse(tmp_path):
    from igpt_batch import cli

    lines = documented_lines()
    hf = [line for line in lines if line.startswith("hf download")]
    runs = [line for line in lines if line.startswith("igpt-batch ")]
    assert hf and runs
    for line in hf:  # offline: the download fails, but not on its options (a usage error exits 2)
        words = shlex.split(line)
        words[words.index("--local-dir") + 1] = str(tmp_path / "m")
        p = subprocess.run([str(BIN / "hf"), *words[1:], "--dry-run"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert p.returncode != 2 and "No such option" not in p.stderr, p.stderr[-2000:]
        assert {"*.json", "*.safetensors"} <= set(words)  # what checkpoint.py accepts, nothing else
    for line in runs:
        args = cli.build_parser().parse_args(shlex.split(line)[1:])
        cfg = cli.config_from_args(args, args.command)
        assert cfg.model.name.startswith("/shared/models/") and cfg.model.dtype == "bf16"


def venv_site(python: Path) -> Path:
    return Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())


@pytest.fixture(scope="module")
def other_ray_and_pyarrow() -> Path:
    """Ray and pyarrow at OTHER's versions, in a folder cached across runs (keyed by the versions): fetching and
    unpacking Ray takes about 25 s, the rest of the test about as long."""
    cache = Path(os.environ.get("IGPT_TEST_CACHE", Path.home() / ".cache" / "igpt-batch-tests"))
    target = cache / ("py%d%d-" % sys.version_info[:2] + "-".join(f"{k}-{v}" for k, v in sorted(OTHER.items())))
    if not (target / ".complete").exists():
        tmp = Path(f"{target}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        pins_ = [f"{k}=={v}" for k, v in OTHER.items()]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp), *pins_],
                       check=True, timeout=900)
        (tmp / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


@pytest.mark.timeout(900)
def test_no_deps_install_next_to_another_ray_and_pyarrow_runs_extract(tmp_path, other_ray_and_pyarrow):
    # A fresh venv whose own site-packages is looked at first, then the other Ray/pyarrow, then (for torch,
    # transformers and the rest) this environment's site-packages: .pth lines are appended in file-name order.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = venv_site(py)
    (site / "a_other_ray.pth").write_text(f"{other_ray_and_pyarrow}\n")
    (site / "z_main_env.pth").write_text(f"{venv_site(Path(sys.executable))}\n")
    # the package from a copy of its source (a build in the repo would leave build/ behind), without deps
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "igpt_batch", src / "igpt_batch", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    "--no-build-isolation", str(src)], check=True, timeout=300)
    probe = ("import igpt_batch, ray, pyarrow, torch; "
             "print(igpt_batch.__file__, ray.__version__, pyarrow.__version__, torch.__version__)")
    where, ray_v, pa_v, _ = subprocess.check_output([str(py), "-c", probe], text=True, cwd=tmp_path).split()
    assert (ray_v, pa_v) == (OTHER["ray"], OTHER["pyarrow"]) and where.startswith(str(site))

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["id,uri"]
    (tmp_path / "images").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        rows.append(f"img{i},images/{i}.png")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    p = subprocess.run([str(venv / "bin" / "igpt-batch"), "extract", "--model", "demo", "--manifest",
                        str(tmp_path / "manifest.csv"), "--output", str(out), "--workers", "1", "--cpus-per-worker", "0.5",
                        "--torch-threads", "1"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    job = json.loads((out / "_job.json").read_text())
    assert job["versions"]["ray"] == OTHER["ray"] and job["versions"]["pyarrow"] == OTHER["pyarrow"]
    import pyarrow.parquet as pq

    emb = pq.read_table(out / "embeddings").column("embedding")
    assert len(emb) == 6 and len(emb[0].values) == 128  # the demo model's width, one layer
