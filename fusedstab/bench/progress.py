"""Progress of a run: one line per stage and per timed row, an ETA, and never a long silence.

On a terminal a bar stays on the last line (rows done, elapsed, ETA, the row being timed) and is
redrawn every half second, so a long ``torch.compile`` warm-up shows its seconds ticking. Into a
file or a pipe (CI logs) there is no bar; instead a "still running" line follows every
``quiet_s`` seconds without output. No dependency: a few dozen lines of this file.
"""
from __future__ import annotations

import sys
import threading
import time


def duration(s: float) -> str:
    """12.3 -> "12 s", 95 -> "1:35", 3725 -> "1:02:05"."""
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    return (f"{h}:" if h else "") + (f"{rest // 60:02d}" if h else f"{rest // 60}") + f":{rest % 60:02d}"


class Progress:
    """``log(msg)``: a line; ``begin(label, slow)``: a row starts (``slow``: a torch.compile warm-up
    row, whose time is estimated apart); ``end()``: it is done; ``close()``: stop the ticker."""

    def __init__(self, total: int = 0, stream=None, tty: bool | None = None, quiet_s: float = 15.0,
                 slow_s: float = 3.0, row_s: float = 0.2):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total, self.quiet_s = total, quiet_s
        self.prior = {True: slow_s, False: row_s}  # seconds a row takes before any has been timed
        self.spent = {True: 0.0, False: 0.0}
        self.done = {True: 0, False: 0}
        self.left = {True: 0, False: 0}
        self.start = self.last_out = time.monotonic()
        self.label, self.row_start, self.slow = "", None, False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    # ------------------------------------------------------------------ rows
    def plan(self, slow: int, fast: int) -> None:
        """How many rows are left of each kind (compile warm-up rows, the rest)."""
        self.left = {True: slow, False: fast}
        self.total = slow + fast
        if self._thread is None:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()

    def begin(self, label: str, slow: bool = False) -> None:
        with self._lock:
            self.label, self.slow, self.row_start = label, slow, time.monotonic()
            self._draw()

    def end(self, line: str | None = None) -> None:
        with self._lock:
            if self.row_start is not None:
                self.spent[self.slow] += time.monotonic() - self.row_start
                self.done[self.slow] += 1
                self.left[self.slow] = max(0, self.left[self.slow] - 1)
            self.row_start = None
        if line:
            self.log(line)

    @property
    def count(self) -> int:
        return self.done[True] + self.done[False]

    def eta(self) -> float:
        """Seconds left: rows left of each kind times that kind's mean so far (the prior before any)."""
        left = 0.0
        for kind in (True, False):
            mean = self.spent[kind] / self.done[kind] if self.done[kind] else self.prior[kind]
            left += self.left[kind] * mean
        if self.row_start is not None:  # the row under way: what is left of its expected time
            mean = self.spent[self.slow] / self.done[self.slow] if self.done[self.slow] else self.prior[self.slow]
            left -= min(time.monotonic() - self.row_start, mean)
        return max(0.0, left)

    # ------------------------------------------------------------------ output
    def log(self, msg: str) -> None:
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K")
            self.stream.write(msg + "\n")
            self.last_out = time.monotonic()
            self._draw()

    def _bar(self) -> str:
        n, total = self.count, max(self.total, 1)
        width = 20
        fill = int(width * n / total)
        now = time.monotonic()
        row = "" if self.row_start is None else f" | {self.label} ({duration(now - self.row_start)})"
        return (f"[{'#' * fill}{'.' * (width - fill)}] {n}/{self.total} {duration(now - self.start)}"
                f" elapsed, ~{duration(self.eta())} left{row}")

    def _draw(self) -> None:  # under the lock
        if self.tty and self.total:
            line = self._bar()
            cols = 160
            try:
                import shutil

                cols = shutil.get_terminal_size((160, 24)).columns
            except Exception:
                pass
            self.stream.write("\r\033[K" + line[: max(20, cols - 1)])
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                if self.tty:
                    self._draw()
                elif self.row_start is not None and time.monotonic() - self.last_out > self.quiet_s:
                    now = time.monotonic()
                    self.stream.write(f"  ... still timing {self.label}: {duration(now - self.row_start)} so far; "
                                      f"{self.count}/{self.total} rows done, ~{duration(self.eta())} left\n")
                    self.stream.flush()
                    self.last_out = now

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K")
                self.stream.flush()
