"""The TrainingRun stage: a foundation model trained from scratch on a pile version, with Ray Train.

    resolve the pile version (snapshot ids, tokenizer) → model config from the preset + tokenizer
    → checks (sizes, batch arithmetic, enough data) → TorchTrainer over Ray Data shards of the
    pile's training split (`loop.train_loop` on every worker) → the final checkpoint's model,
    with the tokenizer and the training log, into a new digest-named model directory

Everything the user can get wrong is refused before a worker starts. The driver (this process:
`fmforge run` locally, the RayJob entrypoint on a cluster) reads no token: Ray Data tasks read
the Iceberg snapshot and stream it to the workers. Checkpoints live in the attempt's folder
(`attempts/<digest of spec and pile snapshots>/checkpoints/`); a run started again for the same
attempt resumes from the newest one, and Ray Train restarts failed workers from it up to
`faultTolerance.maxFailures` times. A finished
model never changes: each attempt writes a new directory, so a failed run leaves the previous
model as it was. Called by the local runner and by `fmforge.runtime.job` through `STAGES`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...api.v1alpha1.trainingrun import TrainingRunSpec
from .. import raytrain
from .. import piles as pile
from ..artifacts import TRAINING_LOG, model_digest
from ..base import InputError, InvalidSpec, StageContext, StageResult
from . import models
from .loop import CURVE, MODEL_DIR, LoopConfig, train_loop

def spec_digest(spec: TrainingRunSpec) -> str:
    body = json.dumps(spec.model_dump(mode="json", by_alias=True), sort_keys=True)
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def _attempt_key(spec: TrainingRunSpec, version: pile.PileVersion) -> str:
    """What decides the model: the spec but its fault tolerance and RayJob options (raising
    maxFailures after a failed run resumes it), and the pile snapshots."""
    what = spec.model_dump(mode="json", by_alias=True, exclude={"fault_tolerance", "ray"})
    body = f"{json.dumps(what, sort_keys=True)}\0{version.snapshot_id}\0{version.sequences_snapshot_id}"
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _eta(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def run(ctx: StageContext) -> StageResult:
    spec: TrainingRunSpec = ctx.spec
    rep = ctx.reporter
    tr, res = spec.training, spec.resources

    # 1. Everything that can be wrong in the input, before a worker starts.
    version = pile.resolve(ctx, spec.data_pile_ref, "spec.dataPileRef")
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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    # One CPU beyond the workers' for the Ray Data tasks that read the pile.
    pile.ray_init(ctx.state_dir, res.workers * res.cpus_per_worker + 1)
    datasets = {"train": pile.sequences(version, "train")}
    if n_val:
        datasets["validation"] = pile.sequences(version, "validation")
    progress = raytrain.progress_queue()
    # The attempt's folder: the same training on the same pile version is the same attempt, and a
    # run started again resumes from its checkpoints; anything else starts afresh in its own folder.
    attempt = ctx.artifacts / "attempts" / _attempt_key(spec, version)
    storage = (attempt / "checkpoints").resolve()
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
        has_validation=bool(n_val), checkpoints=str(storage / "train"), progress=progress)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"loop": loop},
        scaling_config=raytrain.scaling(res),
        run_config=RunConfig(name="train", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=spec.fault_tolerance.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
    )
    started = time.monotonic()
    info: dict[str, Any] = {"restarts": 0}
    last: dict[str, Any] = {}
    rep.step("train", total=tr.max_steps)

    on_event = _progress_handler(ctx, info, last)

    try:
        result = raytrain.fit(trainer, progress, on_event)
    except Exception as e:
        raise RuntimeError(f"training of TrainingRun {ctx.name} failed: {e}; a run started again resumes from "
                           f"the last checkpoint in {storage}") from e
    took = time.monotonic() - started

    # 3. The model directory: the final checkpoint's model, the tokenizer, the training log.
    out_root = ctx.artifacts / "models"
    tmp = out_root / f".tmp-{uuid.uuid4().hex}"
    with result.checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / MODEL_DIR, tmp)
        state = _curve(Path(d))
    tok.save_pretrained(str(tmp))
    log = {
        "name": ctx.name, "namespace": ctx.namespace, "generation": ctx.generation, "specDigest": spec_digest(spec),
        "architecture": spec.model.architecture, "family": spec.model.family, "preset": spec.model.preset,
        "modelConfig": {k: config.get(k) for k in ("hidden_size", "n_embd", "num_hidden_layers", "n_layer",
                                                   "num_attention_heads", "n_head", "vocab_size") if k in config},
        "training": spec.training.model_dump(mode="json", by_alias=True) | {"precisionUsed": info.get("precision",
                                                                                                     precision)},
        "resources": spec.resources.model_dump(mode="json", by_alias=True),
        "dataPile": version.lineage(), "sequences": {"train": n_train, "validation": n_val},
        "parameters": info.get("parameters"), "validationLoss": info.get("validation_loss"),
        "seconds": round(took, 1), "restarts": info["restarts"], "resumedFromStep": info.get("resumed_from"),
        "lossCurve": state,
    }
    (tmp / TRAINING_LOG).write_text(json.dumps(log, indent=2) + "\n")
    digest = model_digest(tmp)
    final = out_root / digest.split(":")[1][:16]
    if final.exists():  # the same bytes already there: keep them, never overwrite
        shutil.rmtree(tmp)
    else:
        tmp.rename(final)
    rep.log(f"Saved the model of TrainingRun {ctx.name}", uri=final.resolve().as_uri(), digest=digest[:19])

    loss = state[-1]["loss"] if state else None
    status = {
        "progress": {"step": tr.max_steps, "maxSteps": tr.max_steps, "loss": loss,
                     "tokensPerSecond": round(last["tokens_s"], 1) if "tokens_s" in last else None, "eta": "0s",
                     "resumedFromStep": info.get("resumed_from")},
        "model": {"uri": final.resolve().as_uri(), "digest": digest, "parameters": info.get("parameters"),
                  "trainableParameters": info.get("parameters"), "generation": ctx.generation,
                  "specDigest": log["specDigest"]},
        "dataPile": version.lineage(),
        "precision": info.get("precision", precision),
        "validationLoss": info.get("validation_loss"),
    }
    status["progress"] = {k: v for k, v in status["progress"].items() if v is not None}
    status = {k: v for k, v in status.items() if v is not None}
    first = state[0]["loss"] if state else None
    message = (f"trained {info.get('parameters', 0) / 1e6:.2f}M parameters for {tr.max_steps} steps on "
               f"{version.name}@{version.snapshot_id}: loss {first:.3f} → {loss:.3f}" if state else "trained")
    if note:
        message += f" ({note})"
    return StageResult(status=status, digest=digest, message=message)


def _progress_handler(ctx: StageContext, info: dict[str, Any],
                      last: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """What the driver does with each event the rank-0 worker sends: advance the progress, log a
    resumption, and keep in `info` what the result reports (restarts, parameters, precision,
    validation loss) and in `last` the latest step and throughput."""
    rep = ctx.reporter

    def on_event(ev: dict[str, Any]) -> None:
        if ev["event"] == "start":
            if info.get("started"):
                info["restarts"] += 1
            info.update(started=True, parameters=ev["parameters"], precision=ev["precision"],
                        resumed_from=ev["resumed_from"])
            if ev["resumed_from"]:
                rep.log(f"Resumed TrainingRun {ctx.name} from its checkpoint", step=ev["resumed_from"])
            rep.advance(ev["step"] - last.get("step", 0))  # back to the checkpoint's step after a restart
            last["step"] = ev["step"]
        elif ev["event"] == "step":
            rep.advance(ev["step"] - last.get("step", 0), loss=f"{ev['loss']:.3f}", lr=f"{ev['lr']:.2e}",
                        tokens_s=f"{ev['tokens_per_second']:.0f}", eta=_eta(ev["eta"]))
            last.update(step=ev["step"], tokens_s=ev["tokens_per_second"])
        elif ev["event"] == "end":
            info["validation_loss"] = ev["validation_loss"]

    return on_event


def _curve(checkpoint: Path) -> list[dict[str, float]]:
    return json.loads((checkpoint / CURVE).read_text())


__all__ = ["run"]
