"""The Ray cluster as the driver sees it: join it or start a local one, its live nodes, what they can place, and
the GPUs a worker asks for."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings

from igpt_batch.uris import call_with_deadline

_STARTED_RAY = []  # the Ray this process started itself (a local one), once it has
_STARTING: list[tuple[threading.Thread, dict]] = []  # a start of Ray under way in the background (start_ray_early)


def start_ray_early(address: str | None) -> None:
    """Start (or join) Ray in a background thread, so that the driver goes on planning meanwhile; the next
    init_ray waits for it and raises what it raised. A no-op once Ray is up or starting. The thread then stays,
    idle, for the life of the process: a local Ray's processes die with the thread that started them
    (PR_SET_PDEATHSIG), and so with this process, as when ray.init runs in the main thread."""
    ray = sys.modules.get("ray")
    if _STARTING or (ray is not None and ray.is_initialized()):
        return
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init sets from the main thread
    logging.getLogger("ray._private.worker").addFilter(  # ... and the warning it gives when started from another one
        lambda record: "SIGTERM handler is not set" not in record.getMessage())
    box: dict = {"done": threading.Event()}

    def start() -> None:
        try:
            box["owns"] = _init_ray(address)
        except BaseException as e:  # handed to the main thread by init_ray
            box["error"] = e
        box["done"].set()
        threading.Event().wait()  # never set: see above

    thread = threading.Thread(target=start, name="igpt-ray-start", daemon=True)
    _STARTING.append((thread, box))
    thread.start()


def init_ray(address: str | None) -> bool:
    """Join the given cluster, the job's cluster (RAY_ADDRESS under `ray job submit`), or start an isolated local Ray.
    Returns True when this process started (and so owns) the Ray instance, on a later call too."""
    if _STARTING:  # started early: wait for it
        box = _STARTING[0][1]
        box["done"].wait()
        _STARTING.clear()
        if "error" in box:
            raise box["error"]
    return _init_ray(address)


def _init_ray(address: str | None) -> bool:
    import ray

    if ray.is_initialized():
        return bool(_STARTED_RAY) and _STARTED_RAY[-1] == ray.get_runtime_context().gcs_address
    if not sys.stderr.isatty() and not os.environ.get("RAY_COLOR_PREFIX"):  # the driver prints worker log lines:
        os.environ["RAY_COLOR_PREFIX"] = "0"  # no colour codes into a log file or a pipe
    if address:
        ray.init(address=address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # Ray's default token auth stays on; only its notice about that, on every local run, is dropped
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda record: "Token authentication is enabled" not in record.getMessage())
        # a node we own and that dies is noticed in seconds, not the default half minute
        with warnings.catch_warnings():  # Ray starts its processes by fork and exec: nothing of lance's runs there
            warnings.filterwarnings("ignore", message="lance is not fork-safe")
            ray.init(address="local", include_dashboard=False, configure_logging=False,
                     _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3})
        _STARTED_RAY.append(ray.get_runtime_context().gcs_address)
        return True
    return False


def worker_gpus(cfg) -> float:
    """GPUs each worker asks for: run.gpus_per_worker, else 1 when the device is not cpu and there is a GPU (the
    cluster's, on the Ray executor; this machine's, in-process)."""
    if cfg.run.gpus_per_worker is not None:
        return cfg.run.gpus_per_worker
    if cfg.model.device == "cpu":
        return 0
    if cfg.run.executor == "local":
        import torch

        return 1 if torch.cuda.is_available() else 0
    import ray

    if not ray.is_initialized():
        init_ray(cfg.run.address)
    return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0


def _call_with_deadline(fn, timeout: float, default):
    """fn(), or `default` if it has not answered within timeout (a dead GCS must not hang us)."""
    try:
        return call_with_deadline(fn, timeout)
    except TimeoutError:
        return default


def alive_nodes() -> dict[str, dict] | None:
    """{node id: resources} of the cluster's live nodes; None when the cluster cannot be asked."""
    import ray

    def ask():
        try:
            return {n["NodeID"]: n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")}
        except Exception:
            return None

    return _call_with_deadline(ask, 10.0, None)


def check_resources(request: dict[str, float], nodes: dict[str, dict]) -> str | None:
    """None if some live node can host one actor; else a message naming what is missing."""
    for res in nodes.values():
        if all(res.get(k, 0) >= v for k, v in request.items() if v):
            return None
    best = {k: max((res.get(k, 0) for res in nodes.values()), default=0) for k, v in request.items() if v}
    missing = [f"{k}: {v:g} per worker, at most {best[k]:g} on any node" for k, v in request.items() if v and best[k] < v]
    return "the cluster cannot place a worker (" + "; ".join(missing) + ")"
