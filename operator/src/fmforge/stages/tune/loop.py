"""The fine-tuning loop each Ray Train worker runs (`tune_loop`, given to `TorchTrainer`).

Every worker loads the base model from its directory (with a new classification head for
sequence-classification), wraps it in LoRA adapters (peft) or leaves every weight trainable,
measures the held-out examples once before the first step, and then takes one optimizer step
per micro-batch of its share of the training examples (the same seeded shuffle on every rank,
each rank taking every world-th example, so that all ranks step alike and DDP's all-reduce
never waits on a rank that ran out). After each epoch rank 0 writes a checkpoint (the trainable
weights, optimizer, scheduler, position, loss curve) that Ray Train keeps; a worker that starts
with one (restarted by Ray Train, or the run started again) resumes from it. The last checkpoint
also holds the adapter (peft layout) and the full model in Hugging Face layout, merged for
LoRA with `merge`. Progress goes to the driver through a Ray queue. Called through
`fmforge.stages.tune`.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from ..train.loop import MANIFEST, latest_checkpoint

STATE = "state.pt"
"""Checkpoint file: trainable weights, optimizer, scheduler, position, curve, the before metrics."""
ADAPTER_DIR = "adapter"
"""Final checkpoint subfolder: the LoRA adapter (peft's save_pretrained)."""
MODEL_DIR = "model"
"""Final checkpoint subfolder: the full model in Hugging Face layout (merged, for LoRA)."""
CURVE = "curve.json"
"""Checkpoint file: the training loss per step."""


def _batch(examples: list[dict], pad_id: int, classification: bool):
    """Right-padded tensors of a micro-batch: input ids, attention mask, labels."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = (torch.tensor([e["label"] for e in examples]) if classification
              else torch.full((len(examples), width), -100, dtype=torch.long))
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        if not classification:
            labels[i, :n] = torch.tensor(e["labels"])
    return ids, mask, labels


def tune_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, get_scheduler

    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    device = ray.train.torch.get_device()
    classification = config["task"] == "sequence-classification"
    torch.manual_seed(config["seed"])  # the same new head and adapters on every rank

    if classification:
        labels = config["labels"]
        model = AutoModelForSequenceClassification.from_pretrained(
            config["base"], num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)})
    else:
        model = AutoModelForCausalLM.from_pretrained(config["base"])
    parameters = sum(p.numel() for p in model.parameters())
    if config["method"] == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = config["lora"]
        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM, r=lora["rank"],
            lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=lora["target_modules"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model = ray.train.torch.prepare_model(model)
    inner = model.module if hasattr(model, "module") else model  # DDP wraps it on more than one worker

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["learning_rate"], weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=config["total_steps"])
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    train, val = config["train"], config["validation"]
    per_rank = len(train) // world
    mbs = config["micro_batch_size"]
    pad = config["pad_id"]

    def evaluate() -> dict[str, float] | None:
        """Held-out loss (per completion token, or per example) and accuracy, over all ranks."""
        if not val:
            return None
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)  # summed loss, scored units, correct
        with torch.no_grad():
            mine = val[rank::world]
            for i in range(0, len(mine), mbs):
                ids, mask, lab = _batch(mine[i:i + mbs], pad, classification)
                with autocast():
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
                if classification:
                    loss = torch.nn.functional.cross_entropy(logits, lab, reduction="sum")
                    totals += torch.tensor([loss.item(), len(lab), float((logits.argmax(-1) == lab).sum())],
                                           dtype=torch.float64)
                else:
                    target = lab[:, 1:]
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target,
                                                             ignore_index=-100, reduction="sum")
                    totals += torch.tensor([loss.item(), float((target != -100).sum()), 0.0], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(totals)
        model.train()
        out = {"loss": float(totals[0] / totals[1])}
        if classification:
            out["accuracy"] = float(totals[2] / len(val))
        return out

    step = epoch = 0
    curve: list[dict[str, float]] = []
    before = None
    resumed_from = None
    checkpoint = ray.train.get_checkpoint()
    stored = latest_checkpoint(Path(config["checkpoints"]))
    if checkpoint is None and stored is not None:
        checkpoint = ray.train.Checkpoint.from_directory(str(stored))
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE, map_location="cpu", weights_only=True)
        inner.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, curve, before = int(state["step"]), int(state["epoch"]), list(state["curve"]), state["before"]
        resumed_from = step
    else:
        before = evaluate()

    def save(final: bool) -> None:
        """Report a checkpoint (rank 0 writes it, every rank joins: report is a barrier)."""
        metrics = {"step": step, "epoch": epoch, "final": final}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            weights = {n: p.detach().cpu() for n, p in inner.named_parameters() if p.requires_grad}
            torch.save({"trainable": weights, "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch, "curve": curve,
                        "before": before}, Path(tmp) / STATE)
            (Path(tmp) / CURVE).write_text(json.dumps(curve))
            if final:
                if config["method"] == "lora":
                    inner.save_pretrained(Path(tmp) / ADAPTER_DIR)
                    if config["lora"]["merge"]:
                        inner.merge_and_unload().save_pretrained(Path(tmp) / MODEL_DIR)
                else:
                    inner.save_pretrained(Path(tmp) / MODEL_DIR)
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()}
            (Path(tmp) / MANIFEST).write_text(json.dumps(files))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint-{step:08d}")

    queue = config["progress"]
    if rank == 0:
        queue.put({"event": "start", "step": step, "resumed_from": resumed_from, "parameters": parameters,
                   "trainable": trainable, "before": before})
    model.train()
    started, first_step = time.monotonic(), step
    while epoch < config["epochs"]:
        # The same permutation on every rank (seeded by the epoch), so a resumed epoch repeats it.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config["seed"] + epoch)).tolist()
        mine = [train[i] for i in order[rank::world][:per_rank]]
        for i in range(0, len(mine), mbs):
            ids, mask, lab = _batch(mine[i:i + mbs], pad, classification)
            with autocast():
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=lab.to(device))
            out.loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = torch.tensor([out.loss.item()], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(loss)
            point = {"step": step, "loss": float(loss[0]) / world, "lr": scheduler.get_last_lr()[0]}
            curve.append({**point, "unixTime": time.time()})
            if rank == 0:
                rate = (step - first_step) / max(time.monotonic() - started, 1e-9)
                queue.put({"event": "step", **point, "epoch": epoch + 1,
                           "eta": (config["total_steps"] - step) / max(rate, 1e-9)})
        epoch += 1
        if epoch < config["epochs"]:
            save(final=False)
    after = evaluate()
    if rank == 0:
        finite = after is None or all(math.isfinite(v) for v in after.values())
        queue.put({"event": "end", "after": after if finite else None})
    save(final=True)
