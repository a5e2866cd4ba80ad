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


def _batch_tensors(batch: dict[str, Any]):
    """input_ids (micro × length) and the real lengths of a numpy batch from Ray Data."""
    import numpy as np
    import torch

    ids = batch["input_ids"]
    ids = np.stack(list(ids)) if ids.dtype == object else ids
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(batch["length"].astype(np.int64))


def train_loop(config: dict[str, Any]) -> None:
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, get_scheduler

    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    encoder = config["architecture"] == "encoder"
    device = ray.train.torch.get_device()

    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"] + rank)
    cfg = AutoConfig.for_model(**config["model_config"])
    auto = AutoModelForMaskedLM if encoder else AutoModelForCausalLM
    model = auto.from_config(cfg, attn_implementation="sdpa")
    parameters = sum(p.numel() for p in model.parameters())
    model = ray.train.torch.prepare_model(model, parallel_strategy=config["parallelism"])

    # AdamW decays matrices only: biases and norm weights (1-D) are left alone, as in GPT-2/Llama.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config["weight_decay"]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config["learning_rate"], betas=(0.9, 0.95), eps=1e-8,
                                  fused=device.type == "cuda")
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config["schedule"]]
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=config["warmup_steps"],
                              num_training_steps=config["max_steps"])

    # The precision the driver chose (fp32 on CPUs); a GPU without bf16 falls back to fp32 too.
    precision = config["precision"]
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        precision = "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    masker = None
    if encoder:
        from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(config["tokenizer"])
        masker = DataCollatorForLanguageModeling(tok, mlm_probability=config["mask_probability"],
                                                 seed=config["seed"] + rank)
        masker.create_rng("pt")

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    step = epoch = consumed = 0
    resumed_from = None
    curve: list[dict[str, float]] = []
    checkpoint = ray.train.get_checkpoint()
    stored = latest_checkpoint(Path(config["checkpoints"]))
    if stored is not None and (checkpoint is None or _step_of(stored) > _step_of(Path(checkpoint.path))):
        checkpoint = ray.train.Checkpoint.from_directory(str(stored))
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE, map_location="cpu", weights_only=True)
        set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, consumed = int(state["step"]), int(state["epoch"]), int(state["consumed"])
        torch.set_rng_state(state["rng"][rank % len(state["rng"])])
        if masker is not None:
            masker.generator.set_state(state["mask_rng"][rank % len(state["mask_rng"])])
        curve = list(state["curve"])
        resumed_from = step

    def save(final: bool) -> None:
        """Report a checkpoint (rank 0 writes it, every rank joins: report is a barrier)."""
        msd = get_model_state_dict(model, options=full)
        osd = get_optimizer_state_dict(model, optimizer, options=full)
        rngs = [torch.get_rng_state()]
        mask_rngs = [masker.generator.get_state()] if masker is not None else []
        if world > 1:  # every rank's random state, so each resumes its own stream
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (rngs[0], mask_rngs[0] if mask_rngs else None))
            rngs = [g[0] for g in gathered]
            mask_rngs = [g[1] for g in gathered] if masker is not None else []
        metrics = {"step": step, "loss": curve[-1]["loss"] if curve else None, "final": final}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"model": msd, "optimizer": osd, "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(), "step": step, "epoch": epoch, "consumed": consumed,
                        "rng": rngs, "mask_rng": mask_rngs, "curve": curve}, Path(tmp) / STATE)
            (Path(tmp) / CURVE).write_text(json.dumps(curve))
            if final:
                hf = auto.from_config(cfg)
                hf.load_state_dict(msd)
                hf.save_pretrained(Path(tmp) / MODEL_DIR)
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()}
            (Path(tmp) / MANIFEST).write_text(json.dumps(files))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint-{step:08d}")

    queue = config["progress"]
    if rank == 0:
        queue.put({"event": "start", "step": step, "resumed_from": resumed_from, "parameters": parameters,
                   "precision": precision})
    accum = config["accumulation"]
    shard = ray.train.get_dataset_shard("train")
    ddp = hasattr(model, "no_sync")
    loss_sum = torch.zeros(2, dtype=torch.float64)  # summed loss of the step's micro-batches, tokens
    micro = 0
    started, first_step = time.monotonic(), step
    while step < config["max_steps"]:
        seen = 0
        for batch in shard.iter_batches(batch_size=config["micro_batch_size"], batch_format="numpy",
                                        drop_last=True, prefetch_batches=2):
            seen += 1
            if seen <= consumed:  # a resumed epoch: skip what the checkpoint had consumed
                continue
            consumed += 1
            ids, length = _batch_tensors(batch)
            valid = torch.arange(ids.shape[1])[None, :] < length[:, None]
            if masker is not None:
                inputs, labels = masker.torch_mask_tokens(ids.clone(), special_tokens_mask=~valid)
            else:
                inputs, labels = ids, ids.masked_fill(~valid, -100)
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
            if config["gradient_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config["gradient_clip"])
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
            point = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "tokens": tokens, "time": now}
            # Wall-clock time (comparable across processes and restarts) and tokens of each step,
            # for throughput read off the curve.
            curve.append({"step": step, "loss": loss, "lr": point["lr"], "tokens": tokens, "unixTime": time.time()})
            if rank == 0:
                rate = (step - first_step) / max(now - started, 1e-9)
                queue.put({"event": "step", **point, "eta": (config["max_steps"] - step) / max(rate, 1e-9)})
            if step >= config["max_steps"]:
                break
            if config["checkpoint_every"] and step % config["checkpoint_every"] == 0:
                save(final=False)
        else:
            if seen == 0:
                raise RuntimeError(f"worker {rank} got no training batch of {config['micro_batch_size']} sequences "
                                   f"from its shard of the pile")
            epoch += 1
            consumed = 0
            continue
        break

    validation = None
    if config["has_validation"]:
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for batch in ray.train.get_dataset_shard("validation").iter_batches(
                    batch_size=config["micro_batch_size"], batch_format="numpy", prefetch_batches=2):
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
    if rank == 0:
        queue.put({"event": "end", "validation_loss": validation if validation is None or math.isfinite(validation)
                   else None})
    save(final=True)
