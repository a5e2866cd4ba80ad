#!/usr/bin/env python3
"""Benchmark the operator on the test control plane: many TrainingRuns applied at once.

    PYTHONPATH=operator/src python tests/bench/bench_operator.py [--sizes 200 1000]

For each size, in a fresh namespace with a fresh operator (`fmforge operator`, watching that
namespace) and, beside it, a no-op kopf operator watching the same TrainingRuns (the peer: what
kopf alone costs):
  - apply -> RayJob created: from the moment the API server answered the TrainingRun's create
    to the moment a watch on RayJobs saw its RayJob, p50 / p99 / max (and the p50 of ten applied
    one at a time before, when nothing else is going on);
  - API requests the operator made, per reconcile and per TrainingRun (its /metrics);
  - peak RSS (VmHWM) of the operator and of the peer.
The TrainingRuns read one DataPile that is Ready before they are applied, so every one of them
gets its RayJob at once. Goals at 200: p99 <= 1 s, RSS <= 150 MB. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "cluster")]

from controlplane import ControlPlane, kuberay_crds  # noqa: E402
from operatorproc import OperatorProcess, apply, get, manifest, rayjob_status, wait_for, wait_phase  # noqa: E402

PEER = '''"""A no-op kopf operator: the peer of the benchmark."""
import kopf

@kopf.on.event("fmforge.io", "v1alpha1", "trainingruns")
def seen(**_):
    pass
'''


def rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Api:
    """Direct HTTPS to the API server with the admin certificate: creates and one watch."""

    def __init__(self, cp: ControlPlane):
        self.host, self.port = "127.0.0.1", cp.port
        self.ctx = ssl.create_default_context(cafile=cp.pki["ca.crt"])
        self.ctx.load_cert_chain(cp.pki["admin.crt"], cp.pki["admin.key"])

    def create(self, path: str, body: dict) -> float:
        req = urllib.request.Request(f"https://{self.host}:{self.port}{path}", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=self.ctx, timeout=60) as r:
            r.read()
        return time.monotonic()

    def watch(self, path: str, seen: dict[str, float], stop: threading.Event) -> None:
        """Record when each object is first seen; a watch that breaks is started again after a
        list (whatever the list brings that was not seen yet counts from the list's time)."""
        while not stop.is_set():
            try:
                conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=600)
                conn.request("GET", path)
                listed = json.loads(conn.getresponse().read())
                for item in listed["items"]:
                    seen.setdefault(item["metadata"]["name"], time.monotonic())
                rv = listed["metadata"]["resourceVersion"]
                conn.request("GET", f"{path}?watch=1&resourceVersion={rv}")
                resp = conn.getresponse()
                while not stop.is_set():
                    line = resp.readline()
                    if not line:
                        break
                    ev = json.loads(line)
                    if ev["type"] == "ADDED":
                        seen.setdefault(ev["object"]["metadata"]["name"], time.monotonic())
                conn.close()
            except (OSError, ValueError, http.client.HTTPException) as e:
                print(f"RayJob watch broke ({e}); watching again", file=sys.stderr)
                time.sleep(0.5)


def run_size(cp: ControlPlane, api: Api, n: int, tmp: Path, keep_logs: Path | None) -> dict:
    ns = f"bench-{n}-{uuid.uuid4().hex[:4]}"
    cp.kubectl("create", "namespace", ns)
    op = OperatorProcess(cp, name=f"bench-operator-{n}", args=["--namespace", ns]).start()
    peer_file = tmp / "peer.py"
    peer_file.write_text(PEER)
    peer = subprocess.Popen([str(Path(sys.executable).parent / "kopf"), "run", "--standalone", "-n", ns,
                             str(peer_file)], env={**os.environ, "KUBECONFIG": str(cp.kubeconfig)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        apply(cp, ns, manifest("DataPile", "pile"))
        wait_for("the pile's RayJob", lambda: get(cp, ns, "rayjobs", "pile-g1-prepare"))
        cp.kubectl("patch", "datapiles", "pile", "-n", ns, "--subresource=status", "--type=merge",
                   "-p", json.dumps({"status": {"tags": ["v1"], "version": {"snapshotId": "1"}}}))
        rayjob_status(cp, ns, "pile-g1-prepare", "Complete", "SUCCEEDED")
        wait_phase(cp, ns, "DataPile", "pile", "Succeeded")
        time.sleep(1.0)
        base_requests = op.metric("fmforge_api_requests_total")
        base_reconciles = op.metric("fmforge_reconciles_total")

        seen: dict[str, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=api.watch, args=(f"/apis/ray.io/v1/namespaces/{ns}/rayjobs", seen, stop),
                                   daemon=True)
        watcher.start()
        time.sleep(0.5)
        path = f"/apis/fmforge.io/v1alpha1/namespaces/{ns}/trainingruns"
        # first one at a time: the latency when nothing else is going on
        single = []
        for i in range(10):
            d = manifest("TrainingRun", f"one{i:02d}", dataPileRef={"name": "pile", "tag": "v1"})
            d["metadata"]["namespace"] = ns
            t = api.create(path, d)
            wait_for("its RayJob", lambda i=i: f"one{i:02d}-g1-train" in seen, every=0.002)
            single.append(seen[f"one{i:02d}-g1-train"] - t)
        base_requests = op.metric("fmforge_api_requests_total")
        base_reconciles = op.metric("fmforge_reconciles_total")
        docs = []
        for i in range(n):
            d = manifest("TrainingRun", f"run{i:04d}", dataPileRef={"name": "pile", "tag": "v1"})
            d["metadata"]["namespace"] = ns
            docs.append(d)
        created: dict[str, float] = {}
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            for d, t in zip(docs, pool.map(lambda d: api.create(path, d), docs), strict=True):
                created[d["metadata"]["name"]] = t
        applied = time.monotonic() - t0
        wait_for(f"{n} RayJobs", lambda: sum(1 for k in seen if k.startswith("run")) >= n, timeout=600, every=0.5)
        all_done = max(seen.values()) - t0
        time.sleep(3.0)  # let the status writes and their echoes settle before counting requests
        stop.set()
        lat = sorted(seen[f"{name}-g1-train"] - t for name, t in created.items())
        q = statistics.quantiles(lat, n=100)
        requests = op.metric("fmforge_api_requests_total") - base_requests
        reconciles = op.metric("fmforge_reconciles_total") - base_reconciles
        return {
            "objects": n,
            "one_at_a_time_p50_s": round(statistics.median(single), 3),
            "apply_seconds": round(applied, 2),
            "all_rayjobs_seconds": round(all_done, 2),
            "p50_s": round(q[49], 3), "p99_s": round(q[98], 3), "max_s": round(lat[-1], 3),
            "requests": int(requests), "reconciles": int(reconciles),
            "requests_per_reconcile": round(requests / reconciles, 2),
            "requests_per_object": round(requests / n, 2),
            "operator_rss_peak_mb": round(rss_peak_mb(op.proc.pid), 1),
            "kopf_noop_rss_peak_mb": round(rss_peak_mb(peer.pid), 1),
        }
    finally:
        op.stop()
        peer.terminate()
        peer.wait(timeout=20)
        if keep_logs:
            keep_logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(op.log, keep_logs / op.log.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--keep-logs", type=Path, help="copy each operator's log into this directory")
    args = ap.parse_args()
    cp = ControlPlane().start()
    try:
        cp.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        for f in kuberay_crds():
            cp.kubectl("apply", "--server-side", "-f", str(f))
        # right after the apply a CRD may have no conditions yet, which kubectl wait refuses
        wait_for("the CRDs to be Established", lambda: cp.kubectl(
            "wait", "--for=condition=Established", "crd", "--all", "--timeout=10s", check=False).returncode == 0,
            timeout=120, every=1)
        api = Api(cp)
        rows = [run_size(cp, api, n, cp.workdir, args.keep_logs) for n in args.sizes]
    finally:
        cp.stop()
    cols = ["objects", "one_at_a_time_p50_s", "apply_seconds", "all_rayjobs_seconds", "p50_s", "p99_s", "max_s",
            "requests_per_reconcile", "requests_per_object", "operator_rss_peak_mb", "kopf_noop_rss_peak_mb"]
    print(" ".join(f"{c:>22}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]!s:>22}" for c in cols))
    print(json.dumps({"benchmark": "operator", "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
