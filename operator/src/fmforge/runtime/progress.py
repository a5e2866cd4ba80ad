"""Progress output of the local runner and its stages.

On a terminal: rich progress bars and coloured status lines. Elsewhere (CI, pipes, log files):
plain, timestamp-free lines that grep well. Stages see only the `Reporter` protocol of
`fmforge.stages.base`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


def _fields(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)


class ConsoleReporter:
    """A Reporter for one object: rich bars on a terminal, plain lines otherwise."""

    def __init__(self, obj: str, stream: TextIO | None = None, rich: bool | None = None):
        self.obj = obj
        self.stream = stream or sys.stderr
        self.rich = self.stream.isatty() if rich is None else rich
        self.console = Console(file=self.stream, force_terminal=self.rich or None, highlight=False)
        self._progress: Progress | None = None
        self._task: Any = None
        self._step: str | None = None
        self._step_started = 0.0
        self._done = 0
        self._total: int | None = None
        self._last_line = 0.0

    # -- Reporter ----------------------------------------------------------------------------
    def step(self, name: str, total: int | None = None) -> None:
        self._finish_step()
        self._step, self._total, self._done = name, total, 0
        self._step_started = time.monotonic()
        if self.rich:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn(f"[bold]{self.obj}[/] {{task.description}}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[figures]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(name, total=total, figures="")
        else:
            self._plain(f"{name}: started" + (f" ({total} in all)" if total else ""))

    def advance(self, amount: int = 1, **figures: Any) -> None:
        self._done += amount
        if self._progress is not None:
            self._progress.update(self._task, advance=amount, figures=_fields(figures))
        elif time.monotonic() - self._last_line > 5.0:
            # Plain output is for logs: one line every few seconds, not one per unit.
            total = f"/{self._total}" if self._total else ""
            self._plain(f"{self._step}: {self._done}{total} {_fields(figures)}".rstrip())

    def log(self, message: str, **fields: Any) -> None:
        self._plain(f"{message} {_fields(fields)}".rstrip())

    # -- runner side -------------------------------------------------------------------------
    def close(self) -> None:
        self._finish_step()

    def _finish_step(self) -> None:
        if self._step is None:
            return
        took = time.monotonic() - self._step_started
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._plain(f"{self._step}: done in {took:.1f}s" + (f" ({self._done})" if self._done else ""))
        self._step = None

    def _plain(self, text: str) -> None:
        self._last_line = time.monotonic()
        if self.rich:
            self.console.print(f"[bold]{self.obj}[/] {text}")
        else:
            print(f"{self.obj}: {text}", file=self.stream, flush=True)


class RunConsole:
    """Status lines of the runner itself (started, skipped, succeeded, failed)."""

    STYLES = {"Succeeded": "green", "Skipped": "cyan", "Failed": "bold red", "Waiting": "yellow", "Running": "blue"}

    def __init__(self, stream: TextIO | None = None, rich: bool | None = None):
        self.stream = stream or sys.stderr
        self.rich = self.stream.isatty() if rich is None else rich
        self.console = Console(file=self.stream, force_terminal=self.rich or None, highlight=False)

    def status(self, obj: str, word: str, message: str = "") -> None:
        if self.rich:
            style = self.STYLES.get(word, "")
            self.console.print(f"[bold]{obj}[/] [{style}]{word}[/]" + (f": {message}" if message else ""))
        else:
            print(f"{obj}: {word}" + (f": {message}" if message else ""), file=self.stream, flush=True)

    def reporter(self, obj: str) -> ConsoleReporter:
        return ConsoleReporter(obj, self.stream, self.rich)
