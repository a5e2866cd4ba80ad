"""The model server of a Deployment: kserve predictors for a Hugging Face model directory.

Run as `python -m fmforge.stages.deploy.predictor --model-dir DIR --name NAME --port PORT` by
the Deployment stage locally (`fmforge run`, `fmforge serve`) and as the entrypoint of the
fmforge predictor image on a cluster (`runtime: fmforge`). kserve's `ModelServer` serves the
predictors (its `Model` lifecycle: load, then predict):

- a causal LM answers KServe v1 (`POST /v1/models/NAME:predict`, instances of prompts) and v2
  (`POST /v2/models/NAME/infer`, a BYTES input `text`), and the OpenAI-compatible
  `POST /openai/v1/completions` and `/openai/v1/chat/completions` (with `stream: true` as
  server-sent events) and `GET /openai/v1/models`; a chat is rendered with the model's own chat
  template (the one it was tuned in), and a model without one refuses chats (400) instead of
  answering a prompt it never saw the like of;
- a sequence classifier answers v1 and v2 with labels and scores.

kserve 0.21 builds its own OpenAI endpoints on vLLM's request types (vLLM is a GPU serving
engine that does not install here), so the OpenAI routes are fmforge's: a small FastAPI router
added to kserve's app (`kserve.model_server.app`, the app its server runs; pinned to
kserve 0.21.x).

The server is exposed to whoever can reach its port, so every request is bounded before it costs
anything: it listens on loopback unless `--host` says otherwise (a cluster passes 0.0.0.0); the
request head (line and headers) may be 64 KiB (431 beyond) and the body `--max-body-bytes`
(413 beyond, refused before it is read whole); at most `--max-connections` connections are open
and `--max-pending` requests use or wait for the model at once (503 beyond); a request holds at
most MAX_INSTANCES prompts, each checked for its length in characters before it is tokenized.
Bad input gets a 4xx naming the field and never stops the server: `InvalidInput` (400) on v1/v2,
an OpenAI-shaped error on the OpenAI routes (422 for a body that is not the request's shape,
400 for a request the model cannot answer). Work stops when its client disconnects, streams
included, and a stream whose generation fails ends with an error event. kserve's `GET /metrics`
carries `fmforge_generated_tokens_total{model}`, counted token by token as they are made (a
request whose client left stops adding to it).

With `--model-digest` (or FMFORGE_MODEL_DIGEST) the server first checks that the model files
are the ones approved and exits with code 3 when they are not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import kserve
import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from kserve.errors import InferenceError, InvalidInput
from kserve.logging import logger
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.server import RESTServer
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: The most new tokens one request may ask for, whatever the context leaves.
MAX_NEW_TOKENS = 1024
#: The most prompts or texts in one request (v1 `instances`, v2 `text` elements).
MAX_INSTANCES = 32
#: Request bodies above this many bytes get 413 (`--max-body-bytes`).
MAX_BODY_BYTES = 1 << 20
#: The request line and headers together; more gets 431.
MAX_HEAD_BYTES = 64 << 10
#: Requests using or waiting for the model at once; more get 503 (`--max-pending`).
MAX_PENDING = 16
#: A refused body or head is still read (and dropped) up to this many bytes, for at most
#: DRAIN_SECONDS, before the connection closes: closing a socket with unread data resets it, and
#: a client still sending would get the reset instead of the answer.
DRAIN_BYTES = 64 << 20
DRAIN_SECONDS = 5.0
#: Open connections at once; more get 503 from uvicorn (`--max-connections`).
MAX_CONNECTIONS = 64
#: Temperatures below this decode greedily: sampling at them picks the likeliest token anyway,
#: and dividing the logits by a tiny number overflows them into NaN probabilities.
MIN_TEMPERATURE = 1e-4
#: The exit code when the model files are not the approved ones (`--model-digest`).
EXIT_DIGEST_MISMATCH = 3

#: Tokens generated, counted at each decoding step (kserve's /metrics serves prometheus_client's
#: default registry): the throughput a dashboard plots, and the proof that work stops for a
#: client that left.
GENERATED_TOKENS = Counter("fmforge_generated_tokens", "Tokens the model generated, counted as they are made",
                           ["model"])

# The disconnect event of the request being served (set by RequestGuard), for work that kserve
# calls without the request object (`predict`).
_CLIENT_GONE: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("fmforge_client_gone",
                                                                                      default=None)


def client_gone() -> threading.Event:
    """The event set when this request's client disconnects (a fresh, unset one outside a request)."""
    return _CLIENT_GONE.get() or threading.Event()


class Busy(Exception):
    """Too many requests use or wait for the model: 503, try again shortly."""


def is_classifier(model_dir: Path) -> bool:
    config = json.loads((model_dir / "config.json").read_text())
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def has_chat_template(model_dir: Path) -> bool:
    """Whether the model's tokenizer has a chat template (transformers saves it as
    chat_template.jinja, older versions inside tokenizer_config.json), read without loading it."""
    if (model_dir / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def check_text(text: str, field: str) -> None:
    """InvalidInput when `text` is not valid Unicode (a JSON escape can smuggle in a lone surrogate,
    which the tokenizers cannot take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(f"{field} is not valid Unicode: a lone surrogate at character {e.start}; send UTF-8 "
                           f"text") from None


def _v2_texts(payload: InferRequest, what: str) -> list[Any]:
    """The strings of a v2 request's BYTES input `text`."""
    text = next((i for i in payload.inputs if i.name == "text"), None)
    if text is None or text.datatype != "BYTES":
        raise InvalidInput(f"v2 requests need a BYTES input named 'text' holding the {what}")
    data = text.data if isinstance(text.data, list) else []
    if len(data) > MAX_INSTANCES:
        raise InvalidInput(f"input 'text': {len(data)} elements; at most {MAX_INSTANCES} per request: split them "
                           f"over several requests")
    out = []
    for i, t in enumerate(data):
        if isinstance(t, bytes):
            try:
                t = t.decode()
            except UnicodeDecodeError:
                raise InvalidInput(f"input 'text' element {i} is not UTF-8 text; send the {what} as UTF-8") from None
        out.append(t)
    return out


def _capped(items: Any, field: str) -> list[Any]:
    """`items` (v1 `instances`) checked to be a list of at most MAX_INSTANCES."""
    if isinstance(items, list) and len(items) > MAX_INSTANCES:
        raise InvalidInput(f"{field}: {len(items)} items; at most {MAX_INSTANCES} per request: split them over "
                           f"several requests")
    return items


def _context_length(tokenizer, config) -> int:
    """The most tokens the model reads: its position embeddings, or the tokenizer's limit."""
    n = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0) or 0)
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1 << 24:  # tokenizers without a limit say ~1e30
        n = min(n, limit) if n else limit
    return n or 512


def _longest_token(tokenizer) -> int:
    """The most characters one token of this tokenizer stands for (its vocabulary's longest entry:
    byte-level and WordPiece entries are at least as long as the text they cover), so that a text
    longer than context x this cannot fit the context and is refused without being tokenized."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


class _Admission:
    """At most `limit` requests use or wait for the model at once; more are refused with Busy
    (503) at once, so a flood neither queues without end nor holds memory for requests that
    would wait minutes. Used from the event loop's thread only."""

    def __init__(self, limit: int):
        self.limit, self.pending = limit, 0

    def enter(self) -> None:
        if self.pending >= self.limit:
            raise Busy(f"the server is busy: {self.pending} requests use or wait for the model; retry shortly")
        self.pending += 1

    def leave(self) -> None:
        self.pending -= 1


def _in_worker(admission: _Admission, fn: Callable, *args) -> asyncio.Future:
    """fn(*args) in a worker thread, admitted; its admission is held until the thread ends (not
    until the request ends: a request cancelled meanwhile must not free a slot its thread still
    uses)."""
    admission.enter()
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def done(f: asyncio.Future) -> None:
        admission.leave()
        if not f.cancelled():
            f.exception()  # retrieved here: the awaiting request may be gone

    fut.add_done_callback(done)
    return fut


@dataclass(frozen=True)
class Sampling:
    """How to decode: greedy at temperature 0 (or below MIN_TEMPERATURE), sampled otherwise."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None


class GenerativePredictor(kserve.Model):
    """A causal language model: greedy or sampled completions of prompts."""

    def __init__(self, name: str, model_dir: Path, max_pending: int = MAX_PENDING):
        super().__init__(name)
        self.model_dir = model_dir
        # torch runs one generation at a time well on a few cores; admitted requests queue on
        # this lock instead of fighting over the same threads.
        self._lock = threading.Lock()
        self.admission = _Admission(max_pending)

    def load(self) -> bool:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir).eval()
        #: Whether the tokenizer has a chat template: chat completions need one.
        self.chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.context_length = _context_length(self.tokenizer, self.model.config)
        self.longest_token = _longest_token(self.tokenizer)
        self.max_prompt_chars = self.context_length * self.longest_token
        self.ready = True
        return self.ready

    # -- the work --------------------------------------------------------------------------------
    def check(self, prompt: Any, max_tokens: Any, where: str = "", special: bool = True) -> list[int]:
        """The prompt's token ids; InvalidInput (400) for what cannot be answered. `where` names
        the prompt's place in the request (`instances[2]: `) in the messages; `special`: add the
        tokenizer's special tokens (not to a chat the template rendered, which holds its own)."""
        if not isinstance(prompt, str) or not prompt:
            raise InvalidInput(f"{where}prompt must be a non-empty string (got {type(prompt).__name__})")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidInput(f"{where}max_tokens must be a positive integer (got {max_tokens!r:.40})")
        check_text(prompt, f"{where}prompt")
        # Before tokenizing: a megabyte of text costs the tokenizer seconds and hundreds of MB.
        if len(prompt) > self.max_prompt_chars:
            raise InvalidInput(f"{where}the prompt is {len(prompt)} characters; this model reads at most "
                               f"{self.context_length} tokens, which no text over {self.max_prompt_chars} characters "
                               f"fits; shorten the prompt")
        ids = self.tokenizer(prompt, add_special_tokens=special)["input_ids"]
        room = self.context_length - len(ids)
        if room < 1:
            raise InvalidInput(f"{where}the prompt is {len(ids)} tokens; this model reads at most "
                               f"{self.context_length}")
        if max_tokens > min(room, MAX_NEW_TOKENS):
            raise InvalidInput(f"{where}max_tokens {max_tokens} is more than this request may generate: at most "
                               f"{min(room, MAX_NEW_TOKENS)} (context {self.context_length}, prompt {len(ids)} tokens)")
        return ids

    def _kwargs(self, ids: list[int], s: Sampling) -> dict[str, Any]:
        import torch

        sample = s.temperature >= MIN_TEMPERATURE
        extra: dict[str, Any] = {}
        if sample:
            extra = {"temperature": s.temperature, "top_p": s.top_p}
            if s.top_k is not None:  # 0: no top-k cut; more than the vocabulary is all of it
                extra["top_k"] = min(s.top_k, len(self.tokenizer))
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                "max_new_tokens": s.max_tokens, "do_sample": sample, **extra,
                "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                else self.tokenizer.eos_token_id}

    def _generate(self, ids: list[int], s: Sampling, gone: threading.Event, streamer=None) -> list[int]:
        """The new token ids (in a worker thread); stops at the next token once `gone` is set,
        and does nothing for a client that left while it waited."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        made = GENERATED_TOKENS.labels(self.name)

        class _Gone(StoppingCriteria):
            # Called once per decoding step, after the step's token is made.
            def __call__(self, input_ids, scores, **kwargs):
                import torch

                made.inc(input_ids.shape[0])
                return torch.full((input_ids.shape[0],), gone.is_set(), dtype=torch.bool, device=input_ids.device)

        with self._lock:
            if gone.is_set():
                return []
            out = self.model.generate(**self._kwargs(ids, s), streamer=streamer,
                                      stopping_criteria=StoppingCriteriaList([_Gone()]))
        return out[0, len(ids):].tolist()

    def generate(self, prompt: str, max_tokens: int = 32, temperature: float = 0.0) -> tuple[str, int, int]:
        """(completion, prompt tokens, completion tokens), in the calling thread (the in-process
        baseline of `make bench-serve`)."""
        ids = self.check(prompt, max_tokens)
        out = self._generate(ids, Sampling(max_tokens, temperature), threading.Event())
        return self.tokenizer.decode(out, skip_special_tokens=True), len(ids), len(out)

    async def complete(self, ids: list[int], s: Sampling, gone: threading.Event) -> tuple[str, int]:
        """(completion, completion tokens)."""
        out = await asyncio.shield(_in_worker(self.admission, self._generate, ids, s, gone))
        return self.tokenizer.decode(out, skip_special_tokens=True), len(out)

    def start_stream(self, ids: list[int], s: Sampling, gone: threading.Event) -> AsyncIterator[str]:
        """The completion piece by piece, as the model makes it. Admitted now (Busy here, before
        any response starts); the generation runs in a worker thread that hands pieces to the
        event loop, so a stream holds no thread while it waits. The iterator raises the
        generation's error after the pieces made before it, and closing it stops the generation."""
        from transformers import TextStreamer

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        class _Pieces(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    loop.call_soon_threadsafe(queue.put_nowait, text)

        streamer = _Pieces(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        fut = _in_worker(self.admission, self._generate, ids, s, gone, streamer)
        # Runs after the pieces' callbacks (all queued from the thread before it ended).
        fut.add_done_callback(lambda _: queue.put_nowait(None))

        async def pieces() -> AsyncIterator[str]:
            try:
                while (piece := await queue.get()) is not None:
                    yield piece
                fut.result()
            finally:  # the client left (cancelled here) or the stream was closed early
                gone.set()

        return pieces()

    # -- KServe v1 and v2 --------------------------------------------------------------------------
    async def _answer_all(self, jobs: list[tuple[str, Any, Any]]) -> list[str]:
        """Completions of (where, prompt, max_tokens): all checked first, so a bad one costs no
        generation; the rest stop when the client leaves."""
        checked = [await asyncio.to_thread(self.check, p, m, w) for w, p, m in jobs]
        gone, outs = client_gone(), []
        for ids, (_, _, m) in zip(checked, jobs, strict=True):
            if gone.is_set():
                break
            outs.append((await self.complete(ids, Sampling(m), gone))[0])
        return outs

    async def predict(self, payload: dict | InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        if isinstance(payload, InferRequest):
            prompts = _v2_texts(payload, "prompts")
            params = payload.parameters or {}
            max_tokens = params.get("max_tokens", 32) if isinstance(params, dict) else 32
            outs = await self._answer_all([(f"input 'text' element {i}: ", p, max_tokens)
                                           for i, p in enumerate(prompts)])
            return InferResponse(model_name=self.name, infer_outputs=[
                InferOutput(name="text", shape=[len(outs)], datatype="BYTES", data=outs)],
                response_id=payload.id or str(uuid.uuid4()))
        instances = _capped(payload.get("instances") if isinstance(payload, dict) else None, "instances")
        if not isinstance(instances, list) or not instances:
            raise InvalidInput('v1 requests are {"instances": [...]}, each a prompt or {"prompt": ..., '
                               '"max_tokens": ...}')
        jobs = [(f"instances[{i}]: ", *((inst.get("prompt"), inst.get("max_tokens", 32)) if isinstance(inst, dict)
                                        else (inst, 32))) for i, inst in enumerate(instances)]
        return {"predictions": await self._answer_all(jobs)}


class ClassifierPredictor(kserve.Model):
    """A sequence classifier: a label and its probability per text."""

    def __init__(self, name: str, model_dir: Path, max_pending: int = MAX_PENDING):
        super().__init__(name)
        self.model_dir = model_dir
        self.admission = _Admission(max_pending)

    def load(self) -> bool:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_dir).eval()
        # Texts are truncated to the context; cutting them to the characters that can fit it
        # first spares the tokenizer a megabyte it would throw away.
        self.max_chars = _context_length(self.tokenizer, self.model.config) * _longest_token(self.tokenizer)
        self.ready = True
        return self.ready

    def classify(self, texts: list[Any]) -> list[tuple[str, float]]:
        bad = [type(t).__name__ for t in texts if not isinstance(t, str) or not t]
        if bad or not texts:
            raise InvalidInput(f"instances must be non-empty strings (got {', '.join(bad) or 'none'})")
        for i, t in enumerate(texts):
            check_text(t, f"instances[{i}]")
        batch = self.tokenizer([t[:self.max_chars] for t in texts], padding=True, truncation=True,
                               return_tensors="pt")
        # Grad mode is per thread: a global switch in load() would leak into whatever else runs
        # on the loading thread (a test process that trains next) and miss the worker threads.
        import torch

        with torch.inference_mode():
            probs = self.model(**batch).logits.softmax(-1)
        scores, labels = probs.max(-1)
        id2label = self.model.config.id2label
        return [(id2label[int(i)], float(s)) for i, s in zip(labels, scores, strict=True)]

    async def _classify(self, texts: list[Any]) -> list[tuple[str, float]]:
        return await asyncio.shield(_in_worker(self.admission, self.classify, texts))

    async def predict(self, payload: dict | InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        if isinstance(payload, InferRequest):
            out = await self._classify(_v2_texts(payload, "texts"))
            return InferResponse(model_name=self.name, response_id=payload.id or str(uuid.uuid4()), infer_outputs=[
                InferOutput(name="label", shape=[len(out)], datatype="BYTES", data=[o[0] for o in out]),
                InferOutput(name="score", shape=[len(out)], datatype="FP32", data=[o[1] for o in out])])
        instances = _capped(payload.get("instances") if isinstance(payload, dict) else None, "instances")
        if not isinstance(instances, list):
            raise InvalidInput('v1 requests are {"instances": ["text", ...]}')
        out = await self._classify(instances)
        return {"predictions": [{"label": label, "score": score} for label, score in out]}


# -- the OpenAI-compatible routes -----------------------------------------------------------------


class _Request(BaseModel):
    # Unknown fields (user, stop, presence_penalty, ...) are ignored, as OpenAI's clients send them.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    n: int = 1
    stream: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("this server makes one choice per request: send n=1 or leave n out")
        return n

    def sampling(self) -> Sampling:
        return Sampling(self.max_tokens, self.temperature, self.top_p, self.top_k)


class CompletionRequest(_Request):
    """The fields of OpenAI's completions request that fmforge's server honours."""

    prompt: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    """The fields of OpenAI's chat completions request that fmforge's server honours."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "BadRequestError", 422: "BadRequestError",
                431: "BadRequestError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


def _error_content(status: int, message: str, param: str = "") -> dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "APIError"), "param": param,
                      "code": str(status)}}


def _error(status: int, message: str, param: str = "") -> JSONResponse:
    return JSONResponse(status_code=status, content=_error_content(status, message, param))


#: The answer to a chat for a model without a chat template.
NO_CHAT_TEMPLATE = ("this model has no chat template, so it cannot take chat messages: its tokenizer says nothing "
                    "about how turns are written; send a prompt to /openai/v1/completions instead, or serve a model "
                    "tuned in a chat template (TunedModel data.format: chat)")


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """A chat as the model's chat template writes it, ending where the assistant answers: the
    turns as the model was tuned on them (TunedModel data.format: chat) and as the ModelCard
    asked them (format: chat)."""
    return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                         add_generation_prompt=True, tokenize=False)


def _not_json(value: Any) -> tuple[str, str] | None:
    """(field, message) for the first value in `value` (read by Python's lenient json) that JSON
    does not allow: a non-finite number, or a string with a lone surrogate."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return where or "body", f"{where or 'body'}: {v} is not a JSON number; send a finite number"
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body", (f"{where or 'body'}: the string holds a lone surrogate (not valid "
                                         f"Unicode); send UTF-8 text")
        elif isinstance(v, dict):
            stack.extend((f"{where}.{k}" if where else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v))
    return None


def parse_body(raw: bytes, cls: type[BaseModel]) -> BaseModel | JSONResponse:
    """The request body as `cls`, or a 422 naming the field. orjson reads strict JSON: no NaN or
    Infinity, no lone surrogates, at most 1024 levels deep (Python's json recurses until it
    fails)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        try:  # only to say where: Python's json reads NaN, Infinity and lone surrogates
            field, message = _not_json(json.loads(raw)) or ("body", f"body: JSON decode error: {e}")
        except (ValueError, RecursionError):
            field, message = "body", f"body: JSON decode error: {e}"
        return _error(422, message, field)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        fields = [".".join(str(p) for p in err["loc"]) or "body" for err in errors]
        return _error(422, "; ".join(f"{f}: {err['msg']}" for f, err in zip(fields, errors, strict=True)), fields[0])


def _sse(data: dict[str, Any]) -> str:
    return "data: " + json.dumps(data) + "\n\n"


def _chat_text(model: GenerativePredictor, body: ChatRequest) -> str | JSONResponse:
    """The chat in the model's template, or the 400 of a model without one (or whose template
    refuses these messages, as some raise on a role order they do not support)."""
    if not model.chat_template:
        return _error(400, NO_CHAT_TEMPLATE, "messages")
    try:
        return chat_prompt(model.tokenizer, body.messages)
    except Exception as e:  # noqa: BLE001 - Jinja's raise_exception, or any error of the template
        return _error(400, f"the model's chat template refused these messages: {e}", "messages")


def openai_router(model: GenerativePredictor) -> APIRouter:
    """Completions, chat completions and the model list, for one generative model."""
    router = APIRouter(prefix="/openai/v1")

    async def answer(body: _Request, prompt: str | None, chat: bool):
        if body.model != model.name:
            return _error(404, f"model {body.model!r} is not served here; this server serves {model.name!r}", "model")
        if chat:
            prompt = _chat_text(model, body)
            if isinstance(prompt, JSONResponse):
                return prompt
        try:
            ids = await asyncio.to_thread(model.check, prompt, body.max_tokens, "", not chat)
        except InvalidInput as e:
            return _error(400, str(e), "max_tokens" if str(e).startswith("max_tokens") else
                          "messages" if chat else "prompt")
        created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion" if chat else "text_completion"
        gone = client_gone()
        if not body.stream:
            try:
                text, n_out = await model.complete(ids, body.sampling(), gone)
            except Busy:
                raise
            except Exception as e:  # noqa: BLE001 - the request was checked: a failure here is the server's
                return _error(500, f"the model failed to generate: {type(e).__name__}: {e}")
            choice = {"index": 0, "finish_reason": "length" if n_out >= body.max_tokens else "stop",
                      **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
            return {"id": rid, "object": kind, "created": created, "model": model.name, "choices": [choice],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": n_out,
                              "total_tokens": len(ids) + n_out}}

        pieces = model.start_stream(ids, body.sampling(), gone)  # Busy here: a 503 before the stream starts

        async def events() -> AsyncIterator[str]:
            head = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created, "model": model.name}
            try:
                async for piece in pieces:
                    delta = {"delta": {"content": piece}} if chat else {"text": piece}
                    yield _sse({**head, "choices": [{"index": 0, "finish_reason": None, **delta}]})
            except Exception as e:  # noqa: BLE001 - the stream has started: the error goes in it, then it ends
                yield _sse(_error_content(500, f"the model failed to generate: {type(e).__name__}: {e}"))
            finally:
                await pieces.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @router.post("/completions")
    async def completions(request: Request):
        body = parse_body(await request.body(), CompletionRequest)
        return body if isinstance(body, JSONResponse) else await answer(body, body.prompt, False)

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        body = parse_body(await request.body(), ChatRequest)
        return body if isinstance(body, JSONResponse) else await answer(body, None, True)

    @router.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model.name, "object": "model", "owned_by": "fmforge"}]}

    return router


# -- the bounds in front of kserve's app ---------------------------------------------------------


def _refusal(path: str, status: int, message: str, param: str = "") -> bytes:
    """An error body in the shape of the route: OpenAI's or kserve's."""
    content = _error_content(status, message, param) if path.startswith("/openai/") else {"error": message}
    return json.dumps(content).encode()


class RequestGuard:
    """ASGI middleware, outermost: refuses a body over `max_body` bytes with 413 as soon as its
    Content-Length (or, chunked, its bytes so far) says so, without reading it whole; hands the
    app the body it read, and sets the request's disconnect event (`client_gone`) when the client
    goes, so that work for nobody stops."""

    def __init__(self, app, max_body: int = MAX_BODY_BYTES):
        self.app, self.max_body = app, max_body

    async def _refuse(self, scope, receive, send, size: str, read: int = 0) -> None:
        headers = dict(scope["headers"])
        if headers.get(b"expect", b"").lower() != b"100-continue":  # such a client waits for the answer
            async def drain(left: int) -> None:
                while left > 0:
                    message = await receive()
                    if message["type"] == "http.disconnect" or not message.get("more_body", False):
                        return
                    left -= len(message.get("body", b""))

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drain(DRAIN_BYTES - read), DRAIN_SECONDS)
        body = _refusal(scope.get("path", ""), 413, f"the request body is {size} bytes; this server takes at most "
                        f"{self.max_body} (--max-body-bytes): send a shorter prompt or fewer instances", "body")
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})  # the rest of the body is not read: the connection goes
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._refuse(scope, receive, send, length.decode("latin-1")[:20])
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_body:
                return await self._refuse(scope, receive, send, f"more than {self.max_body}", size)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        gone, gone_here = threading.Event(), asyncio.Event()

        async def watch() -> None:
            # After the body the server only says http.disconnect: the client left, or the
            # response is complete.
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            gone_here.set()

        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone_here.wait()
            return {"type": "http.disconnect"}

        watcher = asyncio.create_task(watch())
        token = _CLIENT_GONE.set(gone)
        try:
            await self.app(scope, replay, send)
        finally:
            _CLIENT_GONE.reset(token)
            watcher.cancel()


def _bounded_head_protocol(max_head: int):
    """uvicorn's httptools protocol with a bound on the request head: httptools and uvicorn keep
    a URL and headers of any size in memory, so the bytes read before the head ends are counted
    and more than `max_head` get 431 and the connection closed. (uvicorn's h11 protocol bounds
    the head itself; it is the fallback without httptools.)"""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class BoundedHead(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            self._head_bytes, self._in_head, self._refused, self._tail = 0, True, False, b""
            super().connection_made(transport)

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._head_bytes, self._in_head, self._tail = 0, True, b""
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            if self._refused:  # dropped, until DRAIN_BYTES or DRAIN_SECONDS (see there)
                self._head_bytes += len(data)
                if self._head_bytes > max_head + DRAIN_BYTES:
                    self.transport.close()
                return
            if self._in_head:
                # The head's bytes in this chunk: up to its blank line, which may straddle chunks
                # (the chunk's rest is body, or the next request, counted when its head goes on).
                seen = self._tail + data
                end = seen.find(b"\r\n\r\n")
                self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
                self._tail = seen[-3:]
                if self._head_bytes > max_head:
                    self._refuse()
                    return
            super().data_received(data)

        def _refuse(self) -> None:
            self._refused = True
            if self.cycle is not None and not self.cycle.response_complete:  # in the middle of a response
                self.transport.close()
                return
            msg = (f"the request line and headers are over {max_head} bytes; this server takes at most "
                   f"{max_head}").encode()
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                 b"content-type: text/plain; charset=utf-8\r\n"
                                 b"content-length: " + str(len(msg)).encode() + b"\r\n"
                                 b"connection: close\r\n\r\n" + msg)
            asyncio.get_running_loop().call_later(DRAIN_SECONDS, self.transport.close)

    return BoundedHead


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 without echoing the input: an echoed NaN made its JSON encoder fail (a 500),
    and an echoed megabyte is a megabyte sent back."""
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": errors})


async def _invalid_input(request: Request, exc: InvalidInput) -> JSONResponse:
    # kserve's handler logs a traceback per bad request: a client could fill the disk with them.
    logger.warning("%s %s: 400 %s", request.method, request.url.path, str(exc)[:300])
    return JSONResponse(status_code=400, content={"error": str(exc)})


async def _busy(request: Request, exc: Busy) -> JSONResponse:
    return JSONResponse(status_code=503, headers={"Retry-After": "1"},
                        content=json.loads(_refusal(request.url.path, 503, str(exc))))


class _DataPlane(DataPlane):
    """kserve's data plane, with v2 binary requests that cannot be decoded refused as the
    request's fault (400 naming the input), not the server's (kserve answers 500)."""

    def decode_inference_request(self, body, headers, model_name):
        try:
            return super().decode_inference_request(body, headers, model_name)
        except InvalidInput:
            raise
        except (InferenceError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise InvalidInput(_binary_problem(body, headers)
                               or f"the v2 request cannot be read ({type(e).__name__}: {e})") from None


def _binary_problem(body: Any, headers: dict[str, str]) -> str | None:
    """Which BYTES input of a v2 binary request holds an element that is not UTF-8, if one does."""
    try:
        start = int(headers["inference-header-content-length"])
        inputs = orjson.loads(body[:start])["inputs"]
        for inp in inputs:
            size = int((inp.get("parameters") or {}).get("binary_data_size") or 0)
            raw, start = body[start:start + size], start + size
            if inp.get("datatype") != "BYTES":
                continue
            i = pos = 0
            while pos + 4 <= len(raw):
                n = int.from_bytes(raw[pos:pos + 4], "little")
                try:
                    raw[pos + 4:pos + 4 + n].decode()
                except UnicodeDecodeError:
                    return f"input '{inp.get('name')}' element {i} is not UTF-8 text; send text as UTF-8"
                pos, i = pos + 4 + n, i + 1
    except Exception:  # noqa: BLE001 - only a better message; kserve's stands otherwise
        return None
    return None


@dataclass(frozen=True)
class Limits:
    """The bounds of one server (see the module's docstring)."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_pending: int = MAX_PENDING
    max_connections: int = MAX_CONNECTIONS
    max_head_bytes: int = MAX_HEAD_BYTES


class _RESTServer(RESTServer):
    """kserve's REST server on `host`, with fmforge's bounds and error handlers."""

    def __init__(self, *args, host: str, limits: Limits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        # kserve listens on 0.0.0.0 whatever it is told; the config is read when uvicorn starts.
        self.config.host = host
        self.config.limit_concurrency = limits.max_connections
        protocol = _bounded_head_protocol(limits.max_head_bytes)
        if protocol is None:
            self.config.http, self.config.h11_max_incomplete_event_size = "h11", limits.max_head_bytes
        else:
            self.config.http = protocol

    def _add_middlewares(self, app) -> None:
        super()._add_middlewares(app)
        app.add_middleware(RequestGuard, max_body=self.limits.max_body_bytes)  # added last: outermost

    def _add_exception_handlers(self, app) -> None:
        super()._add_exception_handlers(app)
        app.add_exception_handler(InvalidInput, _invalid_input)
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_exception_handler(Busy, _busy)


class ModelServer(kserve.ModelServer):
    """kserve's ModelServer (one process, REST only) on `host`, with fmforge's bounds."""

    def __init__(self, host: str, limits: Limits, **kwargs):
        super().__init__(**kwargs)
        self.host, self.limits = host, limits
        self.dataplane = _DataPlane(model_registry=self.registered_models)

    def start(self, models: list) -> None:
        # kserve's start, less the multi-process and gRPC servers this server does not run, with
        # a REST server that takes a host.
        from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING

        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = _RESTServer(
            FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
            access_log_format=self.access_log_format, workers=1, grace_period=self.grace_period,
            event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile, host=self.host, limits=self.limits)
        self.servers.append(self._rest_server.start())
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


def predictor(name: str, model_dir: Path, max_pending: int = MAX_PENDING) -> GenerativePredictor | ClassifierPredictor:
    """The predictor for the model in `model_dir` (a classifier or a causal LM), loaded."""
    cls = ClassifierPredictor if is_classifier(model_dir) else GenerativePredictor
    p = cls(name, model_dir, max_pending)
    p.load()
    return p


def serve(name: str, model_dir: Path, port: int, host: str = "127.0.0.1", limits: Limits = Limits()) -> None:
    """Serve the model on host:port until SIGINT/SIGTERM (kserve's ModelServer handles both)."""
    from kserve import model_server

    p = predictor(name, model_dir, limits.max_pending)
    if isinstance(p, GenerativePredictor):
        model_server.app.include_router(openai_router(p))
    where = f"[{host}]" if ":" in host else host
    print(f"fmforge predictor: serving {name} on http://{where}:{port}"
          + (" (all interfaces)" if host in ("0.0.0.0", "::") else ""), file=sys.stderr, flush=True)
    # kserve's per-request latency log lines cost about a millisecond a request; the
    # Prometheus metrics at /metrics keep the same figures.
    ModelServer(host, limits, http_port=port, enable_grpc=False, workers=1,
                enable_latency_logging=False).start([p])


def verify_digest(model_dir: Path, approved: str) -> None:
    """Exit with EXIT_DIGEST_MISMATCH and one line when the files in `model_dir` are not the
    approved model's."""
    from ..artifacts import model_digest

    actual = model_digest(model_dir)
    if actual != approved:
        print(f"fmforge predictor: refusing to serve {model_dir}: its digest is {actual}, the approved digest is "
              f"{approved}; the model files changed after they were approved; run the producer again and approve "
              f"the new digest", file=sys.stderr, flush=True)
        sys.exit(EXIT_DIGEST_MISMATCH)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text})")
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fmforge.stages.deploy.predictor", description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True, help="Hugging Face model directory")
    ap.add_argument("--name", required=True, help="the model's name in the URLs")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1, this "
                    "machine only; 0.0.0.0 for every interface, as in a container)")
    ap.add_argument("--model-digest", default=os.environ.get("FMFORGE_MODEL_DIGEST") or None,
                    help="the approved model's digest (sha256:...; default: $FMFORGE_MODEL_DIGEST): the server "
                    f"refuses, exit code {EXIT_DIGEST_MISMATCH}, model files whose digest differs")
    ap.add_argument("--max-body-bytes", type=_positive, default=MAX_BODY_BYTES,
                    help=f"larger request bodies get 413 (default {MAX_BODY_BYTES})")
    ap.add_argument("--max-pending", type=_positive, default=MAX_PENDING,
                    help=f"requests using or waiting for the model at once; more get 503 (default {MAX_PENDING})")
    ap.add_argument("--max-connections", type=_positive, default=MAX_CONNECTIONS,
                    help=f"open connections at once; more get 503 (default {MAX_CONNECTIONS})")
    args, _ = ap.parse_known_args(argv)
    if not (args.model_dir / "config.json").is_file():
        ap.error(f"--model-dir: no config.json in {args.model_dir}; pass a Hugging Face model directory")
    if args.model_digest:
        verify_digest(args.model_dir, args.model_digest)
    serve(args.name, args.model_dir, args.port, args.host,
          Limits(args.max_body_bytes, args.max_pending, args.max_connections))


if __name__ == "__main__":
    main()
