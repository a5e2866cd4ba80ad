"""Fault injection the stage tests share: SIGKILL of a Ray Train worker of this test's own Ray."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil


def kill_a_ray_train_worker_after(root: Path, step: int, found: list[Path], killed: list[int],
                                  stop: threading.Event, before: frozenset[Path] | set[Path] = frozenset()) -> None:
    """Once a run under `root` has written its checkpoint of `step` (one not in `before`), SIGKILL
    one Ray Train worker process; the checkpoint goes into `found` and the pid into `killed`.
    Only a child of this test process (its own local Ray) is killed: other Ray sessions on the
    machine are not ours."""
    while not stop.is_set():
        new = [p for p in root.rglob(f"checkpoint-{step:08d}") if p not in before]
        if new:
            found.append(new[0])
            for p in psutil.Process().children(recursive=True):
                try:
                    cmdline = " ".join(p.cmdline())
                except psutil.Error:
                    continue
                if "RayTrainWorker" in cmdline:
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
                    return
        time.sleep(0.02)
