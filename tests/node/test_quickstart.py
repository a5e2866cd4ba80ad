"""The quickstart as a user applies it on the node: `kubectl apply -k examples/quickstart/node`,
the five kinds at once; each `Ready` in the pipeline's order (`kubectl wait`, as `make
node-quickstart` waits); the InferenceService `Ready` by KServe's own controller; an OpenAI
completion and a chat completion answered through the predictor's Service; and the lineage read
from the statuses, from the endpoint to the tuned model and from the pretrained model to the
pile's three sources with their digests.

Marked `extended` (about 15 minutes on two cores: a pile, a LoRA tuning, a pretraining and a card
in Ray clusters started one after the other): `make test-node` runs it, `make test` and CI do not.
"""

from __future__ import annotations

import json
import time

import pytest
from platform_ import ROOT, WORK_NS, Platform
from test_node import get, lineage
from test_serving import post, ready, routed, until

pytestmark = [pytest.mark.extended, pytest.mark.timeout(3600)]

OVERLAY = ROOT / "examples" / "quickstart" / "node"
#: The pipeline's order; the TrainingRun (the pretraining leg) runs beside the TunedModel.
ORDER = [("datapile", "pydocs"), ("tunedmodel", "pydocs-qa"), ("trainingrun", "pydocs-gpt"),
         ("modelcard", "pydocs-qa"), ("deployments.fmforge.io", "pydocs-qa")]
SERVED = "pydocs-qa"
QUESTION = "Which exception is raised when you divide by zero?"


def wait_ready(p: Platform, kind: str, name: str, timeout: float) -> dict:
    """`kubectl wait --for=condition=Ready`, 30 s at a time; a Failed object ends it with its message."""
    deadline = time.monotonic() + timeout
    while True:
        r = p.kubectl("wait", "--for=condition=Ready", f"{kind}/{name}", "-n", WORK_NS, "--timeout=30s", check=False)
        st = (get(p, kind, name) or {}).get("status") or {}
        if r.returncode == 0:
            return st
        assert st.get("phase") != "Failed", f"{kind}/{name} Failed: {st.get('message')}"
        assert time.monotonic() < deadline, f"{kind}/{name} not Ready after {timeout:.0f}s: {st.get('phase')}: " \
                                            f"{st.get('message')}"


def test_the_quickstart_overlay_goes_from_raw_text_to_an_answer(platform: Platform):
    p = platform
    # the other modules' objects hold CPU the quickstart's Ray clusters need
    p.kubectl("delete", "deployments.fmforge.io,modelcards,tunedmodels,trainingruns,datapiles", "--all", "-n", WORK_NS,
              "--wait=true", "--timeout=300s", check=False)
    t0 = time.monotonic()
    try:
        out = p.kubectl("apply", "-k", str(OVERLAY)).stdout
        assert all(f"{k.split('.')[0].rstrip('s')}.fmforge.io/{n}" in out for k, n in ORDER), out
        at: dict[str, float] = {}
        statuses = {}
        for kind, name in ORDER:
            statuses[kind] = wait_ready(p, kind, name, timeout=2700 - (time.monotonic() - t0))
            at[f"{kind}/{name}"] = round(time.monotonic() - t0)
        card, dep = statuses["modelcard"], statuses["deployments.fmforge.io"]
        assert card["approved"] is True and card["phase"] == "Succeeded", card
        assert dep["phase"] == "Ready" and dep["servedModel"]["modelCard"] == "pydocs-qa", dep
        assert dep["servedModel"]["digest"] == statuses["tunedmodel"]["model"]["digest"] == card["modelDigest"]
        # KServe's own controller made it Ready
        isvc = get(p, "inferenceservice", SERVED)
        conds = {c["type"]: c["status"] for c in isvc["status"]["conditions"]}
        assert conds.get("Ready") == "True" and conds.get("PredictorReady") == "True", conds

        # the requests, from the host through the Service's ClusterIP (kube-proxy)
        def predictors():
            return [q for q in json.loads(p.kubectl("get", "pods", "-n", WORK_NS, "-l",
                                                    f"serving.kserve.io/inferenceservice={SERVED}", "-o",
                                                    "json").stdout)["items"]
                    if ready(q) and routed(q)]

        until("kube-proxy's rules to the Ready predictor pod", predictors, timeout=60, every=0.5)
        svc = get(p, "service", f"{SERVED}-predictor")
        base = f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}/openai/v1"
        done = post(f"{base}/completions", {"model": SERVED, "prompt": "import json\n", "max_tokens": 8})
        chat = post(f"{base}/chat/completions", {"model": SERVED, "max_tokens": 16,
                                                 "messages": [{"role": "user", "content": QUESTION}]})
        assert done["object"] == "text_completion" and done["choices"][0]["text"].strip(), done
        answer = chat["choices"][0]["message"]["content"]
        assert chat["object"] == "chat.completion" and answer.strip(), chat

        # the lineage from the statuses: endpoint -> tuned model; pretrained model -> pile -> sources
        served = lineage(p, f"Deployment/{SERVED}")
        assert served[0].startswith(f"Deployment/{SERVED}: Ready") and "(card pydocs-qa)" in served[0], served
        assert served[1].startswith("  └─ TunedModel/pydocs-qa: Succeeded"), served
        pretrained = lineage(p, "TrainingRun/pydocs-gpt")
        pile = statuses["datapile"]
        assert f"trained on pydocs snapshot {pile['version']['snapshotId']}" in pretrained[0], pretrained
        assert pretrained[1].startswith("  └─ DataPile/pydocs: Succeeded"), pretrained
        assert [line.strip().split(":")[0] for line in pretrained[2:]] == \
            ["└─ source python-docs", "└─ source python-code", "└─ source licenses"], pretrained
        print(f"\nthe quickstart on the node: Ready at {at}; {QUESTION!r} -> {answer!r}")
        print("\n".join(served + pretrained))
    finally:
        p.kubectl("delete", "-k", str(OVERLAY), "--wait=true", "--timeout=300s", check=False)
