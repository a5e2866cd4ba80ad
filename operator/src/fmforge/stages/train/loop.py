"""The training loop each Ray Train worker runs (`train_loop`, given to `raytrain.fit`).

Every worker builds the model from the same seed (or, continuing a pretrained model, loads its
weights), reads its shard of the pile's training split
through `ray.train.get_dataset_shard` (streamed from Iceberg by Ray Data, in a fixed order), and
steps the optimizer once per `globalBatchSize` sequences (gradient accumulation over
micro-batches, the gradients all-reduced only on the last one). Progress, checkpoints and
resumption are `fmforge.stages.raytrain`'s: rank 0 sends the steps to the driver and writes the
checkpoints (model, optimizer, scheduler, random states, data position, loss curve); a worker
that starts with a checkpoint (Ray Train restarted it after a failure, or the run is started
again) resumes from it. The last checkpoint also holds the model in Hugging Face layout.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base import InputError
from ..raytrain import MODEL_DIR, Checkpointer, Worker


@dataclass(frozen=True)
class LoopConfig:
    """What every worker needs, resolved by the driver."""

    architecture: str
    """decoder or encoder."""
    model_config: dict[str, Any]
    """The transformers config, as `to_dict()` (model_type included)."""
    tokenizer: str
    """Directory of the tokenizer in Hugging Face layout (encoders read their mask token there)."""
    seed: int
    """Seed of the model's initialisation (the same on every worker) and of the masking."""
    max_steps: int
    """Optimizer steps in all."""
    micro_batch_size: int
    """Sequences per forward pass on one worker."""
    accumulation: int
    """Micro-batches per optimizer step on each worker (globalBatchSize / micro / workers)."""
    learning_rate: float
    """Peak learning rate."""
    warmup_steps: int
    """Steps of linear warm-up."""
    schedule: str
    """cosine, linear or constant after warm-up."""
    weight_decay: float
    """AdamW weight decay of the matrices."""
    gradient_clip: float
    """Gradient norm clipping; 0 disables it."""
    precision: str
    """bf16, fp16 or fp32, as the driver chose it (fp32 on CPUs)."""
    checkpoint_every: int | None
    """Checkpoint every N steps; None: at the end only."""
    mask_probability: float
    """Share of tokens masked (encoders)."""
    parallelism: str
    """ddp or fsdp, for `ray.train.torch.prepare_model`."""
    has_validation: bool
    """Whether a `validation` dataset shard exists to measure the validation loss on."""
    init: str | None = None
    """Directory of the pretrained model to continue (model.init), whose weights the model starts
    from; None: random weights from `seed`."""


def _batch_tensors(batch: dict[str, Any]):
    """input_ids (micro × length) and the real lengths of a numpy batch from Ray Data."""
    import numpy as np
    import torch

    ids = batch["input_ids"]
    ids = np.stack(list(ids)) if ids.dtype == object else ids
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(batch["length"].astype(np.int64))


def train_loop(c: LoopConfig, worker: Worker) -> None:
    """One worker's training: the loop `raytrain.fit` runs on every worker."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, get_scheduler

    rank, world, device = worker.rank, worker.world, worker.device
    encoder = c.architecture == "encoder"

    worker.seed(c.seed)
    cfg = AutoConfig.for_model(**c.model_config)
    auto = AutoModelForMaskedLM if encoder else AutoModelForCausalLM
    if c.init is not None:  # continued pretraining: the pretrained weights (a checkpoint overrides them)
        model = auto.from_pretrained(c.init, attn_implementation="sdpa", dtype=torch.float32)
    else:
        model = auto.from_config(cfg, attn_implementation="sdpa")
    parameters = sum(p.numel() for p in model.parameters())
    model = ray.train.torch.prepare_model(model, parallel_strategy=c.parallelism)

    # AdamW decays matrices only: biases and norm weights (1-D) are left alone, as in GPT-2/Llama.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": c.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=c.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                  fused=device.type == "cuda")
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[c.schedule]
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=c.warmup_steps,
                              num_training_steps=c.max_steps)

    # The precision the driver chose (fp32 on CPUs); a GPU without bf16 falls back to fp32 too.
    precision = _usable_precision(c.precision, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    masker = None
    if encoder:
        from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(c.tokenizer)
        masker = DataCollatorForLanguageModeling(tok, mlm_probability=c.mask_probability,
                                                 seed=c.seed + rank)
        masker.create_rng("pt")

    checkpointer = Checkpointer(worker, model, optimizer, scheduler, scaler,
                                generators={"mask": masker.generator} if masker is not None else {})
    step = epoch = consumed = 0
    resumed_from = None
    curve: list[dict[str, float]] = []
    position = checkpointer.restore()
    if position is not None:
        step, curve, resumed_from = position.step, position.curve, position.step
        epoch, consumed = int(position.loop["epoch"]), int(position.loop["consumed"])

    def save(final: bool = False) -> None:
        checkpointer.save(step, curve, {"epoch": epoch, "consumed": consumed}, final=final,
                          write=(lambda d, state: _save_model(auto, cfg, state, d)) if final else None)

    worker.started(step, resumed_from, parameters=parameters, precision=precision)
    accum = c.accumulation
    shard = ray.train.get_dataset_shard("train")
    ddp = hasattr(model, "no_sync")
    loss_sum = torch.zeros(2, dtype=torch.float64)  # summed loss of the step's micro-batches, tokens
    micro = 0
    while step < c.max_steps:
        seen = 0
        for batch in shard.iter_batches(batch_size=c.micro_batch_size, batch_format="numpy",
                                        drop_last=True, prefetch_batches=2):
            seen += 1
            if seen <= consumed:  # a resumed epoch: skip what the checkpoint had consumed
                continue
            consumed += 1
            inputs, labels, valid = _inputs_and_labels(*_batch_tensors(batch), masker)
            micro += 1
            sync = micro == accum
            with (contextlib.nullcontext() if sync or not ddp else model.no_sync()), autocast():
                out = model(input_ids=inputs.to(device), attention_mask=valid.long().to(device),
                            labels=labels.to(device))
            scaler.scale(out.loss / accum).backward()
            loss_sum += torch.tensor([out.loss.item(), float(valid.sum())], dtype=torch.float64)
            if not sync:
                continue
            scaler.unscale_(optimizer)
            if c.gradient_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.gradient_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            micro = 0
            if world > 1:
                dist.all_reduce(loss_sum)
            # Tokens of each step on the curve, for throughput read off it.
            curve.append(worker.stepped(step, float(loss_sum[0]) / (accum * world), scheduler.get_last_lr()[0],
                                        tokens=float(loss_sum[1])))
            loss_sum.zero_()
            if step >= c.max_steps:
                break
            if c.checkpoint_every and step % c.checkpoint_every == 0:
                save()
        else:
            if seen == 0:
                raise InputError(f"worker {rank} got no training batch of {c.micro_batch_size} sequences "
                                 f"from its shard of the pile")
            epoch += 1
            consumed = 0
            continue
        break

    validation = _validation_loss(model, c, masker, autocast, device, world) if c.has_validation else None
    worker.ended(validation_loss=validation if validation is None or math.isfinite(validation) else None)
    save(final=True)


def _save_model(auto: Any, cfg: Any, state: dict[str, Any], folder: Path) -> None:
    """The final checkpoint's model in Hugging Face layout (`MODEL_DIR`), from the full state
    dict the checkpointer gathered (from FSDP's shards too)."""
    hf = auto.from_config(cfg)
    hf.load_state_dict(state)
    hf.save_pretrained(folder / MODEL_DIR)


def _usable_precision(precision: str, device: Any) -> str:
    """The precision the driver chose (fp32 on CPUs); a GPU without bf16 falls back to fp32 too."""
    import torch

    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp32"
    return precision


def _inputs_and_labels(ids: Any, length: Any, masker: Any) -> tuple[Any, Any, Any]:
    """The model's inputs, its labels (-100 where no loss is taken) and the mask of real tokens:
    an encoder predicts the tokens the masker hid, a decoder every token but the padding."""
    import torch

    valid = torch.arange(ids.shape[1])[None, :] < length[:, None]
    if masker is not None:
        inputs, labels = masker.torch_mask_tokens(ids.clone(), special_tokens_mask=~valid)
    else:
        inputs, labels = ids, ids.masked_fill(~valid, -100)
    return inputs, labels, valid


def _validation_loss(model: Any, c: LoopConfig, masker: Any, autocast: Any, device: Any, world: int) -> float | None:
    """The mean loss per predicted token over every worker's shard of the validation split."""
    import ray.train
    import torch
    import torch.distributed as dist

    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in ray.train.get_dataset_shard("validation").iter_batches(
                batch_size=c.micro_batch_size, batch_format="numpy", prefetch_batches=2):
            ids, length = _batch_tensors(batch)
            valid = torch.arange(ids.shape[1])[None, :] < length[:, None]
            if masker is not None:
                inputs, labels = masker.torch_mask_tokens(ids.clone(), special_tokens_mask=~valid)
            else:
                inputs, labels = ids, ids.masked_fill(~valid, -100)
            n = float((labels[:, 1:] != -100).sum() if masker is None else (labels != -100).sum())
            with autocast():
                out = model(input_ids=inputs.to(device), attention_mask=valid.long().to(device),
                            labels=labels.to(device))
            if n:
                totals += torch.tensor([out.loss.item() * n, n], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    validation = float(totals[0] / totals[1]) if totals[1] else None
    model.train()
    return validation
