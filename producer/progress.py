"""Progress of a batch on a terminal: a one-line bar redrawn in place, or plain lines when piped.

Dependency-free on purpose: the producer installs light. The ETA comes from the rate observed while
watching, since jobs finished before we started tell us nothing about the current fleet.
"""
from __future__ import annotations

import shutil
import sys
import time

# Piped output gets a line only when something changed, and at most this often, so logs stay short.
QUIET_EVERY_S = 10.0


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class RateEstimator:
    """Finished jobs per second since the first observation; ETA of the rest."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.start: tuple[float, int] | None = None

    def eta_s(self, finished: int, total: int) -> float | None:
        now = self.clock()
        if self.start is None:
            self.start = (now, finished)
            return None
        elapsed_s, progressed = now - self.start[0], finished - self.start[1]
        if progressed <= 0 or elapsed_s <= 0:
            return None
        return (total - finished) / (progressed / elapsed_s)


class Progress:
    """Call with each batch status; `close()` ends the bar's line."""

    def __init__(self, stream=None, tty: bool | None = None, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.rate = RateEstimator(clock)
        self._last_line = ""
        self._last_quiet_at = None
        self._drawn = False

    def __call__(self, status: dict) -> None:
        total = status["total"]
        finished = status["done"] + status["failed"] + status["cancelled"]
        eta_s = self.rate.eta_s(finished, total)
        counts = f"{status['done']} done, {status['failed']} failed"
        if status.get("cancelled"):
            counts += f", {status['cancelled']} cancelled"
        counts += f", {status['running']} running"
        if status.get("waiting_for_worker"):
            counts += f", {status['waiting_for_worker']} waiting for a worker"
        if self.tty:
            self._draw(finished, total, f"{finished}/{total} {counts} ETA {format_duration(eta_s)}")
        else:
            self._quiet(f"{status['batch_id']}: {finished}/{total} ({counts})", status.get("finished", False))

    def _draw(self, finished: int, total: int, text: str) -> None:
        columns = shutil.get_terminal_size((80, 20)).columns
        width = max(10, min(40, columns - len(text) - 4))
        filled = width if total <= 0 else int(width * finished / total)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {text}"[:columns - 1]
        # Pad over the previous line's tail: a shorter line must not leave its ghost behind.
        self.stream.write("\r" + line.ljust(len(self._last_line)))
        self.stream.flush()
        self._last_line = line
        self._drawn = True

    def _quiet(self, line: str, final: bool) -> None:
        now = self.clock()
        due = self._last_quiet_at is None or now - self._last_quiet_at >= QUIET_EVERY_S
        if line != self._last_line and (due or final):
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_line, self._last_quiet_at = line, now

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class CountBar:
    """A bar for a counted operation (validating a file's lines, downloading a batch's files).

    Drawn only on a terminal, and only once the operation is big enough to be worth watching;
    piped output stays as it was."""

    MIN_TOTAL = 200
    REDRAW_EVERY = 0.1  # of the total

    def __init__(self, label: str, stream=None, tty: bool | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total = 0
        self.count = 0
        self._drawn_at = -1

    def __call__(self, count: int, total: int) -> None:
        self.count, self.total = count, total
        if not self.tty or total < self.MIN_TOTAL:
            return
        step = max(1, int(total * self.REDRAW_EVERY))
        if count - self._drawn_at < step and count != total:
            return
        self._drawn_at = count
        width = 30
        filled = int(width * count / total)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {count}/{total}")
        self.stream.flush()

    def close(self) -> None:
        if self._drawn_at >= 0:
            self.stream.write("\n")
            self.stream.flush()
