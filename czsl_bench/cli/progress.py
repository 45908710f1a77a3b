"""rich progress bars on stderr for CLI commands (the library reports progress through callbacks; only the CLI draws).

Library code only sees the small reporter protocol of :mod:`czsl_bench.method`
(``progress.task(description, total)`` → ``advance()`` / ``update()``); this module draws it.
When stderr is not a terminal rich prints only the final frame, so logs stay clean. Nested
tasks (runs → epochs → batches, evaluation) each get a line with elapsed time and ETA; a task
disappears when it finishes, except the outermost.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


class _Task:
    def __init__(self, progress: Any, task_id: Any):
        self._progress = progress
        self._id = task_id

    def advance(self, n: int = 1) -> None:
        if n:
            self._progress.advance(self._id, n)

    def update(self, *, description: str | None = None, total: int | None = None) -> None:
        kwargs = {}
        if description is not None:
            kwargs["description"] = description
        if total is not None:
            kwargs["total"] = total
        self._progress.update(self._id, **kwargs)


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, *, description: str | None = None, total: int | None = None) -> None:
        pass


class RichProgress:
    """A reporter backed by one ``rich.progress.Progress`` on a stderr console."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress = None
        self._depth = 0
        self.console = None

    def __enter__(self) -> RichProgress:
        from rich.console import Console

        self.console = Console(stderr=True)
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        if self._progress is None:
            yield _NullTask()
            return
        indent = "  " * self._depth
        task_id = self._progress.add_task(indent + description, total=total)
        self._depth += 1
        try:
            yield _Task(self._progress, task_id)
        finally:
            self._depth -= 1
            if self._depth > 0:  # keep the outermost bar as the summary, drop inner ones
                self._progress.remove_task(task_id)

    def print(self, line: str) -> None:
        """A line on stdout that does not tear the bars on stderr."""
        import click

        if self._progress is not None:
            self._progress.console.file.flush()
        click.echo(line)
