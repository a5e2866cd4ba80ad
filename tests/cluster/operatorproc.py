"""The fmforge operator run for real, as `fmforge operator`, against the test control plane.

A child process with the control plane's kubeconfig, free ports for /metrics and /healthz, and
its log in the control plane's directory. Tests kill it (SIGKILL, as a node failure would) and
start it again; the process group is its own, so stopping ends exactly what was started here.
Used by tests/cluster/test_operator.py and tests/bench/bench_operator.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from controlplane import ROOT, ControlPlane, free_port


class OperatorProcess:
    """`fmforge operator` as a subprocess."""

    def __init__(self, cluster: ControlPlane, config: Path | None = None, extra_env: dict[str, str] | None = None,
                 name: str = "operator", args: list[str] | None = None):
        self.cluster = cluster
        self.config = config
        self.extra_env = extra_env or {}
        self.name = name
        self.args = args or []
        self.proc: subprocess.Popen | None = None
        self.metrics_port = 0
        self.health_port = 0
        self.starts = 0

    @property
    def log(self) -> Path:
        return self.cluster.workdir / f"{self.name}.log"

    def start(self, timeout: float = 60.0) -> "OperatorProcess":
        self.metrics_port, self.health_port = free_port(), free_port()
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig),
               "PYTHONPATH": str(ROOT / "operator" / "src"), "FMFORGE_METRICS_PORT": str(self.metrics_port),
               "FMFORGE_HEALTH_PORT": str(self.health_port), **self.extra_env}
        if self.config:
            env["FMFORGE_CONFIG"] = str(self.config)
        out = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "fmforge.cli", "operator", *self.args], env=env,
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=self.cluster.workdir)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the operator was not healthy after {timeout}s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, as when a node dies."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
