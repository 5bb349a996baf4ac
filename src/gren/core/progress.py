"""Progress of long loops, for a terminal and for batch logs alike.

One helper, :func:`progress`, used by every long loop (prepare's stages, training, evaluation):

* when stderr is a terminal it shows a ``tqdm`` bar;
* otherwise (a batch job, a pipe, a log file) it writes a log line every ``interval`` seconds
  (default :data:`DEFAULT_INTERVAL_S` = 30, or ``$GREN_PROGRESS_INTERVAL``) and one at the end:
  ``prepare: 1200/2220 img (54%), 13.8 img/s, 1m14s left``.

Both go through the ``logging`` level of the logger passed in (``gren.core.progress`` by default): when
that logger does not emit INFO (``gren -q``), there is no bar and no line. ``-v`` / ``-vv`` need
nothing here (they only lower the level). ``$GREN_PROGRESS=bar|log|off`` forces a mode.

This is a ground-floor module: it imports only the standard library, ``tqdm`` and ``logging``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

DEFAULT_INTERVAL_S = 30.0
INTERVAL_ENV = "GREN_PROGRESS_INTERVAL"
MODE_ENV = "GREN_PROGRESS"

_log = logging.getLogger("gren.core.progress")


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1m15s"``, ``4000`` -> ``"1h06m"``, ``9.4`` -> ``"9s"``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _default_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Counts work done out of ``total`` and reports it as a bar or as periodic log lines.

    Use :func:`progress` to make one. ``update(n)`` adds ``n`` done units; ``close()`` (or leaving the
    ``with`` block) writes the final line. Iterating over it iterates over the wrapped iterable and
    counts one unit per item.
    """

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", *, interval: float | None = None, logger: logging.Logger | None = None,
                 mode: str | None = None, disable: bool = False, clock=time.monotonic):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.desc, self.unit = desc, unit
        self.logger = logger or _log
        self.interval = _default_interval() if interval is None else float(interval)
        self._clock = clock
        self.n = 0
        self._start = clock()
        self._last = self._start
        self._closed = False
        self._bar = None
        self.postfix = ""
        mode = mode or os.environ.get(MODE_ENV) or ("bar" if _is_terminal(sys.stderr) else "log")
        if disable or mode == "off" or not self.logger.isEnabledFor(logging.INFO):
            mode = "off"
        self.mode = mode
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("progress() was not given an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Add ``n`` finished units; logs a line when ``interval`` seconds passed since the last one."""
        self.n += int(n)
        if self._bar is not None:
            self._bar.update(int(n))
        elif self.mode == "log":
            now = self._clock()
            if now - self._last >= self.interval:
                self._last = now
                self.logger.info("%s", self.line(now))

    def set_postfix(self, values: dict[str, Any]) -> None:
        """Show ``key value`` pairs after the counts (e.g. the running mean losses)."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def line(self, now: float | None = None) -> str:
        """``desc: done/total unit (pct), rate unit/s, time left`` (no total: done and rate only)."""
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = self.n / elapsed
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            text = f"{head}{self.n}/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%)"
        else:
            text = f"{head}{self.n} {self.unit}"
        text += f", {rate:.3g} {self.unit}/s"
        if self._closed:
            text += f", done in {format_duration(elapsed)}"
        elif self.total and rate > 0:
            text += f", {format_duration((self.total - self.n) / rate)} left"
        return text + (f"; {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        """Finish: close the bar, or log the final line (once)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "log":
            self.logger.info("%s", self.line())


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
             **kwargs: Any) -> Progress:
    """A :class:`Progress` over ``iterable`` (iterate it) or over ``total`` units (call ``update``).

    ``interval`` (seconds between log lines, default ``$GREN_PROGRESS_INTERVAL`` or 30), ``logger``
    (whose INFO level decides whether anything is shown), ``mode`` (``bar``, ``log``, ``off``; default
    ``$GREN_PROGRESS``, else ``bar`` when stderr is a terminal and ``log`` otherwise), ``disable``.
    """
    return Progress(iterable, total, desc, unit, **kwargs)
