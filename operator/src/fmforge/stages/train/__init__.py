"""The TrainingRun stage: a foundation model trained on a pile version, with Ray Train.

    resolve the pile version (snapshot ids, tokenizer) → model config from the preset + tokenizer,
    or (model.init, continued pretraining) the pretrained model's own config, tokenizer and
    weights, its vocabulary checked against the pile's → checks (sizes, batch arithmetic, enough
    data) → `raytrain.fit`: Ray Train over Ray Data
    shards of the pile's training split (`loop.train_loop` on every worker) → the final
    checkpoint's model, with the tokenizer and the training log, into a new digest-named model
    directory

Everything the user can get wrong is refused before a worker starts. The driver (this process:
`fmforge run` locally, the RayJob entrypoint on a cluster) reads no token: Ray Data tasks read
the Iceberg snapshot and stream it to the workers. Checkpoints live in the attempt's folder
(`attempts/<digest of spec and pile snapshots>/checkpoints/`); a run started again for the same
attempt resumes from the newest one, and Ray Train restarts failed workers from it up to
`faultTolerance.maxFailures` times. A finished
model never changes: each attempt writes a new directory, so a failed run leaves the previous
model as it was; and the same training on the same pile version makes the same model, byte for
byte (fixed seeds, the pile read in a fixed order). Called by the local runner and by
`fmforge.runtime.job` through `STAGES`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ...api.v1alpha1.trainingrun import TrainingRunSpec
from .. import piles as pile
from .. import raytrain
from ..artifacts import producer_model
from ..base import InputError, InvalidSpec, StageContext, StageResult
from ..models import load as load_model
from ..models import vocabulary_difference
from . import models
from .loop import LoopConfig, train_loop


def spec_digest(spec: TrainingRunSpec) -> str:
    body = json.dumps(spec.model_dump(mode="json", by_alias=True), sort_keys=True)
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def _init(ctx: StageContext, spec: TrainingRunSpec, version: pile.PinnedPile) -> tuple[Path, dict[str, Any]]:
    """The pretrained model `model.init` names (a producer's model, digest checked; or a URI: a
    directory or a GGUF file) and its record ({uri, digest, ref}), checked to be a causal LM
    that reads the pile's vocabulary and sequences; all before a worker starts."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    init = spec.model.init
    if init.model_ref is not None:
        path, model = producer_model(ctx, init.model_ref, "spec.model.init.modelRef")
        record = {"uri": model["uri"], "digest": model["digest"], "ref": f"{init.model_ref.kind}/{init.model_ref.name}"}
    else:
        loaded = load_model(ctx, init.uri, "spec.model.init.uri")
        path, record = loaded.path, loaded.record()
    name = record.get("ref") or record["uri"]
    config = AutoConfig.from_pretrained(str(path))
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (config.architectures and not any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures)):
        raise InvalidSpec(f"spec.model.init: {name} is {', '.join(config.architectures or [config.model_type])}, not a "
                          f"causal language model; continued pretraining starts from a decoder")
    # The pile's token ids index the model's embeddings: another vocabulary would train the model
    # on ids that mean other tokens to it, silently. Refused here, before Ray starts.
    diff = vocabulary_difference(version.tokenizer, path)
    if diff is not None:
        raise InvalidSpec(f"spec.dataPileRef: DataPile {version.name} version {version.snapshot_id} was tokenized "
                          f"with another vocabulary than the model of spec.model.init ({name}): {diff}; publish the "
                          f"pile with tokenizer.uri naming that model, then train on that version")
    context = next((int(getattr(config, a)) for a in ("max_position_embeddings", "n_positions")
                    if getattr(config, a, None)), None)
    if context is not None and context < version.sequence_length:
        raise InvalidSpec(f"spec.dataPileRef: the pile's sequences are {version.sequence_length} tokens and the model "
                          f"of spec.model.init ({name}) reads at most {context}; publish the pile with "
                          f"tokenize.sequenceLength at most {context}")
    return path, record


def _init_tokenizer(path: Path):
    """The pretrained model's own tokenizer (chat template included), padding with its
    end-of-text token when it has no padding token: saved with the model trained on."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def run(ctx: StageContext) -> StageResult:
    spec: TrainingRunSpec = ctx.spec
    rep = ctx.reporter
    tr, res = spec.training, spec.resources

    # 1. Everything that can be wrong in the input, before a worker starts.
    version = pile.pin(ctx, spec.data_pile_ref, "spec.dataPileRef")
    init_path, base = (None, None)
    if spec.model.init is not None:
        init_path, base = _init(ctx, spec, version)
        tok = _init_tokenizer(init_path)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(init_path)).to_dict()
        rep.log("Continued from a pretrained model", model=base.get("ref") or base["uri"], digest=base["digest"][:19])
    else:
        tok = models.tokenizer(version.tokenizer, spec.model.architecture)
        config = models.model_config(spec.model, tok, version.sequence_length)
    per_step = tr.micro_batch_size * res.workers
    if tr.global_batch_size % per_step:
        raise InvalidSpec(
            f"spec.training.globalBatchSize: {tr.global_batch_size} sequences per step cannot be split into micro-"
            f"batches of {tr.micro_batch_size} over {res.workers} workers ({per_step} per round); make "
            f"globalBatchSize a multiple of microBatchSize x workers")
    accumulation = tr.global_batch_size // per_step
    if tr.parallelism == "fsdp" and res.gpus_per_worker == 0:
        raise InvalidSpec("spec.training.parallelism: fsdp shards the model over GPUs; with gpusPerWorker 0 use "
                          "ddp (the default), or give the workers GPUs")
    n_train = pile.count(version, "train")
    n_val = pile.count(version, "validation")
    if n_train // res.workers < per_step * accumulation // res.workers:
        raise InputError(
            f"spec.dataPileRef: DataPile {version.name} version {version.snapshot_id} has {n_train} training "
            f"sequences, fewer than one optimizer step of globalBatchSize {tr.global_batch_size} over "
            f"{res.workers} workers; lower globalBatchSize or add data to the pile")
    precision = tr.precision
    note = ""
    if res.gpus_per_worker == 0 and precision != "fp32":
        precision = "fp32"
        note = f"{tr.precision} was asked for; training on CPUs runs in fp32"
        rep.log(f"Chose fp32 for TrainingRun {ctx.name}: {note}")
    rep.log("Resolved the pile version", pile=version.name, snapshot=version.snapshot_id, tag=version.tag,
            sequences=n_train, validation=n_val)

    # 2. Train on Ray.
    raytrain.start(ctx, res)
    datasets = {"train": pile.sequences(version, "train")}
    if n_val:
        datasets["validation"] = pile.sequences(version, "validation")
    attempt = raytrain.attempt_dir(ctx, spec, version.snapshot_id, version.sequences_snapshot_id,
                                   *([base["digest"]] if base else []))
    tok_dir = version.tokenizer
    if spec.model.architecture == "encoder":  # the workers need the tokenizer with its mask token
        tok_dir = attempt / "tokenizer"
        tok.save_pretrained(str(tok_dir))
    loop = LoopConfig(
        architecture=spec.model.architecture, model_config=config, tokenizer=str(tok_dir), seed=tr.seed,
        max_steps=tr.max_steps, micro_batch_size=tr.micro_batch_size, accumulation=accumulation,
        learning_rate=tr.learning_rate, warmup_steps=tr.warmup_steps, schedule=tr.schedule,
        weight_decay=tr.weight_decay, gradient_clip=tr.gradient_clip, precision=precision,
        checkpoint_every=tr.checkpoint_every, mask_probability=tr.mask_probability, parallelism=tr.parallelism,
        has_validation=bool(n_val), init=str(init_path) if init_path else None)
    fitted = raytrain.fit(ctx, train_loop, loop, attempt=attempt, step="train", total_steps=tr.max_steps,
                          resources=res, max_failures=spec.fault_tolerance.max_failures, datasets=datasets)
    facts, progress = fitted.progress.facts, fitted.progress

    # 3. The model directory: the final checkpoint's model, the tokenizer, the training log.
    # Nothing in it depends on where the state directory is, when or how fast the run went, or
    # whether it was interrupted: the same training of the same pile version is the same model,
    # digest and all (times and restarts are in the attempt's run record).
    with fitted.final_checkpoint() as d:
        state = raytrain.read_curve(d)
        log = {
            "name": ctx.name, "namespace": ctx.namespace, "specDigest": spec_digest(spec),
            "architecture": spec.model.architecture,
            "family": config.get("model_type") if base else spec.model.family,
            "preset": None if base else spec.model.preset,
            "base": {k: v for k, v in base.items() if not (k == "uri" and base.get("ref"))} if base else None,
            "modelConfig": {k: config.get(k) for k in ("hidden_size", "n_embd", "num_hidden_layers", "n_layer",
                                                       "num_attention_heads", "n_head", "vocab_size") if k in config},
            "training": spec.training.model_dump(mode="json", by_alias=True)
            | {"precisionUsed": facts.get("precision", precision)},
            "resources": spec.resources.model_dump(mode="json", by_alias=True),
            "dataPile": version.lineage(), "sequences": {"train": n_train, "validation": n_val},
            "parameters": facts.get("parameters"), "validationLoss": facts.get("validation_loss"),
            "lossCurve": raytrain.loss_curve(state),
        }
        model = raytrain.publish(d / raytrain.MODEL_DIR, ctx.artifacts / "models", tok, log)
    fitted.record(state, model["digest"])
    digest = model["digest"]
    rep.log(f"Saved the model of TrainingRun {ctx.name}", uri=model["uri"], digest=digest[:19])

    loss = state[-1]["loss"] if state else None
    status = {
        "progress": {"step": tr.max_steps, "maxSteps": tr.max_steps, "loss": loss,
                     "tokensPerSecond": round(progress.tokens_per_second, 1)
                     if progress.tokens_per_second is not None else None, "eta": "0s",
                     "resumedFromStep": progress.resumed_from},
        "model": {"uri": model["uri"], "digest": digest, "parameters": facts.get("parameters"),
                  "trainableParameters": facts.get("parameters"), "generation": ctx.generation,
                  "specDigest": log["specDigest"]},
        "dataPile": version.lineage(),
        "base": {"uri": base["uri"], "digest": base["digest"]} if base else None,
        "precision": facts.get("precision", precision),
        "validationLoss": facts.get("validation_loss"),
    }
    status["progress"] = {k: v for k, v in status["progress"].items() if v is not None}
    status = {k: v for k, v in status.items() if v is not None}
    first = state[0]["loss"] if state else None
    message = (f"trained {facts.get('parameters', 0) / 1e6:.2f}M parameters for {tr.max_steps} steps on "
               f"{version.name}@{version.snapshot_id}: loss {first:.3f} → {loss:.3f}" if state else "trained")
    if base:
        message = f"continued {base.get('ref') or base['uri']}: " + message
    if note:
        message += f" ({note})"
    lineage = [{"name": base.get("ref") or "model.init", "uri": base["uri"], "digest": base["digest"]}] if base else []
    return StageResult(status=status, digest=digest, message=message, lineage=lineage)


__all__ = ["run"]
