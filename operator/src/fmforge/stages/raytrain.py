"""Ray Train plumbing shared by the stages that train (TrainingRun, TunedModel).

`scaling` turns a spec's `resources` into Ray Train's ScalingConfig; `fit` runs a TorchTrainer
in a thread while the driver reads the workers' progress events from a Ray queue (rank 0 puts
them there) and hands each one to the stage, so the reporter shows steps as they happen; the
queue's actor is removed whatever the outcome. Called by `fmforge.stages.train` and
`fmforge.stages.tune`.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any


def progress_queue():
    """The queue the workers' rank 0 reports progress on (an actor that holds no CPU)."""
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0})


def scaling(resources):
    """Ray Train's ScalingConfig for a spec's `resources` (RayResources)."""
    from ray.train import ScalingConfig

    gpus = resources.gpus_per_worker
    return ScalingConfig(num_workers=resources.workers, use_gpu=gpus > 0,
                         resources_per_worker={"CPU": resources.cpus_per_worker, **({"GPU": gpus} if gpus else {})})


def fit(trainer, progress, on_event: Callable[[dict[str, Any]], None]):
    """`trainer.fit()`, with every event the workers put on `progress` passed to `on_event` as it
    comes; returns Ray Train's Result and raises what fit raised."""
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
