"""Workdirs and prepared data in an object store: a real S3 server (moto's) on 127.0.0.1, reached as a user reaches
MinIO, through AWS_ENDPOINT_URL (conftest.s3_endpoint). Checkpoints go through Orbax and TensorStore's s3 driver,
everything else through etils.epath and s3fs; nothing is stubbed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from etils import epath

from jaxllm.cli import main as jaxllm_main

pytest.importorskip("s3fs")
REPO = Path(__file__).resolve().parents[1]


def train_args(workdir, source, tokenizer, steps: int, *extra) -> list[str]:
    return ["train", "--config=pretrain:model=tiny", f"--config.workdir={workdir}", f"--config.data.sources={source}",
            f"--config.tokenizer={tokenizer}", "--config.data.seq_len=32", "--config.train.batch_size=2",
            f"--config.train.steps={steps}", "--config.train.save_every=2", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.async_checkpointing=false", *extra]


def strict_rows(text: str) -> list[dict]:
    """metrics.jsonl as a strict JSON reader sees it (bare NaN is an error)."""
    def reject(name):
        raise ValueError(f"bare {name} is not JSON")
    return [json.loads(line, parse_constant=reject) for line in text.splitlines() if line.strip()]


def losses(text: str) -> dict[int, float]:
    rows = [r for r in strict_rows(text) if "train/loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["train/loss"] for r in rows}


def committed_steps(checkpoints: epath.Path) -> list[int]:
    if not checkpoints.exists():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def test_run_in_a_bucket_stopped_and_resumed_gives_the_uninterrupted_losses(s3_bucket, english_corpus, tokenizer_path,
                                                                            tmp_path):
    """`jaxllm train` with its workdir in the bucket, stopped by SIGTERM (a pre-empted pod) after its first
    checkpoint, then resumed: every output is in the bucket, metrics.jsonl has one strict-JSON row per step, and
    the losses are those of the same run never stopped (a local workdir). `eval ppl` then reads the checkpoint
    from the bucket and scores as it does from the local copy, writing its report into the bucket."""
    steps = 12
    run = f"{s3_bucket}/runs/tiny"
    args = train_args(run, english_corpus, tokenizer_path, steps)
    proc = subprocess.Popen([sys.executable, "-m", "jaxllm", *args], cwd=REPO, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = epath.Path(run) / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not committed_steps(checkpoints) and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = committed_steps(checkpoints)[-1]
    assert "SIGTERM received" in err and stopped < steps, err[-2000:]

    assert jaxllm_main(args) == 0                                        # resumes from the bucket
    assert jaxllm_main(train_args(tmp_path / "local", english_corpus, tokenizer_path, steps)) == 0

    root = epath.Path(run)
    resumed = losses((root / "metrics.jsonl").read_text())
    assert sorted(resumed) == list(range(1, steps + 1))
    assert resumed == losses((tmp_path / "local" / "metrics.jsonl").read_text())
    assert committed_steps(checkpoints)[-1] == steps
    assert (root / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()
    saved = {k: v for k, v in json.loads((root / "config.json").read_text()).items() if k != "workdir"}
    assert saved == {k: v for k, v in json.loads((tmp_path / "local" / "config.json").read_text()).items()
                     if k != "workdir"}
    assert (root / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = [p.name for p in (root / "tensorboard").iterdir()]
    assert len(events) == 2 and all(n.startswith("events.out.tfevents") for n in events)   # one per process run

    # eval ppl: the model read from the bucket scores the text as the local copy does
    reports = {}
    for where in (run, str(tmp_path / "local")):
        assert jaxllm_main(["eval", "ppl", f"--checkpoint={where}", f"--text={english_corpus}", "--max_chars=4000",
                            "--window=32"]) == 0
        reports[where] = json.loads((epath.Path(where) / "eval" / "ppl.json").read_text())
    assert reports[run] == reports[str(tmp_path / "local")]


def test_prepared_data_in_a_bucket_trains_as_the_local_copy(s3_bucket, english_corpus, tokenizer_path, tmp_path,
                                                            monkeypatch):
    """`jaxllm data prepare --out=s3://...` uploads the ArrayRecord shards and prepared.json; a run whose source is
    that URL reads them (through a local copy: ArrayRecord reads local files) and trains exactly as from the
    directory prepared locally."""
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "cache"))
    url = f"{s3_bucket}/prepared/pydoc"
    for out in (url, str(tmp_path / "prepared")):
        assert jaxllm_main(["data", "prepare", f"--input={english_corpus}", f"--tokenizer={tokenizer_path}",
                            f"--out={out}", "--workers=1"]) == 0
    remote, local = epath.Path(url), tmp_path / "prepared"
    manifest = json.loads((remote / "prepared.json").read_text())
    assert manifest["documents"] > 1000
    for shard in manifest["shards"]:
        assert (remote / shard["file"]).read_bytes() == (local / shard["file"]).read_bytes()

    for name, source in (("bucket", url), ("local", local)):
        assert jaxllm_main(train_args(tmp_path / name, source, tokenizer_path, 3)) == 0
    assert losses((tmp_path / "bucket" / "metrics.jsonl").read_text()) == \
        losses((tmp_path / "local" / "metrics.jsonl").read_text())
