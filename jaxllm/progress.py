"""A progress line per interval for work that can take minutes (multiple-choice scoring, perplexity, DPO
reference log-probs, data clean and prepare, tokenizer training); counts, percent, rate and
time left, through `logging` so tests and library users stay quiet unless they ask for INFO. Standard library
only, so every room (data, tokenizer, eval, objectives) can use it."""
from __future__ import annotations

import logging
import time


class ProgressLog:
    """`update(done)` logs "<what>: done/total unit (pct%), rate/s, eta Ns" at most every `interval_s`
    seconds; `finish()` logs the total and the mean rate once. The first interval includes compilation,
    so early rates are low and early ETAs long."""

    def __init__(self, what: str, total: int, unit: str, *, interval_s: float = 10.0,
                 logger: logging.Logger | None = None, clock=time.monotonic):
        self.what, self.total, self.unit, self.interval_s = what, total, unit, interval_s
        self.log, self.clock = logger or logging.getLogger(__name__), clock
        self.start = self.last = clock()
        self.done = 0

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if now - self.last < self.interval_s or done >= self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        self.log.info("%s: %d/%d %s (%.1f%%), %.1f/s, eta %.0fs", self.what, done, self.total, self.unit,
                      100 * done / max(self.total, 1), rate, eta)

    def finish(self) -> float:
        """Logs the summary line; returns the elapsed seconds."""
        elapsed = self.clock() - self.start
        self.log.info("%s: %d %s in %.1fs (%.1f/s)", self.what, self.done, self.unit, elapsed,
                      self.done / max(elapsed, 1e-9))
        return elapsed
