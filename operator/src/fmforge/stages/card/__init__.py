"""The ModelCard stage: benchmark a model against thresholds, render its card, approve or wait.

    the model of `modelRef` (its directory, digest checked) and, with compareBase, its base (the
    producer's status.base, by URI: a directory or a GGUF file, checked against its recorded
    digest) → every input checked for each (pile versions, prompts files line by line, each
    prompt fits the context with maxNewTokens to spare, a chat template for format chat,
    benchmark fits the architecture) → each benchmark measured on each → thresholds (the model's
    values only) → approval (automatic, or manual bound to the model digest) → card (Markdown +
    JSON + PNG, base and model side by side) in a directory of its own, with the earlier
    evaluations of this ModelCard as history

A perplexity benchmark of a model whose tokenizer is not the pile's reads the split's documents
and tokenizes them with the model's own (`evaluate.on_documents`). A model that misses a
threshold ends the ModelCard as Failed (reason Rejected) with its results and card recorded; a
manual approval that is missing leaves it Waiting, saying what to run. Called by the local
runner and by `fmforge.runtime.job` through `STAGES`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ...api.status import Phase
from ...api.v1alpha1.modelcard import ModelCardSpec, card_verdict
from .. import models, piles
from ..artifacts import TRAINING_LOG, producer_model
from ..base import InputError, InvalidSpec, StageContext, StageResult
from ..uris import locate
from . import evaluate, render


def _model(ctx: StageContext, spec: ModelCardSpec) -> tuple[Path, str, dict[str, Any]]:
    path, model = producer_model(ctx, spec.model_ref, "spec.modelRef")
    return path, model["digest"], model


def _threshold_ok(value: float, th) -> bool:
    return (th.min is None or value >= th.min) and (th.max is None or value <= th.max)


@dataclass
class _Subject:
    """A model the card measures: the model itself, or its base (compareBase)."""

    path: Path
    """The model's directory in Hugging Face layout."""
    name: str
    """How the messages name it (`TunedModel/pydocs-qa`, `the base model pkg://…`)."""
    config: Any
    """Its transformers config."""
    encoder: bool
    """Whether it is a masked LM."""


def _subject(path: Path, name: str) -> _Subject:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    return _Subject(path, name, config, any(a.endswith("ForMaskedLM") for a in config.architectures or []))


def _base(ctx: StageContext, spec: ModelCardSpec) -> tuple[Path, dict[str, Any]]:
    """The base of the evaluated model (compareBase): what its producer recorded in status.base
    (a TunedModel's base model, a TrainingRun's model.init), checked against the recorded digest."""
    key = f"{spec.model_ref.kind}/{spec.model_ref.name}"
    base = ((ctx.inputs.get(key) or {}).get("status") or {}).get("base") or {}
    if not base.get("uri") or not base.get("digest"):
        what = ("was trained from random weights (no model.init)" if spec.model_ref.kind == "TrainingRun"
                else "records no base model")
        raise InvalidSpec(f"spec.compareBase: {key} {what}, so there is no base to compare with; remove compareBase "
                          f"or evaluate a model that has a base")
    # Recorded by fmforge from the producer's spec (relative to the same folder) or its artifacts:
    # not confined again here.
    model = models.load(ctx, base["uri"], "spec.compareBase", confine=False)
    if model.digest != base["digest"]:
        raise InputError(f"spec.compareBase: the base model of {key} ({base['uri']}) changed after {key} was made "
                         f"from it (digest {model.digest}, recorded {base['digest']}); restore it, run {key} again, "
                         f"or remove compareBase")
    return model.path, base


def run(ctx: StageContext) -> StageResult:
    spec: ModelCardSpec = ctx.spec
    rep = ctx.reporter
    path, digest, model = _model(ctx, spec)
    subjects = {"model": _subject(path, f"{spec.model_ref.kind}/{spec.model_ref.name}")}
    base_record = None
    if spec.compare_base:
        base_path, base_record = _base(ctx, spec)
        subjects["base"] = _subject(base_path, f"the base model {base_record['uri']}")
    encoder = subjects["model"].encoder
    log_file = path / TRAINING_LOG
    training = json.loads(log_file.read_text()) if log_file.is_file() else {}

    # 1. Every input checked before the first measurement, for the model and its base.
    plans = [_plan(ctx, spec, i, b, subjects) for i, b in enumerate(spec.benchmarks)]

    # 2. Measure.
    results, examples, datasets = [], {}, {}
    for b, plan in plans:
        metric = b.metric or {"perplexity": "perplexity", "maskedTokens": "accuracy", "prompts": "contains"}[b.type]
        measured = {who: _measure(ctx, b, plan, subject, metric, who) for who, subject in subjects.items()}
        m = measured["model"]
        examples.update({b.name: m.details} if m.details is not None else {})
        if b.type != "prompts":
            datasets[plan.name] = plan.lineage()
        passed = _threshold_ok(m.value, b.threshold)
        base_value = measured["base"].value if "base" in measured else None
        rep.log(f"Measured {b.name} of ModelCard {ctx.name}", metric=metric, value=f"{m.value:.4g}",
                **({"base": f"{base_value:.4g}"} if base_value is not None else {}), passed=passed)
        results.append({"name": b.name, "metric": metric, "value": m.value,
                        "threshold": b.threshold.model_dump(mode="json", exclude_none=True), "passed": passed,
                        "samples": m.samples, "dataset": m.dataset,
                        **({"baseValue": base_value} if base_value is not None else {}),
                        **({"baseExamples": measured["base"].details} if "base" in measured
                           and measured["base"].details is not None else {})})

    # 3. Approval, bound to the model digest.
    verdict = card_verdict(f"ModelCard/{ctx.name}", spec.approval, results, digest, ctx.annotations)

    # 4. The card, in a directory of its own; earlier cards stay as history.
    now = datetime.now(UTC)
    out = ctx.artifacts / f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{digest.split(':')[1][:12]}"
    history = _history(ctx.artifacts)
    pile_info = training.get("dataPile")
    if pile_info:
        datasets = {pile_info["name"]: pile_info, **datasets}
    producer = (ctx.inputs.get(f"{spec.model_ref.kind}/{spec.model_ref.name}") or {}).get("status") or {}
    card = {
        "name": ctx.name, "evaluatedAt": now.isoformat().replace("+00:00", "Z"),
        "model": {"ref": f"{spec.model_ref.kind}/{spec.model_ref.name}", "uri": model["uri"], "digest": digest,
                  "architecture": "encoder" if encoder else "decoder", "family": training.get("family"),
                  "parameters": model.get("parameters")},
        "baseModel": (producer.get("base") or {}).get("uri"),
        "base": {"uri": base_record["uri"], "digest": base_record["digest"]} if base_record else None,
        "datasets": list(datasets.values()),
        "text": spec.card.model_dump(mode="json", by_alias=True),
        "training": {k: training.get(k) for k in ("training", "resources", "parameters", "validationLoss", "seconds",
                                                  "modelConfig")} if training else None,
        "results": [{k: v for k, v in r.items()} | ({"examples": examples[r["name"]]} if r["name"] in examples
                                                    else {}) for r in results],
        "approval": {"mode": spec.approval, "approved": verdict.approved, "by": verdict.approved_by,
                     "waiting": verdict.message if verdict.phase == Phase.WAITING else None},
        "history": history,
    }
    out.mkdir(parents=True)
    png = render.loss_curve(training.get("lossCurve") or [], out / "loss_curve.png",
                            f"{spec.model_ref.name}: training loss")
    card["lossCurve"] = png.name if png else None
    md = render.write(card, out)
    card_digest = "sha256:" + hashlib.sha256((out / "card.json").read_bytes()).hexdigest()

    status = {
        "results": [{k: r[k] for k in ("name", "metric", "value", "threshold", "passed", "samples", "baseValue")
                     if k in r} for r in results],
        "approved": verdict.approved, "modelDigest": digest, "card": {"uri": md.resolve().as_uri()},
        **({"approvedBy": verdict.approved_by} if verdict.approved_by else {}),
    }
    return StageResult(
        status=status, digest=card_digest, message=verdict.message,
        waiting=verdict.message if verdict.phase == Phase.WAITING else "",
        rejected=verdict.message if verdict.phase == Phase.FAILED else "",
    )


def _plan(ctx: StageContext, spec: ModelCardSpec, i: int, b, subjects: dict[str, _Subject]):
    """(benchmark, what it reads): the prompts rows, or the pile version; checked for every
    subject (the model, and its base with compareBase) before anything is measured."""
    where = f"spec.benchmarks[{i}]"
    if b.type == "prompts":
        _, p = locate(b.uri, ctx.base_dir, confine=not ctx.allow_outside_paths)
        rows = evaluate.read_prompts(Path(p), b.uri, b.max_samples)
        for s in subjects.values():
            if s.encoder:
                raise InvalidSpec(f"{where}: {b.name}: prompts need a generative model, and {s.name} is an encoder "
                                  f"(masked LM); use maskedTokens or perplexity for it")
            evaluate.check_fit(rows, s.path, s.config, b.max_new_tokens, b.uri, where, b.format, s.name)
        return b, rows
    version = piles.pin(ctx, b.data_pile_ref, f"{where}.dataPileRef")
    for s in subjects.values():
        if b.type == "maskedTokens" and not s.encoder:
            raise InvalidSpec(f"{where}: {b.name}: maskedTokens measures an encoder (masked LM), and {s.name} is a "
                              f"decoder; use perplexity or prompts for it")
        if b.type == "maskedTokens" or s.encoder:
            _same_tokenizer(version.tokenizer, s.path, where, s.name)
    return b, version


def _measure(ctx: StageContext, b, plan, subject: _Subject, metric: str, who: str) -> evaluate.Measured:
    """One benchmark of one subject (`who`: model or base)."""
    rep = ctx.reporter
    suffix = "" if who == "model" else " (base)"
    if b.type == "prompts":
        rep.step(f"benchmark {b.name}{suffix}", total=len(plan))
        m = evaluate.on_prompts(plan, subject.path, metric, b.max_new_tokens, progress=rep.advance,
                                chat=b.format == "chat")
        m.dataset = {"name": Path(b.uri).name, "type": "prompts"}
        return m
    piles.ray_init(ctx.state_dir, 2)
    ref = b.data_pile_ref
    dataset = {"name": f"{plan.name} ({ref.split})", "type": plan.name, "split": ref.split,
               "revision": str(plan.snapshot_id)}
    if b.type == "perplexity" and not subject.encoder and not evaluate.same_tokenizer(plan.tokenizer, subject.path):
        # The model reads another vocabulary: the documents, tokenized with the model's tokenizer.
        rep.step(f"benchmark {b.name}{suffix} (documents)", total=ref.max_documents)
        window = min(plan.sequence_length, evaluate.context_length(subject.config) or plan.sequence_length)
        pm = evaluate.on_documents(plan, ref.split, subject.path, ref.max_documents, window, progress=rep.advance)
        rep.log(f"Scored the documents of DataPile {plan.name} with the model's own tokenizer", model=subject.name,
                documents=pm["samples"], tokens=int(pm["tokens"]))
        return evaluate.Measured(pm[metric], pm["samples"], dataset={**dataset, "tokenizer": "model's own"})
    rep.step(f"benchmark {b.name}{suffix}", total=b.max_samples)
    pm = evaluate.on_pile(plan, ref.split, subject.path, subject.encoder, b.max_samples, b.mask_probability, b.seed,
                          progress=rep.advance)
    return evaluate.Measured(pm[metric], pm["samples"], dataset=dataset)


def _history(root: Path) -> list[dict[str, Any]]:
    """Earlier evaluations of this ModelCard (every attempt's card.json), oldest first."""
    out = []
    for f in root.glob("*/card.json"):
        try:
            c = json.loads(f.read_text())
            out.append({"evaluatedAt": c["evaluatedAt"], "modelDigest": c["model"]["digest"],
                        "approved": c["approval"]["approved"], "card": f.parent.resolve().as_uri(),
                        "results": [{k: r[k] for k in ("name", "metric", "value", "passed")} for r in c["results"]]})
        except (OSError, KeyError, json.JSONDecodeError):
            continue
    return sorted(out, key=lambda h: h["evaluatedAt"])


def _same_tokenizer(pile_tok: Path, model_dir: Path, where: str, model: str) -> None:
    """Masked tokens are scored with the pile's token ids: only for a model whose tokenizer maps
    tokens alike."""
    if not evaluate.same_tokenizer(pile_tok, model_dir):
        raise InvalidSpec(f"{where}.dataPileRef: the pile's tokenizer is not that of {model} (token ids differ); "
                          f"evaluate on a version of the pile the model was trained on, or one tokenized alike")


__all__ = ["run"]
