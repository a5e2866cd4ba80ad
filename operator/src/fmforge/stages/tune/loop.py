"""The fine-tuning loop each Ray Train worker runs (`tune_loop`, given to `raytrain.fit`).

Every worker loads the base model from its directory (with a new classification head for
sequence-classification), wraps it in LoRA adapters (peft) or leaves every weight trainable,
measures the held-out examples once before the first step, and then takes one optimizer step
per micro-batch of its share of the training examples. The examples come through Ray Data: the
training set split between the workers (`get_dataset_shard`, the same number of examples each,
so that all ranks step alike and DDP's all-reduce never waits on a rank that ran out), shuffled
each epoch by a seeded permutation; the held-out set whole on every worker, each measuring every
world-th example. Progress, checkpoints and resumption are `fmforge.stages.raytrain`'s: after
each epoch rank 0 writes a checkpoint (the trainable weights, optimizer, scheduler, random
states, position, loss curve); a worker that starts with one (restarted by Ray Train, or the run
started again) resumes from it. The last checkpoint also holds the adapter (peft layout) and the
full model in Hugging Face layout, merged for LoRA with `merge`. Called through
`fmforge.stages.tune`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..raytrain import MODEL_DIR, Checkpointer, Worker

ADAPTER_DIR = "adapter"
"""Final checkpoint subfolder: the LoRA adapter (peft's save_pretrained)."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA's settings, as the workers and the tuning log take them."""

    rank: int
    """The adapters' rank."""
    alpha: int
    """The adapters' scaling numerator (alpha / rank)."""
    dropout: float
    """Dropout on the adapters' input."""
    target_modules: list[str] | None
    """The modules adapted, checked to exist in the model."""
    merge: bool
    """Whether the full model is the base with the adapters merged in (else the adapter only)."""


@dataclass(frozen=True)
class TuneConfig:
    """What every worker needs, resolved by the driver (the examples come as Ray Data datasets)."""

    task: str
    """causal-lm or sequence-classification."""
    base: str
    """The base model's directory in Hugging Face layout."""
    base_name: str
    """What the adapter names as its base (peft's `base_model_name_or_path`): the spec's URI or
    the producer, never the local directory, so the adapter's bytes do not depend on where the
    state directory is."""
    labels: list[str]
    """The class names in label-id order (sequence-classification); empty for causal-lm."""
    method: str
    """lora or full."""
    lora: LoraSettings | None
    """LoRA's settings; None for full tuning."""
    pad_id: int
    """The tokenizer's padding token id."""
    epochs: int
    """Passes over the training examples."""
    learning_rate: float
    """AdamW's learning rate at the start (it decays linearly to zero)."""
    micro_batch_size: int
    """Examples per optimizer step on one worker."""
    seed: int
    """Seed of the new weights (head, adapters), the dropout and the shuffles."""
    total_steps: int
    """Optimizer steps in all, over every epoch."""
    has_validation: bool
    """Whether a `validation` dataset (the held-out examples) is there to measure."""


def _batch(examples: list[dict], pad_id: int, classification: bool):
    """Right-padded tensors of a micro-batch: input ids, attention mask, labels."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = (torch.tensor([int(e["label"]) for e in examples]) if classification
              else torch.full((len(examples), width), -100, dtype=torch.long))
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
        if not classification:
            labels[i, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
    return ids, mask, labels


def _rows(name: str) -> list[dict]:
    """Every row of this worker's shard of the dataset `name`, in its fixed order."""
    import ray.train

    return list(ray.train.get_dataset_shard(name).iter_rows())


def tune_loop(c: TuneConfig, worker: Worker) -> None:
    """One worker's fine-tuning: the loop `raytrain.fit` runs on every worker.

    The steps every rank takes in the same order (DDP's set-up in `prepare_model`, the held-out
    measure, the steps, the checkpoint reports) are the collective ones: a rank that skipped one
    would leave the others waiting."""
    import ray.train.torch

    classification = c.task == "sequence-classification"
    worker.seed(c.seed)  # the same new head and adapters on every rank
    model, parameters, trainable = _load_model(c, classification)
    model = ray.train.torch.prepare_model(model)
    optimizer, scheduler = _optimizer(model, c)
    tuner = _Tuner(config=c, worker=worker, model=model, autocast=_autocast(worker.device),
                   classification=classification, train=_rows("train"),
                   validation=_rows("validation") if c.has_validation else [])
    checkpointer = Checkpointer(worker, model, optimizer, scheduler)
    position = checkpointer.restore()
    if position is None:
        tuner.before = tuner.evaluate()
    else:
        tuner.step, tuner.curve = position.step, position.curve
        tuner.epoch, tuner.before = int(position.loop["epoch"]), position.loop["before"]
    worker.started(tuner.step, position.step if position else None, parameters=parameters, trainable=trainable,
                   before=tuner.before)
    model.train()
    while tuner.epoch < c.epochs:
        tuner.train_epoch(optimizer, scheduler)
        tuner.epoch += 1
        # The last epoch's checkpoint is the final one, written after the held-out measure.
        if tuner.epoch < c.epochs:
            checkpointer.save(tuner.step, tuner.curve, {"epoch": tuner.epoch, "before": tuner.before})
    after = tuner.evaluate()
    worker.ended(after=after if after is None or all(math.isfinite(v) for v in after.values()) else None)
    checkpointer.save(tuner.step, tuner.curve, {"epoch": tuner.epoch, "before": tuner.before}, final=True,
                      write=lambda folder, _: tuner.save_models(folder))


def _load_model(c: TuneConfig, classification: bool) -> tuple[Any, int, int]:
    """The base model to tune (with a new classification head for sequence-classification),
    wrapped in LoRA adapters for `method: lora`; with its parameters in all and the trainable ones."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if classification:
        model = AutoModelForSequenceClassification.from_pretrained(
            c.base, num_labels=len(c.labels), id2label=dict(enumerate(c.labels)),
            label2id={name: i for i, name in enumerate(c.labels)})
    else:
        model = AutoModelForCausalLM.from_pretrained(c.base)
    # Counted before peft adds the adapters: the size of the base model, as the user knows it.
    parameters = sum(p.numel() for p in model.parameters())
    # The adapter's config and model card name the base as this (peft takes the directory it was
    # loaded from, which differs between state directories and would change the adapter's digest).
    model.name_or_path = model.config.name_or_path = c.base_name
    if c.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = c.lora
        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM, r=lora.rank,
            lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules))
        # peft keeps the target modules as a set, which its config file lists in the order of
        # the worker's string hashes (seeded per process): sorted, the file is the same each run.
        settings = model.peft_config["default"]
        for name, value in vars(settings).items():
            if isinstance(value, set):
                setattr(settings, name, sorted(value))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, parameters, trainable


def _optimizer(model: Any, c: TuneConfig) -> tuple[Any, Any]:
    """AdamW over the trainable weights only (the adapters, for LoRA) and its linear decay to zero
    over the run's steps."""
    import torch
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=c.total_steps)
    return optimizer, scheduler


def _autocast(device: Any) -> Callable[[], Any]:
    """A factory of the forward pass's precision context: bf16 where the GPU has it, else fp32."""
    import torch

    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


@dataclass
class _Tuner:
    """One worker's model, examples and place in the run: it measures, steps and saves the final
    models. Every rank holds one and calls its methods in the same order."""

    config: TuneConfig
    """The loop's config."""
    worker: Worker
    """This worker's rank, world, device and progress events."""
    model: Any
    """The model as `ray.train.torch.prepare_model` returned it (DDP-wrapped on more than one worker)."""
    autocast: Callable[[], Any]
    """A factory of the forward pass's precision context."""
    classification: bool
    """Whether the task is sequence-classification (else causal-lm)."""
    train: list[dict]
    """This worker's share of the training examples, in the shard's fixed order."""
    validation: list[dict]
    """Every held-out example (each rank measures every world-th one)."""
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
        """The model itself, out of DDP's wrapper: what is saved."""
        return self.model.module if hasattr(self.model, "module") else self.model

    def evaluate(self) -> dict[str, float] | None:
        """Held-out loss (per completion token, or per example) and accuracy, over all ranks."""
        import torch
        import torch.distributed as dist

        c, w = self.config, self.worker
        if not self.validation:
            return None
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64)  # summed loss, scored units, correct
        with torch.no_grad():
            mine = self.validation[w.rank::w.world]
            for i in range(0, len(mine), c.micro_batch_size):
                ids, mask, lab = _batch(mine[i:i + c.micro_batch_size], c.pad_id, self.classification)
                if self.classification:
                    with self.autocast():
                        logits = self.model(input_ids=ids.to(w.device),
                                            attention_mask=mask.to(w.device)).logits.float().cpu()
                    loss = torch.nn.functional.cross_entropy(logits, lab, reduction="sum")
                    totals += torch.tensor([loss.item(), len(lab), float((logits.argmax(-1) == lab).sum())],
                                           dtype=torch.float64)
                else:
                    logits, target = self._scored_logits(ids, mask, lab)
                    loss = torch.nn.functional.cross_entropy(logits.float().cpu().transpose(1, 2), target,
                                                             ignore_index=-100, reduction="sum")
                    totals += torch.tensor([loss.item(), float((target != -100).sum()), 0.0], dtype=torch.float64)
        if w.world > 1:
            dist.all_reduce(totals)
        self.model.train()
        out = {"loss": float(totals[0] / totals[1])}
        if self.classification:
            out["accuracy"] = float(totals[2] / len(self.validation))
        return out

    def train_epoch(self, optimizer: Any, scheduler: Any) -> None:
        """One optimizer step per micro-batch of this rank's share of the training examples, in a
        permutation seeded by the epoch (so a resumed epoch repeats it)."""
        import torch

        c = self.config
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(c.seed + self.epoch)).tolist()
        mine = [self.train[i] for i in order]
        for i in range(0, len(mine), c.micro_batch_size):
            self._train_step(optimizer, scheduler, *_batch(mine[i:i + c.micro_batch_size], c.pad_id,
                                                           self.classification))

    def _train_step(self, optimizer: Any, scheduler: Any, ids: Any, mask: Any, lab: Any) -> None:
        """One optimizer step on a micro-batch; its loss averaged over the ranks goes on the curve
        and to the driver."""
        import torch
        import torch.distributed as dist

        w = self.worker
        if self.classification:
            with self.autocast():
                loss_t = self.model(input_ids=ids.to(w.device), attention_mask=mask.to(w.device),
                                    labels=lab.to(w.device)).loss
        else:
            logits, target = self._scored_logits(ids, mask, lab)
            # the mean over the scored tokens, as transformers' own causal-LM loss takes it
            loss_t = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), target.to(w.device),
                                                       ignore_index=-100)
        loss_t.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = torch.tensor([loss_t.item()], dtype=torch.float64)
        if w.world > 1:
            dist.all_reduce(loss)
        self.curve.append(w.stepped(self.step, float(loss[0]) / w.world, scheduler.get_last_lr()[0],
                                    epoch=self.epoch + 1))

    def _scored_logits(self, ids: Any, mask: Any, lab: Any) -> tuple[Any, Any]:
        """(logits, targets) of a causal-LM micro-batch, from the first position that predicts a
        scored token on: the prompt's positions never reach the vocabulary projection, which for
        a model with a large vocabulary and short answers is most of it (SmolLM2's 49,152 tokens
        cost about a fifth of its step). Logits at position p predict token p + 1."""
        w = self.worker
        scored = (lab[:, 1:] != -100).any(0).nonzero()
        first = int(scored[0]) if len(scored) else ids.shape[1] - 1
        kwargs = {"logits_to_keep": ids.shape[1] - first} if self.keeps_logits else {}
        with self.autocast():
            logits = self.model(input_ids=ids.to(w.device), attention_mask=mask.to(w.device), **kwargs).logits
        if not self.keeps_logits:
            logits = logits[:, first:]
        return logits[:, :-1], lab[:, first + 1:]

    @property
    def keeps_logits(self) -> bool:
        """Whether the model computes the logits of the last positions only when asked
        (transformers' `logits_to_keep`, which Llama, GPT-2 and most causal LMs take)."""
        import inspect

        model = self.inner
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return "logits_to_keep" in inspect.signature(base.forward).parameters

    def save_models(self, folder: Path) -> None:
        """The final checkpoint's models: the adapter (peft layout) and, merged when `lora.merge`,
        the full model (Hugging Face layout); for full tuning the full model only."""
        c = self.config
        if c.method == "lora":
            self.inner.save_pretrained(folder / ADAPTER_DIR)
            if c.lora.merge:
                self.inner.merge_and_unload().save_pretrained(folder / MODEL_DIR)
        else:
            self.inner.save_pretrained(folder / MODEL_DIR)
