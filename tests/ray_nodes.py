"""A Ray cluster of several nodes on one machine for tests: `ray start` nodes, each with its own HF cache and model
cache (optionally its own mount namespace), a driver in a private mount namespace, and process helpers that find
and stop a cluster's processes by the folder they name (never `ray stop`)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, free_ports

from igpt_batch.model.resolve import DEMO_MODEL_DIR

BIN = Path(sys.executable).parent
HUB_ID, REVISION = "igpt/demo", "0123456789abcdef0123456789abcdef01234567"


def fill_hf_cache(hf_home: Path) -> None:
    """The layout huggingface_hub reads offline: hub/models--org--name/{snapshots/<rev>/..., refs/main}."""
    repo = hf_home / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(DEMO_MODEL_DIR, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


def pids_naming(folder: Path) -> list[int]:
    """Processes whose command line or open files name `folder` (this module's Ray processes, and only them)."""
    mark, found = str(folder), []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if mark in (p / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(p.name))
                continue
            if any(os.readlink(fd).startswith(mark) for fd in (p / "fd").iterdir()):
                found.append(int(p.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)


class Cluster:
    """A head (no CPUs) and worker nodes started with `ray start`, all under one folder `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.port, = free_ports(1)
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
        for k in ("RAY_ADDRESS", "HF_HOME", "IGPT_MODEL_CACHE"):
            self.env.pop(k, None)
        self.nodes: dict[str, int] = {}  # node name -> its raylet's port, which names its processes

    def ray_start(self, args: list[str], env: dict, setup: str = "") -> None:
        """`ray start`; with `setup`, in a mount namespace of its own whose mounts that node's processes keep."""
        cmd = [str(BIN / "ray"), "start", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
               f"--temp-dir={self.root / 'ray'}", *args]
        if setup:
            cmd = ["unshare", "-m", "--propagation", "private", "bash", "-c", f'set -e\n{setup}\nexec "$@"', "node", *cmd]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stdout + p.stderr

    def start(self) -> None:
        system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
        agent, = free_ports(1)
        self.ray_start(["--head", "--num-cpus=0", f"--port={self.port}", "--include-dashboard=false",
                        f"--dashboard-agent-listen-port={agent}", f"--system-config={json.dumps(system)}"], self.env)

    def add_node(self, name: str, cpus: int = 1, setup: str = "") -> None:
        """A worker node with its own HF_HOME (pre-filled, offline) and its own model cache; `setup` runs first,
        in the node's own mount namespace."""
        home = self.root / name
        fill_hf_cache(home / "hf")
        manager, agent = free_ports(2)
        env = {**self.env, "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1", "IGPT_MODEL_CACHE": str(home / "models")}
        self.ray_start([f"--address={self.address}", f"--num-cpus={cpus}", f"--node-manager-port={manager}",
                        f"--dashboard-agent-listen-port={agent}"], env, setup)
        self.nodes[name] = manager

    def drive(self, args: list[str], setup: str = "", timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
        """Run the CLI as a driver in its own mount namespace: /driver (a tmpfs) is its own, with its HF cache."""
        private = self.root / "driver"
        private.mkdir(exist_ok=True)
        env = {**self.env, "RAY_ADDRESS": self.address, "HF_HOME": f"{private}/hf", "HF_HUB_OFFLINE": "1",
               "IGPT_MODEL_CACHE": f"{private}/models"}
        script = "\n".join(["set -e", f"mount -t tmpfs -o size=256m igpt-driver {private}",
                            f"mount -t tmpfs igpt-driver-baked {self.root}/baked", setup, 'exec "$@"'])
        t0 = time.monotonic()
        p = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script, "driver",
                            str(BIN / "igpt-batch"), *args], env=env, capture_output=True, text=True, timeout=timeout)
        return p, time.monotonic() - t0

    def drive_async(self, args: list[str]) -> subprocess.Popen:
        """The driver as in drive(), left running; its stderr goes to a file (read it after wait())."""
        private = self.root / "driver"
        private.mkdir(exist_ok=True)
        env = {**self.env, "RAY_ADDRESS": self.address}
        script = f'set -e\nmount -t tmpfs igpt-driver {private}\nexec "$@"'
        self.stderr = open(self.root / "driver.err", "w+")
        return subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-c", script, "driver",
                                 str(BIN / "igpt-batch"), *args], env=env, stdout=subprocess.DEVNULL, stderr=self.stderr)

    def shutdown(self) -> None:
        if getattr(self, "stderr", None) is not None:
            self.stderr.close()
        stop(pids_naming(self.root))


def node_of(pid: int) -> list[int]:
    """The raylet that started worker `pid`, and every process under that raylet: one node, as its loss kills it."""
    def ppid(p: int) -> int:
        return int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])

    raylet = pid
    while "raylet" not in Path(f"/proc/{raylet}/cmdline").read_bytes().decode(errors="replace").split("\0")[0]:
        raylet = ppid(raylet)
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                children.setdefault(ppid(int(p.name)), []).append(int(p.name))
            except (OSError, IndexError):
                continue
    out, todo = [], [raylet]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out
