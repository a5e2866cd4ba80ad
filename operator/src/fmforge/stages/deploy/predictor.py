"""The model server of a Deployment: kserve predictors for a Hugging Face model directory.

Run as `python -m fmforge.stages.deploy.predictor --model-dir DIR --name NAME --port PORT` by
the Deployment stage locally (`fmforge run`, `fmforge serve`) and as the entrypoint of the
fmforge predictor image on a cluster (`runtime: fmforge`). kserve's `ModelServer` serves the
predictors (its `Model` lifecycle: load, then predict):

- a causal LM answers KServe v1 (`POST /v1/models/NAME:predict`, instances of prompts) and v2
  (`POST /v2/models/NAME/infer`, a BYTES input `text`), and the OpenAI-compatible
  `POST /openai/v1/completions` and `/openai/v1/chat/completions` (with `stream: true` as
  server-sent events) and `GET /openai/v1/models`;
- a sequence classifier answers v1 and v2 with labels and scores.

kserve 0.21 builds its own OpenAI endpoints on vLLM's request types (vLLM is a GPU serving
engine that does not install here), so the OpenAI routes are fmforge's: a small FastAPI router
added to kserve's app (`kserve.model_server.app`, the app its server runs; pinned to
kserve 0.21.x). Bad requests get a 4xx with a message and never stop the server: invalid input
is kserve's `InvalidInput` (400) on v1/v2 and an OpenAI-shaped error (400) on the OpenAI routes;
malformed bodies are refused by the frameworks with 400/422.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal
from collections.abc import Iterator

import kserve
from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from pydantic import BaseModel, ConfigDict, Field

#: The most new tokens one request may ask for, whatever the context leaves.
MAX_NEW_TOKENS = 1024


def is_classifier(model_dir: Path) -> bool:
    config = json.loads((model_dir / "config.json").read_text())
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def _v2_texts(payload: InferRequest, what: str) -> list[Any]:
    """The strings of a v2 request's BYTES input `text`."""
    text = next((i for i in payload.inputs if i.name == "text"), None)
    if text is None or text.datatype != "BYTES":
        raise InvalidInput(f"v2 requests need a BYTES input named 'text' holding the {what}")
    return [t.decode() if isinstance(t, bytes) else t for t in text.data]


class GenerativePredictor(kserve.Model):
    """A causal language model: greedy or sampled completions of prompts."""

    def __init__(self, name: str, model_dir: Path):
        super().__init__(name)
        self.model_dir = model_dir
        # torch runs one generation at a time well on a few cores; requests queue on this lock
        # instead of fighting over the same threads.
        self._lock = threading.Lock()

    def load(self) -> bool:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_grad_enabled(False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir).eval()
        cfg = self.model.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 0)
                                  or self.tokenizer.model_max_length)
        self.ready = True
        return self.ready

    # -- the work --------------------------------------------------------------------------------
    def check(self, prompt: Any, max_tokens: Any) -> list[int]:
        """The prompt's token ids; InvalidInput (400) for what cannot be answered."""
        if not isinstance(prompt, str) or not prompt:
            raise InvalidInput(f"prompt must be a non-empty string (got {type(prompt).__name__})")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidInput(f"max_tokens must be a positive integer (got {max_tokens!r})")
        ids = self.tokenizer(prompt)["input_ids"]
        room = self.context_length - len(ids)
        if room < 1:
            raise InvalidInput(f"the prompt is {len(ids)} tokens; this model reads at most {self.context_length}")
        if max_tokens > min(room, MAX_NEW_TOKENS):
            raise InvalidInput(f"max_tokens {max_tokens} is more than this request may generate: at most "
                               f"{min(room, MAX_NEW_TOKENS)} (context {self.context_length}, prompt {len(ids)} tokens)")
        return ids

    def _kwargs(self, ids: list[int], max_tokens: int, temperature: float) -> dict[str, Any]:
        import torch

        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                "max_new_tokens": max_tokens, "do_sample": temperature > 0,
                **({"temperature": temperature} if temperature > 0 else {}),
                "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                else self.tokenizer.eos_token_id}

    def generate(self, prompt: str, max_tokens: int = 32, temperature: float = 0.0) -> tuple[str, int, int]:
        """(completion, prompt tokens, completion tokens)."""
        ids = self.check(prompt, max_tokens)
        with self._lock:
            out = self.model.generate(**self._kwargs(ids, max_tokens, temperature))[0, len(ids):]
        return self.tokenizer.decode(out, skip_special_tokens=True), len(ids), int(out.shape[0])

    def stream(self, prompt: str, max_tokens: int, temperature: float) -> Iterator[str]:
        """The completion piece by piece, as the model makes it."""
        from transformers import TextIteratorStreamer

        ids = self.check(prompt, max_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)

        def work() -> None:
            with self._lock:
                self.model.generate(**self._kwargs(ids, max_tokens, temperature), streamer=streamer)

        threading.Thread(target=work, daemon=True).start()
        yield from streamer

    # -- KServe v1 and v2 --------------------------------------------------------------------------
    async def predict(self, payload: dict | InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        if isinstance(payload, InferRequest):
            prompts = _v2_texts(payload, "prompts")
            params = payload.parameters or {}
            max_tokens = params.get("max_tokens", 32)
            outs = [await asyncio.to_thread(self.generate, p, max_tokens) for p in prompts]
            return InferResponse(model_name=self.name, infer_outputs=[
                InferOutput(name="text", shape=[len(outs)], datatype="BYTES", data=[o[0] for o in outs])],
                response_id=payload.id or str(uuid.uuid4()))
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not instances:
            raise InvalidInput('v1 requests are {"instances": [...]}, each a prompt or {"prompt": ..., '
                               '"max_tokens": ...}')
        preds = []
        for inst in instances:
            prompt, max_tokens = (inst.get("prompt"), inst.get("max_tokens", 32)) if isinstance(inst, dict) \
                else (inst, 32)
            preds.append((await asyncio.to_thread(self.generate, prompt, max_tokens))[0])
        return {"predictions": preds}


class ClassifierPredictor(kserve.Model):
    """A sequence classifier: a label and its probability per text."""

    def __init__(self, name: str, model_dir: Path):
        super().__init__(name)
        self.model_dir = model_dir

    def load(self) -> bool:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_grad_enabled(False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_dir).eval()
        self.ready = True
        return self.ready

    def classify(self, texts: list[Any]) -> list[tuple[str, float]]:
        bad = [type(t).__name__ for t in texts if not isinstance(t, str) or not t]
        if bad or not texts:
            raise InvalidInput(f"instances must be non-empty strings (got {', '.join(bad) or 'none'})")
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        probs = self.model(**batch).logits.softmax(-1)
        scores, labels = probs.max(-1)
        id2label = self.model.config.id2label
        return [(id2label[int(i)], float(s)) for i, s in zip(labels, scores, strict=True)]

    async def predict(self, payload: dict | InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        if isinstance(payload, InferRequest):
            out = await asyncio.to_thread(self.classify, _v2_texts(payload, "texts"))
            return InferResponse(model_name=self.name, response_id=payload.id or str(uuid.uuid4()), infer_outputs=[
                InferOutput(name="label", shape=[len(out)], datatype="BYTES", data=[o[0] for o in out]),
                InferOutput(name="score", shape=[len(out)], datatype="FP32", data=[o[1] for o in out])])
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list):
            raise InvalidInput('v1 requests are {"instances": ["text", ...]}')
        out = await asyncio.to_thread(self.classify, instances)
        return {"predictions": [{"label": label, "score": score} for label, score in out]}


# -- the OpenAI-compatible routes -----------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stream: bool = False


class CompletionRequest(_Request):
    """The fields of OpenAI's completions request that fmforge's server honours."""

    prompt: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    """The fields of OpenAI's chat completions request that fmforge's server honours."""

    messages: list[ChatMessage] = Field(min_length=1)


def _error(status: int, message: str, param: str = "") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "BadRequestError"
                                                               if status == 400 else "NotFoundError",
                                                               "param": param, "code": str(status)}})


def chat_prompt(messages: list[ChatMessage]) -> str:
    """A chat as one prompt: the models fmforge trains have no chat template of their own, so
    each turn is a `Role: content` line and the prompt ends where the assistant answers."""
    lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def openai_router(model: GenerativePredictor) -> APIRouter:
    """Completions, chat completions and the model list, for one generative model."""
    router = APIRouter(prefix="/openai/v1")

    def _run(body: _Request, prompt: str, chat: bool):
        if body.model != model.name:
            return _error(404, f"model {body.model!r} is not served here; this server serves {model.name!r}", "model")
        created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            if body.stream:
                model.check(prompt, body.max_tokens)
            else:
                text, n_prompt, n_out = model.generate(prompt, body.max_tokens, body.temperature)
        except InvalidInput as e:
            return _error(400, str(e), "prompt" if "prompt" in str(e) else "max_tokens")
        kind = "chat.completion" if chat else "text_completion"
        if not body.stream:
            choice = {"index": 0, "finish_reason": "length" if n_out >= body.max_tokens else "stop",
                      **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
            return {"id": rid, "object": kind, "created": created, "model": model.name, "choices": [choice],
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                              "total_tokens": n_prompt + n_out}}

        def events() -> Iterator[str]:
            for piece in model.stream(prompt, body.max_tokens, body.temperature):
                if piece:
                    delta = {"delta": {"content": piece}} if chat else {"text": piece}
                    yield "data: " + json.dumps({"id": rid, "object": kind + (".chunk" if chat else ""),
                                                 "created": created, "model": model.name,
                                                 "choices": [{"index": 0, "finish_reason": None, **delta}]}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @router.post("/completions")
    async def completions(body: CompletionRequest):
        return await asyncio.to_thread(_run, body, body.prompt, False)

    @router.post("/chat/completions")
    async def chat_completions(body: ChatRequest):
        return await asyncio.to_thread(_run, body, chat_prompt(body.messages), True)

    @router.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model.name, "object": "model", "owned_by": "fmforge"}]}

    return router


def predictor(name: str, model_dir: Path) -> GenerativePredictor | ClassifierPredictor:
    """The predictor for the model in `model_dir` (a classifier or a causal LM), loaded."""
    cls = ClassifierPredictor if is_classifier(model_dir) else GenerativePredictor
    p = cls(name, model_dir)
    p.load()
    return p


def serve(name: str, model_dir: Path, port: int) -> None:
    """Serve the model until SIGINT/SIGTERM (kserve's ModelServer handles both)."""
    from kserve import model_server

    p = predictor(name, model_dir)
    if isinstance(p, GenerativePredictor):
        model_server.app.include_router(openai_router(p))
    # kserve's per-request latency log lines cost about a millisecond a request; the
    # Prometheus metrics at /metrics keep the same figures.
    kserve.ModelServer(http_port=port, enable_grpc=False, workers=1, enable_latency_logging=False).start([p])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fmforge.stages.deploy.predictor", description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True, help="Hugging Face model directory")
    ap.add_argument("--name", required=True, help="the model's name in the URLs")
    ap.add_argument("--port", type=int, default=8080)
    args, _ = ap.parse_known_args(argv)
    serve(args.name, args.model_dir, args.port)


if __name__ == "__main__":
    main()
