"""The TunedModel stage: fine-tune a base model on local examples turned into prompts, with Ray Train.

    templates checked → the base model (a TrainingRun's or TunedModel's recorded model, digest
    checked; or baseModel.uri: a directory or a GGUF file on file://, pvc://, pkg:// or s3://,
    through `models.load`) and its fit for the task → the examples read (a JSONL file, a pile
    version's documents, or a ConfigMap mounted into the pod), split (stable) and tokenized (as
    text, or in the base model's chat template with the loss on the assistant's turn) → Ray
    Data datasets of the examples → `raytrain.fit` running `loop.tune_loop` on Ray Train's
    workers (LoRA through peft, or every weight) → the adapter and the full model (merged, for
    LoRA with merge), each in a new digest-named directory, with the tokenizer and the tuning
    log

Everything the user can get wrong (a template, a record without a field, a base model that does
not fit the task, target modules the model lacks) is refused before a worker starts. Checkpoints
live in the attempt's folder (`attempts/<digest of spec, base and data>/checkpoints/`), one per
epoch; a run started again for the same attempt resumes from the latest, and Ray Train restarts
failed workers from it up to `faultTolerance.maxFailures` times. A tuning is repeatable: for a
fixed seed the same spec on the same base and examples makes the same adapter and model, byte
for byte (on CPUs; GPUs' kernels are asked to be deterministic too), so the same digests. Called
by the local runner and by `fmforge.runtime.job` through `STAGES`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...api.v1alpha1.tunedmodel import Lora, TunedModelSpec
from .. import models, raytrain
from ..artifacts import TRAINING_LOG, producer_model
from ..base import InputError, InvalidSpec, StageContext, StageResult
from ..piles import table_name
from . import data as examples
from .loop import ADAPTER_DIR, LoraSettings, TuneConfig, tune_loop

#: LoRA's target modules when the spec names none: the attention projections of each family
#: (query and value, as in the LoRA paper; GPT-2 fuses q, k and v into one `c_attn`).
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}


def _base(ctx: StageContext, spec: TunedModelSpec) -> tuple[Path, dict[str, Any]]:
    """The base model's directory and its record ({uri, digest, ...}): a producer's model, or
    `baseModel.uri` (a directory, or a GGUF file converted once into one: `models.load`)."""
    if spec.base_model_ref is not None:
        path, model = producer_model(ctx, spec.base_model_ref, "spec.baseModelRef")
        return path, {"uri": model["uri"], "digest": model["digest"], "parameters": model.get("parameters"),
                      "ref": f"{spec.base_model_ref.kind}/{spec.base_model_ref.name}"}
    model = models.load(ctx, spec.base_model.uri, "spec.baseModel.uri")
    return model.path, model.record()


def _examples(ctx: StageContext, spec: TunedModelSpec, fields: list[str]) -> tuple[list, dict[str, Any]]:
    """The records of `spec.data` (a URI, a pile version or a mounted ConfigMap) and what the
    status records of them ({uri or dataPile, digest})."""
    d = spec.data
    if d.data_pile_ref is not None:
        records, pile = examples.read_pile(ctx, d.data_pile_ref, fields)
        return records, {"dataPile": pile, "digest": pile.get("digest") or f"snapshot:{pile['snapshotId']}"}
    if d.config_map is not None:
        cm = d.config_map
        mounted = ctx.config_maps.get(cm.name)
        if mounted is None:
            raise InvalidSpec(f"spec.data.configMap: ConfigMap {cm.name} is read on a cluster only, where the "
                              f"operator mounts it into the tuning pods; to run locally, save the key {cm.key!r} "
                              f"as a file beside the manifest and use data.uri: file://{cm.key}")
        records, digest = examples.read_config_map(mounted, cm.name, cm.key)
        return records, {"uri": f"configmap://{cm.name}/{cm.key}", "digest": digest}
    records, digest = examples.read(d.uri, ctx.base_dir, confine=not ctx.allow_outside_paths)
    return records, {"uri": d.uri, "digest": digest}


def _data_lineage(ctx: StageContext, data: dict[str, Any]) -> dict[str, Any]:
    """The lineage entry of the examples: the pile version (its documents table at the snapshot
    read, and the version's digest), or the files."""
    pile = data.get("dataPile")
    if pile is not None:
        table = table_name(ctx.namespace, pile["name"], "documents")
        return {"name": f"DataPile/{pile['name']}", "uri": f"{table}@{pile['snapshotId']}", "digest": data["digest"],
                "snapshotId": pile["snapshotId"], **({"tag": pile["tag"]} if pile.get("tag") else {})}
    return {"name": "tuningData", "uri": data["uri"], "digest": data["digest"]}


def _check_fit(spec: TunedModelSpec, config, base_uri: str) -> list[str] | None:
    """Refuse a base model that cannot do the task; the LoRA target modules, checked to exist."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    classification = spec.task == "sequence-classification"
    supported = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if classification else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if config.model_type not in supported:
        raise InvalidSpec(f"spec.task: {spec.task} needs a model family transformers has a "
                          f"{'sequence-classification' if classification else 'causal-LM'} head for, and the base "
                          f"model {base_uri} is {config.model_type!r}; choose another base model or task")
    # transformers can put a causal-LM head on an encoder (BertLMHeadModel), but an encoder's
    # weights were never trained to predict the next token: refuse what is not a causal LM.
    if not classification and config.architectures and not any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures):
        raise InvalidSpec(f"spec.task: causal-lm tunes a generative model, and the base model {base_uri} is "
                          f"{', '.join(config.architectures)} (not a causal LM); use task sequence-classification "
                          f"or a decoder base model")
    if spec.method != "lora":
        return None
    lora = spec.lora
    targets = list(lora.target_modules) if lora and lora.target_modules else DEFAULT_TARGETS.get(config.model_type)
    if not targets:
        raise InvalidSpec(f"spec.lora.targetModules: there is no default for model family {config.model_type!r} "
                          f"(defaults: {', '.join(f'{k}: {v}' for k, v in DEFAULT_TARGETS.items())}); name the "
                          f"attention projections to adapt")
    # The module names, from a weightless copy of the model (no memory, no file read).
    auto = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules()
                     if type(m).__name__ in ("Linear", "Conv1D")})
    missing = [t for t in targets if t not in linear]
    if missing:
        raise InvalidSpec(f"spec.lora.targetModules: the base model ({config.model_type}) has no module "
                          f"{', '.join(missing)}; its linear layers are {', '.join(linear)}")
    return targets


def _context_length(config, tok) -> int:
    for attr in ("max_position_embeddings", "n_positions"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return int(tok.model_max_length)


@dataclass
class _Inputs:
    """The checked and tokenized inputs of a tuning, read by the driver before a worker starts."""

    base_path: Path
    """The base model's directory in Hugging Face layout."""
    base: dict[str, Any]
    """The base model's record: uri, digest (and parameters, ref for a producer's model)."""
    config: Any
    """The base model's transformers config."""
    targets: list[str] | None
    """LoRA's target modules, checked to exist in the model; None for full tuning."""
    records: list
    """Every example record read, before the split."""
    data: dict[str, Any]
    """What the status records of the examples: uri or dataPile, digest."""
    tok: Any
    """The base model's tokenizer, with a padding token."""
    labels: list[str]
    """The class names, in label-id order (sequence-classification); empty for causal-lm."""
    train: list[dict]
    """The tokenized training examples."""
    val: list[dict]
    """The tokenized held-out examples."""
    total_steps: int
    """Optimizer steps in all, over every epoch."""


def run(ctx: StageContext) -> StageResult:
    """Tune the TunedModel's base model on its examples and publish the result: the stage's entry
    point (`STAGES`)."""
    spec: TunedModelSpec = ctx.spec
    # 1. Everything that can be wrong in the input, before a worker starts.
    inputs = _prepare(ctx, spec)
    # 2. Tune on Ray.
    fitted = _tune(ctx, spec, inputs)
    progress = fitted.progress
    # 3. The adapter and the model, each in a directory named by its digest.
    with fitted.final_checkpoint() as ckpt:
        curve = raytrain.read_curve(ckpt)
        model, adapter = _publish_checkpoint(ctx, spec, inputs, progress, ckpt, curve)
    fitted.record(curve, model["digest"])
    ctx.reporter.log(f"Saved the model of TunedModel {ctx.name}", uri=model["uri"], digest=model["digest"][:19])

    base = inputs.base
    return StageResult(status=_status(ctx, spec, inputs, progress, model, adapter), digest=model["digest"],
                       message=_message(spec, inputs, progress),
                       lineage=[{"name": base.get("ref") or "baseModel", "uri": base["uri"], "digest": base["digest"]},
                                _data_lineage(ctx, inputs.data)])


def _prepare(ctx: StageContext, spec: TunedModelSpec) -> _Inputs:
    """Check the templates, the base model and its fit for the task, then read, split and tokenize
    the examples: every input error is raised here, before Ray starts."""
    d, tr, res = spec.data, spec.training, spec.resources
    fields = _template_fields(spec)
    base_path, base = _base(ctx, spec)
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(str(base_path))
    targets = _check_fit(spec, config, base["uri"])
    records, data = _examples(ctx, spec, fields)
    train_records, val_records = examples.split(records, d.validation_fraction)
    tok = _tokenizer(base_path, base["uri"])
    if d.format == "chat":
        models.chat_template_of(tok, base.get("ref") or base["uri"], "spec.data.format")
    labels, train, val = _encode(spec, tok, records, train_records, val_records, _context_length(config, tok))
    if len(train) < res.workers:
        raise InputError(f"spec.data: {len(train)} training examples cannot be shared by {res.workers} workers; add "
                         f"examples or lower resources.workers")
    # Every rank takes as many examples (the rest are left out), so the steps are those of one share.
    per_rank = len(train) // res.workers
    total_steps = tr.epochs * math.ceil(per_rank / tr.micro_batch_size)
    ctx.reporter.log("Read the tuning examples", source=data.get("uri") or f"DataPile/{d.data_pile_ref.name}",
                     train=len(train), validation=len(val), steps=total_steps)
    return _Inputs(base_path=base_path, base=base, config=config, targets=targets, records=records, data=data,
                   tok=tok, labels=labels, train=train, val=val, total_steps=total_steps)


def _template_fields(spec: TunedModelSpec) -> list[str]:
    """The record fields the examples need: those the templates name (checked), and the label
    field for sequence-classification."""
    d = spec.data
    fields = examples.check_template(d.prompt_template, "spec.data.promptTemplate")
    if spec.task == "sequence-classification":
        fields.append(d.label_field)
    else:
        fields += examples.check_template(d.completion_template, "spec.data.completionTemplate")
    return fields


def _tokenizer(base_path: Path, base_uri: str):
    """The base model's tokenizer, padding with its end-of-text token when it has no padding token
    (as decoders such as GPT-2 and Llama do not)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_path))
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise InvalidSpec(f"the base model's tokenizer ({base_uri}) has neither a padding nor an end-of-text "
                              f"token; give it one")
        tok.pad_token = tok.eos_token
    return tok


def _encode(spec: TunedModelSpec, tok, records: list, train_records: list, val_records: list,
            context: int) -> tuple[list[str], list[dict], list[dict]]:
    """The class names (from every record, so that a label seen only in the held-out examples
    still has an id; empty for causal-lm) and the tokenized training and held-out examples."""
    d = spec.data
    if spec.task == "sequence-classification":
        labels = examples.labels_of(records, d.label_field)
        train = examples.encode_classification(train_records, tok, d.prompt_template, d.label_field, labels, context)
        val = examples.encode_classification(val_records, tok, d.prompt_template, d.label_field, labels, context)
        return labels, train, val
    encode = examples.encode_chat if d.format == "chat" else examples.encode_causal
    train = encode(train_records, tok, d.prompt_template, d.completion_template, context)
    val = encode(val_records, tok, d.prompt_template, d.completion_template, context)
    return [], train, val


def _lora_settings(spec: TunedModelSpec, targets: list[str] | None) -> LoraSettings:
    """LoRA's settings as the workers and the tuning log take them (the defaults when the spec has no `lora`)."""
    lora = spec.lora or Lora()
    return LoraSettings(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=targets,
                        merge=lora.merge)


def _tune(ctx: StageContext, spec: TunedModelSpec, inputs: _Inputs) -> raytrain.Fitted:
    """Run `loop.tune_loop` on Ray Train's workers, the examples streamed to them as Ray Data
    datasets: the training set split between the workers, the held-out set whole to each."""
    import ray

    tr, res = spec.training, spec.resources
    raytrain.start(ctx, res)
    base = inputs.base
    config = TuneConfig(
        task=spec.task, base=str(inputs.base_path), base_name=base.get("ref") or base["uri"], labels=inputs.labels,
        method=spec.method, lora=_lora_settings(spec, inputs.targets) if spec.method == "lora" else None,
        pad_id=inputs.tok.pad_token_id, epochs=tr.epochs, learning_rate=tr.learning_rate,
        micro_batch_size=tr.micro_batch_size, seed=tr.seed, total_steps=inputs.total_steps,
        has_validation=bool(inputs.val))
    # A fixed number of blocks (not one that follows the cluster's CPUs): which examples each
    # worker gets must not change between runs, or neither would the model.
    datasets = {"train": ray.data.from_items(inputs.train, override_num_blocks=res.workers)}
    if inputs.val:
        datasets["validation"] = ray.data.from_items(inputs.val, override_num_blocks=1)
    attempt = raytrain.attempt_dir(ctx, spec, inputs.base["digest"], inputs.data["digest"])
    return raytrain.fit(ctx, tune_loop, config, attempt=attempt, step="tune", total_steps=inputs.total_steps,
                        resources=res, max_failures=spec.fault_tolerance.max_failures, datasets=datasets,
                        split=["train"])


def _publish_checkpoint(ctx: StageContext, spec: TunedModelSpec, inputs: _Inputs, progress: raytrain.Progress,
                        ckpt: Path, curve: list) -> tuple[dict[str, str], dict[str, str] | None]:
    """Publish the final checkpoint's adapter (LoRA) and full model, each with the tokenizer, the
    model with the tuning log: their {uri, digest}. With no full model (LoRA without merge) the
    adapter is the model."""
    adapter = None
    if spec.method == "lora":
        adapter = raytrain.publish(ckpt / ADAPTER_DIR, ctx.artifacts / "adapters", inputs.tok)
    log = _tuning_log(ctx, spec, inputs, progress, adapter, curve)
    if not (ckpt / raytrain.MODEL_DIR).is_dir():
        return adapter, adapter
    return raytrain.publish(ckpt / raytrain.MODEL_DIR, ctx.artifacts / "models", inputs.tok, log), adapter


def _tuning_log(ctx: StageContext, spec: TunedModelSpec, inputs: _Inputs, progress: raytrain.Progress,
                adapter: dict[str, str] | None, curve: list) -> dict[str, Any]:
    """The tuning log saved beside the model (`TRAINING_LOG`): what was tuned, on what, how, and
    the loss curve. Nothing in it depends on where the state directory is, when or how fast the
    run went, or whether it was interrupted (times and restarts are in the attempt's run record):
    the same tuning of the same base on the same examples is the same model, digest and all. So
    a producer's base model is named by its reference and digest, not by its folder, and the
    adapter by its digest."""
    tr, res = spec.training, spec.resources
    facts = progress.facts
    base = {k: v for k, v in inputs.base.items() if not (k == "uri" and inputs.base.get("ref"))}
    return {
        "name": ctx.name, "namespace": ctx.namespace, "kind": "TunedModel",
        "task": spec.task, "method": spec.method, "family": inputs.config.model_type,
        "lora": asdict(_lora_settings(spec, inputs.targets)) if spec.method == "lora" else None,
        "training": tr.model_dump(mode="json", by_alias=True),
        "resources": res.model_dump(mode="json", by_alias=True),
        "base": base, "dataPile": _base_pile(inputs.base_path),
        "tuningData": {**inputs.data, "examples": len(inputs.records), "train": len(inputs.train),
                       "validation": len(inputs.val)},
        "adapter": {"digest": adapter["digest"]} if adapter else None, "labels": inputs.labels or None,
        "parameters": facts.get("parameters"), "trainableParameters": facts.get("trainable"),
        "validation": {"before": facts.get("before"), "after": facts.get("after")},
        "validationLoss": (facts.get("after") or {}).get("loss"),
        "lossCurve": raytrain.loss_curve(curve),
    }


def _status(ctx: StageContext, spec: TunedModelSpec, inputs: _Inputs, progress: raytrain.Progress,
            model: dict[str, str], adapter: dict[str, str] | None) -> dict[str, Any]:
    """The TunedModel's status after a tuning, with the fields that have no value left out."""
    facts = progress.facts
    base, before, after, trainable = inputs.base, facts.get("before"), facts.get("after"), facts.get("trainable")
    artifact = {**model, "parameters": facts.get("parameters"), "trainableParameters": trainable,
                "generation": ctx.generation}
    status = {
        "progress": {"step": inputs.total_steps, "maxSteps": inputs.total_steps, "loss": progress.loss, "eta": "0s",
                     "resumedFromStep": progress.resumed_from},
        "model": artifact,
        "adapter": {**adapter, "trainableParameters": trainable} if adapter else None,
        "base": {"uri": base["uri"], "digest": base["digest"],
                 **({"parameters": base["parameters"]} if base.get("parameters") else {})},
        "data": {**inputs.data, "examples": len(inputs.records)},
        "examples": len(inputs.train),
        "validation": {"examples": len(inputs.val), "before": before, "after": after} if inputs.val else None,
        "validationLoss": (after or {}).get("loss"),
    }
    status["progress"] = {k: v for k, v in status["progress"].items() if v is not None}
    return {k: v for k, v in status.items() if v is not None}


def _message(spec: TunedModelSpec, inputs: _Inputs, progress: raytrain.Progress) -> str:
    """The stage's one-line summary: method, examples, the share of the parameters trained, the
    held-out metrics before and after, and a warning when only an adapter was made."""
    facts = progress.facts
    trainable = facts.get("trainable") or 0  # no start event: nothing was reported trained
    share = trainable / max(facts.get("parameters") or 1, 1)
    message = f"{spec.method} on {len(inputs.train)} examples, {trainable:,} trainable parameters ({share:.2%})"
    before, after = facts.get("before"), facts.get("after")
    if before and after:
        message += f"; validation loss {before['loss']:.3f} → {after['loss']:.3f}"
        if spec.task == "sequence-classification":
            message += f", accuracy {before['accuracy']:.0%} → {after['accuracy']:.0%}"
    if spec.method == "lora" and not (spec.lora or Lora()).merge:
        message += "; adapter only (lora.merge false): a ModelCard or Deployment needs the merged model"
    return message


def _base_pile(base_path: Path) -> dict[str, Any] | None:
    """The pile the base model was trained on, from its training log, when fmforge made it."""
    log = base_path / TRAINING_LOG
    if not log.is_file():
        return None
    return json.loads(log.read_text()).get("dataPile")


__all__ = ["run"]
