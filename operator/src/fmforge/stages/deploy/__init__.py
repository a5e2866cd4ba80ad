"""The Deployment stage: check the governance gate, then serve the model locally and prove it
answers (target kserve), or package it for the edge (target edge: ONNX, see `edge`).

Locally (`fmforge run`) the stage starts the model server (`fmforge.stages.deploy.predictor`,
kserve's ModelServer) in a process of its own, waits until the model is ready, sends one sample
request, prints the URL and a curl to try, and stops the server: `fmforge serve Deployment/NAME`
(or `fmforge run --serve`) serves it in the foreground. On a cluster the operator renders a KServe
InferenceService instead (`fmforge.kube`); this stage is not run there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ...api.v1alpha1.deployment import DeploymentSpec
from ...api.v1alpha1.modelcard import WAITING_FOR_APPROVAL, approval_gate
from ..artifacts import producer_model
from ..base import StageContext, StageError, StageResult, TemporaryError

#: How long the server may take to load the model before the stage gives up.
READY_TIMEOUT = 180.0
#: The sample request's prompt (generative models), question (models with a chat template, asked
#: through chat completions) or text (classifiers).
SAMPLE_PROMPT = "Python is"
SAMPLE_QUESTION = "Which exception is raised when you divide by zero?"
SAMPLE_TEXT = "This module is easy to use and well documented."


def served_model(ctx: StageContext, spec: DeploymentSpec) -> dict[str, Any]:
    """The model the reference points at ({uri, digest, path, ref}) from its producer's status,
    checked to hold exactly the bytes of the recorded digest: the bytes served are the bytes a
    card approved."""
    path, model = producer_model(ctx, spec.model_ref, "spec.modelRef")
    return {**model, "path": path, "ref": f"{spec.model_ref.kind}/{spec.model_ref.name}"}


def approved_card(ctx: StageContext, model: str, digest: str) -> str:
    """The ModelCard that approved exactly `digest` of `model` (`Kind/name`), by the same gate as
    the operator's (`approval_gate`); TemporaryError (Waiting) saying what is missing otherwise."""
    cards = {k.split("/", 1)[1]: r for k, r in ctx.inputs.items() if k.startswith("ModelCard/")}
    gate = approval_gate(model, digest, cards)
    if gate.card is None:
        how = (f"; approve it with `fmforge approve ModelCard/{sorted(cards)[0]} --by YOU --digest {digest}`"
               if gate.reason == WAITING_FOR_APPROVAL else "")
        raise TemporaryError(gate.message + how, reason=gate.reason)
    return gate.card


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now. SO_REUSEADDR as the server's own socket
    has it (asyncio sets it on Unix): the connections of a server that just stopped linger in
    TIME-WAIT for a minute and do not stop a new listener, so they must not fail this check;
    a socket listening there still does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _probe_host(host: str) -> str:
    """Where this machine reaches a server listening on `host` (all interfaces: loopback)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _url(host: str, port: int) -> str:
    host = _probe_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _request(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, Any]:
    """(status, the JSON answer) of a GET, or of a POST of `body`; an answer that is not JSON
    (a proxy's or uvicorn's plain-text error) comes back as text."""
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


def server_command(name: str, model_dir: Path, port: int, host: str = "127.0.0.1",
                   digest: str | None = None) -> list[str]:
    """The model server's command line: on `host` (loopback unless told), refusing to serve
    files whose digest is not `digest` (when given)."""
    return [sys.executable, "-m", "fmforge.stages.deploy.predictor", "--model-dir", str(model_dir), "--name", name,
            "--port", str(port), "--host", host, *(["--model-digest", digest] if digest else [])]


def start_server(name: str, model_dir: Path, port: int, log: Path, host: str = "127.0.0.1",
                 digest: str | None = None) -> subprocess.Popen:
    """The model server in a process of its own, listening on host:port (loopback unless told),
    once its model is ready. With `digest` the server refuses (exit code 3, StageError here)
    model files that are not the approved ones."""
    if not _port_free(port, host):
        raise StageError(f"port {port} is in use on this machine; stop what uses it or set spec.kserve.port")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(server_command(name, model_dir, port, host, digest), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:]
            raise StageError(f"the model server exited with code {proc.returncode} before it was ready; its log "
                             f"({log}) ends:\n{tail}")
        try:
            status, body = _request(f"{_url(host, port)}/v1/models/{name}", timeout=2)
            if status == 200 and isinstance(body, dict) and body.get("ready"):
                return proc
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise StageError(f"the model server did not get ready in {READY_TIMEOUT:.0f}s; see {log}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop the server's process group: SIGTERM, then SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile
            pass
    proc.wait()


def sample_request(name: str, port: int, classifier: bool, chat: bool = False) -> tuple[str, dict, str, str]:
    """One request a user would send: (path, body, what it asked, the answer's text). A model
    with a chat template is asked a question through chat completions, as its users will."""
    if classifier:
        path, body = f"/v1/models/{name}:predict", {"instances": [SAMPLE_TEXT]}
        asked = SAMPLE_TEXT
    elif chat:
        path, body = "/openai/v1/chat/completions", {"model": name, "max_tokens": 16,
                                                     "messages": [{"role": "user", "content": SAMPLE_QUESTION}]}
        asked = SAMPLE_QUESTION
    else:
        path, body = "/openai/v1/completions", {"model": name, "prompt": SAMPLE_PROMPT, "max_tokens": 16}
        asked = SAMPLE_PROMPT
    status, answer = _request(f"http://127.0.0.1:{port}{path}", body)
    if status != 200:
        raise StageError(f"the model server answered the sample request to {path} with {status}: {answer}")
    if classifier:
        first = answer["predictions"][0]
        text = f"{first['label']} ({first['score']:.2f})"
    else:
        choice = answer["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
    return path, body, asked, text


def _edge(ctx: StageContext, spec: DeploymentSpec, model: dict[str, Any], card: str | None) -> StageResult:
    from .edge import export

    quantize = spec.edge.quantize if spec.edge else "int8"
    ctx.reporter.step(f"export to ONNX ({quantize})")
    package, manifest = export(model["path"], ctx.artifacts / "edge", quantize, model["digest"])
    f = manifest["fidelity"]
    ctx.reporter.log("Packaged the model for the edge", deployment=ctx.name, package=str(package),
                     top1=f"{f['sampleTop1Agreement']:.0%}", mb=f"{manifest['bytes']['onnx'] / 1e6:.1f}")
    return StageResult(
        status={"package": package.resolve().as_uri(),
                "servedModel": {"uri": model["uri"], "digest": model["digest"],
                                **({"modelCard": card} if card else {})}},
        digest=manifest["digest"],
        message=(f"ONNX package ({quantize}, {manifest['bytes']['onnx'] / 1e6:.1f} MB, top-1 agreement with torch "
                 f"{f['sampleTop1Agreement']:.0%}, {manifest['latencyMs']['onnx']:.1f} ms against torch's "
                 f"{manifest['latencyMs']['torch']:.1f} ms) at {package}"),
        lineage=[{"name": model["ref"], "uri": model["uri"], "digest": model["digest"]}],
    )


def run(ctx: StageContext) -> StageResult:
    spec: DeploymentSpec = ctx.spec
    rep = ctx.reporter
    model = served_model(ctx, spec)
    card = approved_card(ctx, model["ref"], model["digest"]) if spec.require_approved_model_card else None
    if spec.target == "edge":
        return _edge(ctx, spec, model, card)
    from .predictor import has_chat_template, is_classifier

    port = (spec.kserve.port if spec.kserve else 8080)
    rep.step("start the model server")
    # The server checks the bytes again itself: what it loads is what the card approved.
    proc = start_server(ctx.name, model["path"], port, ctx.artifacts / "logs" / "server.log", digest=model["digest"])
    try:
        rep.step("sample request")
        path, body, asked, answer = sample_request(ctx.name, port, is_classifier(model["path"]),
                                                   has_chat_template(model["path"]))
    finally:
        stop_server(proc)
    url = f"http://127.0.0.1:{port}"
    curl = f"curl -s {url}{path} -H 'content-type: application/json' -d '{json.dumps(body)}'"
    rep.log("Answered a sample request", deployment=ctx.name, url=url + path, asked=json.dumps(asked),
            answer=json.dumps(answer))
    rep.log(f"Try it: fmforge serve Deployment/{ctx.name}, then: {curl}")
    return StageResult(
        status={"url": url, "servedModel": {"uri": model["uri"], "digest": model["digest"],
                                            **({"modelCard": card} if card else {})}},
        digest=model["digest"],
        message=(f"model {model['digest'][:19]}… answered a sample request at {url}{path} "
                 f"({json.dumps(asked)} → {json.dumps(answer[:200])}); not serving now: "
                 f"`fmforge serve Deployment/{ctx.name}` serves it"),
        lineage=[{"name": model["ref"], "uri": model["uri"], "digest": model["digest"]}],
    )
