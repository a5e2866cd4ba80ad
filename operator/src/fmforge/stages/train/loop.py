"""The training loop each Ray Train worker runs (`train_loop`, given to `TorchTrainer`).

Every worker builds the model from the same seed, reads its shard of the pile's training split
through `ray.train.get_dataset_shard` (streamed from Iceberg by Ray Data), and steps the
optimizer once per `globalBatchSize` sequences (gradient accumulation over micro-batches, the
gradients all-reduced only on the last one). Rank 0 sends progress to the driver through a Ray
queue and writes the checkpoints: model, optimizer, scheduler, random states, data position and
the loss curve, reported to Ray Train, which keeps them in the run's storage. A worker that
starts with a checkpoint (Ray Train restarted it after a failure, or the run is started again)
resumes from it. The last checkpoint also holds the model in Hugging Face layout.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE = "state.pt"
"""Checkpoint file with the model's and the optimizer's full state dicts and the loop's position."""
MODEL_DIR = "model"
"""Checkpoint subfolder of the final checkpoint: the model in Hugging Face layout."""
CURVE = "curve.json"
"""Checkpoint file with the loss curve so far: step, loss, learning rate."""
MANIFEST = "manifest.json"
"""Checkpoint file listing the others with their sizes: a checkpoint whose copy into storage was
cut short (a killed run) does not match it and is never resumed from."""


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint directory under `root` (a run's storage folder).

    Ray Train hands a restarted worker its latest registered checkpoint, but a run started
    again (after the whole run failed) may find none registered: the controller registers
    reports lazily and a failure can lose the last ones. The directories in storage are the
    record that survives, and their names carry the step."""
    for d in sorted(root.glob("checkpoint-*"), reverse=True):
        try:
            files = json.loads((d / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if all((d / f).is_file() and (d / f).stat().st_size == n for f, n in files.items()):
            return d
    return None


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


@dataclass(frozen=True)
class LoopConfig:
    """What every worker needs, resolved by the driver (sent as `train_loop_config["loop"]`)."""

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
    checkpoints: str
    """The run's checkpoint folder in storage, searched for the newest complete checkpoint."""
    progress: Any
    """A `ray.util.queue.Queue` the rank-0 worker sends progress events to."""


def _batch_tensors(batch: dict[str, Any]):
    """input_ids (micro × length) and the real lengths of a numpy batch from Ray Data."""
    import numpy as np
    import torch

    ids = batch["input_ids"]
    ids = np.stack(list(ids)) if ids.dtype == object else ids
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(batch["length"].astype(np.int64))


def train_loop(loop_config: dict[str, Any]) -> None:
    """One worker's training: the function `TorchTrainer` runs on every worker."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, get_scheduler

    c: LoopConfig = loop_config["loop"]
    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    encoder = c.architecture == "encoder"
    device = ray.train.torch.get_device()

    torch.manual_seed(c.seed)
    np.random.seed(c.seed + rank)
    cfg = AutoConfig.for_model(**c.model_config)
    auto = AutoModelForMaskedLM if encoder else AutoModelForCausalLM
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

    checkpointer = _Checkpointer(model, optimizer, scheduler, scaler, masker, auto, cfg, rank, world)
    step = epoch = consumed = 0
    resumed_from = None
    curve: list[dict[str, float]] = []
    position = checkpointer.restore(Path(c.checkpoints))
    if position is not None:
        step, epoch, consumed, curve = position
        resumed_from = step

    queue = c.progress
    if rank == 0:
        queue.put({"event": "start", "step": step, "resumed_from": resumed_from, "parameters": parameters,
                   "precision": precision})
    accum = c.accumulation
    shard = ray.train.get_dataset_shard("train")
    ddp = hasattr(model, "no_sync")
    loss_sum = torch.zeros(2, dtype=torch.float64)  # summed loss of the step's micro-batches, tokens
    micro = 0
    started, first_step = time.monotonic(), step
    last_time = started
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
            loss = float(loss_sum[0]) / (accum * world)
            tokens = float(loss_sum[1])
            loss_sum.zero_()
            now = time.monotonic()
            lr = scheduler.get_last_lr()[0]
            # Wall-clock time (comparable across processes and restarts) and tokens of each step,
            # for throughput read off the curve.
            curve.append({"step": step, "loss": loss, "lr": lr, "tokens": tokens, "unixTime": time.time()})
            if rank == 0:  # rates from this worker's own clock: the driver may be on another node
                rate = (step - first_step) / max(now - started, 1e-9)
                queue.put({"event": "step", "step": step, "loss": loss, "lr": lr,
                           "tokens_per_second": tokens / max(now - last_time, 1e-9),
                           "eta": (c.max_steps - step) / max(rate, 1e-9)})
            last_time = now
            if step >= c.max_steps:
                break
            if c.checkpoint_every and step % c.checkpoint_every == 0:
                checkpointer.save(False, step, epoch, consumed, curve)
        else:
            if seen == 0:
                raise RuntimeError(f"worker {rank} got no training batch of {c.micro_batch_size} sequences "
                                   f"from its shard of the pile")
            epoch += 1
            consumed = 0
            continue
        break

    validation = _validation_loss(model, c, masker, autocast, device, world) if c.has_validation else None
    if rank == 0:
        queue.put({"event": "end", "validation_loss": validation if validation is None or math.isfinite(validation)
                   else None})
    checkpointer.save(True, step, epoch, consumed, curve)


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


@dataclass
class _Checkpointer:
    """Reports the loop's checkpoints to Ray Train: rank 0 writes them, every rank joins (a report
    is a barrier, and every rank's random state goes into the checkpoint)."""

    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    masker: Any
    auto: Any
    """The transformers auto class the final checkpoint's Hugging Face model is built with."""
    cfg: Any
    rank: int
    world: int

    def restore(self, checkpoints: Path) -> tuple[int, int, int, list[dict[str, float]]] | None:
        """Load the newest checkpoint into the model, optimizer, scheduler, scaler and random
        states: the one Ray Train hands this worker, or a newer complete one in `checkpoints`.
        Returns the loop's position (step, epoch, micro-batches consumed, loss curve), or None
        when there is no checkpoint to start from."""
        import ray.train
        import torch
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        checkpoint = ray.train.get_checkpoint()
        stored = latest_checkpoint(checkpoints)
        if stored is not None and (checkpoint is None or _step_of(stored) > _step_of(Path(checkpoint.path))):
            checkpoint = ray.train.Checkpoint.from_directory(str(stored))
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE, map_location="cpu", weights_only=True)
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=full)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=full)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"][self.rank % len(state["rng"])])
        if self.masker is not None:
            self.masker.generator.set_state(state["mask_rng"][self.rank % len(state["mask_rng"])])
        return int(state["step"]), int(state["epoch"]), int(state["consumed"]), list(state["curve"])

    def save(self, final: bool, step: int, epoch: int, consumed: int, curve: list[dict[str, float]]) -> None:
        """Report a checkpoint of the loop at `step` (`final`: with the model in Hugging Face layout)."""
        import ray.train
        import torch
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(self.model, options=full)
        osd = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        rngs, mask_rngs = self._random_states()
        metrics = {"step": step, "loss": curve[-1]["loss"] if curve else None, "final": final}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"model": msd, "optimizer": osd, "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict(), "step": step, "epoch": epoch, "consumed": consumed,
                        "rng": rngs, "mask_rng": mask_rngs, "curve": curve}, Path(tmp) / STATE)
            (Path(tmp) / CURVE).write_text(json.dumps(curve))
            if final:
                hf = self.auto.from_config(self.cfg)
                hf.load_state_dict(msd)
                hf.save_pretrained(Path(tmp) / MODEL_DIR)
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()}
            (Path(tmp) / MANIFEST).write_text(json.dumps(files))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint-{step:08d}")

    def _random_states(self) -> tuple[list[Any], list[Any]]:
        """Every rank's torch and masking random states, so each resumes its own stream."""
        import torch
        import torch.distributed as dist

        rngs = [torch.get_rng_state()]
        mask_rngs = [self.masker.generator.get_state()] if self.masker is not None else []
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, (rngs[0], mask_rngs[0] if mask_rngs else None))
            rngs = [g[0] for g in gathered]
            mask_rngs = [g[1] for g in gathered] if self.masker is not None else []
        return rngs, mask_rngs
