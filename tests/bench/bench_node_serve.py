"""Benchmark of a completion through KServe's Service on the node against the same model served by
`fmforge serve`'s predictor on the host.

    python tests/bench/bench_node_serve.py [--deployment pydocs-qa] [--requests 100] [--max-tokens 1]

Needs the node of `make node-up` with a Ready Deployment (`make node-quickstart` makes
pydocs-qa). Starts fmforge's predictor on the host on the same model files (the claim's folder,
the approved digest checked), then sends the same OpenAI completions, one at a time, alternating
between the cluster path (host -> the predictor Service's ClusterIP -> kube-proxy's DNAT -> the
bridge -> the pod) and the host's server on loopback; also `GET /v1/models/NAME`, which costs the
model nothing, so its difference is the path alone. Prints one JSON line with p50/p99 of each and
the cluster path's added p50. The pod runs under its CPU limit (the Deployment's
kserve.resources.cpu), the host process does not: the completion's difference includes that, the
GET's hardly. Never part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "node"))
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
import node as N  # noqa: E402
from platform_ import CLAIM, WORK_NS  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deployment", default="pydocs-qa")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=1)
    ap.add_argument("--port", type=int, default=18080)
    args = ap.parse_args()
    record = N.STATE / "record.json"
    if not record.exists() and not os.environ.get("KUBECONFIG"):
        sys.exit("no node is running here: start one with `make node-up`, then `make node-quickstart`")
    workdir = Path(json.loads(record.read_text())["workdir"])
    env = {**os.environ, "KUBECONFIG": os.environ.get("KUBECONFIG") or str(workdir / "cp" / "kubeconfig")}
    kubectl = str(N.build("k8s") / "kubectl")

    def get(*a: str) -> dict:
        return json.loads(subprocess.run([kubectl, "get", *a, "-n", WORK_NS, "-o", "json"], env=env, check=True,
                                         capture_output=True, text=True).stdout)

    dep = get("deployments.fmforge.io", args.deployment)["status"]
    if dep.get("phase") != "Ready":
        sys.exit(f"Deployment/{args.deployment} is {dep.get('phase')}: {dep.get('message')}")
    name = dep["inferenceService"]
    uri, digest = dep["servedModel"]["uri"], dep["servedModel"]["digest"]
    model_dir = workdir / "pv" / uri.removeprefix(f"file:///mnt/pvc/{CLAIM}/")
    svc = get("service", f"{name}-predictor")
    cluster = f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"
    host = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "fmforge.stages.deploy.predictor", "--model-dir", str(model_dir),
                               "--name", name, "--port", str(args.port), "--model-digest", digest],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{host}/v1/models/{name}", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the host's predictor did not start:\n{server.stderr.read()[-3000:]}")
                time.sleep(0.5)
        body = json.dumps({"model": name, "prompt": "def add(a, b):", "max_tokens": args.max_tokens}).encode()

        def completion(base: str) -> float:
            req = urllib.request.Request(f"{base}/openai/v1/completions", data=body,
                                         headers={"content-type": "application/json"})
            t = time.perf_counter()
            json.loads(urllib.request.urlopen(req, timeout=120).read())
            return time.perf_counter() - t

        def models(base: str) -> float:
            t = time.perf_counter()
            urllib.request.urlopen(f"{base}/v1/models/{name}", timeout=30).read()
            return time.perf_counter() - t

        for base in (cluster, host):  # warm both
            completion(base), models(base)
        times: dict[str, list[float]] = {k: [] for k in ("cluster", "host", "cluster_get", "host_get")}
        for _ in range(args.requests):
            times["cluster"].append(completion(cluster))
            times["host"].append(completion(host))
            times["cluster_get"].append(models(cluster))
            times["host_get"].append(models(host))
        ms = {k: {"p50_ms": round(statistics.median(v) * 1000, 2), "p99_ms": round(pct(v, 0.99) * 1000, 2)}
              for k, v in times.items()}
        print(json.dumps({
            "deployment": args.deployment, "requests": args.requests, "max_tokens": args.max_tokens,
            "pod_cpu_limit": next(iter(get("deployment.apps", f"{name}-predictor")["spec"]["template"]["spec"]
                                       ["containers"]))["resources"]["limits"].get("cpu"),
            **ms,
            "cluster_adds_p50_ms": round(ms["cluster"]["p50_ms"] - ms["host"]["p50_ms"], 2),
            "cluster_path_adds_p50_ms_get": round(ms["cluster_get"]["p50_ms"] - ms["host_get"]["p50_ms"], 2),
            "load_average": os.getloadavg()[0],
        }))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
