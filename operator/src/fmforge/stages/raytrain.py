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
