"""The model server under bad requests, tried as an attacker would (issue 17, defect 6), and its
refusal of model files that are not the approved ones (defect 4).

Every test talks HTTP to the real server process (`python -m fmforge.stages.deploy.predictor`)
on 127.0.0.1 with a real causal LM: a four-layer GPT-2 with a 512-token context and a byte-level
BPE tokenizer trained here on the standard library's sources (untrained weights: these tests are
about serving). A copy of it with NaN weights makes generation itself fail, the way a diverged
checkpoint does. The rule under test: bad input gets a 4xx naming the field, never a 500, a hang
or unbounded memory, and the server answers a good request afterwards.

What the code before the fix did, case by case, is noted at each test (`before:`).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from localrun import free_port
from tinymodel import CHATML, tiny_gpt

from fmforge.stages.artifacts import model_digest
from fmforge.stages.base import StageError
from fmforge.stages.deploy import _port_free, server_command, start_server, stop_server

NAME = "tiny"
HOST = "127.0.0.1"
#: The server's --max-pending in these tests: small, so that the 503 is reachable.
PENDING = 4


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    # with a chat template, so that chat completions reach the model
    return tiny_gpt(tmp_path_factory.mktemp("gpt512"), files=100, positions=512, width=128, layers=4, heads=4,
                    never_ends=True, chat_template=CHATML)


@pytest.fixture(scope="module")
def broken_lm(lm: Path, tmp_path_factory) -> Path:
    """The same model with NaN weights: sampling from it fails inside generate."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("nan")
    shutil.copytree(lm, out, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(lm)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(float("nan"))
    model.save_pretrained(out)
    return out


class Server:
    """A predictor process on 127.0.0.1, started as the stage starts it, plus test flags."""

    def __init__(self, model_dir: Path, log: Path, *extra: str):
        self.port = free_port(HOST)
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen([*server_command(NAME, model_dir, self.port), *extra], stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while True:
            assert self.proc.poll() is None, log.read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/v1/models/{NAME}", timeout=2) as r:
                    if json.loads(r.read()).get("ready"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.3)
        self.ps = psutil.Process(self.proc.pid)

    def request(self, path: str, raw: bytes, headers: dict | None = None, timeout: float = 60,
                method: str = "POST") -> tuple[int, bytes]:
        """(status, body) of one request on a connection of its own; a stream is read to its end."""
        c = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            c.request(method, path, body=raw, headers={"content-type": "application/json", **(headers or {})})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def post(self, path: str, body, **kw) -> tuple[int, bytes]:
        return self.request(path, json.dumps(body).encode(), **kw)

    def good(self) -> None:
        """A good request answers."""
        status, answer = self.post("/openai/v1/completions", {"model": NAME, "prompt": "def f(x):", "max_tokens": 3},
                                   timeout=60)
        assert status == 200, answer
        assert json.loads(answer)["choices"][0]["text"] is not None

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 1e6

    def generated(self) -> float:
        """The server's count of generated tokens (`fmforge_generated_tokens_total`, /metrics)."""
        with urllib.request.urlopen(f"http://{HOST}:{self.port}/metrics", timeout=30) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(f'fmforge_generated_tokens_total{{model="{NAME}"}}'):
                    return float(line.split()[-1])
        return 0.0

    def stop(self) -> float:
        """Seconds the server takes to stop."""
        t = time.monotonic()
        stop_server(self.proc)
        return time.monotonic() - t


@pytest.fixture(scope="module")
def server(lm: Path, tmp_path_factory):
    srv = Server(lm, tmp_path_factory.mktemp("log") / "server.log", "--max-pending", str(PENDING),
                 "--model-digest", model_digest(lm))
    yield srv
    srv.stop()


C = "/openai/v1/completions"
CHAT = "/openai/v1/chat/completions"
V1 = f"/v1/models/{NAME}:predict"
V2 = f"/v2/models/{NAME}/infer"


def _completion(extra: str, stream: bool = False) -> bytes:
    """A completions body with raw JSON text added (NaN and the like cannot go through json.dumps
    as an attacker writes them)."""
    return (f'{{"model": "{NAME}", "prompt": "def f(x):", "max_tokens": 3{extra}'
            f'{", " + chr(34) + "stream" + chr(34) + ": true" if stream else ""}}}').encode()


# (case, path, raw body, expected status, words in the answer); before: what the old code did.
ATTACKS = [
    # before: 500 "Out of range float values are not JSON compliant" (FastAPI's 422 echoed the NaN)
    ("temperature NaN", C, _completion(', "temperature": NaN'), 422, "temperature: nan is not a JSON number"),
    ("temperature Infinity", C, _completion(', "temperature": Infinity'), 422, "temperature: inf is not a JSON"),
    ("temperature -Infinity", C, _completion(', "temperature": -Infinity'), 422, "temperature: -inf"),
    # before: 500 "probability tensor contains either inf, nan or element < 0"; now decoded greedily
    ("temperature 1e-45", C, _completion(', "temperature": 1e-45'), 200, "text_completion"),
    ("temperature 5e-324", C, _completion(', "temperature": 5e-324'), 200, "text_completion"),
    ("temperature 3", C, _completion(', "temperature": 3'), 422, "temperature: Input should be less than"),
    # before: top_p, top_k and n were ignored whatever they were (200)
    ("top_p -1", C, _completion(', "temperature": 1, "top_p": -1'), 422, "top_p: Input should be greater than 0"),
    ("top_p 1e308", C, _completion(', "temperature": 1, "top_p": 1e308'), 422, "top_p: Input should be less"),
    ("top_p NaN", C, _completion(', "top_p": NaN'), 422, "top_p: nan is not a JSON number"),
    ("top_k -5", C, _completion(', "temperature": 1, "top_k": -5'), 422, "top_k: Input should be greater"),
    ("top_k 10**20", C, _completion(', "temperature": 1, "top_k": 100000000000000000000'), 422, "top_k"),
    ("top_k huge but int64", C, _completion(', "temperature": 1, "top_k": 9000000000000000000'), 200, "text"),
    ("n 0", C, _completion(', "n": 0'), 422, "n: Value error, this server makes one choice per request"),
    ("n 10**9", C, _completion(', "n": 1000000000'), 422, "send n=1 or leave n out"),
    # before: 500 (the 422 echoed Infinity / NaN)
    ("max_tokens 1e400", C, f'{{"model": "{NAME}", "prompt": "x", "max_tokens": 1e400}}'.encode(), 422,
     "max_tokens: inf is not a JSON number"),
    ("max_tokens NaN", C, f'{{"model": "{NAME}", "prompt": "x", "max_tokens": NaN}}'.encode(), 422, "max_tokens"),
    ("max_tokens -1", C, f'{{"model": "{NAME}", "prompt": "x", "max_tokens": -1}}'.encode(), 422,
     "max_tokens: Input should be greater than or equal to 1"),
    ("max_tokens 2000", C, f'{{"model": "{NAME}", "prompt": "x", "max_tokens": 2000}}'.encode(), 400,
     "max_tokens 2000 is more than this request may generate"),
    # before: ignored (200)
    ("presence_penalty NaN", C, _completion(', "presence_penalty": NaN'), 422, "presence_penalty: nan"),
    # before: 500 "TextEncodeInput must be Union[...]" from the tokenizer
    ("prompt with a lone surrogate", C, f'{{"model": "{NAME}", "prompt": "\\ud800x"}}'.encode(), 422,
     "prompt: the string holds a lone surrogate"),
    ("chat content with a lone surrogate", CHAT,
     f'{{"model": "{NAME}", "messages": [{{"role": "user", "content": "\\udfff"}}]}}'.encode(), 422,
     "messages[0].content: the string holds a lone surrogate"),
    ("v2 text with a lone surrogate", V2,
     b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["\\ud800"]}]}', 400,
     "input 'text' element 0: prompt is not valid Unicode"),
    # orjson stops at 1024 levels (Python's json recurses until RecursionError)
    ("deeply nested chat body", CHAT, b'{"model": "tiny", "messages": ' + b"[" * 50000 + b"]" * 50000 + b"}", 422,
     "body: JSON decode error"),
    ("deeply nested v2 body", V2, b'{"inputs": ' + b"[" * 50000 + b"]" * 50000 + b"}", 400,
     "There was an error parsing the body"),
    # before: 200 after generating all of them (minutes), or a timeout
    ("v1 5000 instances", V1, json.dumps({"instances": ["x"] * 5000}).encode(), 400,
     "instances: 5000 items; at most 32 per request"),
    ("v2 5000 texts", V2, json.dumps({"inputs": [{"name": "text", "shape": [5000], "datatype": "BYTES",
                                                  "data": ["x"] * 5000}]}).encode(), 400,
     "input 'text': 5000 elements; at most 32"),
    ("v1 max_tokens a float", V1, b'{"instances": [{"prompt": "x", "max_tokens": 1e300}]}', 400,
     "instances[0]: max_tokens must be a positive integer"),
    ("v1 NaN", V1, b'{"instances": [{"prompt": "x", "max_tokens": NaN}]}', 400, "Unrecognized request format"),
    # before: 400 after seconds of tokenizing and hundreds of MB kept
    ("a 900 KB prompt", C, json.dumps({"model": NAME, "prompt": "word " * 180_000}).encode(), 400,
     "the prompt is 900000 characters; this model reads at most 512 tokens"),
]


@pytest.mark.parametrize("case, path, raw, code, words", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_an_attack_gets_a_4xx_naming_the_field(server: Server, case, path, raw, code, words):
    status, answer = server.request(path, raw, timeout=60)
    assert status == code, answer[:500]
    assert words in answer.decode(errors="replace"), answer[:500]
    server.good()


def test_v2_bytes_that_are_not_utf8_get_a_400_naming_the_input(server: Server):
    # v2's binary extension: a JSON header, then each BYTES element as a 4-byte length and bytes.
    # before: 500 'Failed to encode "b'\xff\xfe'" using UTF-8'
    head = json.dumps({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 11}}]}).encode()
    data = (1).to_bytes(4, "little") + b"x" + (2).to_bytes(4, "little") + b"\xff\xfe"
    status, answer = server.request(V2, head + data, headers={"inference-header-content-length": str(len(head)),
                                                              "content-type": "application/octet-stream"})
    assert status == 400 and "input 'text' element 1 is not UTF-8 text" in answer.decode(), answer
    server.good()


def test_bodies_and_heads_over_the_limits_are_refused_unread(server: Server):
    rss = server.rss_mb()
    # before: a 5 MB prompt was read, tokenized (9 s) and its memory kept: +1.2 GB after four
    big = json.dumps({"model": NAME, "prompt": "word " * 1_000_000}).encode()
    for _ in range(4):
        t = time.monotonic()
        status, answer = server.request(C, big)
        assert status == 413 and "--max-body-bytes" in answer.decode(), answer[:300]
        assert time.monotonic() - t < 10
    # chunked: no Content-Length to refuse it by; counted as it comes
    c = http.client.HTTPConnection(HOST, server.port, timeout=60)
    c.request("POST", V1, body=iter([b'{"instances": ["' + b"a" * (256 << 10)] * 8), encode_chunked=True,
              headers={"content-type": "application/json", "transfer-encoding": "chunked"})
    r = c.getresponse()
    assert r.status == 413 and "at most 1048576" in r.read().decode()
    c.close()
    # before: an 8 MB header was read and answered (200)
    s = socket.create_connection((HOST, server.port), timeout=30)
    s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 << 20) + b"\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 431 ")
    s.close()
    assert server.rss_mb() - rss < 100, (rss, server.rss_mb())
    server.good()


def _events(server: Server, body: dict, timeout: float = 60) -> list[str]:
    status, raw = server.post(C, {**body, "stream": True}, timeout=timeout)
    assert status == 200, raw
    return [ln for ln in raw.decode().split("\n\n") if ln]


def test_a_failing_generation_ends_its_stream_with_an_error_event(broken_lm: Path, tmp_path: Path):
    """before: the stream stayed open forever (the generating thread died, its reader waited on),
    each holding one of anyio's 40 worker threads: after 40 of them every stream hung."""
    srv = Server(broken_lm, tmp_path / "server.log")
    try:
        for _ in range(45):
            events = _events(srv, {"model": NAME, "prompt": "def f(x):", "max_tokens": 4, "temperature": 1.0},
                             timeout=30)
            assert events[-1] == "data: [DONE]"
            error = json.loads(events[-2].removeprefix("data: "))["error"]
            assert error["code"] == "500" and "the model failed to generate" in error["message"], error
        # a greedy stream and a greedy request still answer (argmax of NaN is a token)
        assert _events(srv, {"model": NAME, "prompt": "x", "max_tokens": 2}, timeout=30)[-1] == "data: [DONE]"
        srv.good()
    finally:
        srv.stop()


def _made_after_leaving(server: Server, start) -> tuple[float, float]:
    """(tokens made while `start()`'s client was there, tokens made after it left); `start`
    returns the client's close and whether the work has begun. Counted by
    the server, not timed: on a loaded machine a CPU rate says little, a count says what ran."""
    before = server.generated()
    close, begun = start()
    # the work has begun (a stream's first event read, or a few tokens counted): bounded by the
    # work, not a sleep
    wait_until = time.monotonic() + 120
    while not begun() and (made := server.generated() - before) < 5:
        assert time.monotonic() < wait_until, "the server made no token in 120 s"
        time.sleep(0.05)
    close()
    made = server.generated() - before
    # the count settles once the generations have seen the disconnect (at their next token)
    last, settled_at = server.generated(), time.monotonic()
    while time.monotonic() - settled_at < 3.0:
        time.sleep(0.5)
        now = server.generated()
        if now != last:
            last, settled_at = now, time.monotonic()
        assert time.monotonic() - wait_until < 300, "the server went on generating for 5 minutes"
    return made, last - before - made


def test_work_stops_when_the_client_leaves(server: Server):
    """before: v1 went on through every instance, and streams to the end, for nobody."""
    def v1():
        c = http.client.HTTPConnection(HOST, server.port, timeout=60)
        c.request("POST", V1, body=json.dumps({"instances": [{"prompt": "def f(x):", "max_tokens": 500}] * 8}),
                  headers={"content-type": "application/json"})
        return c.close, lambda: False

    def streams():
        conns = []
        for _ in range(3):
            c = http.client.HTTPConnection(HOST, server.port, timeout=60)
            c.request("POST", C, body=json.dumps({"model": NAME, "prompt": "def f(x):", "max_tokens": 500,
                                                  "stream": True}), headers={"content-type": "application/json"})
            conns.append(c)
        # Nothing read: the streamer sends text at word ends, and a model of random weights may
        # write none for a whole stream; the server's count says when the work has begun.
        return (lambda: [c.close() for c in conns]), lambda: False

    # Asked for: 8 x 500 tokens (v1), 3 x 500 (streams, made one at a time); a server that went
    # on would make them all. The clients leave once a few tokens are counted; the bounds leave
    # room for a server slow to see them go: the current generation may run to its end, the
    # next one must not run (a third of v1's, two of the three streams).
    for start, asked, bound in ((v1, 8 * 500, 1000), (streams, 3 * 500, 1000)):
        made, after = _made_after_leaving(server, start)
        print(f"\n{start.__name__}: {made:.0f} tokens before the client left, {after:.0f} after (of {asked} asked)")
        assert made + after < bound, f"{start.__name__}: the server went on after the client left: " \
                                     f"{made:.0f} tokens before, {after:.0f} after, of {asked} asked"
    server.good()


def test_requests_beyond_the_pending_bound_get_503_not_memory(server: Server):
    """before: no bound: every request queued for the model, holding its prompt and a thread."""
    conns = []
    for _ in range(PENDING + 3):
        c = http.client.HTTPConnection(HOST, server.port, timeout=300)
        c.request("POST", C, body=json.dumps({"model": NAME, "prompt": "def f(x):", "max_tokens": 60}),
                  headers={"content-type": "application/json"})
        conns.append(c)
    statuses = []
    for c in conns:
        r = c.getresponse()
        statuses.append(r.status)
        body = r.read()
        if r.status == 503:
            assert r.getheader("retry-after") == "1" and b"the server is busy" in body
        c.close()
    assert statuses.count(200) >= PENDING and statuses.count(503) >= 1 and set(statuses) <= {200, 503}, statuses
    server.good()


# -- random mutations of good requests ------------------------------------------------------------

GOOD = [
    (C, {"model": NAME, "prompt": "def f(x):", "max_tokens": 3}),
    (C, {"model": NAME, "prompt": "import os", "max_tokens": 2, "temperature": 0.7, "top_p": 0.9, "stream": True}),
    (CHAT, {"model": NAME, "messages": [{"role": "user", "content": "What is a list?"}], "max_tokens": 3}),
    (V1, {"instances": ["x = 1", {"prompt": "class A:", "max_tokens": 2}]}),
    (V2, {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["for i in"]}],
          "parameters": {"max_tokens": 2}}),
]
# Values an attacker tries; raw JSON text where json.dumps cannot write it as they do.
EVIL = ["NaN", "Infinity", "-Infinity", "1e400", "-1", "0", "1", "2", "9223372036854775808",
        "1000000000000000000000000000000", "1e-320", "-0.0", "0.5", '""', "null", "true", "[]", "{}",
        '"\\ud800"', '"\\u0000"', '"' + "\u00e9" * 50 + '"', '"' + "x" * 200_000 + '"',
        "[" * 3000 + "]" * 3000, json.dumps(["x"] * 40), json.dumps([{"prompt": 5}]),
        '{"role": "wizard", "content": "x"}', '"tiny"', '"other"']


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


def _mutate(rng: random.Random) -> tuple[str, bytes]:
    path, body = rng.choice(GOOD)
    body = json.loads(json.dumps(body))
    how = rng.random()
    if how < 0.08:  # bytes flipped or cut
        raw = bytearray(json.dumps(body).encode())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return path, bytes(raw[:rng.randint(1, len(raw))] if rng.random() < 0.3 else raw)
    where = rng.choice([p for p in _paths(body) if p])
    parent = body
    for k in where[:-1]:
        parent = parent[k]
    if how < 0.2 and isinstance(parent, dict):
        del parent[where[-1]]
        return path, json.dumps(body).encode()
    if how < 0.3 and isinstance(parent, dict):  # an extra field
        parent[rng.choice(["stream", "n", "top_k", "top_p", "seed", "stop", "logprobs", "user"])] = "@EVIL@"
    else:
        parent[where[-1]] = "@EVIL@"
    return path, json.dumps(body).replace('"@EVIL@"', rng.choice(EVIL)).encode()


@pytest.mark.timeout(600)
def test_random_mutations_get_a_4xx_or_an_answer(server: Server):
    """200 seeded mutations of good requests to every endpoint: each answer is 200 or a 4xx,
    within its timeout; a stream ends with [DONE]; memory stays bounded; a good request answers.
    before: 500s (NaN echoed, lone surrogates, RecursionError), and the hangs above."""
    rng = random.Random(17)
    server.good()
    rss, t0, seen = server.rss_mb(), time.monotonic(), {}
    for i in range(200):
        path, raw = _mutate(rng)
        status, answer = server.request(path, raw, timeout=60)
        seen[status] = seen.get(status, 0) + 1
        assert status == 200 or 400 <= status < 500, (i, path, raw[:300], status, answer[:500])
        if status == 200 and answer.startswith(b"data: "):
            events = [e for e in answer.decode().split("\n\n") if e]
            assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), (i, raw[:300], events)
    took = time.monotonic() - t0
    print(f"\n200 mutated requests in {took:.0f}s: statuses {dict(sorted(seen.items()))}; "
          f"RSS {rss:.0f} -> {server.rss_mb():.0f} MB")
    assert server.rss_mb() - rss < 150, (rss, server.rss_mb())
    server.good()


# -- where the server listens, the port check, stopping ----------------------------------------------


def test_the_server_listens_on_loopback_and_says_so(server: Server):
    """before: 0.0.0.0 (every interface) while the CLI printed 127.0.0.1."""
    conns = getattr(server.ps, "net_connections", server.ps.connections)("tcp")
    listening = {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
    assert listening == {HOST}, listening
    assert f"serving {NAME} on http://127.0.0.1:{server.port}" in server.log.read_text()


def test_a_port_in_time_wait_counts_as_free():
    """before: the check bound without SO_REUSEADDR, so the connections of a server that had just
    stopped (TIME-WAIT, a minute) made `fmforge serve` fail with 'port in use'."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen()
    port = listener.getsockname()[1]
    assert not _port_free(port)  # a listening socket is in use
    client = socket.create_connection((HOST, port))
    conn, _ = listener.accept()
    conn.close()  # the server's side closes first: its socket goes to TIME-WAIT on `port`
    client.recv(1)
    client.close()
    listener.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind((HOST, port))  # the old check's bind: refused while the TIME-WAIT socket lingers
    assert _port_free(port)


def test_the_server_stops_promptly_after_the_attacks(server: Server):
    """before: SIGTERM left it waiting on hung streams and work for gone clients (over a minute)."""
    server.good()
    assert server.stop() < 15


# -- the approved digest (defect 4) -------------------------------------------------------------------


def test_changed_model_files_are_refused_with_exit_code_3(lm: Path, tmp_path: Path):
    """before: --model-digest did not exist; the server served whatever bytes were there."""
    model = tmp_path / "model"
    shutil.copytree(lm, model)
    approved = model_digest(model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    changed = model_digest(model)
    with pytest.raises(StageError) as e:
        start_server(NAME, model, free_port(HOST), tmp_path / "server.log", digest=approved)
    assert "exited with code 3" in str(e.value)
    line = next(ln for ln in str(e.value).splitlines() if "refusing to serve" in ln)
    assert approved in line and changed in line
    assert "the model files changed after they were approved; run the producer again and approve the new " \
           "digest" in line
    # the digest from the environment when the flag is absent
    proc = subprocess.run([sys.executable, "-m", "fmforge.stages.deploy.predictor", "--model-dir", str(model),
                           "--name", NAME, "--port", str(free_port(HOST))], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FMFORGE_MODEL_DIGEST": approved})
    assert proc.returncode == 3 and approved in proc.stderr and changed in proc.stderr, proc.stderr[-2000:]
