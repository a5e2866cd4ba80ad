"""Ray Train plumbing shared by the stages that train (TrainingRun, TunedModel).

A stage's loop is a function `loop(config, worker)` over a dataclass config of its own; this
module owns everything around it, the same for both stages:

- driver side: `start` (the local Ray, or the cluster's), `attempt_dir` (the folder of one
  attempt: the same work on the same inputs resumes from its checkpoints), `fit` (a TorchTrainer
  with ScalingConfig, RunConfig, FailureConfig and CheckpointConfig, run in a thread while the
  workers' progress events are read from a Ray queue into a `Progress` and shown as they come;
  a failure turned into the stage's errors with what to do), `publish` (a final model into a
  digest-named folder through a temporary one, atomically) and `Fitted.record` (what differs
  between two runs of the same attempt, times and restarts, kept out of the model directory);
- worker side: `Worker` (rank, world, device, seeds, the progress events: one protocol, sent by
  rank 0) and `Checkpointer` (one resume rule: the newest complete checkpoint, handed by Ray
  Train or found in storage; one write: rank 0, with a manifest, reported to Ray Train, every
  rank's random states kept).

Called by `fmforge.stages.train` and `fmforge.stages.tune` (drivers) and their `loop` modules
(workers).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..api.v1alpha1.common import WORKER_SLOT
from . import piles
from .artifacts import model_digest
from .base import StageContext, StageError

STATE = "state.pt"
"""Checkpoint file: the trainable weights, optimizer, scheduler, scaler, random states and the
loop's position."""
CURVE = "curve.json"
"""Checkpoint file: the loss curve so far (step, loss, learning rate, tokens, time)."""
MANIFEST = "manifest.json"
"""Checkpoint file listing the others with their sizes: a checkpoint whose copy into storage was
cut short (a killed run) does not match it and is never resumed from."""
MODEL_DIR = "model"
"""Final checkpoint subfolder: the model in Hugging Face layout (merged, for LoRA)."""
RUN_RECORD = "run.json"
"""File in the attempt's folder: the last run's times, restarts and resumption, which differ
between runs that make the same model and so stay out of the model directory."""

FAULT_ENV = "FMFORGE_FAULT_KILL_AFTER_CHECKPOINT"
"""Fault injection for the tests, `STEP:MARKER`: rank 0 SIGKILLs itself right after it reported
the checkpoint of STEP (so the checkpoint is complete in storage), once: it first creates the
file MARKER holding its pid, and does nothing when MARKER is there. Read by `fit` on the driver."""


# -- driver side ----------------------------------------------------------------------------------


def start(ctx: StageContext, resources) -> None:
    """Start the local Ray (or attach to the cluster's) for workers of `resources` (RayResources),
    with one CPU more for the Ray Data tasks that feed them."""
    piles.ray_init(ctx.state_dir, resources.workers * resources.cpus_per_worker + 1)


def attempt_dir(ctx: StageContext, spec, *pins: Any) -> Path:
    """The folder of this attempt (`attempts/<digest>`): the spec but its fault tolerance and
    RayJob options (raising maxFailures after a failed run resumes it), and `pins`, what else
    decides the model (snapshot ids, the base model's and the data's digests). The same work on
    the same inputs is the same attempt and resumes from its checkpoints; anything else starts
    afresh in its own folder."""
    what = spec.model_dump(mode="json", by_alias=True, exclude={"fault_tolerance", "ray"})
    body = "\0".join([json.dumps(what, sort_keys=True), *map(str, pins)])
    return ctx.artifacts / "attempts" / hashlib.sha256(body.encode()).hexdigest()[:16]


def progress_queue():
    """The queue the workers' rank 0 reports progress on (an actor that holds no CPU), on the
    driver's node: anywhere else, the loss of that node (a Ray worker pod deleted or evicted)
    took the queue with it and failed the run that Ray Train would have restarted from its
    checkpoint (found on a real node, tests/node)."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


def scaling(resources):
    """Ray Train's ScalingConfig for a spec's `resources` (RayResources). On a RayJob's cluster
    each training worker also takes a worker pod's slot (`WORKER_SLOT`), so that none lands on the
    head; a local Ray has no such resource and is asked for none."""
    import ray
    from ray.train import ScalingConfig

    gpus = resources.gpus_per_worker
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    if ray.cluster_resources().get(WORKER_SLOT):
        per_worker[WORKER_SLOT] = 1
    return ScalingConfig(num_workers=resources.workers, use_gpu=gpus > 0, resources_per_worker=per_worker)


def eta(seconds: float) -> str:
    """The time left as people read it: 12s, 3m05s, 1h02m."""
    s = int(max(seconds, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class Progress:
    """What the workers reported through the progress queue, kept by the driver."""

    restarts: int = 0
    """How often the workers started again (Ray Train restarting them after a failure)."""
    started: bool = False
    """Whether the workers have started once."""
    resumed_from: int | None = None
    """The step the workers last resumed from a checkpoint at; None: they started at step 0."""
    step: int = 0
    """The last step reported."""
    loss: float | None = None
    """The training loss of the last step reported."""
    tokens_per_second: float | None = None
    """The throughput of the last step reported, when the loop counts tokens."""
    facts: dict[str, Any] = field(default_factory=dict)
    """What the loop reported at its start and end beyond the steps (parameters, precision,
    held-out metrics...), by name."""

    def take(self, ev: dict[str, Any], ctx: StageContext) -> None:
        """Take in one event of the workers: advance the console's step and keep what the
        status and the training log need."""
        rep = ctx.reporter
        if ev["event"] == "start":
            if self.started:  # workers that start a second time were restarted after a failure
                self.restarts += 1
            self.started, self.resumed_from = True, ev["resumed_from"]
            self.facts.update(ev["facts"])
            if ev["resumed_from"]:
                rep.log(f"Resumed {ctx.kind} {ctx.name} from its checkpoint", step=ev["resumed_from"])
            rep.advance(ev["step"] - self.step)  # back to the checkpoint's step after a restart
            self.step = ev["step"]
        elif ev["event"] == "step":
            figures = {"loss": f"{ev['loss']:.3f}", "lr": f"{ev['lr']:.2e}", **ev["figures"]}
            if ev.get("tokens_per_second") is not None:
                figures["tokens_s"] = f"{ev['tokens_per_second']:.0f}"
            rep.advance(ev["step"] - self.step, **figures, eta=eta(ev["eta"]))
            self.step, self.loss = ev["step"], ev["loss"]
            self.tokens_per_second = ev.get("tokens_per_second")
        elif ev["event"] == "end":
            self.facts.update(ev["facts"])


@dataclass
class Fitted:
    """A finished `fit`: Ray Train's result (its checkpoint is the final one), what the workers
    reported, how long it took, and the attempt's folder."""

    result: Any
    """Ray Train's Result."""
    progress: Progress
    """What the workers reported."""
    seconds: float
    """Wall-clock seconds of the fit."""
    attempt: Path
    """The attempt's folder (checkpoints and the run record)."""

    @contextlib.contextmanager
    def final_checkpoint(self) -> Iterator[Path]:
        """The final checkpoint's directory (with the model in `MODEL_DIR`)."""
        with self.result.checkpoint.as_directory() as d:
            yield Path(d)

    def record(self, curve: list[dict[str, Any]], digest: str) -> None:
        """Write the run record (`RUN_RECORD`) into the attempt's folder: the model made, the
        seconds, restarts, the step resumed from and each step's wall-clock time."""
        p = self.progress
        record = {"model": digest, "seconds": round(self.seconds, 1), "restarts": p.restarts,
                  "resumedFromStep": p.resumed_from,
                  "stepTimes": [{"step": c["step"], "unixTime": c["unixTime"]} for c in curve if "unixTime" in c]}
        (self.attempt / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read_curve(checkpoint: Path) -> list[dict[str, Any]]:
    """The loss curve of a checkpoint, each step's time included."""
    return json.loads((checkpoint / CURVE).read_text())


def loss_curve(curve: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The curve as a model directory records it: without the times, which would make two runs
    of the same training differ (they are in the run record)."""
    return [{k: v for k, v in point.items() if k != "unixTime"} for point in curve]


@dataclass(frozen=True)
class Harness:
    """What `fit` hands every worker beside the loop's own config."""

    checkpoints: str
    """The run's checkpoint folder in storage, searched for the newest complete checkpoint."""
    progress: Any
    """The `ray.util.queue.Queue` rank 0 sends progress events to."""
    total_steps: int
    """Optimizer steps in all, for the time left."""
    fault: tuple[int, str] | None = None
    """The test hook of `FAULT_ENV`: (step, marker file)."""


def _fault() -> tuple[int, str] | None:
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    step, _, marker = value.partition(":")
    return int(step), marker


def _entry(c: dict[str, Any]) -> None:
    """What TorchTrainer runs on every worker: the stage's loop, with its config and this
    worker's side of the plumbing."""
    c["loop"](c["config"], Worker(c["harness"]))


def fit(ctx: StageContext, loop: Callable[[Any, Worker], None], config: Any, *, attempt: Path, step: str,
        total_steps: int, resources, max_failures: int, datasets: dict[str, Any] | None = None,
        split: list[str] | None = None) -> Fitted:
    """Run `loop(config, worker)` on Ray Train's workers (`resources`), `max_failures` restarts
    allowed, checkpoints in `attempt`/checkpoints/`step`; `datasets` (Ray Data) reach the
    workers through `get_dataset_shard`, those in `split` (default: all) split between them.
    `step` (train or tune) names the run: the console shows it with `total_steps` as the
    workers report them.

    A worker that raised a StageError (an input no worker can use) fails the stage with it; a
    worker that died more often than `max_failures` fails it with a StageError that says where
    the run resumes from; anything else (a bug) goes on as a RuntimeError, traceback kept."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    storage = (attempt / "checkpoints").resolve()
    queue = progress_queue()
    harness = Harness(checkpoints=str(storage / step), progress=queue, total_steps=total_steps, fault=_fault())
    trainer = TorchTrainer(
        _entry,
        train_loop_config={"loop": loop, "config": config, "harness": harness},
        scaling_config=scaling(resources),
        run_config=RunConfig(name=step, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=split) if split is not None else None,
    )
    progress = Progress()
    ctx.reporter.step(step, total=total_steps)
    started = time.monotonic()
    try:
        result = _follow(trainer, queue, lambda ev: progress.take(ev, ctx))
    except Exception as e:
        raise _failure(ctx, step, e, storage, max_failures) from e
    return Fitted(result=result, progress=progress, seconds=time.monotonic() - started, attempt=attempt)


def _follow(trainer, progress, on_event: Callable[[dict[str, Any]], None]):
    """`trainer.fit()` in a thread, with every event the workers put on `progress` passed to
    `on_event` as it comes; returns Ray Train's Result and raises what fit raised. The queue's
    actor is removed whatever the outcome."""
    import ray
    from ray.util.queue import Empty

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(trainer.fit)
        try:
            while True:
                try:
                    ev = progress.get(timeout=0.5)
                except Empty:
                    if running.done():
                        break
                    continue
                on_event(ev)
            return running.result()
        finally:
            ray.kill(progress.actor)


#: The run names `fit` is given, as its messages say them.
_DOING = {"train": "training", "tune": "tuning"}


def _failure(ctx: StageContext, step: str, e: Exception, storage: Path, max_failures: int) -> Exception:
    """The error a failed fit ends the stage with (see `fit`)."""
    import ray.exceptions

    what = f"{_DOING.get(step, step)} of {ctx.kind} {ctx.name} failed"
    resume = f"a run started again resumes from the last checkpoint in {storage / step}"
    failures = getattr(e, "worker_failures", None) or {}
    for rank, cause in sorted(failures.items()):
        if isinstance(cause, StageError):
            err = type(cause)(f"{what}: worker {rank}: {cause}")
            err.reason = cause.reason
            return err
    for rank, cause in sorted(failures.items()):
        # A worker that died or hung: Ray's error, or Ray Train's health check holding it.
        inner = getattr(cause, "health_check_failure", None)
        death = inner if isinstance(inner, ray.exceptions.RayError) else cause
        if isinstance(death, ray.exceptions.RayError) or type(death).__module__.startswith("ray."):
            said = (str(death).strip().splitlines() or [""])[0]
            return StageError(f"{what}: worker {rank} died ({type(death).__name__}: {said}) more often than "
                              f"faultTolerance.maxFailures ({max_failures}) allows; {resume}")
    return RuntimeError(f"{what}: {e}; {resume}")


def publish(src: Path, root: Path, tok, log: dict[str, Any] | None = None) -> dict[str, str]:
    """Copy the model folder `src` with the tokenizer (and the training log `log`, as
    `TRAINING_LOG`) into `root/<digest>`: {uri, digest}. Made in a temporary folder and renamed
    into place, so a run killed half-way leaves no half model; a folder with the same bytes
    already there is kept as it is, never overwritten. A folder of that name whose bytes are no
    longer those of its digest (changed after it was made: the runner makes the model again for
    exactly that) is moved aside, to `<name>.changed-<random>`, and replaced."""
    from .artifacts import TRAINING_LOG

    tmp = root / f".tmp-{uuid.uuid4().hex}"
    shutil.copytree(src, tmp)
    tok.save_pretrained(str(tmp))
    if log is not None:
        (tmp / TRAINING_LOG).write_text(json.dumps(log, indent=2) + "\n")
    digest = model_digest(tmp)
    final = root / digest.split(":")[1][:16]
    if final.exists() and model_digest(final) == digest:
        shutil.rmtree(tmp)
    else:
        if final.exists():  # kept for a person to look at, never served: its name no longer tells its bytes
            final.rename(root / f"{final.name}.changed-{uuid.uuid4().hex[:8]}")
        tmp.rename(final)
    return {"uri": final.resolve().as_uri(), "digest": digest}


# -- worker side ----------------------------------------------------------------------------------


class Worker:
    """One Ray Train worker's side of the plumbing: its rank, world and device, its seeds, and the
    progress events (rank 0 sends them: `started`, `stepped`, `ended`)."""

    def __init__(self, harness: Harness):
        import ray.train
        import ray.train.torch

        tc = ray.train.get_context()
        self.rank: int = tc.get_world_rank()
        self.world: int = tc.get_world_size()
        self.device = ray.train.torch.get_device()
        self.harness = harness
        self._started = self._last = time.monotonic()
        self._first_step = 0

    def seed(self, seed: int) -> None:
        """The same seed on every rank (the same initial weights: new heads, adapters) and the
        deterministic kernels where torch has them, so that a run is repeated bit for bit."""
        import numpy as np
        import torch

        # cuBLAS needs this set before its first use to be deterministic (torch says so otherwise).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.manual_seed(seed)
        np.random.seed(seed + self.rank)
        torch.use_deterministic_algorithms(True, warn_only=True)

    def _send(self, event: dict[str, Any]) -> None:
        if self.rank == 0:
            self.harness.progress.put(event)

    def started(self, step: int, resumed_from: int | None, **facts: Any) -> None:
        """The loop starts at `step` (resumed from a checkpoint of that step, or at 0); `facts`
        (parameters, precision...) go to the driver's `Progress.facts`."""
        self._started = self._last = time.monotonic()
        self._first_step = step
        self._send({"event": "start", "step": step, "resumed_from": resumed_from, "facts": facts})

    def stepped(self, step: int, loss: float, lr: float, tokens: float | None = None,
                **figures: Any) -> dict[str, Any]:
        """An optimizer step is done: its point of the loss curve (with the time), and to the
        driver the loss, the throughput and the time left, from this worker's own clock (the
        driver may be on another node). `figures` are shown beside them (epoch=...)."""
        now = time.monotonic()
        rate = (step - self._first_step) / max(now - self._started, 1e-9)
        point = {"step": step, "loss": loss, "lr": lr, **({"tokens": tokens} if tokens is not None else {}),
                 "unixTime": time.time()}
        self._send({"event": "step", "step": step, "loss": loss, "lr": lr, "figures": figures,
                    "tokens_per_second": tokens / max(now - self._last, 1e-9) if tokens is not None else None,
                    "eta": (self.harness.total_steps - step) / max(rate, 1e-9)})
        self._last = now
        return point

    def ended(self, **facts: Any) -> None:
        """The steps are done; `facts` (held-out metrics) go to the driver's `Progress.facts`."""
        self._send({"event": "end", "facts": facts})


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


def _step_of(path: str | Path) -> int:
    return int(Path(path).name.rsplit("-", 1)[1])


@dataclass(frozen=True)
class Position:
    """Where a restored checkpoint left the loop."""

    step: int
    """Optimizer steps taken."""
    curve: list[dict[str, Any]]
    """The loss curve up to `step`."""
    loop: dict[str, Any]
    """The rest of the loop's position, as it saved it (epoch, micro-batches consumed...)."""


@dataclass
class Checkpointer:
    """Restores and reports one worker's checkpoints. Rank 0 writes them; every rank joins (a
    report is a barrier, and every rank's random states go into the checkpoint). Only the
    trainable weights are kept (a LoRA's adapters, not the frozen base); the model's and the
    optimizer's state dicts are full ones, gathered for FSDP."""

    worker: Worker
    """This worker's rank, world and harness (where the checkpoints are)."""
    model: Any
    """The model as `prepare_model` returned it (DDP or FSDP wrapped)."""
    optimizer: Any
    """The optimizer over the trainable weights."""
    scheduler: Any
    """The learning rate's scheduler."""
    scaler: Any = None
    """The fp16 gradient scaler, if the loop has one."""
    generators: dict[str, Any] = field(default_factory=dict)
    """The loop's own torch Generators (an encoder's masking), by name: their states are kept
    per rank like torch's global one."""

    def restore(self) -> Position | None:
        """Load the newest checkpoint into the model, optimizer, scheduler, scaler and this rank's
        random states: the newer of the one Ray Train hands this worker (it restarted it after a
        failure) and the newest complete one in storage (the run was started again). None when
        there is none: the loop starts at step 0."""
        import ray.train
        import torch
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        checkpoint = ray.train.get_checkpoint()
        stored = latest_checkpoint(Path(self.worker.harness.checkpoints))
        if stored is not None and (checkpoint is None or _step_of(stored) > _step_of(checkpoint.path)):
            checkpoint = ray.train.Checkpoint.from_directory(str(stored))
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE, map_location="cpu", weights_only=True)
        # The frozen weights (a LoRA's base) are not in the checkpoint: they are the base model's,
        # loaded before. torch's strict check would count them missing under DDP; it stays on
        # where every weight is trained.
        strict = all(p.requires_grad for p in self.model.parameters())
        full = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=strict)
        set_model_state_dict(self.model, state["model"], options=full)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=full)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        mine = state["rng"][self.worker.rank % len(state["rng"])]
        torch.set_rng_state(mine["torch"])
        if mine.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])
        for name, gen in self.generators.items():
            gen.set_state(mine[name])
        return Position(step=int(state["step"]), curve=list(state["curve"]), loop=dict(state["loop"]))

    def save(self, step: int, curve: list[dict[str, Any]], loop: dict[str, Any], final: bool = False,
             write: Callable[[Path, dict[str, Any]], None] | None = None) -> None:
        """Report a checkpoint at `step` with the curve and the loop's position `loop`; `write`
        (rank 0 only: no collective in it) adds the models to its folder (`MODEL_DIR`...), given
        the folder and the model's full state dict (its trainable weights)."""
        import ray.train
        import torch
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        # Collectives (FSDP's gathering, the random states'): every rank, in the same order.
        full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        msd = get_model_state_dict(self.model, options=full)
        osd = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        rngs = self._random_states()
        metrics = {"step": step, "loss": curve[-1]["loss"] if curve else None, "final": final}
        if self.worker.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"model": msd, "optimizer": osd, "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                        "step": step, "curve": curve, "loop": loop, "rng": rngs}, Path(tmp) / STATE)
            (Path(tmp) / CURVE).write_text(json.dumps(curve))
            if write is not None:
                write(Path(tmp), msd)
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()}
            (Path(tmp) / MANIFEST).write_text(json.dumps(files))
            # Returns once the checkpoint is copied into storage (a synchronous upload).
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint-{step:08d}")
        fault = self.worker.harness.fault
        if fault is not None and fault[0] == step:
            _kill_once(fault[1])

    def _random_states(self) -> list[dict[str, Any]]:
        """Every rank's random states (torch's, CUDA's, the loop's generators'), so each resumes
        its own stream."""
        import torch
        import torch.distributed as dist

        mine = {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                **{name: gen.get_state() for name, gen in self.generators.items()}}
        if self.worker.world == 1:
            return [mine]
        gathered: list[Any] = [None] * self.worker.world
        dist.all_gather_object(gathered, mine)
        return gathered


def _kill_once(marker: str) -> None:
    """The `FAULT_ENV` hook: SIGKILL this worker, unless `marker` says it was done already."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
