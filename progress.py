"""Progress of long work (a run's weight steps, a batch's runs): a bar on a terminal, a line now
and then anywhere else, so that no command sits silent for minutes."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm import tqdm

PROGRESS_EVERY = 30.0      # seconds between progress lines off a terminal
BAR_STATUS_EVERY = 0.5     # seconds between updates of the status beside a terminal's bar


def duration(seconds: float) -> str:
    """A time span as people say it: 40 s, 12 min, 3.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def rate(per_second: float, unit: str) -> str:
    """12 steps/s, or 4.5 s/step below one a second (never '0 steps/s')."""
    if per_second >= 1:
        return f"{per_second:.3g} {unit}s/s"
    return f"{1 / per_second:.3g} s/{unit}" if per_second > 0 else ""


class Progress:
    """Progress of long work: a tqdm bar on a terminal; elsewhere (a log file, nohup, a cluster
    job) one line on stderr at most every `every` seconds, saying how far the work is, how fast it
    goes and when it should end. `tick` between updates keeps lines coming when units take long.
    The status text comes from a callable, called only when shown: not at every step."""

    def __init__(self, total: int, initial: int, name: str, unit: str, every: float | None = None,
                 enabled: bool = True):
        self.total, self.done, self.first = total, initial, initial
        self.name, self.unit = name, unit
        self.status: Callable[[], str] = str
        self.every = PROGRESS_EVERY if every is None else every
        self.terminal = enabled and sys.stderr.isatty()
        self.lines = enabled and not self.terminal
        self.bar = tqdm(total=total, initial=initial, unit=unit, disable=not self.terminal, dynamic_ncols=True)
        self.start = self.last_line = self.last_status = time.monotonic()

    def update(self, done: int, status: Callable[[], str] | None = None) -> None:
        self.done += done
        self.status = status or self.status
        self.bar.update(done)
        self.tick()

    def tick(self) -> None:
        now = time.monotonic()
        if self.terminal and now - self.last_status >= BAR_STATUS_EVERY:
            self.last_status = now
            self.bar.set_postfix_str(self.status(), refresh=False)
        if self.lines and now - self.last_line >= self.every:
            self.last_line = now
            self.write(self.line(now))

    def line(self, now: float) -> str:
        per_second = (self.done - self.first) / max(now - self.start, 1e-9)
        to_go = f"{duration((self.total - self.done) / per_second)} to go" if per_second > 0 else ""
        parts = (f"{self.name}: {self.unit} {self.done}/{self.total}", self.status(), rate(per_second, self.unit),
                 to_go)
        return "  ".join(part for part in parts if part)

    def write(self, text: str) -> None:
        """A line of news (under the bar on a terminal); nothing when progress is not shown."""
        if self.terminal:
            self.bar.write(text, file=sys.stderr)
        elif self.lines:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
