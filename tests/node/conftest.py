"""The node tier: fmforge on a real single-node cluster (tests/node/node.py), installed with its
chart, running its RayJobs on real pods from the repository's own images.

Needs root (containerd, kubelet, iptables), Go, the Debian packages build-images.sh installs and
the disk for the images (tests/node/preflight.py). Skipped with the reason elsewhere; in CI
(CI=true) a missing tool fails the run, and only a machine short of disk skips, saying so.
`make test` (and so CI) runs the tier less the tests marked `extended`; `make test-node` runs all.
A failing test gets the tail of each component's log and the pods' state attached.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "cluster"))
sys.path.insert(0, str(HERE.parent))
import node as N  # noqa: E402
import platform_ as P  # noqa: E402
import preflight  # noqa: E402
from tools import unavailable  # noqa: E402


@pytest.fixture(scope="session")
def platform():
    reason = preflight.why_not()
    if reason is not None:
        if not reason.fails_ci:
            pytest.skip(reason.text)
        unavailable(reason.text)
    node = N.Node()
    try:
        node.start()
        plat = P.install(node)
    except Exception as e:  # noqa: BLE001
        logs = node.logs()
        node.stop()
        unavailable(f"the node did not start: {e}\n{logs}")
    print("\nNode up: " + ", ".join(f"{k} {v:.1f}s" for k, v in {**node.timings, **plat.timings}.items()))
    yield plat
    node.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    plat = item.funcargs.get("platform") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(plat, P.Platform):
        report.sections.append(("node logs", plat.node.logs()))
        pods = plat.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
        events = plat.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False).stdout[-6000:]
        op = plat.kubectl("logs", "-n", P.RELEASE_NS, "deployment/fmforge", "--tail=80", check=False).stdout
        report.sections.append(("pods, events, operator log", f"{pods}\n{events}\n{op}"))
