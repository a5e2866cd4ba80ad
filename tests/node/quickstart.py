"""`make node-quickstart`: the quickstart applied to the running node of `make node-up`, as a user
applies it, and one OpenAI request answered by the served model.

`kubectl apply -k examples/quickstart/node`, then `kubectl wait --for=condition=Ready` for each
kind in the pipeline's order (a Failed object ends the wait at once, with its message), then a
chat completion sent from the host to the InferenceService's Service (its ClusterIP, through
kube-proxy) and its answer printed.

    python tests/node/quickstart.py [--timeout SECONDS]     # KUBECONFIG: $KUBECONFIG or the running node's
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "cluster"))
import node as N  # noqa: E402
from platform_ import ROOT, WORK_NS  # noqa: E402

OVERLAY = ROOT / "examples" / "quickstart" / "node"
#: The pipeline's order; the TrainingRun (the pretraining leg) runs beside the TunedModel.
ORDER = [("datapile", "pydocs"), ("tunedmodel", "pydocs-qa"), ("trainingrun", "pydocs-gpt"),
         ("modelcard", "pydocs-qa"), ("deployments.fmforge.io", "pydocs-qa")]
QUESTION = "Which exception is raised when you divide by zero?"


def kubeconfig() -> str:
    if os.environ.get("KUBECONFIG"):
        return os.environ["KUBECONFIG"]
    record = N.STATE / "record.json"
    if not record.exists():
        sys.exit("no node is running here: start one with `make node-up` (or set KUBECONFIG)")
    return str(Path(json.loads(record.read_text())["workdir"]) / "cp" / "kubeconfig")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=3600, help="seconds for the whole pipeline (default 3600)")
    args = ap.parse_args()
    kubectl_bin = str(N.build("k8s") / "kubectl")
    env = {**os.environ, "KUBECONFIG": kubeconfig()}

    def kubectl(*a: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([kubectl_bin, *a], capture_output=True, text=True, env=env)
        if check and r.returncode:
            sys.exit(f"kubectl {' '.join(a)} failed:\n{r.stderr.strip()}")
        return r

    t0 = time.monotonic()
    print(kubectl("apply", "-k", str(OVERLAY)).stdout.rstrip())
    deadline = t0 + args.timeout
    for kind, name in ORDER:
        while True:
            r = kubectl("wait", "--for=condition=Ready", f"{kind}/{name}", "-n", WORK_NS, "--timeout=30s", check=False)
            if r.returncode == 0:
                break
            st = json.loads(kubectl("get", f"{kind}/{name}", "-n", WORK_NS, "-o", "json").stdout).get("status") or {}
            if st.get("phase") == "Failed":
                print(f"{kind}/{name} Failed: {st.get('message')}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"{kind}/{name} not Ready after {args.timeout:.0f}s: {st.get('phase')}: {st.get('message')}",
                      file=sys.stderr)
                return 1
        print(f"{kind}/{name} Ready at {time.monotonic() - t0:.0f}s", flush=True)

    svc = json.loads(kubectl("get", "service", "pydocs-qa-predictor", "-n", WORK_NS, "-o", "json").stdout)
    url = f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}/openai/v1/chat/completions"
    body = {"model": "pydocs-qa", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        answer = json.loads(r.read())["choices"][0]["message"]["content"]
    st = json.loads(kubectl("get", "deployments.fmforge.io/pydocs-qa", "-n", WORK_NS, "-o", "json").stdout)["status"]
    print(f"Deployment/pydocs-qa: {st['message']} (digest {st['servedModel']['digest']}, "
          f"card {st['servedModel'].get('modelCard')})")
    print(f"  POST {url}\n  asked={QUESTION!r} answer={answer!r}")
    print(f"The quickstart on the node: {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
