"""The work queue: reconciles run by key, one at a time per object, retried by error type.

Watch events only add keys; a key added while queued is queued once, and a key added while its
reconcile runs is run again right after (so the last event is never lost). The handler's errors
carry their retry semantics in their type, as kopf's do: `kopf.PermanentError` is not retried
(the object waits for a change from its user), `kopf.TemporaryError` is retried after its
`delay`, anything else with exponential backoff. A handler returns the seconds after which the
key should be reconciled again (the safety-net resync), or None.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable

import kopf

log = logging.getLogger("fmforge.queue")

Handler = Callable[[Hashable], Awaitable[float | None]]


class WorkQueue:
    """Keys to reconcile and the workers that reconcile them."""

    def __init__(self, handler: Handler, workers: int = 32, max_backoff: float = 60.0):
        self.handler = handler
        self.workers = workers
        self.max_backoff = max_backoff
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._queued: set[Hashable] = set()
        self._running: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._failures: dict[Hashable, int] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task] = []

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: Hashable, after: float = 0.0) -> None:
        """Reconcile `key` now (after=0) or in `after` seconds (the earliest request wins)."""
        if after > 0:
            loop = asyncio.get_running_loop()
            due = loop.time() + after
            old = self._timers.get(key)
            if old is not None and old.when() <= due:
                return
            if old is not None:
                old.cancel()
            self._timers[key] = loop.call_at(due, self._fire, key)
            return
        if key in self._running:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"fmforge-worker-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        for t in self._timers.values():
            t.cancel()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._running.add(key)
            try:
                again = await self._run(key)
            finally:
                self._running.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self.add(key)
            elif again is not None:
                self.add(key, again)

    async def _run(self, key: Hashable) -> float | None:
        try:
            again = await self.handler(key)
        except kopf.PermanentError as e:
            self._failures.pop(key, None)
            log.warning("Stopped reconciling %s until it changes: %s", "/".join(map(str, key)), e)
            return None
        except kopf.TemporaryError as e:
            n = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(self.max_backoff, (e.delay or 1.0) * (2 ** min(n - 1, 8)))
            log.info("Postponed %s by %.1fs: %s", "/".join(map(str, key)), delay, e)
            return delay
        except Exception:  # noqa: BLE001 - a bug in one reconcile must not stop the others
            n = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(self.max_backoff, 0.5 * (2 ** min(n, 10)))
            log.exception("Failed to reconcile %s; retrying in %.1fs", "/".join(map(str, key)), delay)
            return delay
        self._failures.pop(key, None)
        return again
