"""Progress reporting with rate and ETA, for a terminal or a log file.

Owns: `ProgressBar`. On a terminal it draws a rich bar (description, count, rate, ETA, extra fields such as
the loss); elsewhere (CI, `nohup`, a log) it logs one plain line (logger `diffseg_engine.core.progress`, level INFO,
so `-q` silences it) at most every `log_every` seconds, or writes it to `stream` when one is given.
Imports: rich (lazily). Never torch.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

log = logging.getLogger(__name__)


def _fmt_seconds(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class ProgressBar:
    """`with ProgressBar(total, "sampling") as bar: bar.advance(n, loss=0.1)`."""

    def __init__(self, total: int, description: str, *, unit: str = "it", quiet: bool = False,
                 stream: TextIO | None = None, log_every: float = 10.0, initial: int = 0):
        self.total, self.description, self.unit, self.quiet = int(total), description, unit, quiet
        self._explicit_stream = stream
        self.stream = stream or sys.stderr
        self.log_every = log_every
        self.done = int(initial)
        self._initial = int(initial)
        self.fields: dict[str, Any] = {}
        self._t0 = time.monotonic()
        self._last_log = 0.0
        self._rich = None
        self._task = None

    # ---- context -------------------------------------------------------------------------------------
    def __enter__(self) -> "ProgressBar":
        self._t0 = time.monotonic()
        if not self.quiet and getattr(self.stream, "isatty", lambda: False)():
            try:
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                           TimeElapsedColumn, TimeRemainingColumn)
                self._rich = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                      TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[extra]}"),
                                      console=Console(file=self.stream), transient=False)
                self._rich.start()
                self._task = self._rich.add_task(self.description, total=self.total, completed=self.done,
                                                 rate="", extra="")
            except ImportError:
                self._rich = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif not self.quiet:
            self._log(final=True)

    # ---- state ---------------------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        dt = time.monotonic() - self._t0
        return (self.done - self._initial) / dt if dt > 0 else 0.0

    @property
    def eta_seconds(self) -> float:
        r = self.rate
        return (self.total - self.done) / r if r > 0 else float("inf")

    def set_total(self, total: int) -> None:
        """A new total (work that turned out shorter or longer than planned)."""
        self.total = int(total)
        if self._rich is not None:
            self._rich.update(self._task, total=self.total)

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        if self.quiet:
            return
        if self._rich is not None:
            extra = "  ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())
            self._rich.update(self._task, completed=self.done, rate=f"{self.rate:.2f} {self.unit}/s", extra=extra)
        elif time.monotonic() - self._last_log >= self.log_every:
            self._log()

    def _log(self, final: bool = False) -> None:
        self._last_log = time.monotonic()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        extra = "  ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())
        elapsed = _fmt_seconds(time.monotonic() - self._t0)
        eta = "done" if final or self.done >= self.total else f"ETA {_fmt_seconds(self.eta_seconds)}"
        line = (f"{self.description}: {self.done}/{self.total} ({pct:5.1f}%) {self.rate:.2f} {self.unit}/s "
                f"elapsed {elapsed} {eta}  {extra}").rstrip()
        if self._explicit_stream is not None:
            self._explicit_stream.write(line + "\n")
            self._explicit_stream.flush()
        else:
            log.info(line)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
