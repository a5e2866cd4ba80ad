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
from collections.abc import Callable
from dataclasses import dataclass, field
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
    """One worker's fine-tuning: the function `TorchTrainer` runs on every worker.

    The steps every rank takes in the same order (DDP's set-up in `prepare_model`, the held-out
    measure, the steps, the checkpoint reports) are the collective ones: a rank that skipped one
    would leave the others waiting. Only what goes to the progress queue is rank 0's alone."""
    import ray.train
    import ray.train.torch
    import torch

    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    device = ray.train.torch.get_device()
    classification = config["task"] == "sequence-classification"
    torch.manual_seed(config["seed"])  # the same new head and adapters on every rank
    model, parameters, trainable = _load_model(config, classification)
    model = ray.train.torch.prepare_model(model)
    optimizer, scheduler = _optimizer(model, config)
    tuner = _Tuner(config=config, model=model, optimizer=optimizer, scheduler=scheduler, device=device,
                   autocast=_autocast(device), rank=rank, world=world, classification=classification)
    resumed_from = tuner.restore()

    queue = config["progress"]
    if rank == 0:
        queue.put({"event": "start", "step": tuner.step, "resumed_from": resumed_from, "parameters": parameters,
                   "trainable": trainable, "before": tuner.before})
    model.train()
    started, first_step = time.monotonic(), tuner.step
    while tuner.epoch < config["epochs"]:
        tuner.train_epoch(queue, started, first_step)
        tuner.epoch += 1
        # The last epoch's checkpoint is the final one, written after the held-out measure.
        if tuner.epoch < config["epochs"]:
            tuner.save(final=False)
    after = tuner.evaluate()
    if rank == 0:
        finite = after is None or all(math.isfinite(v) for v in after.values())
        queue.put({"event": "end", "after": after if finite else None})
    tuner.save(final=True)


def _load_model(config: dict[str, Any], classification: bool) -> tuple[Any, int, int]:
    """The base model to tune (with a new classification head for sequence-classification),
    wrapped in LoRA adapters for `method: lora`; with its parameters in all and the trainable ones."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if classification:
        labels = config["labels"]
        model = AutoModelForSequenceClassification.from_pretrained(
            config["base"], num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)})
    else:
        model = AutoModelForCausalLM.from_pretrained(config["base"])
    # Counted before peft adds the adapters: the size of the base model, as the user knows it.
    parameters = sum(p.numel() for p in model.parameters())
    if config["method"] == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = config["lora"]
        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM, r=lora["rank"],
            lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=lora["target_modules"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, parameters, trainable


def _optimizer(model: Any, config: dict[str, Any]) -> tuple[Any, Any]:
    """AdamW over the trainable weights only (the adapters, for LoRA) and its linear decay to zero
    over the run's steps."""
    import torch
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["learning_rate"], weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=config["total_steps"])
    return optimizer, scheduler


def _autocast(device: Any) -> Callable[[], Any]:
    """A factory of the forward pass's precision context: bf16 where the GPU has it, else fp32."""
    import torch

    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


@dataclass
class _Tuner:
    """One worker's model, optimizer and place in the run: it measures, steps, restores and
    reports checkpoints. Every rank holds one and calls its methods in the same order."""

    config: dict[str, Any]
    """The loop's config, as the driver built it (`train_loop_config`)."""
    model: Any
    """The model as `ray.train.torch.prepare_model` returned it (DDP-wrapped on more than one worker)."""
    optimizer: Any
    """AdamW over the trainable weights."""
    scheduler: Any
    """The learning rate's linear schedule."""
    device: Any
    """The torch device this worker runs on."""
    autocast: Callable[[], Any]
    """A factory of the forward pass's precision context."""
    rank: int
    """This worker's rank."""
    world: int
    """The number of workers."""
    classification: bool
    """Whether the task is sequence-classification (else causal-lm)."""
    step: int = 0
    """Optimizer steps taken (restored from a checkpoint)."""
    epoch: int = 0
    """Epochs finished (restored from a checkpoint)."""
    curve: list[dict[str, float]] = field(default_factory=list)
    """The training loss per step: step, loss, learning rate, time."""
    before: dict[str, float] | None = None
    """The held-out metrics before the first step (kept in checkpoints: a resumed run does not
    measure them again on weights already tuned)."""

    @property
    def inner(self) -> Any:
        """The model itself, out of DDP's wrapper: what is saved and loaded."""
        return self.model.module if hasattr(self.model, "module") else self.model

    def evaluate(self) -> dict[str, float] | None:
        """Held-out loss (per completion token, or per example) and accuracy, over all ranks."""
        import torch
        import torch.distributed as dist

        val, mbs, pad = self.config["validation"], self.config["micro_batch_size"], self.config["pad_id"]
        rank, world, classification = self.rank, self.world, self.classification
        if not val:
            return None
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64)  # summed loss, scored units, correct
        with torch.no_grad():
            mine = val[rank::world]
            for i in range(0, len(mine), mbs):
                ids, mask, lab = _batch(mine[i:i + mbs], pad, classification)
                with self.autocast():
                    logits = self.model(input_ids=ids.to(self.device),
                                        attention_mask=mask.to(self.device)).logits.float().cpu()
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
        self.model.train()
        out = {"loss": float(totals[0] / totals[1])}
        if classification:
            out["accuracy"] = float(totals[2] / len(val))
        return out

    def restore(self) -> int | None:
        """Resume from the checkpoint Ray Train hands this worker or, when it hands none (a run
        started again), the newest complete one in storage: the step resumed from. Without a
        checkpoint, measure the held-out examples before the first step and return None."""
        import ray.train
        import torch

        checkpoint = ray.train.get_checkpoint()
        stored = latest_checkpoint(Path(self.config["checkpoints"]))
        if checkpoint is None and stored is not None:
            checkpoint = ray.train.Checkpoint.from_directory(str(stored))
        if checkpoint is None:
            self.before = self.evaluate()
            return None
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE, map_location="cpu", weights_only=True)
        # Only the trainable weights are in the checkpoint; the frozen ones are the base model's.
        self.inner.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.curve, self.before = list(state["curve"]), state["before"]
        return self.step

    def train_epoch(self, queue: Any, started: float, first_step: int) -> None:
        """One optimizer step per micro-batch of this rank's share of the training examples;
        rank 0 sends each step's loss and the time left to the driver."""
        import torch

        train, mbs, pad = self.config["train"], self.config["micro_batch_size"], self.config["pad_id"]
        # The same permutation on every rank (seeded by the epoch), so a resumed epoch repeats it;
        # every rank takes as many examples, so that DDP's all-reduce never waits on one that ran out.
        order = torch.randperm(len(train),
                               generator=torch.Generator().manual_seed(self.config["seed"] + self.epoch)).tolist()
        mine = [train[i] for i in order[self.rank::self.world][:len(train) // self.world]]
        for i in range(0, len(mine), mbs):
            point = self._train_step(*_batch(mine[i:i + mbs], pad, self.classification))
            if self.rank == 0:
                rate = (self.step - first_step) / max(time.monotonic() - started, 1e-9)
                queue.put({"event": "step", **point, "epoch": self.epoch + 1,
                           "eta": (self.config["total_steps"] - self.step) / max(rate, 1e-9)})

    def _train_step(self, ids: Any, mask: Any, lab: Any) -> dict[str, float]:
        """One optimizer step on a micro-batch; its loss averaged over the ranks goes on the curve
        (and is returned with the step and learning rate)."""
        import torch
        import torch.distributed as dist

        with self.autocast():
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                             labels=lab.to(self.device))
        out.loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = torch.tensor([out.loss.item()], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(loss)
        point = {"step": self.step, "loss": float(loss[0]) / self.world, "lr": self.scheduler.get_last_lr()[0]}
        self.curve.append({**point, "unixTime": time.time()})
        return point

    def save(self, final: bool) -> None:
        """Report a checkpoint (rank 0 writes it, every rank joins: report is a barrier)."""
        import ray.train
        import torch

        metrics = {"step": self.step, "epoch": self.epoch, "final": final}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            weights = {n: p.detach().cpu() for n, p in self.inner.named_parameters() if p.requires_grad}
            torch.save({"trainable": weights, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch,
                        "curve": self.curve, "before": self.before}, Path(tmp) / STATE)
            (Path(tmp) / CURVE).write_text(json.dumps(self.curve))
            if final:
                self._save_model(Path(tmp))
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()}
            (Path(tmp) / MANIFEST).write_text(json.dumps(files))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint-{self.step:08d}")

    def _save_model(self, tmp: Path) -> None:
        """The final checkpoint's models: the adapter (peft layout) and, merged when `lora.merge`,
        the full model (Hugging Face layout); for full tuning the full model only."""
        if self.config["method"] == "lora":
            self.inner.save_pretrained(tmp / ADAPTER_DIR)
            if self.config["lora"]["merge"]:
                self.inner.merge_and_unload().save_pretrained(tmp / MODEL_DIR)
        else:
            self.inner.save_pretrained(tmp / MODEL_DIR)
