"""The serving engine: one thread owns the model and batches the requests that are waiting, so concurrent
clients share each decode step (used by server.py)."""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import Counter

from jaxllm.model.generate import Completion, generate, score_tokens

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Job:
    """One request's rows. The engine puts events on `events`: ("token", row, text, n_tokens, finish_reason)
    while generating, then ("done", results) or ("error", exception)."""
    kind: str                                   # "generate" | "score"
    rows: list                                  # generate: [(ids, SamplingParams)]; score: [ids]
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)

    def result(self, timeout: float = 600.0):
        """Blocks until the job's result (skipping stream events); raises the engine's error."""
        while True:
            kind, *payload = self.events.get(timeout=timeout)
            if kind == "done":
                return payload[0]
            if kind == "error":
                raise payload[0]


class Engine:
    def __init__(self, params, cfg, tokenizer, max_batch: int = 8, max_wait_s: float = 0.005):
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.stats = Counter()                  # batches, rows, max_rows: read by tests and logs
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="jaxllm-engine", daemon=True)
        self._thread.start()

    def submit(self, kind: str, rows: list) -> Job:
        job = Job(kind, rows)
        self._queue.put(job)
        return job

    def close(self, timeout: float = 60.0) -> None:
        """Stops the engine after the batch it is running. Joining matters: a daemon thread still inside XLA
        when the interpreter exits aborts the process."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch, deadline = [job], time.monotonic() + self.max_wait_s
            while sum(len(j.rows) for j in batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            for j in [j for j in batch if j.kind == "score"]:
                self._run(lambda j=j: [j.events.put(("done", score_tokens(self.params, self.cfg, j.rows)))], [j])
            gen_jobs = [j for j in batch if j.kind == "generate"]
            if gen_jobs:
                self._run(lambda: self._generate(gen_jobs), gen_jobs)

    def _run(self, fn, jobs) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a failed batch answers its requests with 500s; the engine lives on
            log.exception("engine batch failed")
            for j in jobs:
                j.events.put(("error", e))

    def _generate(self, jobs: list[Job]) -> None:
        owners = [(j, i) for j in jobs for i in range(len(j.rows))]
        prompts = [j.rows[i][0] for j, i in owners]
        sampling = [j.rows[i][1] for j, i in owners]
        self.stats["batches"] += 1
        self.stats["rows"] += len(owners)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(owners))

        def on_token(row: int, c: Completion) -> None:
            job, local = owners[row]
            job.events.put(("token", local, c.text, len(c.tokens), c.finish_reason))

        results = generate(self.params, self.cfg, prompts, sampling, tokenizer=self.tokenizer, on_token=on_token)
        for j in jobs:
            j.events.put(("done", [results[k] for k, (owner, _) in enumerate(owners) if owner is j]))
