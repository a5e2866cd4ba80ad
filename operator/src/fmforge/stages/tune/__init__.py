"""The TunedModel stage: fine-tune a base model on local examples turned into prompts, with Ray Train.

    templates checked → the base model (a TrainingRun's or TunedModel's recorded model, digest
    checked; or baseModel.uri: file://, pvc://, pkg://, or s3:// downloaded into a cache keyed by
    the objects' names, sizes and times) and its fit for the task → the examples read (a JSONL
    file, a pile version's documents, or a ConfigMap mounted into the pod), split (stable) and
    tokenized → TorchTrainer running `loop.tune_loop` (LoRA through peft, or every weight) → the
    adapter and the full model (merged, for LoRA with merge), each in a new digest-named
    directory, with the tokenizer and the tuning log

Everything the user can get wrong (a template, a record without a field, a base model that does
not fit the task, target modules the model lacks) is refused before a worker starts. Checkpoints
live in the attempt's folder (`attempts/<digest of spec, base and data>/checkpoints/`), one per
epoch; a run started again for the same attempt resumes from the latest, and Ray Train restarts
failed workers from it up to `faultTolerance.maxFailures` times. Called by the local runner and
by `fmforge.runtime.job` through `STAGES`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...api.v1alpha1.tunedmodel import Lora, TunedModelSpec
from .. import raytrain
from ..base import InputError, InvalidSpec, StageContext, StageResult
from ..piles import table_name
from ..uris import resolve, s3_filesystem
from ..artifacts import producer_model
from ..artifacts import TRAINING_LOG, model_digest
from .. import piles
from . import data as examples
from .loop import ADAPTER_DIR, CURVE, MODEL_DIR, tune_loop

#: LoRA's target modules when the spec names none: the attention projections of each family
#: (query and value, as in the LoRA paper; GPT-2 fuses q, k and v into one `c_attn`).
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}


def _base(ctx: StageContext, spec: TunedModelSpec) -> tuple[Path, dict[str, Any]]:
    """The base model's directory and its record ({uri, digest, ...})."""
    if spec.base_model_ref is not None:
        path, model = producer_model(ctx, spec.base_model_ref, "spec.baseModelRef")
        return path, {"uri": model["uri"], "digest": model["digest"], "parameters": model.get("parameters"),
                      "ref": f"{spec.base_model_ref.kind}/{spec.base_model_ref.name}"}
    uri = spec.base_model.uri
    if uri.startswith("s3://"):
        path = _from_s3(ctx, uri)
    else:
        _, p = resolve(uri, ctx.base_dir, confine=not ctx.allow_outside_paths)
        path = Path(p)
    if not (path / "config.json").is_file():
        raise InvalidSpec(f"spec.baseModel.uri: {uri} ({path}) is not a model directory in Hugging Face layout (no "
                          f"config.json); point it at the directory that holds config.json and the weights")
    return path, {"uri": uri, "digest": model_digest(path)}


def _from_s3(ctx: StageContext, uri: str) -> Path:
    """A local copy of the model directory at `uri` (s3://BUCKET/PREFIX), read through pyarrow's
    S3 filesystem into `<state>/cache/models/<key>`; transformers loads from there.

    The key is the URI and each object's name, size and last-modified time (what an S3 listing
    gives; pyarrow does not expose ETags): a model rewritten in place is fetched again, and an
    unchanged one is read from the cache without a byte downloaded. The copy is made in a
    temporary folder and renamed into place, so a run killed mid-download leaves no half model
    to be taken for a whole one."""
    import pyarrow.fs as pafs

    fs, root = s3_filesystem(), uri.removeprefix("s3://").rstrip("/")
    try:
        listed = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as e:
        raise InputError(f"spec.baseModel.uri: {uri}: cannot list it ({e}); check the bucket, the endpoint "
                         f"(AWS_ENDPOINT_URL) and the credentials") from None
    files = sorted((f for f in listed if f.type == pafs.FileType.File), key=lambda f: f.path)
    rel = {f.path: f.path[len(root):].lstrip("/") for f in files}
    if "config.json" not in rel.values():
        raise InvalidSpec(f"spec.baseModel.uri: {uri} is not a model directory in Hugging Face layout (no "
                          f"config.json under it); point it at the prefix that holds config.json and the weights")
    key = hashlib.sha256("\n".join([uri, *(f"{rel[f.path]}:{f.size}:{f.mtime_ns}" for f in files)]).encode())
    cache = (ctx.state_dir / "cache" / "models" / key.hexdigest()[:16]).resolve()
    if (cache / "config.json").is_file():
        ctx.reporter.log("Used the cached copy of the base model", uri=uri, path=str(cache))
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".tmp-{uuid.uuid4().hex}"
    total = 0
    for f in files:
        dest = tmp / rel[f.path]
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f.path) as src, dest.open("wb") as out:
            shutil.copyfileobj(src, out, 8 * 2**20)
        total += f.size or 0
    try:
        tmp.rename(cache)
    except OSError:  # another run put the same copy there first: it holds the same bytes
        shutil.rmtree(tmp)
    ctx.reporter.log("Downloaded the base model", uri=uri, files=len(files), bytes=total, path=str(cache))
    return cache


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


@dataclass
class _Progress:
    """What the workers reported through the progress queue, kept by the driver: the counts of
    parameters, the held-out metrics, the restarts and the last step and loss."""

    restarts: int = 0
    """How often the workers started again (Ray Train restarting them after a failure)."""
    started: bool = False
    """Whether the workers have started once."""
    parameters: int | None = None
    """The base model's parameters."""
    trainable: int | None = None
    """The parameters trained (the adapters', for LoRA)."""
    before: dict[str, float] | None = None
    """The held-out metrics before the first step."""
    after: dict[str, float] | None = None
    """The held-out metrics after the last step (None when not finite)."""
    resumed_from: int | None = None
    """The step the workers last resumed from a checkpoint at."""
    step: int = 0
    """The last step reported."""
    loss: float | None = None
    """The training loss of the last step reported."""


def run(ctx: StageContext) -> StageResult:
    """Tune the TunedModel's base model on its examples and publish the result: the stage's entry
    point (`STAGES`)."""
    spec: TunedModelSpec = ctx.spec
    # 1. Everything that can be wrong in the input, before a worker starts.
    inputs = _prepare(ctx, spec)
    # 2. Tune on Ray.
    result, progress, took = _tune(ctx, spec, inputs)
    # 3. The adapter and the model, each in a directory named by its digest.
    with result.checkpoint.as_directory() as ckpt:
        model, adapter = _publish_checkpoint(ctx, spec, inputs, progress, Path(ckpt), took)
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
    train = examples.encode_causal(train_records, tok, d.prompt_template, d.completion_template, context)
    val = examples.encode_causal(val_records, tok, d.prompt_template, d.completion_template, context)
    return [], train, val


def _lora_config(spec: TunedModelSpec, targets: list[str] | None) -> dict[str, Any]:
    """LoRA's settings as the workers and the tuning log take them (the defaults when the spec has no `lora`)."""
    lora = spec.lora or Lora()
    return {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": targets,
            "merge": lora.merge}


def _attempt_storage(ctx: StageContext, spec: TunedModelSpec, inputs: _Inputs) -> Path:
    """The checkpoint folder of this attempt (`attempts/<digest>/checkpoints`).

    The same tuning of the same base model on the same examples is the same attempt, and a run
    started again resumes from its checkpoints; anything else starts afresh in its own folder.
    Fault tolerance is left out: raising maxFailures after a failed run resumes it."""
    what = spec.model_dump(mode="json", by_alias=True, exclude={"fault_tolerance"})
    key = hashlib.sha256(f"{json.dumps(what, sort_keys=True)}\0{inputs.base['digest']}\0{inputs.data['digest']}"
                         .encode())
    return (ctx.artifacts / "attempts" / key.hexdigest()[:16] / "checkpoints").resolve()


def _tune(ctx: StageContext, spec: TunedModelSpec, inputs: _Inputs) -> tuple[Any, _Progress, float]:
    """Run `loop.tune_loop` on Ray Train's workers, following their progress: the result (its
    checkpoint is the final one), what the workers reported, and the seconds it took."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    tr, res = spec.training, spec.resources
    piles.ray_init(ctx.state_dir, res.workers * res.cpus_per_worker)
    queue = raytrain.progress_queue()
    storage = _attempt_storage(ctx, spec, inputs)
    loop_config = {
        "task": spec.task, "base": str(inputs.base_path), "labels": inputs.labels, "method": spec.method,
        "lora": _lora_config(spec, inputs.targets),
        "train": inputs.train, "validation": inputs.val, "pad_id": inputs.tok.pad_token_id, "epochs": tr.epochs,
        "learning_rate": tr.learning_rate, "micro_batch_size": tr.micro_batch_size, "seed": tr.seed,
        "total_steps": inputs.total_steps, "checkpoints": str(storage / "tune"), "progress": queue,
    }
    trainer = TorchTrainer(
        tune_loop, train_loop_config=loop_config, scaling_config=raytrain.scaling(res),
        run_config=RunConfig(name="tune", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=spec.fault_tolerance.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    started = time.monotonic()
    progress = _Progress()
    ctx.reporter.step("tune", total=inputs.total_steps)
    try:
        result = raytrain.fit(trainer, queue, lambda ev: _on_event(ctx, progress, ev))
    except Exception as e:
        raise RuntimeError(f"tuning of TunedModel {ctx.name} failed: {e}; a run started again resumes from the last "
                           f"checkpoint in {storage}") from e
    return result, progress, time.monotonic() - started


def _on_event(ctx: StageContext, progress: _Progress, ev: dict[str, Any]) -> None:
    """Take in one event from the workers' progress queue: advance the console's step and keep
    what the status and the tuning log need."""
    rep = ctx.reporter
    if ev["event"] == "start":
        # Workers that start a second time were restarted by Ray Train after a failure.
        if progress.started:
            progress.restarts += 1
        progress.started = True
        progress.parameters, progress.trainable = ev["parameters"], ev["trainable"]
        progress.before, progress.resumed_from = ev["before"], ev["resumed_from"]
        if ev["resumed_from"]:
            rep.log(f"Resumed TunedModel {ctx.name} from its checkpoint", step=ev["resumed_from"])
        rep.advance(ev["step"] - progress.step)
        progress.step = ev["step"]
    elif ev["event"] == "step":
        rep.advance(ev["step"] - progress.step, loss=f"{ev['loss']:.3f}", epoch=ev["epoch"],
                    eta=f"{ev['eta']:.0f}s")
        progress.step, progress.loss = ev["step"], ev["loss"]
    elif ev["event"] == "end":
        progress.after = ev["after"]


def _publish_checkpoint(ctx: StageContext, spec: TunedModelSpec, inputs: _Inputs, progress: _Progress, ckpt: Path,
                        took: float) -> tuple[dict[str, str], dict[str, str] | None]:
    """Publish the final checkpoint's adapter (LoRA) and full model, each with the tokenizer, the
    model with the tuning log: their {uri, digest}. With no full model (LoRA without merge) the
    adapter is the model."""
    curve = json.loads((ckpt / CURVE).read_text())
    adapter = _publish(ckpt / ADAPTER_DIR, ctx.artifacts / "adapters", inputs.tok) if spec.method == "lora" else None
    log = _tuning_log(ctx, spec, inputs, progress, adapter, curve, took)
    model = _publish(ckpt / MODEL_DIR, ctx.artifacts / "models", inputs.tok, log) if (ckpt / MODEL_DIR).is_dir() \
        else adapter
    return model, adapter


def _tuning_log(ctx: StageContext, spec: TunedModelSpec, inputs: _Inputs, progress: _Progress,
                adapter: dict[str, str] | None, curve: list, took: float) -> dict[str, Any]:
    """The tuning log saved beside the model (`TRAINING_LOG`): what was tuned, on what, how, and
    the loss curve."""
    tr, res = spec.training, spec.resources
    return {
        "name": ctx.name, "namespace": ctx.namespace, "generation": ctx.generation, "kind": "TunedModel",
        "task": spec.task, "method": spec.method, "family": inputs.config.model_type,
        "lora": _lora_config(spec, inputs.targets) if spec.method == "lora" else None,
        "training": tr.model_dump(mode="json", by_alias=True),
        "resources": res.model_dump(mode="json", by_alias=True),
        "base": inputs.base, "dataPile": _base_pile(inputs.base_path),
        "tuningData": {**inputs.data, "examples": len(inputs.records), "train": len(inputs.train),
                       "validation": len(inputs.val)},
        "adapter": adapter, "labels": inputs.labels or None,
        "parameters": progress.parameters, "trainableParameters": progress.trainable,
        "validation": {"before": progress.before, "after": progress.after},
        "validationLoss": (progress.after or {}).get("loss"),
        "seconds": round(took, 1), "restarts": progress.restarts, "resumedFromStep": progress.resumed_from,
        "lossCurve": curve,
    }


def _status(ctx: StageContext, spec: TunedModelSpec, inputs: _Inputs, progress: _Progress, model: dict[str, str],
            adapter: dict[str, str] | None) -> dict[str, Any]:
    """The TunedModel's status after a tuning, with the fields that have no value left out."""
    base, before, after = inputs.base, progress.before, progress.after
    artifact = {**model, "parameters": progress.parameters, "trainableParameters": progress.trainable,
                "generation": ctx.generation}
    status = {
        "progress": {"step": inputs.total_steps, "maxSteps": inputs.total_steps, "loss": progress.loss, "eta": "0s",
                     "resumedFromStep": progress.resumed_from},
        "model": artifact,
        "adapter": {**adapter, "trainableParameters": progress.trainable} if adapter else None,
        "base": {"uri": base["uri"], "digest": base["digest"],
                 **({"parameters": base["parameters"]} if base.get("parameters") else {})},
        "data": {**inputs.data, "examples": len(inputs.records)},
        "examples": len(inputs.train),
        "validation": {"examples": len(inputs.val), "before": before, "after": after} if inputs.val else None,
        "validationLoss": (after or {}).get("loss"),
    }
    status["progress"] = {k: v for k, v in status["progress"].items() if v is not None}
    return {k: v for k, v in status.items() if v is not None}


def _message(spec: TunedModelSpec, inputs: _Inputs, progress: _Progress) -> str:
    """The stage's one-line summary: method, examples, the share of the parameters trained, the
    held-out metrics before and after, and a warning when only an adapter was made."""
    trainable = progress.trainable or 0  # no start event: nothing was reported trained
    share = trainable / max(progress.parameters or 1, 1)
    message = f"{spec.method} on {len(inputs.train)} examples, {trainable:,} trainable parameters ({share:.2%})"
    before, after = progress.before, progress.after
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


def _publish(src: Path, root: Path, tok, log: dict[str, Any] | None = None) -> dict[str, str]:
    """Copy `src` with the tokenizer (and the tuning log) into `root/<digest>`; {uri, digest}.
    A directory with the same bytes already there is kept as it is, never overwritten."""
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    shutil.copytree(src, tmp)
    tok.save_pretrained(str(tmp))
    if log is not None:
        (tmp / TRAINING_LOG).write_text(json.dumps(log, indent=2) + "\n")
    digest = model_digest(tmp)
    final = root / digest.split(":")[1][:16]
    if final.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(final)
    return {"uri": final.resolve().as_uri(), "digest": digest}


__all__ = ["run"]
