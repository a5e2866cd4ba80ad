"""The ModelCard stage: benchmark a model against thresholds, render its card, approve or wait.

    the model of `modelRef` (its directory, digest checked) → every input checked (pile versions,
    prompts files line by line, each prompt fits the model's context with maxNewTokens to spare,
    benchmark fits the architecture) → each benchmark measured → thresholds →
    approval (automatic, or manual bound to the model digest) → card (Markdown + JSON + PNG) in
    a directory of its own, with the earlier evaluations of this ModelCard as history

A model that misses a threshold ends the ModelCard as Failed (reason Rejected) with its results
and card recorded; a manual approval that is missing leaves it Waiting, saying what to run.
Called by the local runner and by `fmforge.runtime.job` through `STAGES`.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ...api.status import Phase
from ...api.v1alpha1.modelcard import ModelCardSpec, card_verdict
from .. import piles
from ..artifacts import TRAINING_LOG, producer_model
from ..base import InvalidSpec, StageContext, StageResult
from ..uris import locate
from . import evaluate, render


def _model(ctx: StageContext, spec: ModelCardSpec) -> tuple[Path, str, dict[str, Any]]:
    path, model = producer_model(ctx, spec.model_ref, "spec.modelRef")
    return path, model["digest"], model


def _threshold_ok(value: float, th) -> bool:
    return (th.min is None or value >= th.min) and (th.max is None or value <= th.max)


def run(ctx: StageContext) -> StageResult:
    spec: ModelCardSpec = ctx.spec
    rep = ctx.reporter
    path, digest, model = _model(ctx, spec)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    arch = config.architectures or []
    encoder = any(a.endswith("ForMaskedLM") for a in arch)
    log_file = path / TRAINING_LOG
    training = json.loads(log_file.read_text()) if log_file.is_file() else {}

    # 1. Every input checked before the first measurement.
    plans = []
    for i, b in enumerate(spec.benchmarks):
        where = f"spec.benchmarks[{i}]"
        if b.type == "prompts":
            if encoder:
                raise InvalidSpec(f"{where}: {b.name}: prompts need a generative model, and {spec.model_ref.name} is "
                                  f"an encoder (masked LM); use maskedTokens or perplexity for it")
            _, p = locate(b.uri, ctx.base_dir, confine=not ctx.allow_outside_paths)
            rows = evaluate.read_prompts(Path(p), b.uri, b.max_samples)
            evaluate.check_fit(rows, path, config, b.max_new_tokens, b.uri, where)
            plans.append((b, rows))
        else:
            if b.type == "maskedTokens" and not encoder:
                raise InvalidSpec(f"{where}: {b.name}: maskedTokens measures an encoder (masked LM), and "
                                  f"{spec.model_ref.name} is a decoder; use perplexity or prompts for it")
            version = piles.pin(ctx, b.data_pile_ref, f"{where}.dataPileRef")
            _same_tokenizer(version.tokenizer, path, where)
            plans.append((b, version))

    # 2. Measure.
    results, examples, datasets = [], {}, {}
    for b, plan in plans:
        metric = b.metric or {"perplexity": "perplexity", "maskedTokens": "accuracy", "prompts": "contains"}[b.type]
        if b.type == "prompts":
            rep.step(f"benchmark {b.name}", total=len(plan))
            m = evaluate.on_prompts(plan, path, metric, b.max_new_tokens, progress=rep.advance)
            value, samples, dataset = m.value, m.samples, {"name": Path(b.uri).name, "type": "prompts"}
            examples[b.name] = m.details
        else:
            piles.ray_init(ctx.state_dir, 2)
            rep.step(f"benchmark {b.name}", total=b.max_samples)
            pm = evaluate.on_pile(plan, b.data_pile_ref.split, path, encoder, b.max_samples, b.mask_probability,
                                  b.seed, progress=rep.advance)
            value, samples = pm[metric], pm["samples"]
            dataset = {"name": f"{plan.name} ({b.data_pile_ref.split})", "type": plan.name,
                       "split": b.data_pile_ref.split, "revision": str(plan.snapshot_id)}
            datasets[plan.name] = plan.lineage()
        passed = _threshold_ok(value, b.threshold)
        rep.log(f"Measured {b.name} of ModelCard {ctx.name}", metric=metric, value=f"{value:.4g}", passed=passed)
        results.append({"name": b.name, "metric": metric, "value": value,
                        "threshold": b.threshold.model_dump(mode="json", exclude_none=True), "passed": passed,
                        "samples": samples, "dataset": dataset})

    # 3. Approval, bound to the model digest.
    verdict = card_verdict(f"ModelCard/{ctx.name}", spec.approval, results, digest, ctx.annotations)

    # 4. The card, in a directory of its own; earlier cards stay as history.
    now = datetime.now(UTC)
    out = ctx.artifacts / f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{digest.split(':')[1][:12]}"
    history = _history(ctx.artifacts)
    pile_info = training.get("dataPile")
    if pile_info:
        datasets = {pile_info["name"]: pile_info, **datasets}
    card = {
        "name": ctx.name, "evaluatedAt": now.isoformat().replace("+00:00", "Z"),
        "model": {"ref": f"{spec.model_ref.kind}/{spec.model_ref.name}", "uri": model["uri"], "digest": digest,
                  "architecture": "encoder" if encoder else "decoder", "family": training.get("family"),
                  "parameters": model.get("parameters")},
        "baseModel": ((ctx.inputs.get(f"{spec.model_ref.kind}/{spec.model_ref.name}") or {}).get("status") or {})
        .get("base", {}).get("uri"),
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
        "results": [{k: r[k] for k in ("name", "metric", "value", "threshold", "passed", "samples")} for r in results],
        "approved": verdict.approved, "modelDigest": digest, "card": {"uri": md.resolve().as_uri()},
        **({"approvedBy": verdict.approved_by} if verdict.approved_by else {}),
    }
    return StageResult(
        status=status, digest=card_digest, message=verdict.message,
        waiting=verdict.message if verdict.phase == Phase.WAITING else "",
        rejected=verdict.message if verdict.phase == Phase.FAILED else "",
    )


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


def _same_tokenizer(pile_tok: Path, model_dir: Path, where: str) -> None:
    """A pile is scored with the model's token ids only if both tokenizers map tokens alike."""
    pv = json.loads((pile_tok / "tokenizer.json").read_text())["model"]["vocab"]
    mv = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    if any(mv.get(t) != i for t, i in pv.items()):
        raise InvalidSpec(f"{where}.dataPileRef: the pile's tokenizer is not the model's (token ids differ); "
                          f"evaluate on a version of the pile the model was trained on, or one tokenized alike")


__all__ = ["run"]
