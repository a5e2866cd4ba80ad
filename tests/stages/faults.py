"""Fault injection the stage tests share: a Ray Train worker killed right after a checkpoint.

The kill is the worker's own (`fmforge.stages.raytrain.FAULT_ENV`): rank 0 SIGKILLs itself as
soon as its report of the checkpoint of the given step has returned, that is once the checkpoint
is whole in storage, and only once. A thread that watched for the checkpoint's folder and killed
a worker when it appeared raced the copy into it: on a loaded machine the kill could land while
the files were still being copied, the restarted workers found no complete checkpoint and
started again from step 0 (no resumption recorded, though the run succeeded).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fmforge.stages.raytrain import FAULT_ENV


@contextlib.contextmanager
def worker_killed_after_checkpoint(step: int) -> Iterator[list[int]]:
    """Within the block, the first Ray Train run that reports a checkpoint of `step` has its
    rank-0 worker SIGKILLed right after; the list yielded holds the killed pid once the block
    is left (empty: no worker reached that checkpoint)."""
    killed: list[int] = []
    with tempfile.TemporaryDirectory(prefix="fmforge-fault-") as tmp:
        marker = Path(tmp) / "killed"
        os.environ[FAULT_ENV] = f"{step}:{marker}"
        try:
            yield killed
        finally:
            del os.environ[FAULT_ENV]
            if marker.exists():
                killed.append(int(marker.read_text()))
