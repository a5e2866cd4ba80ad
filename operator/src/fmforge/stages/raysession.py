"""Start the local Ray a stage runs on, or attach to the cluster's; and clean up after it.

Called by the stages (`start`) and by the local runner (`cleanup`, `reap`). In a RayJob
(`RAY_ADDRESS` set by KubeRay) a stage attaches to the cluster and nothing here touches files or
processes. Locally Ray keeps its sessions (sockets, logs, spilled objects) in a temporary
directory named after the state directory and the process that started Ray
(`$TMPDIR/fmforge-ray-<uid>-<state key>-<pid>`: short, because Ray's socket paths must fit 107
bytes), so that a run removes its own when it ends, and a later run on the same state directory
finds the ones whose process died, stops the Ray processes still using them and removes them.
A directory whose process is alive is left alone: a notebook or a test session may keep its Ray
after its run is over.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

#: The temporary directory of the Ray this process started, if it started one.
_started: Path | None = None


def in_cluster() -> bool:
    """Whether a Ray cluster is there to attach to (KubeRay sets RAY_ADDRESS in a RayJob)."""
    return bool(os.environ.get("RAY_ADDRESS"))


def _prefix(state_dir: Path) -> str:
    return f"fmforge-ray-{os.getuid()}-{hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:12]}-"


def temp_dir(state_dir: Path, pid: int | None = None) -> Path:
    """Ray's temporary directory for the process `pid` (this one by default) on `state_dir`."""
    return Path(tempfile.gettempdir()) / f"{_prefix(state_dir)}{pid or os.getpid()}"


def temp_dirs(state_dir: Path) -> list[Path]:
    """Every Ray temporary directory of runs on `state_dir` that is still there."""
    return sorted(Path(tempfile.gettempdir()).glob(_prefix(state_dir) + "*"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start(state_dir: Path, cpus: int) -> None:
    """Start Ray in-process with at least `cpus` CPUs (locally) or attach to the cluster (in a
    RayJob).

    Locally, a Ray that an earlier stage started with fewer CPUs is started again: Ray Train's
    workers hold their CPUs for the whole run, and the Ray Data tasks that feed them need more,
    or they would wait for ever."""
    import ray

    global _started
    if ray.is_initialized() and not in_cluster() and ray.cluster_resources().get("CPU", 0) < cpus:
        shutdown()
    if not ray.is_initialized():
        # Ray 2.60 announces on every local start that it turned token authentication on (the
        # secure default, which stays on); in fmforge's output that line is noise.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # A task with several returns stores its error in each; the stages get one of them and
        # report the error themselves, and Ray would print the same traceback again for each
        # return nobody got.
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
        kwargs = {}
        if not in_cluster():
            tmp = temp_dir(state_dir)
            tmp.mkdir(parents=True, exist_ok=True)
            kwargs = {"num_cpus": max(1, cpus), "_temp_dir": str(tmp),
                      # Every task result goes to the object store: Ray would otherwise keep
                      # results under 100 KB in the memory of the process that submitted the
                      # task (the driver), and many small pieces of a pile would add up there.
                      # The RayJob's pods set the same through RAY_max_direct_call_object_size.
                      "_system_config": {"max_direct_call_object_size": 0}}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, ignore_reinit_error=True,
                 **kwargs)
        _started = Path(kwargs["_temp_dir"]) if "_temp_dir" in kwargs else None
        if threading.current_thread() is threading.main_thread():
            # Ray's core worker installs absl's failure handler for SIGTERM too, which prints a
            # native stack dump before Python's handler runs. Setting the Python handler again
            # puts Python's trampoline back for SIGTERM only (crash signals keep absl's dumps),
            # so SIGTERM ends a run as cleanly as Ctrl-C.
            signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))
    # Ray Data logs its plan and progress at INFO (set up by ray.init) and draws its own bars; the
    # stage's reporter says what matters. (A dataset copies the context when it is created.)
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False
    data_ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    # Right after start the node has not reported its CPUs yet, and Ray Data would warn that the
    # job "will hang"; wait the moment it takes.
    deadline = time.monotonic() + 10
    while not ray.available_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(0.05)


def processes_using(path: Path) -> list[int]:
    """Pids of this user's processes whose command line names `path` (Ray's own processes)."""
    needle = str(path).encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if needle in f.read():
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def reap(state_dir: Path) -> int:
    """Stop what runs on `state_dir` whose process died left behind (Ray's processes, its
    session files); the number of Ray processes stopped."""
    stopped = 0
    for tmp in temp_dirs(state_dir):
        pid = int(tmp.name.rsplit("-", 1)[1])
        if pid == os.getpid() or _alive(pid):
            continue
        pids = processes_using(tmp) if Path("/proc").is_dir() else []
        for p in pids:
            with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
                os.kill(p, signal.SIGKILL)
        stopped += len(pids)
        shutil.rmtree(tmp, ignore_errors=True)
    return stopped


def shutdown() -> None:
    """Shut down the Ray this process started or attached to, if any, and remove the files of
    the one it started (its processes have exited with the shutdown)."""
    import sys

    global _started
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    if _started is not None:
        shutil.rmtree(_started, ignore_errors=True)
        _started = None
