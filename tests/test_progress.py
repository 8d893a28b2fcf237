"""The progress line of long evaluations: at most one per interval, with counts, rate and time left, then a
summary; through logging, so tests and library users see nothing unless they ask for INFO."""
from __future__ import annotations

import logging

from jaxllm.progress import ProgressLog


def test_one_line_per_interval_with_counts_rate_and_eta(caplog):
    now = [0.0]
    progress = ProgressLog("multiple choice", 100, "questions", interval_s=10, clock=lambda: now[0],
                           logger=logging.getLogger("test.progress"))
    with caplog.at_level(logging.INFO, logger="test.progress"):
        for done in range(10, 101, 10):
            now[0] += 4.0                                  # 10 questions every 4 s: lines at 12 s, 24 s, 36 s
            progress.update(done)
        progress.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["multiple choice: 30/100 questions (30.0%), 2.5/s, eta 28s",
                         "multiple choice: 60/100 questions (60.0%), 2.5/s, eta 16s",
                         "multiple choice: 90/100 questions (90.0%), 2.5/s, eta 4s"]
    assert lines[3:] == ["multiple choice: 100 questions in 40.0s (2.5/s)"]
